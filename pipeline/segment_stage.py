"""``wsi-pipeline segment``: slides -> tissue contours -> patch coordinates (+ previews)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from extract.errors import ConfigError, SlideError

from .config import SegmentConfig, dump_yaml, resolve_stage
from .logging_setup import attach_run_log
from .manifest import MPP_RANGE, load_manifest, parse_shard
from .runner import SlideOutcome, check_stage_params, run_slides
from .workspace import Workspace, fingerprint, seg_tag

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SEG_FLAGS = ("preset", "sthresh", "mthresh", "close", "use_otsu", "a_t", "a_h", "max_n_holes", "remove_ink", "ink_colours", "include_geojson", "exclude_geojson", "segmenter", "weights", "seg_device",
             "target_mpp", "patch_px", "patch_level", "step_px", "contour_fn", "use_padding",
             "seg_downsample", "tag", "previews")


def segmentation_params(config: SegmentConfig):
    """The preset's CLAM parameters with the values the user set on top."""
    from extract.segmentation import SegmentParams, load_preset

    base = load_preset(config.preset)
    changes = {f.name: getattr(config, f.name) for f in dataclasses.fields(SegmentParams)
               if getattr(config, f.name, None) is not None}
    return dataclasses.replace(base, **changes)


def tag_for(config: SegmentConfig) -> str:
    return config.tag or seg_tag(config.target_mpp, config.patch_px, config.patch_level, config.step_px,
                                 config.preset if config.segmenter == "clam" else config.segmenter)


def segment_params_record(config: SegmentConfig) -> dict:
    """Everything that changes the coordinates; its digest is the output fingerprint."""
    record = dataclasses.asdict(config)
    record.pop("previews")
    record.pop("tag")
    record["segmentation"] = dataclasses.asdict(segmentation_params(config))
    # Without ink removal the record (and so every existing workspace's fingerprint) is unchanged.
    for key in ("remove_ink", "ink_colours"):
        record.pop(key)
    if not record["segmentation"]["remove_ink"]:
        for key in ("remove_ink", "ink_colours"):
            record["segmentation"].pop(key)
    segmenter = {"name": record.pop("segmenter"), "weights": record.pop("weights")}
    record.pop("seg_device")
    if segmenter["name"] != "clam":  # the model and its weights' digest make the coordinates
        segmenter["weights_sha256"] = _sha256(segmenter["weights"])
        record["segmenter"] = segmenter
    for key in ("include_geojson", "exclude_geojson"):
        if record[key] is None:
            record.pop(key)
        else:
            record[key] = str(Path(record[key]).resolve())
    record["format_version"] = FORMAT_VERSION
    return record


