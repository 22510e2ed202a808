"""``wsi-pipeline extract``: patch coordinates -> one feature bag per slide, per backbone.

Reading and compute overlap: reader processes decode tile-aligned blocks and crop patches
(uint8), the main process moves each batch to the device (pinned memory, non-blocking), resizes
and normalises there, and runs the backbone under autocast in channels_last. The same code runs
on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extract.errors import ConfigError, SlideError
from extract.runtime import autocast, autocast_dtype, resolve_device

from .config import ExtractConfig, dump_yaml, resolve_stage
from .logging_setup import attach_run_log
from .manifest import load_manifest, parse_shard
from .runner import (SlideOutcome, SlideRecords, StatusFile, pid_alive, check_stage_params, read_fingerprint,
                     run_slides, stamp_fingerprint, temp_path_for)
from .workspace import Workspace, fingerprint

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
EXTRACT_FLAGS = ("max_reread", "reread_action", "backbone", "backbone_kw", "weights", "batch_size", "num_workers", "device", "precision",
                 "dtype", "compile", "seg_tag", "export_pt", "qc")


def backbone_tag(backbone: str, weights_id: str) -> str:
    """``resnet50_trunc-imagenet``, ``timm-vit_small_patch16_224-random``, ``uni-sha256_1a2b3c4d``."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", backbone).strip("-")
    weights = weights_id.replace("sha256:", "sha256_")[:15]
    return f"{name}-{weights}"


@dataclass
class Extractor:
    """A backbone on a device with its precision: uint8 patches in, features out."""

    model: object
    device: object
    amp_dtype: object

    @classmethod
    def create(cls, config: ExtractConfig) -> "Extractor":
        import torch

        from extract.backbones import backbone_card, create_backbone, is_backbone, list_backbones, parse_backbone_kw

        if not is_backbone(config.backbone):
            import difflib

            close = difflib.get_close_matches(config.backbone, list_backbones(), n=3)
            raise ConfigError(
                f"The 'backbone' parameter must be a registered encoder "
                f"({'closest: ' + ', '.join(close) if close else 'resnet50_trunc, uni, conch_v15, virchow2, ...'}) "
                f"or timm:<model name> (see `wsi-pipeline extract --list-backbones`). Got {config.backbone!r} instead."
            )
        kwargs = parse_backbone_kw(config.backbone_kw)
        if kwargs and not config.backbone.startswith("timm:"):
            raise ConfigError(f"--backbone-kw applies to timm:<name> backbones; {config.backbone} is registered "
                              "with its exact architecture (see --list-backbones)")
        device = resolve_device(config.device)
        if device.type == "cuda":  # every batch has the same shape: let cuDNN pick its fastest kernels once
            torch.backends.cudnn.benchmark = True
        model = create_backbone(config.backbone, weights=config.weights, **kwargs)
        model = model.to(device).eval().to(memory_format=torch.channels_last)
        if config.compile:
            model = torch.compile(model)
        card = backbone_card(config.backbone)
        return cls(model, device, autocast_dtype(device, config.precision, card.precision if card else "bf16"))

    @property
    def config(self):
        model = getattr(self.model, "_orig_mod", self.model)
        return model.backbone_config

    def embed(self, patches):
        """``patches`` uint8 ``[B, H, W, 3]`` (numpy, pinned or device tensor) -> float32 ``[B, D]``
        left on the device: nothing here waits for the device, so reading the next batch
        overlaps this one's forward pass."""
        return self.forward(self.prepare(patches))

    def prepare(self, patches):
        """uint8 ``[B, H, W, 3]`` -> the model's input on its device: resized, normalised,
        channels_last, in the autocast dtype (``[B, 3, S, S]``)."""
        import torch

        from extract.backbones import preprocess_on_device

        batch = torch.as_tensor(patches).to(self.device, non_blocking=True)
        with torch.inference_mode():
            return preprocess_on_device(batch, self.config, self.amp_dtype or torch.float32)

    def forward(self, x):
        """Prepared input ``[B, 3, S, S]`` -> float32 features ``[B, D]`` on the device."""
        import torch

        with torch.inference_mode():
            with autocast(self.device, self.amp_dtype):
                features = self.model(x)
            return features.float()

    def __call__(self, patches) -> np.ndarray:
        """``patches`` uint8 ``[B, H, W, 3]`` (numpy or pinned tensor) -> float32 ``[B, D]`` on the host."""
        return self.embed(patches).cpu().numpy()


