"""The top floor: CLI, manifest, workspace, resumable per-slide runner, stage commands."""
