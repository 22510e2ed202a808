"""``wsi-pipeline run``: segment -> extract -> train -> evaluate from one YAML config.

Each step is resumable on its own, so killing ``run`` anywhere and starting it again continues
where it stopped: finished slides are skipped, training resumes from ``last.pt`` and finished
folds are skipped; evaluation is recomputed (it is cheap).
"""

from __future__ import annotations

import logging
from pathlib import Path

from extract.errors import ConfigError

from .config import resolve_stage
from .logging_setup import attach_run_log
from .manifest import load_manifest
from .extract_stage import run_extract
from .segment_stage import run_segment

log = logging.getLogger(__name__)


def run_command(args) -> int:
    if getattr(args, "config", None) is None:
        raise ConfigError("`wsi-pipeline run` needs --config YAML (see configs/demo.yaml)")
    seg = resolve_stage(args, "segment")  # every section of the config is checked here
    if seg.manifest is None:
        raise ConfigError(f"{args.config}: no 'manifest:' (or pass --manifest)")
    config = seg.config
    overwrite = bool(args.overwrite)
    progress = not args.quiet
    train_section = config.train_keys()
    allow_missing = bool(train_section.get("allow_missing"))

    def stop_if_failed(summary, stage: str) -> int | None:
        print(summary.table())
        if summary.failed and not allow_missing:
            print(f"\n{stage}: {len(summary.failed)} slide(s) failed (see the table above). Fix or remove "
                  "them from the manifest and rerun, or set 'train: allow_missing: true' to go on without them.")
            return 1
        return None

    # The recipe is merged before any slide is touched: a typo in it must not surface only after
    # hours of segmentation and extraction.
    train_config, recipe = config.resolve_train()
    ext, ev = config.extract, config.evaluate

    check_mpp = not getattr(args, "no_mpp_check", False)
    load_manifest(seg.manifest, require=("path",), check_files=False, check_mpp=check_mpp)
    attach_run_log(seg.workspace, "run")  # only once every section and the manifest are known to be valid
    print("== 1/4 segment")
    summary, tag = run_segment(seg.manifest, seg.workspace, seg.section, args.shard, overwrite, progress=progress,
                               check_mpp=check_mpp)
    if (code := stop_if_failed(summary, "segment")) is not None:
        return code

    print("== 2/4 extract")
    if ext.seg_tag is None:
        import dataclasses
        ext = dataclasses.replace(ext, seg_tag=tag)
    summary, features_dir = run_extract(seg.manifest, seg.workspace, ext, args.shard, overwrite, progress=progress)
    if (code := stop_if_failed(summary, "extract")) is not None:
        return code
    if args.shard:
        print("--shard given: this process stops after extraction; run train/evaluate once all shards are done")
        return 0

    print("== 3/4 train")
    from .train_stage import experiment_name, run_training

    experiment = experiment_name(train_section, config.raw, recipe, train_config)
    exp_dir = run_training(seg.manifest, seg.workspace, features_dir, train_config, experiment,
                           resume=True, allow_missing=allow_missing, progress=progress)

    print("== 4/4 evaluate")
    from .evaluate_stage import run_evaluation

    eval_dir = run_evaluation(seg.workspace, experiment, protocol=ev.protocol, heatmaps=ev.heatmaps,
                              device=ev.device, n_boot=ev.n_boot, gallery_k=ev.gallery_k, cmap=ev.cmap,
                              threshold=ev.threshold, heatmap_mode=ev.heatmap_mode)

    import json

    from .evaluate_stage import format_table

    print(format_table(json.loads((eval_dir / "metrics.json").read_text())))
    ws = Path(seg.workspace).resolve()
    print("\nOutputs:")
    print(f"  coordinates + previews  {ws / 'segment' / tag}")
    print(f"  feature bags            {features_dir}")
    print(f"  models (per fold)       {exp_dir}")
    print(f"  metrics                 {eval_dir / 'metrics.json'}")
    print(f"  predictions             {eval_dir / 'predictions.csv'}")
    if (eval_dir / "heatmaps").is_dir():
        print(f"  heatmaps                {eval_dir / 'heatmaps'}")
    return 0