def extract_slide(row, tmp_path, coords_path: Path, extractor, config: ExtractConfig,
                  progress: bool = False, seg_status: dict | None = None):
    """Read the patches of one slide, embed them and write its bag to ``tmp_path``.

    ``extractor`` and ``tmp_path`` may be lists of the same length: every patch is then read
    once and fed to each encoder (on a GPU, from the same device batch), one bag per encoder,
    all with the same coordinates; a list of outcomes is returned.

    ``seg_status`` is the segment stage's status.csv row of the slide, quoted when it has no
    coordinates file (the reason it failed there is what the user needs to see).
    """
    from extract.bags import write_bag
    from extract.coords_file import read_coords
    from extract.patch_qc import parse_qc, patch_qc, write_qc
    from extract.patch_reader import iter_patch_batches

    several = isinstance(extractor, (list, tuple))
    extractors = list(extractor) if several else [extractor]
    tmp_paths = list(tmp_path) if several else [tmp_path]
    if not coords_path.is_file():
        if seg_status and seg_status.get("state") in ("failed", "refused"):
            raise SlideError(f"{row.slide_id}: segmentation {seg_status['state']} ({seg_status.get('message', '')}); "
                             "fix that and rerun `wsi-pipeline segment`")
        raise SlideError(f"{row.slide_id}: no coordinates at {coords_path}; run `wsi-pipeline segment` first "
                         "(or check its status.csv for why this slide failed)")
    coords, cattrs = read_coords(coords_path)
    attrs = [_bag_attrs(ex, cattrs) for ex in extractors]
    n = len(coords)
    qc_kinds = parse_qc(config.qc)
    if n == 0:
        for ex, a, tmp in zip(extractors, attrs, tmp_paths):
            a["dropped_patches"] = 0
            write_bag(tmp, np.zeros((0, ex.config.feature_dim), np.float32), coords, a, dtype=config.dtype)
            write_qc(tmp, {name: np.zeros(0, np.float32) for name in patch_qc(np.zeros((0, 1, 1, 3), np.uint8), qc_kinds)})
        outcomes = [SlideOutcome("empty", "no patches in the coordinates file", patches=0) for _ in extractors]
        return outcomes if several else outcomes[0]
    qc = {}

    patch_px_level0 = int(cattrs["patch_size_level0"])
    out_px = int(cattrs.get("patch_px", 0)) or min(patch_px_level0,
                                                    max([ex.config.input_size for ex in extractors] + [224]))
    import torch

    with torch.inference_mode():  # features stay on the device until the slide is done (one sync)
        features = [torch.zeros((n, ex.config.feature_dim), dtype=torch.float32, device=ex.device)
                    for ex in extractors]
    device = extractors[0].device
    shared_device = all(ex.device == device for ex in extractors)
    pin = any(ex.device.type == "cuda" for ex in extractors)
    from .stage_clock import StageClock

    clock = StageClock()  # device time per stage, without a per-batch sync
    batches = iter_patch_batches(row.path, coords, patch_px_level0, out_px, batch_size=config.batch_size,
                                 num_workers=config.num_workers, mpp=row.mpp, pin_memory=pin,
                                 ordered=False)
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc=row.slide_id, unit="patch", leave=False, disable=not progress or not sys.stderr.isatty())
    with batches:
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                indices, patches = next(it)
            except StopIteration:
                break
            clock.add("read", time.perf_counter() - t0)
            if qc_kinds:  # on the uint8 batch already in host memory: no second read
                for name, values in patch_qc(patches, qc_kinds).items():
                    qc.setdefault(name, np.zeros(n, np.float32))[indices] = values
            if shared_device and device.type != "cpu":
                with clock.span("transfer", device):  # one host->device copy for all encoders
                    patches = torch.as_tensor(patches).to(device, non_blocking=True)
            rows = torch.as_tensor(indices)
            for k, ex in enumerate(extractors):
                with clock.span("transfer", ex.device):
                    x = ex.prepare(patches)
                with clock.span(f"model{k}", ex.device), torch.inference_mode():
                    features[k][rows.to(ex.device, non_blocking=True)] = ex.forward(x)
            bar.update(len(indices))
    bar.close()
    features = [f.cpu().numpy() for f in features]  # waits for the last forward passes
    seconds = clock.seconds()
    t_read, t_transfer = seconds.get("read", 0.0), seconds.get("transfer", 0.0)
    t_model = [seconds.get(f"model{k}", 0.0) for k in range(len(extractors))]
    report = batches.report
    keep = np.ones(n, bool)
    keep[report.dropped] = False
    state, unreadable = _read_quality(row.slide_id, n, report, config)
    outcomes = []
    for k, (a, tmp) in enumerate(zip(attrs, tmp_paths)):
        a["dropped_patches"] = int((~keep).sum())
        a["retried_patches"] = int(len(report.retried))
        write_bag(tmp, features[k][keep], coords[keep], a, dtype=config.dtype)
        write_qc(tmp, {name: values[keep] for name, values in qc.items()})
        message = f"read {t_read:.1f} s, transfer {t_transfer:.1f} s, model {t_model[k]:.1f} s"
        if len(extractors) > 1:
            message += f" (one read pass for {len(extractors)} encoders)"
        if a["dropped_patches"]:
            message += f"; {a['dropped_patches']} unreadable patch(es) dropped ({report.errors[0] if report.errors else ''})"
        if unreadable:
            message = f"{unreadable}; {message}"
        outcomes.append(SlideOutcome(state, message, patches=int(keep.sum()),
                                     extra={"read_s": round(t_read, 3), "transfer_s": round(t_transfer, 3),
                                            "model_s": round(t_model[k], 3),
                                            "reread_patches": int(len(report.retried)),
                                            "dropped_patches": int((~keep).sum())}))
    return outcomes if several else outcomes[0]


