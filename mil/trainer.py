"""One fold of MIL training: baseline or MHIM-MIL, early stopping, checkpoints and exact resume.

    config = TrainConfig(model="abmil", mhim={"mask_ratio": 0.5, "mask_ratio_h": 0.01})
    result = train_fold(bags, split, config, fold_dir, resume=True, targets=targets, seed=2021, fold=0)
    model = load_student(fold_dir / "best.pt")           # for evaluation
    rows = predict_bags(model, [(sid, bags.get(sid))], "cpu")

Protocol (REFERENCE.md sections 5-6): Adam (lr 2e-4, weight decay 1e-5), cosine annealing per
epoch, one bag per step in an order shuffled by a seeded generator; baseline step = task loss
(cross-entropy, or the discrete-time survival NLL) + the student's auxiliary loss; MHIM step via
:class:`mil.mhim.MHIM` with the teacher's EMA after every optimizer step. ``teacher_init: auto``
first trains the baseline of the same fold and seed (in ``fold_dir/baseline``, itself resumable
and skipped once finished) and loads its best weights into the teacher. Validation runs the
student alone in eval mode on full bags every epoch; the model is selected and early-stopped on
the validation AUC (C-index for survival), ties broken by the lower validation loss; the
patience counter runs only after ``min_epochs``.

Files in ``fold_dir``::

    last.pt        everything needed to continue exactly (written atomically every epoch)
    best.pt        the selected student + what evaluation needs to rebuild it
    history.csv    one row per epoch (losses, kept-instance ratio, validation metrics, seconds)
    done.json      the marker of a finished fold (best epoch, validation metrics)
    baseline/      the teacher's baseline run (MHIM with ``teacher_init: auto``)

Resume: a run killed after epoch ``e`` continues from ``last.pt`` with every RNG state restored
(torch, CUDA, NumPy, Python, the shuffling and masking generators), so on the CPU it reaches
bit-for-bit the weights of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extract.errors import CheckpointError, ConfigError, PipelineError
from mil.data import TASKS, BagSet, Targets

__all__ = [
    "TrainConfig",
    "FoldResult",
    "TrainingError",
    "EarlyStopping",
    "train_fold",
    "predict_bags",
    "load_student",
    "read_checkpoint",
    "resolve_device",
    "fold_seed",
    "config_fingerprint",
    "software_versions",
    "CHECKPOINT_VERSION",
]

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
SELECTION_METRICS = ("auto", "auc", "c_index", "accuracy", "balanced_accuracy", "loss")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
#: TrainConfig fields that do not change what a fold computes (excluded from its fingerprint).
_RUNTIME_FIELDS = ("device", "folds", "seeds")


class TrainingError(PipelineError):
    """Training diverged (non-finite loss) or cannot go on."""


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


def _bad(name: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"The '{name}' parameter of TrainConfig must be {expected}. Got {value!r} instead.")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class TrainConfig:
    """Training settings of one experiment (every fold and seed); validated on construction.

    Attributes
    ----------
    model, model_kw : registry name of the student and its keyword arguments
        (``mil.models.list_models()``; e.g. ``{"gated": false}``).
    task : 'classification' (softmax CE) or 'survival' (discrete-time NLL over ``n_bins``).
    classes : class names in index order (default: sorted names, integers kept as given).
    n_bins : survival time bins (quantiles of the uncensored training times).
    epochs : planned epochs (the cosine schedule and MHIM's decay span them).
    lr, weight_decay : Adam.
    scheduler : 'cosine' (per epoch, to 0 at ``epochs``) or 'none'.
    patience : epochs without improvement before stopping, counted after ``min_epochs``;
        None trains all ``epochs``.
    min_epochs : epochs before the patience counter starts.
    grad_clip : max gradient L2 norm, or None.
    val_ratio : share of each training fold (whole cases, stratified) used for validation.
    folds, seeds : cross-validation folds and the seeds to repeat them with.
    device : 'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:N'.
    precision : 'fp32', 'bf16', 'fp16' (autocast on CUDA; the CPU always runs fp32) or 'auto'
        (bf16 on CUDA where supported, else fp16).
    mhim : ``mil.mhim.MHIMConfig`` fields, or None for the baseline.
    teacher_init : 'auto' (train the baseline of the same fold/seed first and load its best
        weights), 'none' (the teacher starts as a copy of the random student), or a path to an
        experiment folder, fold folder or checkpoint of the same model.
    student_init : 'none', 'fc' (embedding layer) or 'all', from the teacher's source.
    selection : metric for model selection and early stopping: 'auto' (AUC for
        classification, C-index for survival), 'auc', 'c_index', 'accuracy',
        'balanced_accuracy' or 'loss'.
    protocol : 'default' (validation carved from training) or 'paper' (validation = the test
        fold, as the official MHIM-MIL CAMELYON16 code: optimistic, for comparison only).
    class_weights : 'none' or 'balanced' (classification: cross-entropy weights
        ``n / (C * n_c)`` from the training split, so a minority subtype is not ignored).
    bag : 'slide' (one bag per slide) or 'case' (one bag per case: the case's slides
        concatenated in manifest order, :mod:`mil.cases`; as MHIM-v2 runs survival).
    feature_norm : 'none' (features as extracted, as CLAM and MHIM-MIL use them) or
        'standardize' (z-score every feature dimension with the mean and std of the fold's
        training instances; stored in the checkpoint and applied again at inference). Helps
        where the features carry a large common offset (random or some foundation-model
        features) and training data are few.
    """

    model: str = "abmil"
    model_kw: dict = field(default_factory=dict)
    task: str = "classification"
    classes: tuple[str, ...] | None = None
    n_bins: int = 4
    epochs: int = 200
    lr: float = 2e-4
    weight_decay: float = 1e-5
    scheduler: str = "cosine"
    patience: int | None = 30
    min_epochs: int = 0
    grad_clip: float | None = None
    val_ratio: float = 0.15
    folds: int = 5
    seeds: tuple[int, ...] = (2021,)
    device: str = "auto"
    precision: str = "fp32"
    mhim: dict | None = None
    teacher_init: str = "auto"
    student_init: str = "none"
    selection: str = "auto"
    protocol: str = "default"
    class_weights: str = "none"
    feature_norm: str = "none"
    bag: str = "slide"

    def __post_init__(self) -> None:
        from mil.models import list_models

        if self.model not in list_models():
            raise _bad("model", f"one of {', '.join(list_models())}", self.model)
        if not isinstance(self.model_kw, dict):
            raise _bad("model_kw", "a mapping of keyword arguments", self.model_kw)
        if "task" in self.model_kw:
            raise ConfigError("Set the task with the 'task' key of the train section, not inside 'model_kw'.")
        from mil.models import model_info

        options = [o for o in model_info(self.model).options if o != "task"]
        unknown = sorted(set(self.model_kw) - set(options))
        if unknown:
            raise ConfigError(
                f"The 'model_kw' parameter of TrainConfig has key(s) {', '.join(map(repr, unknown))} that "
                f"model {self.model!r} does not take. Accepted: {', '.join(options)}."
            )
        if self.task not in TASKS:
            raise _bad("task", f"one of {', '.join(TASKS)}", self.task)
        if self.classes is not None and (len(self.classes) < 2 or len(set(self.classes)) != len(self.classes)):
            raise _bad("classes", "None or at least two distinct class names", self.classes)
        for name, low in (("n_bins", 1), ("epochs", 1), ("min_epochs", 0), ("folds", 1)):
            v = getattr(self, name)
            if not _is_int(v) or v < low:
                raise _bad(name, f"an int >= {low}", v)
        if self.patience is not None and (not _is_int(self.patience) or self.patience < 1):
            raise _bad("patience", "None or an int >= 1", self.patience)
        for name in ("lr", "weight_decay"):
            v = getattr(self, name)
            if not _is_num(v) or v < 0 or (name == "lr" and v == 0):
                raise _bad(name, "a float > 0" if name == "lr" else "a float >= 0", v)
        if self.grad_clip is not None and not (_is_num(self.grad_clip) and self.grad_clip > 0):
            raise _bad("grad_clip", "None or a float > 0", self.grad_clip)
        if not (_is_num(self.val_ratio) and 0 <= self.val_ratio < 1):
            raise _bad("val_ratio", "a float in [0, 1)", self.val_ratio)
        if not isinstance(self.seeds, tuple) or not self.seeds or not all(_is_int(s) and s >= 0 for s in self.seeds):
            raise _bad("seeds", "a non-empty tuple of ints >= 0", self.seeds)
        if len(set(self.seeds)) != len(self.seeds):
            raise _bad("seeds", "distinct seeds", self.seeds)
        for name, choices in (("scheduler", ("cosine", "none")), ("precision", PRECISIONS),
                              ("student_init", ("none", "fc", "all")), ("selection", SELECTION_METRICS),
                              ("protocol", ("default", "paper")), ("class_weights", ("none", "balanced")),
                              ("feature_norm", ("none", "standardize")), ("bag", ("slide", "case"))):
            if getattr(self, name) not in choices:
                raise _bad(name, f"one of {', '.join(choices)}", getattr(self, name))
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            raise _bad("device", "'auto', 'cpu', 'cuda' or 'cuda:N'", self.device)
        if not isinstance(self.teacher_init, str) or not self.teacher_init:
            raise _bad("teacher_init", "'auto', 'none' or a path", self.teacher_init)
        if self.task == "survival" and self.selection in ("auc", "accuracy", "balanced_accuracy"):
            raise _bad("selection", "'auto', 'c_index' or 'loss' for survival", self.selection)
        if self.task == "classification" and self.selection == "c_index":
            raise _bad("selection", "'auto', 'auc', 'accuracy', 'balanced_accuracy' or 'loss' for classification",
                       self.selection)
        if self.mhim is not None:
            self.mhim_config()  # validates
        if self.student_init != "none" and (self.mhim is None or self.teacher_init == "none"):
            raise ConfigError(
                f"The 'student_init' parameter of TrainConfig is {self.student_init!r} but there is no "
                "baseline to initialise from: it needs 'mhim' set and 'teacher_init' other than 'none'."
            )

    def mhim_config(self):
        """The :class:`mil.mhim.MHIMConfig` of the ``mhim`` section (None for a baseline)."""
        if self.mhim is None:
            return None
        from mil.mhim import MHIMConfig

        if not isinstance(self.mhim, Mapping):
            raise _bad("mhim", "None or a mapping of MHIMConfig fields", self.mhim)
        valid = [f.name for f in dataclasses.fields(MHIMConfig)]
        unknown = sorted(set(self.mhim) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(repr('mhim.' + k) for k in unknown)}; valid keys here: {', '.join(valid)}"
            )
        return MHIMConfig(**self.mhim)

    @property
    def selection_metric(self) -> str:
        if self.selection != "auto":
            return self.selection
        return "auc" if self.task == "classification" else "c_index"

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if out["bag"] == "slide":  # absent = slide: experiments recorded before 'bag' existed stay equal
            del out["bag"]
        out["seeds"] = list(self.seeds)
        if self.classes is not None:
            out["classes"] = list(self.classes)
        return out

    def baseline(self) -> "TrainConfig":
        """The same settings without MHIM: what ``teacher_init: auto`` trains first."""
        return dataclasses.replace(self, mhim=None, teacher_init="none", student_init="none")


def balanced_class_weights(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    """``n / (C * n_c)`` per class from integer training labels (absent classes get ``n / C``)."""
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=n_classes).float()
    return counts.sum() / (n_classes * counts.clamp(min=1))


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                           weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over bags of ``weight[y] * CE(logits, y)``; ``logits`` [B, C], ``target`` [B].

    Not ``F.cross_entropy(weight=...)``: its mean divides by the summed weights, which cancels
    them exactly for the usual batch of one bag.
    """
    loss = F.cross_entropy(logits.float(), target, reduction="none")
    return (loss * weight[target]).mean() if weight is not None else loss.mean()


def config_fingerprint(config: TrainConfig, split: Mapping[str, Sequence[str]] | None = None) -> str:
    """Digest of what a fold's result depends on: the config (minus device/folds/seeds) and split."""
    data = {k: v for k, v in config.to_dict().items() if k not in _RUNTIME_FIELDS}
    if split is not None:
        data["split"] = {k: list(split[k]) for k in ("train", "val", "test") if k in split}
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolve_device(spec: str = "auto") -> torch.device:
    """``'auto'`` -> CUDA when available, else CPU; a CUDA request without CUDA is an error."""
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} was asked for but CUDA is not available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            log.warning("precision %s is for CUDA; the CPU trains in fp32", precision)
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def fold_seed(seed: int, fold: int) -> int:
    """The seed of one (seed, fold) run: distinct per fold, repeatable."""
    return int(np.random.SeedSequence([int(seed), int(fold)]).generate_state(1)[0])


