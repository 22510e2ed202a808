"""Bags in memory, labels and cross-validation splits by case.

    bags = load_bags(features_dir, slide_ids)          # every bag read ONCE, kept on the host
    bags.to_device(torch.device("cuda"))                # all of them as float32, when they fit
    x = bags.get("slide_1", device)                     # float32 [N, D] on the device
    labels = encode_labels(rows, "classification")      # class names -> 0..C-1, recorded
    folds = make_splits(rows, "classification", n_folds=5, seed=2021)

Splits are made at CASE level (``case_id``, defaulting to ``slide_id``): the slides of one patient
never span train, validation and test. Stratification uses the class (classification) or the
event status (survival). A predefined ``fold`` column (test fold = k, validation carved from the
other folds) or ``split`` column (one fold of train/val/test) in the manifest wins over the
generated folds.

Nothing here writes files or prints; problems raise :class:`~extract.errors.BagError` (bags) or
:class:`~extract.errors.ConfigError` (labels, splits) with every offending slide listed.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from extract.errors import BagError, ConfigError
from mil.evaluation import TASKS, check_protocol, check_task

__all__ = [
    "BagSet",
    "LabelMap",
    "Targets",
    "load_bags",
    "encode_labels",
    "make_targets",
    "make_splits",
    "TASKS",
]

log = logging.getLogger(__name__)

#: Share of the free CUDA memory that the float32 copies of all bags may take.
_DEVICE_FRACTION = 0.5


def _listing(items: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# --------------------------------------------------------------------------------------------
# bags
# --------------------------------------------------------------------------------------------


class BagSet:
    """Feature bags of many slides held in memory, indexed by ``slide_id``.

    Host copies keep the stored dtype (float16 by default: half the memory). Training asks for
    ``get(slide_id, device)``, which returns float32 on the device: either from the device cache
    filled by :meth:`to_device` (all bags moved once, when they fit) or by one host-to-device
    copy and cast per call.

    Parameters
    ----------
    features : dict slide_id -> torch.Tensor [N, D]
        Host tensors (float16 or float32), N >= 1, the same D for all.
    coords : dict slide_id -> ndarray int64 [N, 2], optional
        Level-0 top-left patch coordinates in the same row order (for heatmaps).
    attrs : dict slide_id -> dict, optional
        Each slide's bag-file attributes (``patch_size_level0``, ``target_mpp``, ``backbone``, ...),
        kept so that nothing reopens a bag to learn its patch geometry. Keyed by slide even when the
        bags are cases (:func:`mil.cases.case_bags`).
    """

    def __init__(self, features: dict[str, torch.Tensor], coords: dict[str, np.ndarray] | None = None,
                 attrs: dict[str, dict] | None = None):
        dims = {sid: int(t.shape[1]) for sid, t in features.items()}
        if len(set(dims.values())) > 1:
            by_dim: dict[int, list[str]] = defaultdict(list)
            for sid, d in dims.items():
                by_dim[d].append(sid)
            detail = "; ".join(f"D={d}: {_listing(ids, 5)}" for d, ids in sorted(by_dim.items()))
            raise BagError(
                f"bags have different feature sizes ({detail}); they come from different "
                "backbones: point --features at one backbone's folder"
            )
        self._host = dict(features)
        self._coords = dict(coords or {})
        self._attrs = dict(attrs or {})
        self._device_cache: dict[str, torch.Tensor] = {}
        self._cache_device: torch.device | None = None
        self.in_dim = next(iter(dims.values())) if dims else 0

    # mapping-like view
    def __len__(self) -> int:
        return len(self._host)

    def __contains__(self, slide_id: str) -> bool:
        return slide_id in self._host

    def __iter__(self):
        return iter(self._host)

    @property
    def slide_ids(self) -> list[str]:
        return list(self._host)

    def host(self, slide_id: str) -> torch.Tensor:
        """The host tensor [N, D] as stored (float16 or float32)."""
        try:
            return self._host[slide_id]
        except KeyError:
            raise BagError(f"no bag loaded for slide {slide_id!r}") from None

    def coords(self, slide_id: str) -> np.ndarray | None:
        return self._coords.get(slide_id)

    def attrs(self, slide_id: str) -> dict:
        """The attributes of the slide's bag file (empty for CLAM files and ``.pt`` tensors)."""
        return self._attrs.get(slide_id, {})

    def n_instances(self, slide_id: str) -> int:
        return int(self.host(slide_id).shape[0])

    def nbytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of all bags at ``dtype``."""
        size = torch.empty((), dtype=dtype).element_size()
        return sum(t.numel() for t in self._host.values()) * size

    def subset(self, slide_ids: Iterable[str]) -> "BagSet":
        """A BagSet sharing the host tensors of ``slide_ids`` (no copy)."""
        ids = list(slide_ids)
        return BagSet({s: self.host(s) for s in ids}, {s: self._coords[s] for s in ids if s in self._coords},
                      self._attrs)

    def feature_stats(self, slide_ids: Iterable[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and std [D] (float32) over every instance of ``slide_ids``."""
        total = torch.zeros(self.in_dim, dtype=torch.float64)
        squares = torch.zeros(self.in_dim, dtype=torch.float64)
        count = 0
        for sid in slide_ids:
            x = self.host(sid).double()
            total += x.sum(0)
            squares += (x * x).sum(0)
            count += x.shape[0]
        mean = total / max(count, 1)
        std = (squares / max(count, 1) - mean * mean).clamp(min=0).sqrt()
        # A constant dimension would divide by zero; leave it centred but unscaled.
        return mean.float(), torch.where(std > 1e-6, std, torch.ones_like(std)).float()

    def standardized(self, mean: torch.Tensor, std: torch.Tensor) -> "BagSet":
        """A new BagSet with every bag z-scored as ``(x - mean) / std`` (float32 on the host)."""
        return BagSet({s: (t.float() - mean) / std for s, t in self._host.items()}, self._coords, self._attrs)

    def get(self, slide_id: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """float32 [N, D] on ``device`` (cached when :meth:`to_device` moved the bags there)."""
        device = torch.device(device)
        cached = self._device_cache.get(slide_id)
        if cached is not None and cached.device == _canonical(device):
            return cached
        host = self.host(slide_id)
        return host.to(device, non_blocking=device.type == "cuda").float()

    def to_device(self, device: torch.device | str, max_bytes: int | None = None) -> bool:
        """Keep float32 copies of all bags on ``device`` when they fit; returns whether it did.

        On CUDA the budget is half the free memory (``max_bytes`` overrides); on the CPU it is a
        float32 copy of each bag, done once instead of a cast every epoch, within ``max_bytes``
        (default: a quarter of the physical memory). When the bags do not fit, :meth:`get`
        copies and casts one bag per call.
        """
        device = _canonical(torch.device(device))
        need = self.nbytes(torch.float32)
        if max_bytes is None:
            max_bytes = _default_budget(device)
        if need > max_bytes:
            log.info("bags need %.2f GiB as float32 on %s (budget %.2f GiB): copied per step",
                     need / 2**30, device, max_bytes / 2**30)
            self.release_device()
            return False
        if self._cache_device == device and len(self._device_cache) == len(self._host):
            return True  # already there
        if self._cache_device != device:
            self._device_cache = {}
        for sid, host in self._host.items():
            if sid not in self._device_cache:
                self._device_cache[sid] = host.to(device).float()
        self._cache_device = device
        log.info("%d bags kept on %s as float32 (%.2f GiB)", len(self), device, need / 2**30)
        return True

    def release_device(self) -> None:
        """Drop the device copies (host tensors stay)."""
        self._device_cache = {}
        self._cache_device = None


def _canonical(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * _DEVICE_FRACTION)
    try:
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30
    return int(total // 4)


def load_bags(
    features_dir: str | Path,
    slide_ids: Sequence[str],
    allow_missing: bool = False,
    qc_filter=None,
) -> BagSet:
    """Read the bags of ``slide_ids`` once into host memory.

    Parameters
    ----------
    features_dir : folder of ``<slide_id>.h5`` bags (ours or CLAM's; ``.pt`` exports too).
    slide_ids : slides to load, in order.
    allow_missing : skip slides without a bag or with an empty bag (warning listing them)
        instead of raising.
    qc_filter : :class:`extract.patch_qc.QCFilter` or its text (``'focus>=50,background<=0.5'``),
        optional: keep only the patches passing it (bags extracted with ``--qc``); a bag left
        with no patch counts as empty.

    Raises
    ------
    BagError
        Listing every slide without a bag, every empty bag (0 instances) and every unreadable
        or non-finite bag (unless ``allow_missing``; unreadable and non-finite bags always raise).
    """
    from extract.bags import find_bag, read_bag
    from extract.patch_qc import QCFilter, read_qc

    if qc_filter is not None and not isinstance(qc_filter, QCFilter):
        qc_filter = QCFilter.parse(qc_filter)
    qc_dropped = 0
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise BagError(
            f"{features_dir}: feature folder not found; run `wsi-pipeline extract` first or pass "
            "--features pointing at a folder of <slide_id>.h5 bags"
        )
    start = time.perf_counter()
    missing: list[str] = []
    empty: list[str] = []
    broken: list[str] = []
    features: dict[str, torch.Tensor] = {}
    coords: dict[str, np.ndarray] = {}
    attrs: dict[str, dict] = {}
    for sid in slide_ids:
        path = find_bag(features_dir, sid)
        if path is None:
            missing.append(sid)
            continue
        try:
            bag = read_bag(path, keep_float16=True)
        except BagError as exc:
            broken.append(f"{sid} ({exc})")
            continue
        x = bag.features
        bag_coords = getattr(bag, "coords", None)
        if qc_filter:
            try:
                keep = qc_filter.keep(read_qc(path, qc_filter.columns))
            except (BagError, OSError) as exc:
                broken.append(f"{sid} ({str(exc).splitlines()[0]})")
                continue
            qc_dropped += int((~keep).sum())
            x = np.asarray(x)[keep]
            bag_coords = None if bag_coords is None else np.asarray(bag_coords)[keep]
        x = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x)
        if x.ndim != 2:
            broken.append(f"{sid} (features of shape {tuple(x.shape)}, expected [N, D])")
            continue
        if x.shape[0] == 0:
            empty.append(sid)
            continue
        if not x.is_floating_point():
            x = x.float()
        if not bool(torch.isfinite(x).all()):
            broken.append(f"{sid} (non-finite feature values)")
            continue
        features[sid] = x
        attrs[sid] = dict(bag.attrs)
        if bag_coords is not None:
            coords[sid] = np.asarray(bag_coords)

    if broken:
        raise BagError(
            f"{len(broken)} bag(s) in {features_dir} cannot be used; re-extract them:\n  "
            + "\n  ".join(broken[:50])
        )
    if not features and not broken:
        raise BagError(
            f"no bag in {features_dir} for any of the {len(slide_ids)} manifest slide(s) "
            f"(e.g. {slide_ids[0]}.h5); check --features (it should be "
            "<workspace>/features/<backbone_tag>/<seg_tag>) or run `wsi-pipeline extract` first"
        )
    problems = []
    if missing:
        problems.append(f"{len(missing)} slide(s) have no bag in {features_dir}: {_listing(missing)}")
    if empty:
        problems.append(
            f"{len(empty)} bag(s) have 0 instances (no tissue patches): {_listing(empty)}"
        )
    if problems:
        if not allow_missing:
            raise BagError(
                "; ".join(problems)
                + ". Extract them, remove them from the manifest, or pass --allow-missing to skip them."
            )
        log.warning("skipping slides (--allow-missing): %s", "; ".join(problems))
    if not features:
        raise BagError(f"no usable bag in {features_dir} for the {len(slide_ids)} slide(s) asked for")
    bags = BagSet(features, coords, attrs)
    if qc_filter:
        log.info("patch QC %s dropped %d patch(es) across %d bag(s)", qc_filter, qc_dropped, len(bags))
    seconds = time.perf_counter() - start
    log.info("read %d bags (%.2f GiB as stored, %d instances) from %s in %.1f s", len(bags),
             sum(t.numel() * t.element_size() for t in features.values()) / 2**30,
             sum(int(t.shape[0]) for t in features.values()), features_dir, seconds)
    return bags


# --------------------------------------------------------------------------------------------
# labels and targets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelMap:
    """Class names in index order. ``classes[i]`` is the name of class ``i``."""

    classes: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def index(self, name: str) -> int:
        return self.classes.index(str(name))

    def to_dict(self) -> dict:
        return {"classes": list(self.classes), "mapping": {c: i for i, c in enumerate(self.classes)}}


_INT = re.compile(r"[0-9]+")


def encode_labels(rows: Sequence, classes: Sequence[str] | None = None) -> LabelMap:
    """Class mapping of the manifest labels.

    Parameters
    ----------
    rows : manifest rows with a ``label`` (class name or integer) and ``slide_id``.
    classes : explicit class names in index order (e.g. from the config); a label outside them
        is an error. Default: integer labels are kept as given (they must be 0..C-1) and names
        are sorted.

    Raises
    ------
    ConfigError
        Empty or unknown labels (every row listed), integer labels that are not 0..C-1, or a
        single class (nothing to learn).
    """
    labels = [(r.slide_id, None if r.label is None else str(r.label).strip()) for r in rows]
    empty = [sid for sid, lab in labels if not lab]
    if empty:
        raise ConfigError(f"{len(empty)} slide(s) have no label: {_listing(empty)}; fill the 'label' column")
    present = sorted({lab for _, lab in labels})
    if classes is not None:
        classes = tuple(str(c) for c in classes)
        unknown = [f"{sid} ({lab!r})" for sid, lab in labels if lab not in classes]
        if unknown:
            raise ConfigError(
                f"{len(unknown)} slide(s) have a label outside the configured classes "
                f"{list(classes)}: {_listing(unknown)}; fix the manifest or the 'classes' setting"
            )
    if len(present) < 2:
        raise ConfigError(
            f"all {len(labels)} slides have the label {present[0]!r}: training needs at "
            "least two classes; check the manifest's 'label' column"
        )
    if classes is not None:
        return LabelMap(classes)
    if all(_INT.fullmatch(n) for n in present):
        values = sorted({int(n) for n in present})
        if values != list(range(len(values))):
            raise ConfigError(
                f"integer labels are kept as class indices and must be 0..C-1 with every class "
                f"present; got {values}. Renumber them, use class names, or list the classes in "
                "the 'classes' setting"
            )
        return _IntLabelMap(tuple(str(v) for v in values))
    return LabelMap(tuple(present))


@dataclass(frozen=True)
class _IntLabelMap(LabelMap):
    """Integer labels kept as given ('1' and '01' are class 1)."""

    def index(self, name: str) -> int:
        value = int(str(name).strip())
        if not 0 <= value < len(self.classes):
            raise ValueError(name)
        return value


@dataclass
class Targets:
    """Per-slide training targets.

    ``task == 'classification'``: ``y[slide_id]`` class index and ``labels`` the mapping.
    ``task == 'survival'``: ``time[slide_id]`` (>= 0) and ``event[slide_id]`` (1 event, 0 censored);
    time bins are fitted per fold on its training slides.
    """

    task: str
    y: dict[str, int] = field(default_factory=dict)
    time: dict[str, float] = field(default_factory=dict)
    event: dict[str, int] = field(default_factory=dict)
    labels: LabelMap | None = None

    @property
    def n_classes(self) -> int | None:
        return self.labels.n_classes if self.labels is not None else None

    def strata(self, slide_ids: Sequence[str]) -> list[str]:
        """What splits stratify on: the class (classification) or the event status (survival)."""
        if self.task == "classification":
            return [str(self.y[s]) for s in slide_ids]
        return [str(self.event[s]) for s in slide_ids]

    def to_dict(self) -> dict:
        if self.task == "classification":
            counts = Counter(self.y.values())
            out = {"task": self.task, **self.labels.to_dict()}
            out["counts"] = {c: counts.get(i, 0) for i, c in enumerate(self.labels.classes)}
            return out
        return {"task": self.task, "n_slides": len(self.time),
                "n_events": int(sum(self.event.values()))}


def make_targets(rows: Sequence, task: str, classes: Sequence[str] | None = None) -> Targets:
    """Targets of the manifest rows for ``task`` (see :class:`Targets`)."""
    check_task(task)
    if task == "classification":
        mapping = encode_labels(rows, classes)
        return Targets(task, y={r.slide_id: mapping.index(r.label) for r in rows}, labels=mapping)
    bad = [r.slide_id for r in rows if r.time is None or r.event is None]
    if bad:
        raise ConfigError(
            f"survival needs 'time' and 'event' for every slide; {len(bad)} slide(s) lack them: {_listing(bad)}"
        )
    events = sum(int(r.event) for r in rows)
    if events == 0:
        raise ConfigError("survival needs observed events; every slide is censored (event = 0)")
    return Targets(task, time={r.slide_id: float(r.time) for r in rows},
                   event={r.slide_id: int(r.event) for r in rows})


# --------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------


def _cases(rows: Sequence, strata: dict[str, str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Slides per case (case_id, default slide_id) and each case's stratum (its commonest)."""
    slides: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        slides[r.case_id or r.slide_id].append(r.slide_id)
    case_stratum = {}
    for case, ids in slides.items():
        counts = Counter(strata[s] for s in ids)
        case_stratum[case] = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    return dict(slides), case_stratum


def _assign_folds(cases: Sequence[str], case_stratum: dict[str, str], sizes: dict[str, int],
                  n_folds: int, rng: np.random.Generator) -> dict[str, int]:
    """Stratified group K-fold: per stratum, cases in random order go to the fold with the fewest
    slides of that stratum (ties: fewest slides overall, then a rotating fold order)."""
    fold_of: dict[str, int] = {}
    total = np.zeros(n_folds, dtype=np.int64)
    for stratum in sorted(set(case_stratum[c] for c in cases)):
        members = [c for c in cases if case_stratum[c] == stratum]
        members = [members[i] for i in rng.permutation(len(members))]
        # big cases first so they balance, stable among equals (random order kept)
        members.sort(key=lambda c: -sizes[c])
        per_fold = np.zeros(n_folds, dtype=np.int64)
        offset = int(rng.integers(n_folds))
        for i, case in enumerate(members):
            order = [(offset + i + j) % n_folds for j in range(n_folds)]
            k = min(order, key=lambda f: (per_fold[f], total[f]))
            fold_of[case] = k
            per_fold[k] += sizes[case]
            total[k] += sizes[case]
    return fold_of


def _carve_val(cases: Sequence[str], case_stratum: dict[str, str], sizes: dict[str, int],
               val_ratio: float, rng: np.random.Generator) -> set[str]:
    """A stratified share ``val_ratio`` of ``cases`` (by slides), at least one case per stratum
    that has two or more cases (so validation AUC is defined)."""
    chosen: set[str] = set()
    for stratum in sorted(set(case_stratum[c] for c in cases)):
        members = [c for c in cases if case_stratum[c] == stratum]
        members = [members[i] for i in rng.permutation(len(members))]
        n_slides = sum(sizes[c] for c in members)
        want = max(1, round(val_ratio * n_slides))
        taken = 0
        # at least one case (validation AUC needs every class), but leave one for training
        for case in members[: len(members) - 1]:
            if taken > 0 and taken >= want:
                break
            chosen.add(case)
            taken += sizes[case]
    return chosen


def make_splits(
    rows: Sequence,
    task: str,
    n_folds: int,
    seed: int,
    val_ratio: float = 0.15,
    protocol: str = "default",
    strata: dict[str, str] | None = None,
) -> list[dict[str, list[str]]]:
    """Cross-validation splits at case level, stratified and repeatable by ``seed``.

    Parameters
    ----------
    rows : manifest rows (``slide_id``, ``case_id``, ``label`` or ``event``, ``fold``, ``split``).
    task : 'classification' (stratify by label) or 'survival' (stratify by event status).
    n_folds : folds of the generated K-fold (ignored with a predefined ``fold``/``split``
        column).
    seed : shuffling seed; the same seed gives the same folds.
    val_ratio : share of each fold's training slides (whole cases) carved out for validation,
        stratified; e.g. 10/75 gives TCGA's 65:10:25 with 4 folds.
    protocol : 'default' (validation carved from training) or 'paper' (the official MHIM-MIL
        folds, :mod:`mil.official_splits`, and validation IS the test fold, as the official
        CAMELYON16 code; optimistic, for comparison only).
    strata : slide_id -> stratum, overriding the label / event status.

    Returns
    -------
    list of dict
        One ``{"train": [...], "val": [...], "test": [...]}`` per fold, slide ids in manifest
        order.

    Raises
    ------
    ConfigError
        Bad parameters, a case that spans several predefined folds/splits, a fold with an
        empty train or test part.
    """
    check_task(task, "make_splits")
    check_protocol(protocol, "make_splits")
    if not (isinstance(val_ratio, (int, float)) and 0 <= val_ratio < 1):
        raise ConfigError(f"The 'val_ratio' parameter of make_splits must be a float in [0, 1). Got {val_ratio!r} instead.")
    rows = list(rows)
    if strata is None:
        if task == "classification":
            strata = {r.slide_id: str(r.label) for r in rows}
        else:
            strata = {r.slide_id: str(r.event) for r in rows}
    slides, case_stratum = _cases(rows, strata)
    sizes = {c: len(ids) for c, ids in slides.items()}
    order = {r.slide_id: i for i, r in enumerate(rows)}
    rng = np.random.default_rng([int(seed), 0x5B11])

    def ids_of(cases: Iterable[str]) -> list[str]:
        return sorted((s for c in cases for s in slides[c]), key=order.__getitem__)

    predefined_fold = any(r.fold is not None for r in rows)
    predefined_split = any(r.split is not None for r in rows)
    if predefined_fold or predefined_split:
        column = "fold" if predefined_fold else "split"
        value = {r.slide_id: (r.fold if predefined_fold else r.split) for r in rows}
        unset = [r.slide_id for r in rows if value[r.slide_id] is None]
        if unset:
            raise ConfigError(
                f"the manifest's '{column}' column is empty for {len(unset)} slide(s): {_listing(unset)}; "
                f"fill it for every slide or drop the column"
            )
        case_value: dict[str, object] = {}
        spanning = []
        for case, ids in slides.items():
            vals = sorted({str(value[s]) for s in ids})
            if len(vals) > 1:
                spanning.append(f"{case} ({', '.join(vals)})")
            case_value[case] = value[ids[0]]
        if spanning:
            raise ConfigError(
                f"{len(spanning)} case(s) have slides in different {column}s, so one patient would "
                f"be in train and test: {_listing(spanning)}; put each case's slides in one {column}"
            )
        if predefined_split:
            parts = {p: [c for c in slides if case_value[c] == p] for p in ("train", "val", "test")}
            if not parts["train"] or not parts["test"]:
                raise ConfigError("the manifest's 'split' column needs at least one 'train' and one 'test' slide")
            if protocol == "paper":
                parts["train"] = parts["train"] + parts["val"]
                parts["val"] = parts["test"]
            elif not parts["val"]:
                if val_ratio <= 0:
                    raise ConfigError("no 'val' slides in the 'split' column and val_ratio is 0: nothing to select the model on")
                val = _carve_val(parts["train"], case_stratum, sizes, val_ratio, rng)
                parts["train"] = [c for c in parts["train"] if c not in val]
                parts["val"] = sorted(val)
            if n_folds not in (None, 1):
                log.info("the manifest's 'split' column defines one fold; ignoring folds=%s", n_folds)
            return [{k: ids_of(v) for k, v in parts.items()}]
        fold_values = sorted({int(v) for v in case_value.values()})
        if len(fold_values) < 2:
            raise ConfigError(f"the manifest's 'fold' column has a single value {fold_values}; cross-validation needs at least two folds")
        if n_folds is not None and n_folds != len(fold_values):
            log.info("the manifest's 'fold' column defines %d folds %s; ignoring folds=%s",
                     len(fold_values), fold_values, n_folds)
        fold_of = {c: fold_values.index(int(v)) for c, v in case_value.items()}
        n_folds = len(fold_values)
    else:
        if not isinstance(n_folds, int) or isinstance(n_folds, bool) or n_folds < 2:
            raise ConfigError(f"The 'folds' parameter must be an int >= 2. Got {n_folds!r} instead.")
        if n_folds > len(slides):
            raise ConfigError(f"cannot make {n_folds} folds from {len(slides)} case(s); use fewer folds")
        per_stratum = Counter(case_stratum.values())
        small = {s: n for s, n in per_stratum.items() if n < n_folds}
        if small:
            log.warning("stratum/strata %s have fewer cases than folds (%d): some test folds lack them",
                        small, n_folds)
        if protocol == "paper":  # the official folds: StratifiedKFold over the cases shuffled by the seed
            from mil.official_splits import official_folds

            cases = list(slides)  # first appearance = manifest (= official label file) order
            try:
                fold_of = official_folds(cases, [case_stratum[c] for c in cases], n_folds, seed)
            except ValueError as exc:
                raise ConfigError(f"protocol paper: the official fold procedure failed ({exc})") from exc
        else:
            fold_of = _assign_folds(list(slides), case_stratum, sizes, n_folds, rng)

    splits = []
    for k in range(n_folds):
        test = [c for c in slides if fold_of[c] == k]
        rest = [c for c in slides if fold_of[c] != k]
        if not test or not rest:
            raise ConfigError(f"fold {k} has an empty {'test' if not test else 'training'} part; use fewer folds")
        if protocol == "paper":
            val = set(test)
            train = rest
        else:
            fold_rng = np.random.default_rng([int(seed), 0x5B11, k + 1])
            val = _carve_val(rest, case_stratum, sizes, val_ratio, fold_rng) if val_ratio > 0 else set()
            train = [c for c in rest if c not in val]
            if not val:
                raise ConfigError(f"fold {k}: validation is empty (val_ratio={val_ratio}); raise val_ratio or add cases")
        splits.append({"train": ids_of(train), "val": ids_of(val), "test": ids_of(test)})
    return splits
