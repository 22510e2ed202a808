"""``wsi-pipeline``: the command line. Heavy imports are deferred so ``--help`` is instant.

Every stage reads the same YAML config (top-level ``manifest``, ``workspace`` and one section per
stage); a flag given on the command line overrides the config, an unset flag changes nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("pipeline")


def _common(p: argparse.ArgumentParser, manifest: bool = True, slide_cache: bool = False) -> None:
    g = p.add_argument_group("common")
    if manifest:
        g.add_argument("--manifest", type=Path, help="slide manifest CSV (see data_manifests/README.md)")
    g.add_argument("--workspace", type=Path, help="workspace folder holding every stage's outputs")
    g.add_argument("--config", type=Path, help="YAML config; flags override its values")
    g.add_argument("--shard", metavar="I/N", help="process only rows I, I+N, ... (0-based) of the manifest")
    if slide_cache:
        g.add_argument("--cache-dir", type=Path, help="local folder for copies of slides on network storage "
                       "(the next slide is copied while the current one is processed)")
        g.add_argument("--cache-gb", type=float, default=50.0, help="size of the slide cache in GiB (default 50)")
    g.add_argument("--overwrite", action="store_true", default=None,
                   help="redo outputs that were made with other parameters")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and the summary only; no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsi-pipeline",
        description="Whole-slide images to evaluated MHIM-MIL models: segment -> extract -> train -> evaluate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("segment", help="tissue segmentation and tiling into patch coordinates",
                       description="CLAM-style tissue segmentation and magnification-aware tiling.")
    _common(p, slide_cache=True)
    g = p.add_argument_group("segmentation (defaults from --preset)")
    g.add_argument("--preset", help="default | tcga | bwh_biopsy | bwh_resection | biopsy_ink (configs/segment/)")
    g.add_argument("--sthresh", type=int, help="saturation threshold (0-255)")
    g.add_argument("--mthresh", type=int, help="median blur kernel (odd)")
    g.add_argument("--close", type=int, help="morphological closing kernel (0 = off)")
    g.add_argument("--use-otsu", action="store_true", default=None, help="Otsu threshold instead of --sthresh")
    g.add_argument("--a-t", type=float, help="minimum tissue area, in 512x512 level-0 patches")
    g.add_argument("--a-h", type=float, help="minimum hole area, in 512x512 level-0 patches")
    g.add_argument("--max-n-holes", type=int, help="largest holes kept per contour")
    g.add_argument("--seg-downsample", type=float, help="downsample of the segmentation image (default 64)")
    g.add_argument("--remove-ink", action="store_true", default=None,
                   help="remove ink and pen marks from the tissue (on in the biopsy_ink preset)")
    g.add_argument("--keep-ink", dest="remove_ink", action="store_false", default=None, help="turn a preset's ink removal off")
    g.add_argument("--ink-colours", help="marker colours to remove (default blue,green,black,red)")
    g.add_argument("--segmenter", choices=["clam", "grandqc", "hest"],
                   help="clam (saturation threshold, default) or a deep tissue model run from --weights")
    g.add_argument("--weights", help="local weights of the deep segmenter (GrandQC Tissue_Detection_MPP10.pth, "
                                     "HEST deeplabv3_seg_v4.ckpt); nothing is downloaded")
    g.add_argument("--seg-device", help="device of the deep segmenter: auto | cpu | cuda | cuda:N")
    g.add_argument("--include-geojson", help="folder of <slide_id>.geojson (QuPath): tile only inside these polygons")
    g.add_argument("--exclude-geojson", help="folder of <slide_id>.geojson (QuPath): drop patches inside these polygons")
    g = p.add_argument_group("tiling")
    g.add_argument("--target-mpp", type=float, help="patch resolution in micrometres per pixel (default 0.5 = 20x)")
    g.add_argument("--patch-size", dest="patch_px", type=int, help="patch size in pixels at the target resolution (default 256)")
    g.add_argument("--patch-level", type=int, help="CLAM mode: tile at this pyramid level instead of a target mpp")
    g.add_argument("--step", dest="step_px", type=int, help="grid step in target pixels (default: patch size)")
    g.add_argument("--contour-fn", choices=["four_pt", "four_pt_hard", "center", "basic"])
    g.add_argument("--no-padding", dest="use_padding", action="store_false", default=None,
                   help="drop patches that run past the slide edge")
    g.add_argument("--slide-mpp", type=float, help="level-0 mpp for every slide without one (the manifest 'mpp' column wins)")
    g.add_argument("--no-mpp-check", action="store_true",
                   help="accept a level-0 mpp outside 0.05-20 micrometres per pixel (an unusual scanner)")
    g.add_argument("--tag", help="output tag (default: from the tiling, e.g. mpp0.50_256px)")
    g.add_argument("--no-previews", dest="previews", action="store_false", default=None)

    p = sub.add_parser("extract", help="patch features per slide into HDF5 bags, one folder per backbone")
    _common(p, slide_cache=True)
    g = p.add_argument_group("extraction")
    g.add_argument("--backbone", help="backbone name (see --list-backbones); timm:<name> for any timm model")
    g.add_argument("--backbone-kw", help="timm:<name> only: key=value,... passed to timm.create_model")
    g.add_argument("--weights", help="imagenet | random | PATH to a local checkpoint (.pth/.pt/.bin/.safetensors) "
                                     "or the folder holding it (e.g. a Hugging Face snapshot)")
    g.add_argument("--seg-tag", help="which segmentation to read (default: the only one in the workspace)")
    g.add_argument("--batch-size", help="patches per batch, or 'auto' (from the free GPU memory; 64 on a CPU)")
    g.add_argument("--num-workers", type=int, help="reader processes per device")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--devices", help="comma-separated CUDA indices: one process per GPU on the shared workspace")
    g.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    g.add_argument("--dtype", choices=["float16", "float32"], help="feature storage type")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the backbone")
    g.add_argument("--export-pt", action="store_true", default=None, help="also write one .pt tensor per slide")
    g.add_argument("--max-reread", type=float, metavar="FRACTION",
                   help="share of a slide's patches that may be unreadable at full resolution (default 0.05)")
    g.add_argument("--reread-action", choices=["degraded", "failed"],
                   help="a slide over --max-reread: keep its bag flagged 'degraded' (default) or fail it")
    g.add_argument("--qc", help="patch QC stored in the bag: any of blur,background,ink (filter later with --qc-filter)")
    g.add_argument("--list-backbones", action="store_true", help="print the registered backbones and exit")

    p = sub.add_parser("train", help="train MIL models (baselines and MHIM-MIL) with cross-validation")
    _common(p)
    g = p.add_argument_group("training")
    g.add_argument("--features", type=Path, help="folder of bags (default: the workspace's only feature folder)")
    g.add_argument("--recipe", help="training recipe: a name from configs/train/ (e.g. mhim_abmil_c16) or a YAML path")
    g.add_argument("--experiment", help="experiment name (folder under <workspace>/experiments)")
    g.add_argument("--folds", type=int, help="number of cross-validation folds")
    g.add_argument("--seeds", help="comma-separated seeds, e.g. 2021,2022,2023")
    g.add_argument("--epochs", type=int)
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--resume", action="store_true", default=None, help="continue a killed run")
    g.add_argument("--allow-missing", action="store_true", default=None, help="skip manifest slides without a bag")
    g.add_argument("--qc-filter", help="keep only patches passing patch-QC rules, e.g. 'focus>=50,background<=0.5' "
                                       "(bags extracted with --qc; evaluate applies the same rules)")
    g.add_argument("--list-models", action="store_true", help="print the registered MIL students and exit")

    p = sub.add_parser("evaluate", help="metrics, per-slide predictions and attention heatmaps")
    _common(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--experiment", help="experiment to evaluate")
    g.add_argument("--features", type=Path, help="bags of an external test set (with --manifest)")
    g.add_argument("--heatmaps", help="number of slides to draw heatmaps for, or 'all'")
    g.add_argument("--heatmap-mode", choices=["absolute", "rank"],
                   help="absolute (default: bag probability x relative attention, one colour range for "
                        "every slide) or rank (percentile within each slide)")
    g.add_argument("--protocol", help="default | paper ('paper' = validation is the test fold; optimistic, "
                                      "for comparison only)")
    g.add_argument("--threshold", choices=["auto", "youden", "argmax"],
                   help="binary decision rule (default auto: Youden's J on validation when it holds "
                        ">= 10 bags of each class, else argmax)")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")

    p = sub.add_parser("run", help="segment -> extract -> train -> evaluate from one config")
    _common(p)
    p.add_argument("--no-mpp-check", action="store_true",
                   help="accept a level-0 mpp outside 0.05-20 micrometres per pixel (an unusual scanner)")

    p = sub.add_parser("status", help="done / failed / pending / running per stage of a workspace, with ETA",
                       description="One table across stages and backbones, who is running what, and the failures.")
    p.add_argument("--workspace", type=Path, help="workspace folder")
    p.add_argument("--config", type=Path, help="YAML config (its 'workspace' and 'manifest')")
    p.add_argument("--manifest", type=Path, help="count pending slides against this manifest "
                   "(default: the one each stage last ran on)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")

    from .submit import add_submit_parser
    add_submit_parser(sub)

    p = sub.add_parser("make-demo", help="write a generated cohort of pyramidal SVS slides and its manifest")
    p.add_argument("--out", type=Path, required=True, help="folder for the slides and manifest.csv")
    p.add_argument("--slides", type=int, default=24)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--texture", type=Path, help="a real H&E image to take tissue texture from")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parse_args``, but an unknown flag is reported by its subcommand with the closest flag."""
    import difflib

    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = sub.choices[args.command]
    flags = [o for a in command._actions for o in a.option_strings if o.startswith("--")]
    problems = []
    for token in extra:
        name = token.split("=", 1)[0]
        close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6) if name.startswith("-") else []
        problems.append(f"{token} (did you mean {close[0]}?)" if close else token)
    command.error(f"unrecognized argument(s): {' '.join(problems)}; see `wsi-pipeline {args.command} --help`")


