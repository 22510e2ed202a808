"""Checkpoints: our format (read, write, rebuild the student or teacher, RNG states) and the
official MHIM-MIL layouts mapped onto our students.

Our files (``best.pt``, ``last.pt`` of a fold, written by :mod:`mil.trainer`) are dicts with
``format_version`` (:data:`CHECKPOINT_VERSION`), the facts that rebuild the student (model,
model_kw, in_dim, n_classes, task, classes, bin_edges, mhim, feature_mean/std), the run's
identity (seed, fold, split_digest, config, config_fingerprint, software) and state dicts
(student, teacher, grn; in ``last.pt`` also wrapper, optimizer, scheduler, scaler,
early_stopping, history and the RNG states). They load with ``weights_only=True``.

The official v1 code saves ``MHIM`` modules whose keys are ``patch_to_emb.*`` (instance
embedding), ``online_encoder.*`` (the aggregator) and ``predictor.*`` (bag classifier); its
standalone baselines use ``_fc1``/``_fc2`` (TransMIL) and ``i_classifier``/``b_classifier``
(DSMIL). :func:`from_official_layout` renames (and, for DSMIL's ``Conv1d`` bag classifier,
reshapes) those tensors into our layout; loading then stays strict, so every tensor of the
model must be filled and every tensor of the file used (:func:`mil.mhim.MHIM.init_teacher_from`
names whatever is left over).

Key maps (official -> ours), read from the official v1 modules (mhim.py, datten.py, satten.py,
emb_position.py, transmil.py, dsmil.py) and checked on a released C16 AB-MIL teacher:

==============================================  =================================
``patch_to_emb.0`` / ``_fc1.0`` /               ``feature.0``
``i_classifier.embed.0``
``predictor`` / ``_fc2``                         ``classifier``
``online_encoder.attention.attention.0``         ``attention.branch_a.0`` (AB-MIL)
``online_encoder.attention.attention.2``         ``attention.out``
``online_encoder.attention.attention_a.0``       ``attention.branch_a.0`` (gated)
``online_encoder.attention.attention_b.0``       ``attention.branch_b.0``
``online_encoder.attention.attention_c``         ``attention.out``
``online_encoder.{cls_token,layer1,layer2,norm}``  the same names (TransMIL)
``online_encoder.pos_embedding.proj{,1,2}`` /    ``ppeg.proj{7,5,3}``
``pos_layer.proj{,1,2}``
``online_encoder.i_classifier.0`` /              ``instance_classifier`` (DSMIL)
``i_classifier.fc.0``
``[online_encoder.]b_classifier.q.{0,2}``        ``query.{0,2}``
``[online_encoder.]b_classifier.v.1``            ``value.1``
``[online_encoder.]b_classifier.fcc``            ``classifier`` (weight [C, C, E] -> [C, C*E])
==============================================  =================================
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from extract.errors import CheckpointError, ConfigError
from extract.runtime import atomic_write

__all__ = ["CHECKPOINT_VERSION", "read_checkpoint", "save_checkpoint", "build_student", "load_student",
           "teacher_source", "load_teacher_state", "split_digest", "software_versions", "capture_rng_state",
           "restore_rng_state", "OFFICIAL_PREFIXES", "is_official_layout", "from_official_layout"]

log = logging.getLogger(__name__)

#: Written into every checkpoint; a file with a higher number needs newer code.
CHECKPOINT_VERSION = 1

#: Top-level key prefixes that only the official code's checkpoints use.
OFFICIAL_PREFIXES = ("patch_to_emb.", "online_encoder.", "predictor.", "_fc1.", "_fc2.", "pos_layer.",
                     "i_classifier.", "b_classifier.")

_RULES: tuple[tuple[str, str], ...] = (
    (r"^(patch_to_emb|_fc1|i_classifier\.embed)\.0\.", "feature.0."),
    (r"^(predictor|_fc2)\.", "classifier."),
    (r"^online_encoder\.attention\.attention\.0\.", "attention.branch_a.0."),
    (r"^online_encoder\.attention\.attention\.2\.", "attention.out."),
    (r"^online_encoder\.attention\.attention_a\.0\.", "attention.branch_a.0."),
    (r"^online_encoder\.attention\.attention_b\.0\.", "attention.branch_b.0."),
    (r"^online_encoder\.attention\.attention_c\.", "attention.out."),
    (r"^(online_encoder\.pos_embedding|pos_layer)\.proj\.", "ppeg.proj7."),
    (r"^(online_encoder\.pos_embedding|pos_layer)\.proj1\.", "ppeg.proj5."),
    (r"^(online_encoder\.pos_embedding|pos_layer)\.proj2\.", "ppeg.proj3."),
    (r"^online_encoder\.(cls_token|layer1\.|layer2\.|norm\.)", r"\1"),
    (r"^(online_encoder\.i_classifier\.0|i_classifier\.fc\.0)\.", "instance_classifier."),
    (r"^(online_encoder\.)?b_classifier\.q\.", "query."),
    (r"^(online_encoder\.)?b_classifier\.v\.", "value."),
    (r"^(online_encoder\.)?b_classifier\.fcc\.", "classifier."),
)


def is_official_layout(state_dict: Mapping[str, Any]) -> bool:
    """True when any key has an official-only prefix (``patch_to_emb.``, ``online_encoder.``, ...)."""
    return any(str(k).startswith(OFFICIAL_PREFIXES) for k in state_dict)


def _rename(key: str) -> str:
    for pattern, repl in _RULES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key  # left as it is: the strict load names it as unexpected


def from_official_layout(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """An official-layout state dict in our key names; any other state dict unchanged.

    Keys no rule covers keep their official name, so a strict load reports them ("unexpected")
    next to our keys they left empty ("missing"). DSMIL's ``Conv1d(C, C, E)`` bag-classifier
    weight becomes the equivalent ``Linear(C*E, C)`` weight.
    """
    if not is_official_layout(state_dict):
        return dict(state_dict)
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        new = _rename(str(key))
        if new == "classifier.weight" and "b_classifier.fcc." in str(key) and getattr(value, "dim", lambda: 0)() == 3:
            value = value.reshape(value.shape[0], -1)  # Conv1d over the C class vectors = Linear on their concat
        if new in out:
            raise KeyError(f"two official keys map to {new!r} (the second is {key!r})")
        out[new] = value
    return out


# --------------------------------------------------------------------------------------------
# our format
# --------------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`mil.trainer.train_fold` (``best.pt`` or ``last.pt``).

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


def save_checkpoint(obj: Mapping[str, Any], path: str | Path) -> None:
    """``torch.save`` through :func:`extract.runtime.atomic_write` (temp file, fsync, rename)."""
    atomic_write(Path(path), lambda f: torch.save(dict(obj), f))


def build_student(meta: Mapping[str, Any]) -> nn.Module:
    """An untrained student from a checkpoint's (or run's) ``model``, ``model_kw``, ``in_dim``,
    ``n_classes`` and ``task``."""
    from mil.models import create_model

    return create_model(meta["model"], int(meta["in_dim"]), int(meta["n_classes"]),
                        task=meta["task"], **dict(meta["model_kw"]))


def load_student(checkpoint_path: str | Path, device: str | torch.device = "cpu",
                 which: str = "student") -> nn.Module:
    """Rebuild the trained student of a checkpoint, in eval mode, on ``device``.

    ``which='teacher'`` rebuilds the MHIM teacher (the EMA model) saved with it instead; a
    checkpoint without one (a baseline) raises CheckpointError.

    The returned module carries ``wsi_meta`` (model, model_kw, in_dim, n_classes, task, classes,
    bin_edges, seed, fold, epoch, val_threshold), which :func:`mil.inference.predict_bags` uses. With an MHIM
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
        model = build_student(ckpt)
        model.load_state_dict(ckpt[which], strict=True)
    except (RuntimeError, KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: the weights do not fit model {ckpt['model']!r} ({exc})") from exc
    mhim = ckpt.get("mhim")
    if which == "student" and mhim and mhim.get("grn_at_test") and ckpt.get("grn") is not None:
        from mil.mhim import MHIM
        from mil.train_config import MHIMConfig

        wrapper = MHIM(model, MHIMConfig.from_dict(mhim))
        wrapper.grn.load_state_dict(ckpt["grn"])
        model = wrapper
    model.wsi_meta = {k: ckpt.get(k) for k in (
        "model", "model_kw", "in_dim", "n_classes", "task", "classes", "bin_edges", "seed", "fold",
        "epoch", "val_threshold", "kind", "feature_mean", "feature_std")}
    return model.to(device).eval()


def teacher_source(config, fold_dir: Path, seed: int, fold: int) -> Path | None:
    """Where the teacher's weights come from (None: a copy of the random student).

    ``config`` is the run's :class:`mil.train_config.TrainConfig`: ``teacher_init`` ``auto`` is
    the fold's own baseline; a path is a checkpoint, a fold folder, an experiment folder (with
    ``seed_<s>/fold_<k>`` or ``fold_<k>``) or a released official teacher folder.
    """
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


def load_teacher_state(path: Path, meta: Mapping[str, Any], seed: int, fold: int,
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


def split_digest(split: Mapping[str, Sequence[str]]) -> str:
    """Short digest of a fold's train/val/test slide lists (checked before a teacher is loaded)."""
    text = json.dumps({k: list(split[k]) for k in ("train", "val", "test") if k in split}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def software_versions() -> dict:
    """Versions recorded with every checkpoint and experiment (wsi-pipeline, torch, NumPy, CUDA)."""
    from importlib import metadata

    try:
        version = metadata.version("wsi-pipeline")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"wsi_pipeline": version, "torch": str(torch.__version__), "numpy": str(np.__version__),
            "cuda": str(torch.version.cuda)}


def capture_rng_state(generators: Mapping[str, torch.Generator]) -> dict:
    """Every random state a run draws from: torch, CUDA, NumPy, Python and ``generators``."""
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


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    """Put back what :func:`capture_rng_state` recorded (CUDA only on the same device count)."""
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
