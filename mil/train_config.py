"""Training settings without torch: :class:`TrainConfig` and its MHIM section :class:`MHIMConfig`.

A configuration error (an unknown key, a value out of range) must answer at once, before any
heavy import: this module imports neither torch nor the students (model names and keyword
arguments come from :mod:`mil.model_catalog`, read from the source).

    config = TrainConfig(model="abmil", mhim={"mask_ratio": 0.5, "mask_ratio_h": 0.01})
    config.mhim            # MHIMConfig(mask_ratio=0.5, mask_ratio_h=0.01, ...)
    config.to_dict()       # what checkpoints, config.yaml and the fingerprint record
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from extract.errors import ConfigError
from extract.runtime import PRECISIONS, is_number
from mil.evaluation import PROTOCOLS, TASKS

__all__ = ["MHIMConfig", "TrainConfig", "config_fingerprint", "SELECTION_METRICS"]

SELECTION_METRICS = ("auto", "auc", "c_index", "accuracy", "balanced_accuracy", "loss")
#: TrainConfig fields that do not change what a fold computes (excluded from its fingerprint).
_RUNTIME_FIELDS = ("device", "folds", "seeds")

_CHOICES = {
    "mrh_schedule": ("none", "cosine"),
    "mask_score": ("attention", "class_prob"),
    "momentum_schedule": ("constant", "cosine"),
}


def _bad(name: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"The '{name}' parameter of TrainConfig must be {expected}. Got {value!r} instead.")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)




def _remember_given_keys(cls):
    """Record which fields a constructor call named (``_given``), whatever builds the config.

    Checkpoints, ``config.yaml`` and the config fingerprint hold the ``mhim`` section as it was
    written (a recipe's eleven keys, not all twenty fields): :meth:`MHIMConfig.to_dict` returns
    those keys, so fingerprints of experiments trained before the section was typed still match.
    ``dataclasses.replace`` names every field, and so records all of them.
    """
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        object.__setattr__(self, "_given", tuple(names[: len(args)]) + tuple(kwargs))

    cls.__init__ = __init__
    return cls


@_remember_given_keys
@dataclass(frozen=True)
class MHIMConfig:
    """MHIM-MIL settings (REFERENCE names); validated on construction (raises ``ConfigError``).

    Attributes
    ----------
    mask_ratio : float
        Random masking ratio ``r`` in ``[0, 1)`` (v1).
    mask_ratio_h : float
        High-score (HAM) ratio ``h`` in ``[0, 1)``.
    mask_ratio_hr : float or None
        R-HAM random sub-ratio ``hr`` in ``(0, 1]``; ``None`` = plain HAM.
    mask_ratio_l : float
        Low-score (L-HAM) ratio ``l`` in ``[0, 1)`` (v1).
    mrh_schedule : {'none', 'cosine'}
        ``'cosine'``: ``h`` decays per iteration from ``mask_ratio_h`` to 0 over the planned steps.
    mask_score : {'attention', 'class_prob'}
        What the teacher ranks by: ``instance_scores`` (v1) or ``instance_class_prob`` (v2).
    teacher_momentum : float
        EMA momentum ``m`` in ``[0, 1]``.
    momentum_schedule : {'constant', 'cosine'}
        ``'cosine'``: momentum goes from ``m`` to 1.0 over all iterations.
    cl_alpha : float
        Consistency loss weight (>= 0; 0 skips it).
    t_teacher, t_student : float
        Softmax temperatures of the consistency loss (> 0).
    teacher_train_mode : bool
        Run the teacher in train mode (dropout on) as the official code does.
    grn : bool
        MHIM-v2 random masking + Global Recycle Network.
    keep_ratio : float
        v2: share in ``(0, 1]`` of the instances left after the masks that the student keeps;
        the others go through the GRN.
    grn_tokens : int
        Number ``k`` of GRN tokens (>= 1).
    grn_momentum : float
        EMA momentum of the GRN query tokens in ``[0, 1]``.
    grn_at_test : bool
        Append GRN tokens (computed from the whole bag) at inference too.
    grn_heads, grn_dim_head : int
        GRN cross-attention shape.
    grn_dropout : float
        GRN dropout in ``[0, 1)``.
    """

    mask_ratio: float = 0.0
    mask_ratio_h: float = 0.01
    mask_ratio_hr: float | None = None
    mask_ratio_l: float = 0.0
    mrh_schedule: str = "none"
    mask_score: str = "attention"
    teacher_momentum: float = 0.9999
    momentum_schedule: str = "constant"
    cl_alpha: float = 0.1
    t_teacher: float = 0.1
    t_student: float = 1.0
    teacher_train_mode: bool = True
    grn: bool = False
    keep_ratio: float = 0.9
    grn_tokens: int = 1
    grn_momentum: float = 0.9999
    grn_at_test: bool = False
    grn_heads: int = 8
    grn_dim_head: int = 64
    grn_dropout: float = 0.1

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ConfigError:
            return ConfigError(
                f"The '{name}' parameter of MHIMConfig must be {expected}. "
                f"Got {getattr(self, name)!r} instead."
            )

        for name in ("mask_ratio", "mask_ratio_h", "mask_ratio_l", "grn_dropout"):
            v = getattr(self, name)
            if not (is_number(v) and 0.0 <= v < 1.0):
                raise bad(name, "a float in [0, 1)")
        for name in ("teacher_momentum", "grn_momentum"):
            v = getattr(self, name)
            if not (is_number(v) and 0.0 <= v <= 1.0):
                raise bad(name, "a float in [0, 1]")
        hr = self.mask_ratio_hr
        if hr is not None and not (is_number(hr) and 0.0 < hr <= 1.0):
            raise bad("mask_ratio_hr", "None or a float in (0, 1]")
        if not (is_number(self.keep_ratio) and 0.0 < self.keep_ratio <= 1.0):
            raise bad("keep_ratio", "a float in (0, 1]")
        if not (is_number(self.cl_alpha) and self.cl_alpha >= 0.0):
            raise bad("cl_alpha", "a float >= 0")
        for name in ("t_teacher", "t_student"):
            v = getattr(self, name)
            if not (is_number(v) and v > 0.0):
                raise bad(name, "a float > 0")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise bad(name, "one of " + ", ".join(repr(c) for c in choices))
        for name in ("teacher_train_mode", "grn", "grn_at_test"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")
        for name in ("grn_tokens", "grn_heads", "grn_dim_head"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "an int >= 1")
        if self.grn_at_test and not self.grn:
            raise ConfigError(
                "The 'grn_at_test' parameter of MHIMConfig needs 'grn: true' (there is no GRN "
                "to run at test time). Set grn: true or grn_at_test: false."
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "mhim.") -> "MHIMConfig":
        """Build from a mapping; unknown keys raise ConfigError naming the closest valid one."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"The 'mhim' parameter of TrainConfig must be None or a mapping of MHIMConfig "
                              f"fields. Got {data!r} instead.")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            import difflib

            named = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), valid, n=1)
                named.append(repr(f"{where}{key}") + (f" (did you mean '{close[0]}'?)" if close else ""))
            raise ConfigError(f"unknown key(s) {', '.join(named)}; valid keys here: {', '.join(valid)}")
        return cls(**data)

    def to_dict(self) -> dict:
        """The fields named when this config was built (all of them when unknown), in that order."""
        names = getattr(self, "_given", None)
        if names is None:
            names = [f.name for f in dataclasses.fields(self)]
        return {name: getattr(self, name) for name in names}


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
    precision : 'fp32', 'bf16', 'fp16' (autocast, on the CPU too) or 'auto' (bf16 on CUDA where
        supported, else fp16; fp32 on the CPU): :func:`extract.runtime.autocast_dtype`.
    mhim : :class:`MHIMConfig` (a mapping of its fields is converted on construction), or None
        for the baseline.
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
    mhim: MHIMConfig | None = None
    teacher_init: str = "auto"
    student_init: str = "none"
    selection: str = "auto"
    protocol: str = "default"
    class_weights: str = "none"
    feature_norm: str = "none"
    bag: str = "slide"

    def __post_init__(self) -> None:
        from mil.model_catalog import model_options

        models = model_options()
        if self.model not in models:
            raise _bad("model", f"one of {', '.join(models)}", self.model)
        if not isinstance(self.model_kw, dict):
            raise _bad("model_kw", "a mapping of keyword arguments", self.model_kw)
        if "task" in self.model_kw:
            raise ConfigError("Set the task with the 'task' key of the train section, not inside 'model_kw'.")
        options = [o for o in models[self.model] if o != "task"]
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
            if not is_number(v) or v < 0 or (name == "lr" and v == 0):
                raise _bad(name, "a float > 0" if name == "lr" else "a float >= 0", v)
        if self.grad_clip is not None and not (is_number(self.grad_clip) and self.grad_clip > 0):
            raise _bad("grad_clip", "None or a float > 0", self.grad_clip)
        if not (is_number(self.val_ratio) and 0 <= self.val_ratio < 1):
            raise _bad("val_ratio", "a float in [0, 1)", self.val_ratio)
        if not isinstance(self.seeds, tuple) or not self.seeds or not all(_is_int(s) and s >= 0 for s in self.seeds):
            raise _bad("seeds", "a non-empty tuple of ints >= 0", self.seeds)
        if len(set(self.seeds)) != len(self.seeds):
            raise _bad("seeds", "distinct seeds", self.seeds)
        for name, choices in (("scheduler", ("cosine", "none")), ("precision", PRECISIONS),
                              ("student_init", ("none", "fc", "all")), ("selection", SELECTION_METRICS),
                              ("protocol", tuple(PROTOCOLS)), ("class_weights", ("none", "balanced")),
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
        if self.mhim is not None and not isinstance(self.mhim, MHIMConfig):
            object.__setattr__(self, "mhim", MHIMConfig.from_dict(self.mhim))
        if self.student_init != "none" and (self.mhim is None or self.teacher_init == "none"):
            raise ConfigError(
                f"The 'student_init' parameter of TrainConfig is {self.student_init!r} but there is no "
                "baseline to initialise from: it needs 'mhim' set and 'teacher_init' other than 'none'."
            )

    @property
    def selection_metric(self) -> str:
        if self.selection != "auto":
            return self.selection
        return "auc" if self.task == "classification" else "c_index"

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["model_kw"] = dict(self.model_kw)
        out["mhim"] = self.mhim.to_dict() if self.mhim is not None else None
        if out["bag"] == "slide":  # absent = slide: experiments recorded before 'bag' existed stay equal
            del out["bag"]
        out["seeds"] = list(self.seeds)
        if self.classes is not None:
            out["classes"] = list(self.classes)
        return out

    def baseline(self) -> "TrainConfig":
        """The same settings without MHIM: what ``teacher_init: auto`` trains first."""
        return dataclasses.replace(self, mhim=None, teacher_init="none", student_init="none")


def config_fingerprint(config: TrainConfig, split: Mapping[str, Sequence[str]] | None = None) -> str:
    """Digest of what a fold's result depends on: the config (minus device/folds/seeds) and split."""
    data = {k: v for k, v in config.to_dict().items() if k not in _RUNTIME_FIELDS}
    if split is not None:
        data["split"] = {k: list(split[k]) for k in ("train", "val", "test") if k in split}
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