def _sha256(path) -> str | None:
    import hashlib

    if path is None or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def segment_slide(row, tmp_path: Path, config: SegmentConfig, preview_path: Path | None,
                  default_mpp: float | None = None, geojson_path: Path | None = None,
                  check_mpp: bool = True, deep=None) -> SlideOutcome:
    """Segment and tile one slide into ``tmp_path`` (coords HDF5); draw its preview; write its
    tissue as GeoJSON to ``geojson_path``. ``check_mpp``: refuse a level-0 mpp outside
    :data:`pipeline.manifest.MPP_RANGE` (a wrong value tiles millions of 1-px patches)."""
    from extract.coords_file import write_coords
    from extract.segmentation import segment_tissue, segmentation_image
    from extract.slide import Slide
    from extract.tiling import level0_patch_px, tile_tissue

    if row.path is None:
        raise SlideError(f"row {row.line}: no 'path' for slide {row.slide_id}")
    params = segmentation_params(config)
    with Slide(row.path, mpp=row.mpp if row.mpp is not None else default_mpp) as slide:
        if config.patch_level is None:
            slide_mpp = slide.require_mpp()
            if check_mpp and not (MPP_RANGE[0] <= slide_mpp <= MPP_RANGE[1]):
                raise SlideError(
                    f"{row.slide_id}: level-0 mpp {slide_mpp:g} ({slide.mpp_source}) is outside "
                    f"{MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} micrometres per pixel; fix the manifest's 'mpp' or "
                    "--slide-mpp, or pass --no-mpp-check for an unusual scanner"
                )
            patch_px_level0 = level0_patch_px(config.patch_px, config.target_mpp, slide_mpp)
            step_px_level0 = level0_patch_px(config.step_px or config.patch_px, config.target_mpp, slide_mpp)
            patch_level, downsample = 0, 1.0
            attr_patch = patch_px_level0
        else:
            if config.patch_level >= slide.level_count:
                raise SlideError(
                    f"{row.path}: --patch-level {config.patch_level} does not exist (the slide has "
                    f"{slide.level_count} level(s)); use a lower level or --target-mpp"
                )
            slide_mpp = slide.mpp
            patch_level = config.patch_level
            downsample = slide.level_downsamples[patch_level]
            patch_px_level0 = int(round(config.patch_px * downsample))
            step_px_level0 = int(round((config.step_px or config.patch_px) * downsample))
            attr_patch = config.patch_px

        if deep is None:
            image, scale = segmentation_image(slide, mode="clam", downsample=config.seg_downsample)
            tissue = segment_tissue(image, params, scale)
        else:
            image, scale, tissue = _deep_tissue(slide, deep, params)
        coords = tile_tissue(tissue, patch_px_level0, slide.dimensions, contour_fn=config.contour_fn,
                             step_px_level0=step_px_level0, use_padding=config.use_padding)
        coords, region_text = _apply_annotations(coords, patch_px_level0, config, row.slide_id)
        attrs = {
            "patch_size": int(attr_patch),
            "patch_level": int(patch_level),
            "downsample": [float(downsample), float(downsample)],
            "level_dim": list(slide.level_dimensions[patch_level]),
            "name": row.slide_id,
            "patch_size_level0": int(patch_px_level0),
            "patch_px": int(config.patch_px),
            "target_mpp": float(config.target_mpp) if config.patch_level is None else -1.0,
            "slide_mpp": float(slide_mpp) if slide_mpp is not None else -1.0,
            "mpp_source": slide.mpp_source,
            "params": json.dumps(segment_params_record(config), sort_keys=True),
            "format_version": FORMAT_VERSION,
        }
        write_coords(tmp_path, coords, attrs)
        if geojson_path is not None:
            _write_tissue_geojson(tissue, geojson_path)
        mpp_source = slide.mpp_source
        slide_wh = tuple(slide.dimensions)
        if preview_path is not None:
            _write_preview(slide, image, scale, tissue, coords, patch_px_level0, row.slide_id, preview_path, slide_mpp)

    n = int(len(coords))
    mpp_text = f"mpp {slide_mpp:.4f} from {mpp_source}" if slide_mpp else "no mpp (level-based tiling)"
    ink_text, extra = _ink_report(tissue, slide_mpp) if params.remove_ink else ("", {})
    if n:
        return SlideOutcome("done", f"{len(tissue.contours)} contour(s); {mpp_text}{ink_text}{region_text}",
                            patches=n, extra=extra)
    why = "no patch inside the include annotation" if region_text and not tissue.is_empty else \
        _why_empty(tissue, patch_px_level0, slide_wh)
    return SlideOutcome("empty", why + ink_text + region_text, patches=0, extra=extra)


def _annotation_file(folder: str, slide_id: str) -> Path | None:
    for suffix in (".geojson", ".json"):
        path = Path(folder) / f"{slide_id}{suffix}"
        if path.is_file():
            return path
    return None


def _apply_annotations(coords, patch_px_level0: int, config: SegmentConfig, slide_id: str):
    """Keep the patches the include/exclude GeoJSON of this slide allow; (coords, status text).

    A slide with no include file fails (tiling it whole would silently ignore the restriction);
    a slide with no exclude file has nothing to exclude.
    """
    from extract.geojson import filter_coords, load_polygons

    if config.include_geojson is None and config.exclude_geojson is None:
        return coords, ""
    include = exclude = None
    if config.include_geojson is not None:
        path = _annotation_file(config.include_geojson, slide_id)
        if path is None:
            raise SlideError(f"no include annotation for slide {slide_id}: expected "
                             f"{Path(config.include_geojson) / (slide_id + '.geojson')} (or .json)")
        include = load_polygons(path)
    if config.exclude_geojson is not None:
        path = _annotation_file(config.exclude_geojson, slide_id)
        exclude = load_polygons(path) if path is not None else []
    keep = filter_coords(coords, patch_px_level0, include, exclude, config.contour_fn)
    parts = []
    if include is not None:
        parts.append(f"{len(include)} include polygon(s)")
    if exclude:
        parts.append(f"{len(exclude)} exclude polygon(s)")
    return coords[keep], f"; {', '.join(parts) or 'no annotation'}: {int((~keep).sum())} patch(es) dropped"