def _seed_everything(value: int) -> None:
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


# --------------------------------------------------------------------------------------------
# early stopping
# --------------------------------------------------------------------------------------------


@dataclass
class EarlyStopping:
    """Selection on a validation score (higher is better), ties broken by the lower loss.

    The patience counter only runs for epochs after ``min_epochs``. A NaN score (e.g. AUC on a
    one-class validation set) counts as -inf, so the loss decides.
    """

    patience: int | None
    min_epochs: int = 0
    best_score: float = -math.inf
    best_loss: float = math.inf
    best_epoch: int = 0
    counter: int = 0

    def update(self, epoch: int, score: float, loss: float) -> bool:
        """Record epoch ``epoch`` (1-based); returns whether it is the new best."""
        score = -math.inf if score is None or math.isnan(score) else float(score)
        loss = math.inf if loss is None or math.isnan(loss) else float(loss)
        improved = score > self.best_score or (score == self.best_score and loss < self.best_loss)
        if improved:
            self.best_score, self.best_loss, self.best_epoch, self.counter = score, loss, epoch, 0
        elif epoch > self.min_epochs:
            self.counter += 1
        return improved

    def should_stop(self, epoch: int) -> bool:
        return self.patience is not None and epoch >= self.min_epochs and self.counter >= self.patience

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


