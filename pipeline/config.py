"""YAML configuration mapped onto frozen dataclasses, validated on load.

Unknown keys are errors that name the key path (a mistyped key never passes silently);
command-line flags override only what the user set (argparse defaults are ``None``); the
resolved configuration is written next to every output.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from extract.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        named = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            named.append(repr(f"{where}{key}") + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(
            f"unknown key(s) {', '.join(named)}; valid keys here: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"bad value for '{key}'")
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"The '{key}' key must be a mapping. Got {value!r} instead.")
        return from_dict(tp, value, where=f"{key}.")
    if origin in (tuple, list):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"The '{key}' key must be a list. Got {value!r} instead.")
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, key) for v in value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"The '{key}' key must be true or false. Got {value!r} instead.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"The '{key}' key must be a whole number. Got {value!r} instead.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"The '{key}' key must be a number. Got {value!r} instead.")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"The '{key}' key must be a string. Got {value!r} instead.")
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"The '{key}' key must be a mapping. Got {value!r} instead.")
        return dict(value)
    return value


def override(config, **flags):
    """A copy of ``config`` with the flags that are not None (an unset flag changes nothing)."""
    changes = {k: v for k, v in flags.items() if v is not None}
    return dataclasses.replace(config, **changes) if changes else config


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def dump_yaml(config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config) if is_dataclass(config) else config, sort_keys=False))


# -- stage sections ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SegmentConfig:
    """Tissue segmentation and tiling. ``None`` segmentation values come from ``preset``."""

    preset: str = "default"
    sthresh: int | None = None
    mthresh: int | None = None
    close: int | None = None
    use_otsu: bool | None = None
    a_t: float | None = None
    a_h: float | None = None
    max_n_holes: int | None = None
    remove_ink: bool | None = None
    ink_colours: str | None = None
    include_geojson: str | None = None  # folder of <slide_id>.geojson: only patches inside these polygons
    exclude_geojson: str | None = None  # folder of <slide_id>.geojson: patches inside these polygons dropped
    segmenter: str = "clam"  # clam | grandqc | hest (deep models need weights: a local file)
    weights: str | None = None
    seg_device: str = "auto"
    target_mpp: float = 0.5
    patch_px: int = 256
    patch_level: int | None = None  # set = CLAM mode: tile at a pyramid level, no mpp needed
    step_px: int | None = None
    contour_fn: str = "four_pt"
    use_padding: bool = True
    seg_downsample: float = 64.0
    tag: str | None = None
    previews: bool = True

    def __post_init__(self):
        if self.patch_px < 16:
            raise ConfigError(f"The 'patch_px' parameter (--patch-size) must be >= 16. Got {self.patch_px} instead.")
        if self.target_mpp <= 0:
            raise ConfigError(f"The 'target_mpp' parameter must be > 0 micrometres. Got {self.target_mpp} instead.")
        if self.patch_level is not None and self.patch_level < 0:
            raise ConfigError(f"The 'patch_level' parameter must be >= 0. Got {self.patch_level} instead.")
        if self.segmenter not in ("clam", "grandqc", "hest"):
            raise ConfigError(f"The 'segmenter' parameter must be clam, grandqc or hest. Got {self.segmenter!r} instead.")
        if self.contour_fn not in ("four_pt", "four_pt_hard", "center", "basic"):
            raise ConfigError(
                "The 'contour_fn' parameter must be one of four_pt, four_pt_hard, center, basic. "
                f"Got {self.contour_fn!r} instead."
            )


@dataclass(frozen=True)
class ExtractConfig:
    """Feature extraction with one backbone."""

    backbone: str = "resnet50_trunc"
    backbone_kw: str | None = None  # timm:<name> only: "key=value,..." for timm.create_model
    weights: str = "imagenet"
    batch_size: int | str = 256  # or "auto": from the free device memory (64 on a CPU)
    num_workers: int = 2
    device: str = "auto"
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    dtype: str = "float16"
    compile: bool = False
    seg_tag: str | None = None
    export_pt: bool = False
    # A slide whose patches are unreadable at full resolution beyond this fraction (re-read from a
    # coarser level or dropped) is 'degraded' (bag kept, flagged in status.csv) or 'failed'.
    max_reread: float = 0.05
    reread_action: str = "degraded"
    qc: str | None = None  # patch QC stored in the bag: "blur,background,ink" (extract/patch_qc.py)

    def __post_init__(self):
        if not 0 <= self.max_reread <= 1:
            raise ConfigError(f"The 'max_reread' parameter must be a fraction in [0, 1]. Got {self.max_reread} instead.")
        if self.reread_action not in ("degraded", "failed"):
            raise ConfigError(f"The 'reread_action' parameter must be degraded or failed. Got {self.reread_action!r} instead.")
        if isinstance(self.batch_size, str):
            if self.batch_size.strip().isdigit():
                object.__setattr__(self, "batch_size", int(self.batch_size))
            elif self.batch_size != "auto":
                raise ConfigError(f"The 'batch_size' parameter must be a number >= 1 or 'auto'. Got {self.batch_size!r} instead.")
        if self.batch_size != "auto" and self.batch_size < 1:
            raise ConfigError(f"The 'batch_size' parameter must be >= 1. Got {self.batch_size} instead.")
        if self.num_workers < 0:
            raise ConfigError(f"The 'num_workers' parameter must be >= 0. Got {self.num_workers} instead.")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"The 'precision' parameter must be auto, bf16, fp16 or fp32. Got {self.precision!r} instead.")
        if self.qc is not None:
            from extract.patch_qc import parse_qc

            parse_qc(self.qc)
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"The 'dtype' parameter must be float16 or float32. Got {self.dtype!r} instead.")


@dataclass(frozen=True)
class EvaluateConfig:
    """The ``evaluate:`` section (flags override what they set)."""

    experiment: str | None = None
    features: str | None = None
    heatmaps: str | None = None  # a number of slides, or "all"
    protocol: str = "default"
    device: str = "auto"
    n_boot: int = 1000
    gallery_k: int = 8
    cmap: str = "viridis"
    threshold: str = "auto"  # binary decision rule: auto | youden | argmax (mil.evaluation)
    heatmap_mode: str = "absolute"  # absolute | rank (pipeline.heatmaps)

    def __post_init__(self):
        from mil.evaluation import THRESHOLD_RULES, check_protocol

        from .heatmaps import MODES

        if self.heatmap_mode not in MODES:
            raise ConfigError(f"The 'heatmap_mode' parameter must be one of {', '.join(MODES)}. "
                              f"Got {self.heatmap_mode!r} instead.")
        if self.threshold not in THRESHOLD_RULES:
            raise ConfigError(f"The 'threshold' parameter must be one of {', '.join(THRESHOLD_RULES)}. "
                              f"Got {self.threshold!r} instead.")
        check_protocol(self.protocol)
        if self.n_boot < 1:
            raise ConfigError(f"The 'n_boot' parameter must be >= 1. Got {self.n_boot} instead.")
        if self.gallery_k < 1:
            raise ConfigError(f"The 'gallery_k' parameter must be >= 1. Got {self.gallery_k} instead.")
        parse_heatmaps(self.heatmaps)


def parse_heatmaps(value: Any) -> int | None:
    """``--heatmaps`` as a count: ``None``/0 -> 0, a number -> that many, ``'all'`` -> None (all)."""
    if value is None:
        return 0
    if isinstance(value, str) and value.strip().lower() == "all":
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        n = -1
    if n < 0:
        raise ConfigError(f"The 'heatmaps' parameter must be a number >= 0 or 'all'. Got {value!r} instead.")
    return n


#: Keys of the ``train:`` section that are not TrainConfig fields (the stage's own).
TRAIN_STAGE_KEYS = ("recipe", "experiment", "features", "allow_missing", "qc_filter")


@functools.cache
def train_section_class():
    """``TrainSection``: every TrainConfig field optional (None = not set) + the stage's keys.

    It checks key names and types of the ``train:`` section as written; the recipe it names is
    merged in by :func:`pipeline.train_stage.resolve_train_config`, which builds the TrainConfig.
    """
    from mil.train_config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    specs: list[tuple[str, Any, Any]] = [
        (name, typing.Optional[bool if name == "allow_missing" else str], field(default=None))
        for name in TRAIN_STAGE_KEYS
    ]
    specs += [(f.name, typing.Optional[hints[f.name]], field(default=None)) for f in fields(TrainConfig)]
    return dataclasses.make_dataclass("TrainSection", specs, frozen=True)


# -- the root ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PipelineConfig:
    """One YAML config for every command: where (manifest, workspace), what (name) and a typed
    section per stage. Built by :func:`load_config`; every command and ``run`` validate here.

    Attributes
    ----------
    manifest, workspace : Path or None
        Resolved once against the config file's folder (absolute paths stay as written).
    name : str or None
        Default experiment name (``train.experiment`` wins).
    segment, extract, evaluate : the stage sections.
    train : ``TrainSection`` (:func:`train_section_class`): the keys as typed; :attr:`raw` keeps
        them as written (an explicit ``mhim: null`` turns a recipe's MHIM off).
    slurm : dict
        Per-stage Slurm resources, checked by :func:`pipeline.submit.stage_resources`.
    source : Path or None
        The config file; None for a config made of flags alone.
    raw : dict
        The mapping as loaded (excluded from comparisons).
    """

    manifest: Path | None = None
    workspace: Path | None = None
    name: str | None = None
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: Any = None
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    slurm: dict = field(default_factory=dict)
    source: Path | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def base(self) -> Path:
        """The folder relative paths inside the config resolve against (the cwd without a file)."""
        return self.source.resolve().parent if self.source is not None else Path.cwd()

    def section(self, name: str):
        return getattr(self, name)

    def train_keys(self) -> dict:
        """The ``train:`` section's keys as written (``null`` values included)."""
        return dict(self.raw.get("train") or {})

    def resolve_train(self, flags: dict | None = None):
        """(TrainConfig, recipe path or None): the recipe ``train:`` names, its inline keys, then
        ``flags`` (:func:`pipeline.train_stage.resolve_train_config`); errors name the file."""
        from .train_stage import resolve_train_config

        try:
            return resolve_train_config(self.train_keys(), self.base, flags)
        except ConfigError as exc:
            if self.source is None:
                raise
            raise ConfigError(f"{self.source}: {exc}") from exc


#: The top-level keys of a config file.
TOP_LEVEL_KEYS = tuple(f.name for f in fields(PipelineConfig) if f.name not in ("source", "raw"))


def load_config(path: str | Path | None) -> PipelineConfig:
    """The :class:`PipelineConfig` of a YAML file (``None``: every section at its defaults).

    Every problem is a :class:`ConfigError` whose message starts with the file: unknown keys at
    any level (with the closest valid one), wrong types, values out of range.
    """
    if path is None:
        return PipelineConfig(train=train_section_class()())
    path = Path(path)
    raw = load_yaml(path)
    base = path.resolve().parent
    try:
        unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS), key=str)
        if unknown:
            named = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), TOP_LEVEL_KEYS, n=1)
                named.append(repr(key) + (f" (did you mean '{close[0]}'?)" if close else ""))
            raise ConfigError(f"unknown top-level key(s) {', '.join(named)}; valid: {', '.join(sorted(TOP_LEVEL_KEYS))}")
        sections = {name: from_dict(cls, raw.get(name), where=f"{name}.")
                    for name, cls in (("segment", SegmentConfig), ("extract", ExtractConfig),
                                      ("train", train_section_class()), ("evaluate", EvaluateConfig))}
        slurm = raw.get("slurm") or {}
        if not isinstance(slurm, dict):
            raise ConfigError(f"The 'slurm' key must be a mapping. Got {slurm!r} instead.")
        name = _coerce(typing.Optional[str], raw.get("name"), "name")
        where = {k: _coerce(typing.Optional[str], raw.get(k), k) for k in ("manifest", "workspace")}
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    where = {k: (base / Path(v).expanduser() if v else None) for k, v in where.items()}
    return PipelineConfig(name=name, slurm=dict(slurm), source=path, raw=raw, **where, **sections)


# -- the command-line view --------------------------------------------------------------------

@dataclass(frozen=True)
class StageInputs:
    """What every stage command resolves first: manifest, workspace and its config section."""

    manifest: Path | None
    workspace: Path
    section: Any
    config: PipelineConfig

    @property
    def raw(self) -> dict:
        return self.config.raw


def resolve_stage(args, section_name: str, flag_names: tuple[str, ...] = ()) -> StageInputs:
    """The root config of ``--config`` (every section checked), then ``--manifest``/``--workspace``
    and the stage's flags over it. Relative paths in the file resolve against its folder."""
    config = load_config(getattr(args, "config", None))
    section = override(config.section(section_name), **{name: getattr(args, name, None) for name in flag_names})
    manifest = getattr(args, "manifest", None) or config.manifest
    workspace = getattr(args, "workspace", None) or config.workspace
    if workspace is None:
        raise ConfigError("no workspace: pass --workspace DIR or set 'workspace:' in the config")
    return StageInputs(Path(manifest) if manifest else None, Path(workspace), section, config)