def main(argv: list[str] | None = None) -> int:
    from extract.errors import PipelineError

    from .logging_setup import setup_logging

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # the bare command: show what it can do rather than a one-line usage error
        parser.print_help()
        return 2
    stage_args: list[str] = []
    if argv[0] == "submit" and "--" in argv:  # `submit STAGE ... -- <flags of the stage command>`
        cut = argv.index("--")
        argv, stage_args = argv[:cut], argv[cut + 1:]
    args = _parse(parser, argv)
    args.argv = argv
    args.stage_args = stage_args
    setup_logging(args.verbose, args.quiet)
    # A log file on a disk that fills up must not add a traceback per line to the real error.
    logging.raiseExceptions = False
    try:
        # Listings answer at once: neither reads more than the registries, which import no torch.
        if args.command == "extract" and args.list_backbones:
            from extract.backbones import backbone_table

            print(backbone_table())
            return 0
        if args.command == "train" and args.list_models:
            from mil.model_catalog import model_summaries

            summaries = model_summaries()
            width = max(map(len, summaries))
            print("\n".join(f"{name:<{width}}  {text}" for name, text in summaries.items()))
            return 0
        if args.command == "make-demo":
            from extract.synthetic import make_cohort

            manifest = make_cohort(args.out, n_slides=args.slides, seed=args.seed,
                                   n_classes=args.classes, texture=args.texture)
            print(f"wrote {args.slides} slides and {manifest}")
            return 0
        if args.command == "segment":
            from .segment_stage import segment_command
            return segment_command(args)
        if args.command == "extract":
            from .extract_stage import extract_command
            return extract_command(args)
        if args.command == "train":
            from .train_stage import train_command
            return train_command(args)
        if args.command == "evaluate":
            from .evaluate_stage import evaluate_command
            return evaluate_command(args)
        if args.command == "run":
            from .run_stage import run_command
            return run_command(args)
        if args.command == "status":
            from .status import status_command
            return status_command(args)
        if args.command == "submit":
            from .submit import submit_command
            return submit_command(args)
    except PipelineError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:  # a full disk, a read-only workspace, a missing permission: one line
        from .os_errors import describe_os_error

        log.error("%s", describe_os_error(exc))
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; finished slides are kept, rerun the same command to continue")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