def _read_quality(slide_id: str, n: int, report, config: ExtractConfig) -> tuple[str, str]:
    """``('done', '')``, or ``('degraded', why)`` when more than ``config.max_reread`` of the
    patches were unreadable at full resolution (re-read from a coarser level, or dropped);
    with ``reread_action: failed`` such a slide raises SlideError instead (no bag)."""
    bad = len(report.retried) + len(report.dropped)
    if n == 0 or bad / n <= config.max_reread:
        return "done", ""
    why = (f"{bad} of {n} patches ({bad / n:.0%}) unreadable at full resolution ({len(report.retried)} re-read "
           f"from a coarser level, {len(report.dropped)} dropped; limit {config.max_reread:g}, --max-reread)")
    if config.reread_action == "failed":
        raise SlideError(f"{slide_id}: {why}; the slide file is damaged: rescan or re-export it, or pass "
                         "--reread-action degraded to keep it flagged")
    return "degraded", why


def _bag_attrs(extractor: Extractor, cattrs: dict) -> dict:
    bb = extractor.config
    return {
        "backbone": bb.name,
        "weights": bb.weights_id,
        "feature_dim": int(bb.feature_dim),
        "input_size": int(bb.input_size),
        "preprocessing": json.dumps(bb.preprocessing(), sort_keys=True),
        "patch_size_level0": int(cattrs["patch_size_level0"]),
        "target_mpp": float(cattrs.get("target_mpp", -1.0)),
        "slide_mpp": float(cattrs.get("slide_mpp", -1.0)),
        "precision": str(extractor.amp_dtype).replace("torch.", "") if extractor.amp_dtype else "float32",
        "seg_fingerprint": str(cattrs.get("fingerprint", "")),
        "format_version": FORMAT_VERSION,
    }