# --------------------------------------------------------------------------------------------
# results, checkpoints
# --------------------------------------------------------------------------------------------


@dataclass
class FoldResult:
    """Outcome of :func:`train_fold` (also rebuilt from ``done.json`` for a skipped fold)."""

    fold_dir: Path
    seed: int
    fold: int
    status: str  # 'done' (trained now) or 'skipped' (finished before)
    best_epoch: int
    metric: str
    best_value: float
    val_metrics: dict
    epochs_run: int
    seconds_per_epoch: float
    stopped_early: bool = False
    baseline: "FoldResult | None" = None

    @classmethod
    def from_done(cls, fold_dir: Path, done: dict, status: str = "skipped") -> "FoldResult":
        return cls(Path(fold_dir), int(done["seed"]), int(done["fold"]), status, int(done["best_epoch"]),
                   done["metric"], float(done["best_value"]), dict(done["val_metrics"]),
                   int(done["epochs_run"]), float(done["seconds_per_epoch"]), bool(done.get("stopped_early")))


def _atomic_write_bytes(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write via a temporary file in the same folder, fsync, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save(obj: Any, path: Path) -> None:
    _atomic_write_bytes(path, lambda f: torch.save(obj, f))


def _write_json(obj: Any, path: Path) -> None:
    text = json.dumps(obj, indent=2, default=_json_default, allow_nan=True)
    _atomic_write_bytes(path, lambda f: f.write(text + "\n"), mode="w")


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray,)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _write_history(rows: list[dict], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def write(f):
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({k: _fmt(v) for k, v in row.items()})

    _atomic_write_bytes(path, write, mode="w")


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`train_fold` (``best.pt`` or ``last.pt``).

    Raises
    ------
    CheckpointError
        Missing, unreadable or corrupt file, or one without the keys the pipeline writes.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; train this fold first (wsi-pipeline train)")
    try:
        ckpt = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types (RuntimeError, EOFError, UnpicklingError, ...)
        raise CheckpointError(
            f"{path}: unreadable or corrupt checkpoint ({type(exc).__name__}: {exc}); delete it and "
            "retrain the fold (or --resume from last.pt)"
        ) from exc
    needed = ("format_version", "model", "model_kw", "in_dim", "n_classes", "task", "student")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: not a wsi-pipeline checkpoint (expected keys {', '.join(needed)}; found {have})"
        )
    if int(ckpt["format_version"]) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {ckpt['format_version']} is newer than this code "
            f"({CHECKPOINT_VERSION}); update wsi-pipeline"
        )
    return ckpt