def _write_tissue_geojson(tissue, path: Path) -> None:
    from extract.geojson import feature_collection, ink_features, tissue_features, write_geojson

    write_geojson(path, feature_collection(tissue_features(tissue)))
    ink_path = path.with_name(f"{path.stem}.ink.geojson")
    if tissue.ink_contours:
        write_geojson(ink_path, feature_collection(ink_features(tissue)))
    else:
        ink_path.unlink(missing_ok=True)


def _ink_report(tissue, slide_mpp) -> tuple[str, dict]:
    """Ink removed, for the status message and its status.csv columns (percent of the thresholded
    tissue; mm^2 when the slide has an mpp)."""
    sx, sy = tissue.scale
    mm2 = tissue.ink_removed_px * sx * sy * slide_mpp**2 / 1e6 if slide_mpp else None
    colours = ", ".join(f"{c} {100 * px / max(1, tissue.threshold_px):.2f}%"
                        for c, px in tissue.ink_px.items() if px)
    text = f"; ink removed {100 * tissue.ink_fraction:.2f}% of tissue" + (f" ({colours})" if colours else "")
    extra = {"ink_pct": f"{100 * tissue.ink_fraction:.3f}", "ink_mm2": "" if mm2 is None else f"{mm2:.4f}"}
    return text, extra


def _deep_tissue(slide, deep, params):
    """The thumbnail at the model's resolution, its tissue mask, and contours by CLAM's filters."""
    from extract.segmentation import segment_mask

    slide_mpp = slide.require_mpp()
    # The model's native resolution; a slide coarser than that is used at level 0 as it is.
    image, scale = slide.thumbnail(max(1.0, deep.spec.mpp / slide_mpp))
    return image, scale, segment_mask(deep.predict(image), params, scale, rgb=image)


def _why_empty(tissue, patch_px_level0: int, slide_wh: tuple[int, int] | None = None) -> str:
    small = ""
    if slide_wh is not None and min(slide_wh) < patch_px_level0:
        small = f"the slide ({slide_wh[0]}x{slide_wh[1]} px) is smaller than one patch ({patch_px_level0} level-0 px); "
    if tissue.is_empty:
        return small + tissue.describe_empty()
    return small or f"tissue found but smaller than one patch ({patch_px_level0} level-0 px)"


def _write_preview(slide, image, scale, tissue, coords, patch_px_level0, slide_id, path: Path, slide_mpp) -> None:
    from .previews import draw_preview, save_png

    # A 64x image of a small slide is too small to look at: read a larger one for the preview.
    if max(image.shape[:2]) < 800 and max(slide.dimensions) > max(image.shape[:2]):
        image, scale = slide.thumbnail(max(1.0, max(slide.dimensions) / 1200))
    mpp_text = f", {slide_mpp:.3f} um/px" if slide_mpp else ""
    caption = f"{slide_id}: {len(coords)} patches of {patch_px_level0} level-0 px{mpp_text}"
    if tissue.params.remove_ink:
        caption += f", ink {100 * tissue.ink_fraction:.1f}% removed"
    save_png(path, draw_preview(image, scale, tissue.contours, tissue.holes, coords, patch_px_level0, caption,
                                ink=tissue.ink_contours, mpp=slide_mpp))


def _check_slide_mpp(slide_mpp: float | None, check_mpp: bool) -> None:
    if slide_mpp is not None and check_mpp and not (MPP_RANGE[0] <= slide_mpp <= MPP_RANGE[1]):
        raise ConfigError(f"--slide-mpp {slide_mpp:g} is outside {MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} micrometres per "
                          "pixel (20x is about 0.5); pass --no-mpp-check for an unusual scanner")