def find_seg_tag(ws: Workspace, wanted: str | None) -> str:
    tags = ws.segment_tags()
    if wanted:
        if wanted not in tags:
            raise ConfigError(f"no segmentation '{wanted}' in {ws.root / 'segment'} (found: {', '.join(tags) or 'none'}); "
                              + ("pass one of those with --seg-tag" if tags else "run `wsi-pipeline segment` first"))
        return wanted
    if len(tags) == 1:
        return tags[0]
    if not tags:
        raise ConfigError(f"no segmentation in {ws.root / 'segment'}; run `wsi-pipeline segment` first")
    raise ConfigError(f"several segmentations in {ws.root / 'segment'} ({', '.join(tags)}); choose one with --seg-tag")


def run_extract(manifest_path: Path, workspace: Path, config: ExtractConfig, shard: str | None = None,
                overwrite: bool = False, progress: bool = True, cache=None):
    """Extract every manifest slide not done yet with one backbone; returns (BatchSummary, features_dir).

    ``cache``: a :class:`pipeline.slide_cache.SlideCache` to read slides from local copies.
    """
    if "," in config.backbone:
        raise ConfigError(f"The 'backbone' parameter must name one backbone here (the run command trains on one "
                          f"feature folder). Got {config.backbone!r} instead; run `wsi-pipeline extract` for several")
    return run_extract_all(manifest_path, workspace, config, shard, overwrite, progress, cache)[0]


@dataclass
class _Encoder:
    """One backbone of an extract run: its model, output folder and fingerprint."""

    config: ExtractConfig
    extractor: Extractor
    btag: str
    out_dir: Path
    digest: str


def _split_backbones(config: ExtractConfig) -> list[ExtractConfig]:
    """``--backbone a,b --weights w1,w2`` (or one weights value for all) -> one config per backbone."""
    names = [b.strip() for b in config.backbone.split(",") if b.strip()]
    weights = [w.strip() for w in str(config.weights).split(",")] if len(names) > 1 else [config.weights]
    if len(weights) == 1:
        weights = weights * len(names)
    if len(weights) != len(names) or len(set(names)) != len(names):
        raise ConfigError(f"The 'weights' parameter must be one value or one per backbone ({len(names)}: "
                          f"{', '.join(names)}), each backbone named once. Got {config.weights!r} instead.")
    if len(names) > 1 and config.backbone_kw:
        raise ConfigError("--backbone-kw applies to one timm:<name> backbone; extract several backbones one by one")
    return [dataclasses.replace(config, backbone=b, weights=w) for b, w in zip(names, weights)]