def _build_student(meta: Mapping[str, Any]) -> nn.Module:
    from mil.models import create_model

    return create_model(meta["model"], int(meta["in_dim"]), int(meta["n_classes"]),
                        task=meta["task"], **dict(meta["model_kw"]))


def load_student(checkpoint_path: str | Path, device: str | torch.device = "cpu",
                 which: str = "student") -> nn.Module:
    """Rebuild the trained student of a checkpoint, in eval mode, on ``device``.

    ``which='teacher'`` rebuilds the MHIM teacher (the EMA model) saved with it instead; a
    checkpoint without one (a baseline) raises CheckpointError.

    The returned module carries ``wsi_meta`` (model, model_kw, in_dim, n_classes, task, classes,
    bin_edges, seed, fold, epoch, val_threshold), which :func:`predict_bags` uses. With an MHIM
    ``grn_at_test`` setting the returned module is the MHIM wrapper (the GRN runs at inference).
    """
    path = Path(checkpoint_path)
    ckpt = read_checkpoint(path)
    if which not in ("student", "teacher"):
        raise ConfigError(f"The 'which' parameter of load_student must be 'student' or 'teacher'. Got {which!r} instead.")
    if which == "teacher" and ckpt.get("teacher") is None:
        raise CheckpointError(f"{path}: no MHIM teacher in this checkpoint (a baseline, or trained before "
                              "teachers were saved with the best model)")
    try:
        model = _build_student(ckpt)
        model.load_state_dict(ckpt[which], strict=True)
    except (RuntimeError, KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: the weights do not fit model {ckpt['model']!r} ({exc})") from exc
    mhim = ckpt.get("mhim")
    if which == "student" and mhim and mhim.get("grn_at_test") and ckpt.get("grn") is not None:
        from mil.mhim import MHIM, MHIMConfig

        wrapper = MHIM(model, MHIMConfig(**mhim))
        wrapper.grn.load_state_dict(ckpt["grn"])
        model = wrapper
    model.wsi_meta = {k: ckpt.get(k) for k in (
        "model", "model_kw", "in_dim", "n_classes", "task", "classes", "bin_edges", "seed", "fold",
        "epoch", "val_threshold", "kind", "feature_mean", "feature_std")}
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# inference
# --------------------------------------------------------------------------------------------


def _iter_bags(bag_list: Any, device: torch.device) -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(bag_list, BagSet):
        for sid in bag_list.slide_ids:
            yield sid, bag_list.get(sid, device)
        return
    for item in bag_list:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            sid, x = item
        elif hasattr(item, "slide_id") and hasattr(item, "features"):
            sid, x = item.slide_id, item.features
        else:
            raise ConfigError(
                "The 'bag_list' parameter of predict_bags must be a BagSet or an iterable of "
                f"(slide_id, features [N, D]) pairs. Got an item of type {type(item).__name__} instead."
            )
        x = torch.as_tensor(x)
        yield str(sid), x.to(device, non_blocking=True).float()


@torch.no_grad()
def predict_bags(
    model: nn.Module,
    bag_list: Any,
    device: str | torch.device = "cpu",
    task: str | None = None,
    instance_scores: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> list[dict]:
    """Run ``model`` (eval mode, no_grad) on full bags.

    Parameters
    ----------
    model : a student (or MHIM wrapper) returning ``MILOutput``; see :func:`load_student`.
    bag_list : a :class:`~mil.data.BagSet` or an iterable of ``(slide_id, features [N, D])``.
    device : where to run.
    task : 'classification' or 'survival'; default ``model.wsi_meta['task']`` or classification.
    instance_scores : also return the per-instance scores (and attention where the model has it).

    Returns
    -------
    list of dict, one per bag, in input order:
        ``slide_id``; ``logits`` ndarray [C]; classification: ``prob`` ndarray [C] (the
        student's ``class_probabilities``: softmax of the logits, DSMIL v1 its two-stream mean);
        survival: ``risk`` float (higher = earlier event) and ``survival`` ndarray [K];
        ``instance_scores`` ndarray [N] (what MHIM ranks by: attention logits for AB-MIL) and
        ``attention`` ndarray [N] when the model reports one.
    """
    device = torch.device(device)
    if task is None:
        task = (getattr(model, "wsi_meta", None) or {}).get("task") or "classification"
    was_training = model.training
    model.eval()
    ids: list[str] = []
    logits: list[torch.Tensor] = []
    per_bag: list[dict] = []
    ctx = (torch.autocast(device_type=device.type, dtype=autocast_dtype)
           if autocast_dtype is not None else contextlib.nullcontext())
    meta = getattr(model, "wsi_meta", None) or {}
    head = getattr(model, "student", model)  # an MHIM wrapper predicts with its student
    norm = None
    if meta.get("feature_mean") is not None:  # the checkpoint was trained on standardized features
        norm = (torch.tensor(meta["feature_mean"], device=device), torch.tensor(meta["feature_std"], device=device))
    try:
        for sid, x in _iter_bags(bag_list, device):
            if norm is not None:
                x = (x.float() - norm[0]) / norm[1]
            with ctx:
                out = model(x.unsqueeze(0) if x.dim() == 2 else x)
            ids.append(sid)
            logits.append(out.logits[0].float())
            extra = {}
            if task != "survival" and hasattr(head, "class_probabilities"):
                extra["prob"] = head.class_probabilities(out)[0].float().cpu().numpy()
            if instance_scores:
                # With grn_at_test the GRN's k tokens are appended after the N instances: keep
                # the instances' scores only, one per patch coordinate.
                extra["instance_scores"] = out.instance_scores[0, : x.shape[-2]].float().cpu().numpy()
                att = (out.extras or {}).get("attention") if hasattr(out, "extras") else None
                if isinstance(att, torch.Tensor) and att.dim() >= 2 and att.shape[-1] == x.shape[-2]:
                    extra["attention"] = att.reshape(-1, att.shape[-1])[0].float().cpu().numpy()
            per_bag.append(extra)
    finally:
        model.train(was_training)
    if not ids:
        return []
    stacked = torch.stack(logits)  # one transfer for the whole list
    rows: list[dict] = []
    if task == "survival":
        from mil.survival import risk_from_logits

        risk, surv = risk_from_logits(stacked)
        risk, surv = risk.cpu().numpy(), surv.cpu().numpy()
    else:
        prob = stacked.softmax(dim=1).cpu().numpy()
    lg = stacked.cpu().numpy()
    for i, sid in enumerate(ids):
        row = {"slide_id": sid, "logits": lg[i]}
        if task == "survival":
            row["risk"] = float(risk[i])
            row["survival"] = surv[i]
        else:
            row["prob"] = prob[i]  # softmax(logits), unless the student reports its own below
        row.update(per_bag[i])
        rows.append(row)
    return rows


def _val_metrics(rows: list[dict], ids: Sequence[str], targets: Targets, task: str,
                 bins: dict[str, int] | None, metric: str) -> dict[str, float]:
    """Validation loss and metrics from :func:`predict_bags` rows."""
    from mil.metrics import concordance_index, multiclass_metrics

    logits = torch.from_numpy(np.stack([r["logits"] for r in rows])).float()
    out: dict[str, float] = {}
    if task == "classification":
        y = np.array([targets.y[s] for s in ids])
        out["loss"] = float(F.cross_entropy(logits, torch.from_numpy(y).long()))
        prob = np.stack([r["prob"] for r in rows])
        m = multiclass_metrics(y, prob)
        out["auc"] = m["auc"]
        out["accuracy"] = m["accuracy"]
        out["balanced_accuracy"] = m["balanced_accuracy"]
        out["f1_macro"] = m["f1_macro"]
    else:
        from mil.survival import nll_survival_loss

        ev = np.array([targets.event[s] for s in ids])
        b = np.array([bins[s] for s in ids])
        out["loss"] = float(nll_survival_loss(logits, torch.from_numpy(b).long(), torch.from_numpy(ev)))
        out["c_index"] = concordance_index(np.array([targets.time[s] for s in ids]), ev,
                                           np.array([r["risk"] for r in rows]))
    return out


def _selection_score(metrics: Mapping[str, float], metric: str) -> float:
    return -metrics["loss"] if metric == "loss" else metrics[metric]


# --------------------------------------------------------------------------------------------
# the fold
# --------------------------------------------------------------------------------------------


def software_versions() -> dict:
    from importlib import metadata

    try:
        version = metadata.version("wsi-pipeline")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"wsi_pipeline": version, "torch": str(torch.__version__), "numpy": str(np.__version__),
            "cuda": str(torch.version.cuda)}


def _rng_state(generators: Mapping[str, torch.Generator]) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state((npst["name"], np.asarray(npst["keys"], dtype=np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    for k, g in generators.items():
        g.set_state(state["generators"][k].cpu() if hasattr(state["generators"][k], "cpu") else state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


def _teacher_source(config: TrainConfig, fold_dir: Path, seed: int, fold: int) -> Path | None:
    """Where the teacher's weights come from (None: a copy of the random student)."""
    if config.mhim is None or config.teacher_init == "none":
        return None
    if config.teacher_init == "auto":
        return fold_dir / "baseline" / "best.pt"
    p = Path(config.teacher_init).expanduser()
    candidates = [p] if p.is_file() else [
        p / "best.pt", p / f"seed_{seed}" / f"fold_{fold}" / "best.pt", p / f"fold_{fold}" / "best.pt",
        p / f"fold_{fold}_model_best_auc.pt",  # a released official teacher folder (modules/init_ckp/...)
    ]
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError(
        f"teacher_init {config.teacher_init!r}: no checkpoint for seed {seed} fold {fold} (looked for "
        f"{', '.join(str(c) for c in candidates)}); point it at a finished baseline experiment of the "
        "same model, or use teacher_init: auto"
    )


def _load_teacher_state(path: Path, meta: Mapping[str, Any], seed: int, fold: int,
                        split_digest: str) -> Mapping[str, Any]:
    """The student state of a baseline checkpoint, checked against this fold."""
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError:
        # a foreign state dict (e.g. a released official MHIM teacher, mapped by mil.checkpoints):
        # accepted, but the split is unverifiable
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable teacher checkpoint ({type(exc).__name__}: {exc})") from exc
        log.warning("%s is not a wsi-pipeline checkpoint: its training split cannot be checked against "
                    "this fold (test-set leakage is on you)", path)
        return obj
    for key in ("model", "in_dim", "n_classes", "task"):
        if ckpt.get(key) != meta.get(key):
            raise CheckpointError(
                f"{path}: teacher checkpoint has {key}={ckpt.get(key)!r} but this run has {meta.get(key)!r}; "
                "the teacher must be the same model as the student"
            )
    if dict(ckpt.get("model_kw") or {}) != dict(meta.get("model_kw") or {}):
        raise CheckpointError(
            f"{path}: teacher checkpoint was built with model_kw={ckpt.get('model_kw')} but this run uses "
            f"{meta.get('model_kw')} (e.g. gated vs non-gated attention); use a baseline of the same architecture"
        )
    if ckpt.get("split_digest") is not None and ckpt.get("split_digest") != split_digest:
        raise CheckpointError(
            f"{path}: teacher checkpoint was trained on another split (seed {ckpt.get('seed')}, fold "
            f"{ckpt.get('fold')}) than this run (seed {seed}, fold {fold}); its training slides may include "
            "this fold's test slides. Use the baseline of the same folds and seed, or teacher_init: auto"
        )
    return ckpt["student"]


def _split_digest(split: Mapping[str, Sequence[str]]) -> str:
    text = json.dumps({k: list(split[k]) for k in ("train", "val", "test") if k in split}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train_fold(
    bags: BagSet,
    split: Mapping[str, Sequence[str]],
    config: TrainConfig,
    fold_dir: str | Path,
    resume: bool = False,
    *,
    targets: Targets,
    seed: int | None = None,
    fold: int = 0,
    on_epoch_end: Callable[[Path, int, dict], None] | None = None,
) -> FoldResult:
    """Train (or resume, or skip) one fold and seed.

    Parameters
    ----------
    bags : every bag of the split, in memory.
    split : ``{"train": [...], "val": [...], "test": [...]}`` slide ids (test is not touched).
    config : the experiment's :class:`TrainConfig`.
    fold_dir : output folder of this fold (created).
    resume : continue an unfinished run from ``last.pt``; without it an unfinished run is an error.
    targets : labels (classification) or times/events (survival) of every slide.
    seed, fold : the run's identity (``seed`` defaults to ``config.seeds[0]``); together they seed
        everything (:func:`fold_seed`).
    on_epoch_end : called as ``on_epoch_end(fold_dir, epoch, history_row)`` after each epoch's
        checkpoint is written (progress display; an exception raised here stops the run like a
        kill, leaving a resumable ``last.pt``).

    Returns
    -------
    FoldResult
    """
    fold_dir = Path(fold_dir)
    seed = config.seeds[0] if seed is None else int(seed)
    if targets.task != config.task:
        raise ConfigError(f"targets are for {targets.task!r} but the config's task is {config.task!r}")
    train_ids, val_ids = list(split["train"]), list(split["val"])
    if not train_ids or not val_ids:
        raise ConfigError(f"{fold_dir}: the split needs training and validation slides "
                          f"(got {len(train_ids)} train, {len(val_ids)} val)")
    absent = [s for s in train_ids + val_ids if s not in bags]
    if absent:
        raise ConfigError(f"{fold_dir}: {len(absent)} slide(s) of the split have no loaded bag: {absent[:10]}")
    fingerprint = config_fingerprint(config, split)
    done_path, last_path, best_path = fold_dir / "done.json", fold_dir / "last.pt", fold_dir / "best.pt"

    if done_path.is_file():
        done = json.loads(done_path.read_text())
        if done.get("config_fingerprint") != fingerprint:
            raise CheckpointError(
                f"{fold_dir} holds a finished run with other settings or another split; use a new "
                "experiment name (or delete that folder to retrain it)"
            )
        log.info("%s: finished before (best epoch %s, val %s %.4f); skipped", fold_dir,
                 done["best_epoch"], done["metric"], done["best_value"])
        return FoldResult.from_done(fold_dir, done)
    if last_path.is_file() and not resume:
        raise CheckpointError(
            f"{fold_dir}: an unfinished run is there (last.pt); pass --resume to continue it or delete "
            "the folder to start over"
        )

    # ---- the teacher's baseline first (itself resumable, skipped when finished)
    baseline_result = None
    if config.mhim is not None and config.teacher_init == "auto":
        log.info("%s: training the teacher's baseline (teacher_init: auto)", fold_dir)
        baseline_result = train_fold(bags, split, config.baseline(), fold_dir / "baseline", resume=resume,
                                     targets=targets, seed=seed, fold=fold, on_epoch_end=on_epoch_end)

    device = resolve_device(config.device)
    amp_dtype = _amp_dtype(config.precision, device)
    task = config.task
    run_seed = fold_seed(seed, fold)
    _seed_everything(run_seed)

    # ---- targets on the device, once
    bin_edges = None
    bins = None
    if task == "classification":
        n_out = targets.n_classes
        tgt = {s: torch.tensor([targets.y[s]], dtype=torch.long, device=device) for s in train_ids}
        classes = list(targets.labels.classes)

        weight = None
        if config.class_weights == "balanced":
            weight = balanced_class_weights([targets.y[s] for s in train_ids], n_out).to(device)
            log.info("%s: balanced class weights %s", fold_dir, [round(w, 3) for w in weight.tolist()])

        def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return weighted_cross_entropy(logits, target, weight)
    else:
        from mil.survival import assign_bins, make_time_bins, nll_survival_loss

        n_out = config.n_bins
        classes = None
        edges = make_time_bins([targets.time[s] for s in train_ids], [targets.event[s] for s in train_ids],
                               config.n_bins)
        bin_edges = edges.tolist()
        all_ids = train_ids + val_ids
        bins = dict(zip(all_ids, assign_bins([targets.time[s] for s in all_ids], edges).tolist()))
        tgt = {s: (torch.tensor([bins[s]], dtype=torch.long, device=device),
                   torch.tensor([targets.event[s]], dtype=torch.long, device=device)) for s in train_ids}

        def loss_fn(logits: torch.Tensor, target) -> torch.Tensor:
            return nll_survival_loss(logits.float(), target[0], target[1])

    feature_mean = feature_std = None
    if config.feature_norm == "standardize":
        feature_mean, feature_std = bags.feature_stats(train_ids)  # training instances only
        bags = bags.subset(train_ids + val_ids).standardized(feature_mean, feature_std)
        feature_mean, feature_std = feature_mean.tolist(), feature_std.tolist()

    meta = {
        "format_version": CHECKPOINT_VERSION,
        "feature_mean": feature_mean, "feature_std": feature_std,
        "model": config.model, "model_kw": dict(config.model_kw), "in_dim": bags.in_dim,
        "n_classes": int(n_out), "task": task, "classes": classes, "bin_edges": bin_edges,
        "mhim": dict(config.mhim) if config.mhim is not None else None,
        "seed": seed, "fold": fold, "split_digest": _split_digest(split), "protocol": config.protocol,
    }

    # ---- model, MHIM wrapper, optimizer (built fresh and seeded; resume overwrites the states)
    student = _build_student(meta).to(device)
    wrapper = None
    shuffle_gen = torch.Generator().manual_seed(run_seed)
    generators = {"shuffle": shuffle_gen}
    if config.mhim is not None:
        from mil.mhim import MHIM

        mask_gen = torch.Generator(device=device).manual_seed(run_seed + 1)
        generators["mask"] = mask_gen
        wrapper = MHIM(student, config.mhim_config(), generator=mask_gen).to(device)
        params = wrapper.trainable_parameters()
    else:
        params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
                 if config.scheduler == "cosine" else None)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    stopper = EarlyStopping(config.patience, config.min_epochs)
    metric = config.selection_metric
    history: list[dict] = []
    start_epoch = 0
    teacher_from = None

    if last_path.is_file():  # resume (checked above)
        ckpt = read_checkpoint(last_path, map_location=device)
        if ckpt.get("config_fingerprint") != fingerprint:
            raise CheckpointError(
                f"{last_path}: this unfinished run was started with other settings or another split; "
                "resume it with the same config, or delete the folder to start over"
            )
        if wrapper is not None:
            wrapper.load_state_dict(ckpt["wrapper"])
        else:
            student.load_state_dict(ckpt["student"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        stopper.load_state_dict(ckpt["early_stopping"])
        history = list(ckpt["history"])
        start_epoch = int(ckpt["epoch"])
        teacher_from = ckpt.get("teacher_from")
        _set_rng_state(ckpt["rng"], generators)
        log.info("%s: resuming after epoch %d/%d", fold_dir, start_epoch, config.epochs)
    elif wrapper is not None:
        source = _teacher_source(config, fold_dir, seed, fold)
        if source is not None:
            state = _load_teacher_state(source, meta, seed, fold, meta["split_digest"])
            wrapper.init_teacher_from(state)
            if config.student_init != "none":
                wrapper.init_student_from(state, config.student_init)
            teacher_from = str(source)
            log.info("%s: teacher initialised from %s (student_init: %s)", fold_dir, source, config.student_init)
        # the student-init probe forward draws random numbers: re-seed so that the run's random
        # stream does not depend on where the teacher came from
        _seed_everything(run_seed)

    fold_dir.mkdir(parents=True, exist_ok=True)
    bags.to_device(device)
    run_meta = {"config": config.to_dict(), "config_fingerprint": fingerprint, "software": software_versions()}
    model_for_eval = wrapper if (wrapper is not None and config.mhim_config().grn_at_test) else student
    n_train = len(train_ids)
    total_steps = config.epochs * n_train
    seconds: list[float] = [float(r["seconds"]) for r in history]

    epoch = start_epoch
    stopped_early = bool(history) and stopper.should_stop(start_epoch)
    while epoch < config.epochs and not stopped_early:
        t0 = time.perf_counter()
        (wrapper or student).train()
        order = torch.randperm(n_train, generator=shuffle_gen).tolist()
        # running sums stay on the device (no per-step sync); MHIM reports its parts as floats
        sums = {"loss": torch.zeros((), device=device), "task": torch.zeros((), device=device),
                "aux": torch.zeros((), device=device)}
        task_sum = aux_sum = cl_sum = kept_sum = 0.0
        for pos, idx in enumerate(order):
            sid = train_ids[idx]
            step = epoch * n_train + pos
            x = bags.get(sid, device).unsqueeze(0)
            target = tgt[sid]
            with (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                  else contextlib.nullcontext()):
                if wrapper is not None:
                    loss, info = wrapper.training_step(x, target, step, total_steps, loss_fn)
                    task_sum += float(info["ce"])
                    aux_sum += float(info["aux"])
                    cl_sum += float(info["cl"])
                    kept_sum += float(info["kept_ratio"])
                else:
                    out = student(x)
                    task_loss = loss_fn(out.logits, target)
                    loss = student.training_loss(out, target, task_loss)
                    sums["task"] += task_loss.detach().float()
                    sums["aux"] += (loss - task_loss).detach().float()
                    kept_sum += 1.0
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if wrapper is not None:
                wrapper.after_optimizer_step(step, total_steps)
            sums["loss"] += loss.detach().float()
        lr_used = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        train = {k: float(v) / n_train for k, v in sums.items()}
        if wrapper is not None:
            train["task"], train["aux"] = task_sum / n_train, aux_sum / n_train
        if not math.isfinite(train["loss"]):
            raise TrainingError(
                f"{fold_dir}: the training loss became {train['loss']} in epoch {epoch + 1}; lower the "
                "learning rate, set grad_clip, or check the bags for extreme values. last.pt still holds "
                f"epoch {epoch}"
            )

        rows = predict_bags(model_for_eval, [(s, bags.get(s, device)) for s in val_ids], device, task=task,
                            instance_scores=False, autocast_dtype=amp_dtype)
        val = _val_metrics(rows, val_ids, targets, task, bins, metric)
        epoch += 1
        improved = stopper.update(epoch, _selection_score(val, metric), val["loss"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        sec = time.perf_counter() - t0
        seconds.append(sec)
        row = {"epoch": epoch, "lr": lr_used, "train_loss": train["loss"],
               ("train_ce" if task == "classification" else "train_nll"): train["task"],
               "train_cl": cl_sum / n_train, "train_aux": train["aux"], "kept_ratio": kept_sum / n_train}
        row.update({f"val_{k}": v for k, v in val.items()})
        row.update({"best_epoch": stopper.best_epoch, "seconds": sec})
        history.append(row)

        if improved or not best_path.is_file():
            threshold = None
            if task == "classification" and n_out == 2:
                threshold = _youden([targets.y[s] for s in val_ids], [r["prob"][1] for r in rows])
            best = {**meta, "kind": "best", "epoch": epoch, "student": student.state_dict(),
                    # the EMA teacher at the selected epoch: evaluate reports it next to the student
                    "teacher": wrapper.teacher.state_dict() if wrapper is not None else None,
                    "grn": wrapper.grn.state_dict() if wrapper is not None and wrapper.grn is not None else None,
                    "val_metrics": val, "val_threshold": threshold, "teacher_from": teacher_from, **run_meta}
            _save(best, best_path)
        stopped_early = stopper.should_stop(epoch)
        last = {**meta, "kind": "last", "epoch": epoch, "student": student.state_dict(),
                "teacher": wrapper.teacher.state_dict() if wrapper is not None else None,
                "wrapper": wrapper.state_dict() if wrapper is not None else None,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "early_stopping": stopper.state_dict(), "history": history,
                "rng": _rng_state(generators), "teacher_from": teacher_from, **run_meta}
        _save(last, last_path)
        _write_history(history, fold_dir / "history.csv")
        name = f"{fold_dir.parent.name}/{fold_dir.name}" if fold_dir.name == "baseline" else fold_dir.name
        last_one = stopped_early or epoch == config.epochs
        level = logging.INFO if (epoch == start_epoch + 1 or epoch % 10 == 0 or last_one) else logging.DEBUG
        log.log(level, "%s epoch %d/%d: train loss %.4f, val loss %.4f, val %s %.4f (best epoch %d), %.2f s/epoch",
                name, epoch, config.epochs, train["loss"], val["loss"], metric,
                val["loss"] if metric == "loss" else val[metric], stopper.best_epoch, sec)
        if on_epoch_end is not None:
            on_epoch_end(fold_dir, epoch, dict(row))

    if stopped_early:
        log.info("%s: early stop after epoch %d (best %d)", fold_dir, epoch, stopper.best_epoch)
    best_row = next(r for r in history if r["epoch"] == stopper.best_epoch)
    val_best = {k[4:]: v for k, v in best_row.items() if k.startswith("val_")}
    best_ckpt = read_checkpoint(best_path)
    done = {
        "seed": seed, "fold": fold, "best_epoch": stopper.best_epoch, "metric": metric,
        "best_value": val_best[metric],
        "val_metrics": val_best, "val_threshold": best_ckpt.get("val_threshold"),
        "epochs_run": epoch, "stopped_early": stopped_early,
        "seconds_per_epoch": float(np.mean(seconds)) if seconds else 0.0,
        "config_fingerprint": fingerprint, "teacher_from": teacher_from,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _write_json(done, done_path)
    result = FoldResult.from_done(fold_dir, done, status="done")
    result.baseline = baseline_result
    return result


def _youden(y: Sequence[int], p: Sequence[float]) -> float | None:
    from mil.metrics import youden_threshold

    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return None
    return float(youden_threshold(y, np.asarray(p, dtype=np.float64)))
