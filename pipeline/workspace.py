"""The workspace: one object that owns every output path, plus tags and fingerprints.

    <ws>/segment/<seg_tag>/coords/<slide_id>.h5
    <ws>/segment/<seg_tag>/previews/<slide_id>.png
    <ws>/segment/<seg_tag>/status.csv     (rebuilt from .records/<slide_id>.json; .locks/ hold claims)
    <ws>/features/<backbone_tag>/<seg_tag>/<slide_id>.h5
    <ws>/features/<backbone_tag>/<seg_tag>/status.csv
    <ws>/experiments/<name>/fold_<k>/{last.pt,best.pt,history.csv}
    <ws>/experiments/<name>/evaluation/{metrics.json,predictions.csv,heatmaps/}
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from extract.errors import ConfigError

_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")


def fingerprint(params: dict) -> str:
    """A short, stable digest of the parameters that made an output (key order ignored)."""
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def seg_tag(target_mpp: float | None, patch_px: int, patch_level: int | None = None,
            step_px: int | None = None, preset: str | None = None) -> str:
    """Name a tiling: ``mpp0.50_256px`` (magnification mode) or ``level0_256px`` (CLAM mode)."""
    base = f"level{patch_level}_{patch_px}px" if patch_level is not None else f"mpp{target_mpp:.2f}_{patch_px}px"
    if step_px is not None and step_px != patch_px:
        base += f"_step{step_px}"
    if preset and preset != "default":
        base += f"_{preset}"
    return base


def check_tag(tag: str, what: str) -> str:
    if not _TAG.match(tag):
        raise ConfigError(
            f"The '{what}' must use only letters, digits, '.', '_' and '-'. Got {tag!r} instead."
        )
    return tag


class Workspace:
    """All paths of one workspace folder. Creates folders lazily, never deletes."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    # segment
    def segment_dir(self, tag: str) -> Path:
        return self.root / "segment" / check_tag(tag, "segmentation tag")

    def coords_path(self, tag: str, slide_id: str) -> Path:
        return self.segment_dir(tag) / "coords" / f"{slide_id}.h5"

    def preview_path(self, tag: str, slide_id: str) -> Path:
        return self.segment_dir(tag) / "previews" / f"{slide_id}.png"

    def tissue_geojson_path(self, tag: str, slide_id: str) -> Path:
        """Tissue contours and holes for QuPath; the removed ink beside it as ``<id>.ink.geojson``."""
        return self.segment_dir(tag) / "geojson" / f"{slide_id}.geojson"

    def segment_tags(self) -> list[str]:
        base = self.root / "segment"
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    # extract
    def features_dir(self, backbone_tag: str, tag: str) -> Path:
        return self.root / "features" / check_tag(backbone_tag, "backbone tag") / check_tag(tag, "segmentation tag")

    def bag_path(self, backbone_tag: str, tag: str, slide_id: str) -> Path:
        return self.features_dir(backbone_tag, tag) / f"{slide_id}.h5"

    # train / evaluate
    def experiment_dir(self, name: str) -> Path:
        return self.root / "experiments" / check_tag(name, "experiment name")

    def fold_dir(self, name: str, fold: int, seed: int | None = None) -> Path:
        sub = f"fold_{fold}" if seed is None else f"seed_{seed}/fold_{fold}"
        return self.experiment_dir(name) / sub

    def evaluation_dir(self, name: str) -> Path:
        return self.experiment_dir(name) / "evaluation"