def run_extract_all(manifest_path: Path, workspace: Path, config: ExtractConfig, shard: str | None = None,
                    overwrite: bool = False, progress: bool = True, cache=None) -> list[tuple]:
    """Extract with every backbone of ``config.backbone`` (comma-separated) in one read pass.

    Each slide's patches are read once and fed to every backbone whose bag is not done; a
    backbone's bag is committed by its own pass of the runner (its own lock, record and
    status), so each backbone resumes on its own. Bags computed for a later backbone wait in
    a ``.<slide>.h5.staged`` file (stamped with that backbone's fingerprint) until its pass.

    ``cache``: a :class:`pipeline.slide_cache.SlideCache` to read slides from local copies.

    Returns one ``(BatchSummary, features_dir)`` per backbone, in the order given.
    """
    from .encoder_geometry import geometry_warning

    if manifest_path is None:
        raise ConfigError("no manifest: pass --manifest CSV or set 'manifest:' in the config")
    manifest = load_manifest(manifest_path, require=("path",), check_files=False)
    manifest = manifest.shard(*parse_shard(shard))
    ws = Workspace(workspace)
    tag = find_seg_tag(ws, config.seg_tag)
    seg_record = ws.segment_dir(tag) / "params.json"
    try:
        seg_params = json.loads(seg_record.read_text()).get("fingerprint", "")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{seg_record}: missing or unreadable, so {ws.segment_dir(tag)} is not a finished "
                          "segmentation; rerun `wsi-pipeline segment` with the same parameters") from exc

    encoders = []
    for cfg in _split_backbones(config):
        extractor = Extractor.create(cfg)  # fails here, before any slide, if weights are missing
        bb = extractor.config
        mismatch = geometry_warning(cfg.backbone, tag, _seg_tiling(seg_record), bb.weights_id)
        if mismatch:
            log.warning("%s", mismatch)
        btag = backbone_tag(cfg.backbone, bb.weights_id)
        out_dir = ws.features_dir(btag, tag)
        record = {"backbone": bb.name, "weights": bb.weights_id, "input_size": bb.input_size,
                  "dtype": cfg.dtype, "segmentation": seg_params, "format_version": FORMAT_VERSION}
        if cfg.backbone_kw:
            record["backbone_kw"] = cfg.backbone_kw
        if cfg.qc:
            from extract.patch_qc import parse_qc

            record["qc"] = sorted(parse_qc(cfg.qc))
        if bb.preprocessing() != _legacy_preprocessing(bb):
            record["preprocessing"] = bb.preprocessing()
        digest = fingerprint(record)
        check_stage_params(out_dir, record, digest, overwrite)
        dump_yaml(cfg, out_dir / "config.yaml")
        precision = str(extractor.amp_dtype).replace("torch.", "") if extractor.amp_dtype else "float32"
        log.info("extracting with %s (%s, %d-d) on %s in %s -> %s", bb.name, bb.weights_id,
                 bb.feature_dim, extractor.device, precision, out_dir)
        encoders.append(_Encoder(cfg, extractor, btag, out_dir, digest))

    if config.batch_size == "auto":
        from .device_feed import auto_batch_size

        tiling = _seg_tiling(seg_record)
        size = auto_batch_size([e.extractor for e in encoders], int(tiling.get("patch_px") or 256))
        for e in encoders:
            e.config = dataclasses.replace(e.config, batch_size=size)

    seg_statuses = StatusFile(ws.segment_dir(tag) / "status.csv").read()
    seg_records = SlideRecords(ws.segment_dir(tag))  # fresher than status.csv while segment runs

    def bag_path(enc: _Encoder, row) -> Path:
        return ws.bag_path(enc.btag, tag, row.slide_id)

    def staged_path(enc: _Encoder, row) -> Path:
        final = bag_path(enc, row)
        return final.with_name(f".{final.name}.staged")

    def make_work(k: int):
        enc = encoders[k]

        def work(row, tmp):
            staged = staged_path(enc, row)
            if read_fingerprint(staged) == enc.digest:  # computed in an earlier backbone's read pass
                os.replace(staged, tmp)
                import h5py

                with h5py.File(tmp, "r") as f:
                    n = int(f["coords"].shape[0])
                return SlideOutcome("done" if n else "empty", f"read in the pass of {encoders[0].config.backbone}",
                                    patches=n)
            later = [e for e in encoders[k + 1:]
                     if (overwrite or read_fingerprint(bag_path(e, row)) != e.digest)
                     and read_fingerprint(staged_path(e, row)) != e.digest]
            for e in later:
                _remove_dead_leftovers(staged_path(e, row))
            targets = [tmp] + [temp_path_for(staged_path(e, row)) for e in later]
            seg_status = seg_records.get(row.slide_id) or seg_statuses.get(row.slide_id)
            try:
                outcomes = extract_slide(row, targets, ws.coords_path(tag, row.slide_id),
                                         [enc.extractor] + [e.extractor for e in later], enc.config, progress,
                                         seg_status=seg_status)
                for e, staged_tmp in zip(later, targets[1:]):
                    stamp_fingerprint(staged_tmp, e.digest, "extract")
                    os.replace(staged_tmp, staged_path(e, row))
            finally:
                for staged_tmp in targets[1:]:
                    staged_tmp.unlink(missing_ok=True)
            return outcomes[0]

        return work

    results = []
    for k, enc in enumerate(encoders):
        work = make_work(k)
        if cache is not None:
            work = cache.wrap(work, manifest.rows, functools.partial(bag_path, enc), enc.out_dir / ".locks")
        summary = run_slides("extract", manifest.rows, enc.out_dir, functools.partial(bag_path, enc),
                             enc.digest, work, overwrite=overwrite, progress=progress,
                             manifest=manifest_path)
        for row in manifest.rows:  # staged for a slide another process finished meanwhile
            if staged_path(enc, row).is_file() and read_fingerprint(bag_path(enc, row)) == enc.digest:
                staged_path(enc, row).unlink(missing_ok=True)
        if enc.config.export_pt:
            _export_pt_files(manifest.rows, enc.out_dir, functools.partial(bag_path, enc))
        results.append((summary, enc.out_dir))
    return results