def run_segment(manifest_path: Path, workspace: Path, config: SegmentConfig, shard: str | None = None,
                overwrite: bool = False, slide_mpp: float | None = None, progress: bool = True,
                cache=None, check_mpp: bool = True):
    """Segment every manifest slide not done yet; returns (BatchSummary, tag).

    ``cache``: a :class:`pipeline.slide_cache.SlideCache` to read slides from local copies.
    """
    if manifest_path is None:
        raise ConfigError("no manifest: pass --manifest CSV or set 'manifest:' in the config")
    _check_slide_mpp(slide_mpp, check_mpp)
    for name in ("include_geojson", "exclude_geojson"):
        folder = getattr(config, name)
        if folder is not None and not Path(folder).is_dir():
            raise ConfigError(f"--{name.replace('_', '-')} {folder}: no such folder; give the folder that holds "
                              "one <slide_id>.geojson per slide (QuPath: File > Export objects as GeoJSON)")
    manifest = load_manifest(manifest_path, require=("path",), check_files=False, check_mpp=check_mpp)
    manifest = manifest.shard(*parse_shard(shard))
    deep = None
    if config.segmenter != "clam":  # loaded once, before any slide: a missing file is one line now
        from extract.deep_tissue import load_segmenter

        from extract.runtime import resolve_device

        deep = load_segmenter(config.segmenter, config.weights, resolve_device(config.seg_device))
        log.info("tissue from the %s model (%s) on %s at %g um/px", config.segmenter, config.weights,
                 deep.device, deep.spec.mpp)

    ws = Workspace(workspace)
    tag = tag_for(config)
    out_dir = ws.segment_dir(tag)
    record = segment_params_record(config)
    digest = fingerprint(record)
    check_stage_params(out_dir, record, digest, overwrite)
    dump_yaml(config, out_dir / "config.yaml")
    (out_dir / "coords").mkdir(parents=True, exist_ok=True)
    if config.previews:
        (out_dir / "previews").mkdir(parents=True, exist_ok=True)

    def work(row, tmp):
        preview = ws.preview_path(tag, row.slide_id) if config.previews else None
        if preview is not None:  # the half-written picture of a killed run (we hold the slide's lock)
            for leftover in preview.parent.glob(f".{preview.stem}.tmp*.png"):
                leftover.unlink(missing_ok=True)
        return segment_slide(row, tmp, config, preview, default_mpp=slide_mpp,
                             geojson_path=ws.tissue_geojson_path(tag, row.slide_id), check_mpp=check_mpp, deep=deep)

    if cache is not None:
        work = cache.wrap(work, manifest.rows, lambda r: ws.coords_path(tag, r.slide_id), out_dir / ".locks")
    summary = run_slides("segment", manifest.rows, out_dir, lambda r: ws.coords_path(tag, r.slide_id),
                         digest, work, overwrite=overwrite, progress=progress, manifest=manifest_path)
    return summary, tag


def segment_command(args) -> int:
    inputs = resolve_stage(args, "segment", SEG_FLAGS)
    check_mpp = not getattr(args, "no_mpp_check", False)
    _check_slide_mpp(getattr(args, "slide_mpp", None), check_mpp)
    if inputs.manifest is not None:  # nothing (not even the log) is written before the manifest passes
        load_manifest(inputs.manifest, require=("path",), check_files=False, check_mpp=check_mpp)
    attach_run_log(inputs.workspace, "segment")
    from .slide_cache import cache_from_args

    with cache_from_args(args) as cache:
        summary, tag = run_segment(inputs.manifest, inputs.workspace, inputs.section, args.shard,
                                   bool(args.overwrite), getattr(args, "slide_mpp", None),
                                   progress=not args.quiet, cache=cache, check_mpp=check_mpp)
    out_dir = Workspace(inputs.workspace).segment_dir(tag)
    print(summary.table())
    print(f"coordinates: {out_dir / 'coords'}")
    if inputs.section.previews:
        print(f"previews:    {out_dir / 'previews'}")
    print(f"geojson:     {out_dir / 'geojson'}  (tissue for QuPath, level-0 px)")
    print(f"status:      {out_dir / 'status.csv'}")
    return summary.exit_code