def _export_pt_files(rows, out_dir: Path, bag_path) -> None:
    from extract.bags import export_pt

    pt_dir = out_dir / "pt_files"
    pt_dir.mkdir(exist_ok=True)
    for row in rows:
        bag = bag_path(row)
        pt = pt_dir / f"{row.slide_id}.pt"
        if bag.is_file() and (not pt.is_file() or pt.stat().st_mtime < bag.stat().st_mtime):
            _remove_dead_leftovers(pt)
            tmp = temp_path_for(pt)
            export_pt(bag, tmp)
            os.replace(tmp, pt)


def _legacy_preprocessing(bb) -> dict:
    """What the preprocessing of ``bb`` would be under the first format (resize only)."""
    return {"resize_px": int(bb.input_size), "crop_px": int(bb.input_size), "interpolation": bb.interpolation,
            "antialias": True, "mean": [float(v) for v in bb.mean], "std": [float(v) for v in bb.std]}


def _seg_tiling(seg_record: Path) -> dict:
    try:
        return json.loads(seg_record.read_text()).get("params", {})
    except (OSError, ValueError):
        return {}


def _remove_dead_leftovers(final: Path) -> None:
    """Delete the temporary files of ``final`` left by killed processes of this host."""
    import socket

    prefix = f".{final.name}.tmp-{socket.gethostname()}-"
    for leftover in final.parent.glob(f"{glob.escape(prefix)}*"):
        pid = leftover.name[len(prefix):]
        if pid.isdigit() and not pid_alive(int(pid)):
            leftover.unlink(missing_ok=True)


def _spawn_per_device(args, devices: str) -> int:
    """One ``extract`` process per GPU on the same manifest; the slide locks share the work."""
    indices = [d.strip() for d in devices.split(",") if d.strip()]
    if not indices or not all(d.isdigit() for d in indices):
        raise ConfigError(f"The '--devices' parameter must be comma-separated GPU indices like 0,1. Got {devices!r} instead.")
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    absent = [d for d in indices if int(d) >= available]
    if absent:
        raise ConfigError(
            f"--devices {devices}: this machine has {available} CUDA device(s), none with index "
            f"{', '.join(absent)}; {'use --device cpu' if not available else f'use indices below {available}'}"
        )
    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    cleaned, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--devices":
            skip = True
            continue
        if a.startswith("--devices="):
            continue
        cleaned.append(a)
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", *cleaned, "--device", f"cuda:{d}"])
             for d in indices]
    codes = [p.wait() for p in procs]
    return max(codes)


def extract_command(args) -> int:
    if args.list_backbones:
        from extract.backbones import backbone_table

        print(backbone_table())
        return 0
    if args.devices:
        return _spawn_per_device(args, args.devices)
    inputs = resolve_stage(args, "extract", EXTRACT_FLAGS)
    if inputs.manifest is not None:  # nothing (not even the log) is written before the manifest passes
        load_manifest(inputs.manifest, require=("path",), check_files=False)
    attach_run_log(inputs.workspace, "extract", create_workspace=False)
    from .slide_cache import cache_from_args

    with cache_from_args(args) as cache:
        results = run_extract_all(inputs.manifest, inputs.workspace, inputs.section, args.shard,
                                  bool(args.overwrite), progress=not args.quiet, cache=cache)
    for summary, out_dir in results:
        print(summary.table())
        print(f"bags:   {out_dir}\nstatus: {out_dir / 'status.csv'}")
    return max(summary.exit_code for summary, _ in results)
