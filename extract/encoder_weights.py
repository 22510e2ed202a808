"""Encoder weight files: find them (file or hub snapshot folder), read them, map keys, load strictly.

Nothing here downloads anything: a user points ``--weights`` at a file or a folder they already
have, and every failure is one line naming the file that was expected. torch is imported inside
the functions that need it, so the registry can list encoders without importing it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import nn

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "file_sha256",
    "find_weights_file",
    "load_state_dict_file",
    "load_strict",
    "select_keys",
]

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# Keys under which training scripts commonly nest the real state dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
# Prefixes that wrappers (DataParallel, SSL frameworks) put in front of every key.
_STRIP_PREFIXES = ("module.", "backbone.")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def find_weights_file(path: str | os.PathLike, expected: tuple[str, ...] = (), what: str = "") -> Path:
    """The checkpoint file that ``path`` designates.

    Parameters
    ----------
    path : file or folder
        A ``.pth/.pt/.bin/.safetensors`` file, or a folder holding one of ``expected``: a
        Hugging Face snapshot folder (the file directly inside), a hub cache folder
        (``models--org--name/snapshots/<rev>/<file>``) or any folder with the file in it.
    expected : file names, most preferred first
        What the publisher calls the weights (``pytorch_model.bin``, ``model.safetensors``).
    what : str
        Who expects them, for the error message (``"backbone 'uni' (MahmoodLab/UNI)"``).
    """
    path = Path(path).expanduser()
    wanted = " or ".join(expected) if expected else "/".join(CHECKPOINT_SUFFIXES) + " file"
    for_whom = f" for {what}" if what else ""
    if path.is_dir():
        for name in expected:
            direct = path / name
            if direct.is_file():
                return direct
        for name in expected:  # hub cache layout: newest snapshot first
            found = sorted(path.glob(f"snapshots/*/{name}"), key=lambda p: p.stat().st_mtime, reverse=True)
            found += sorted(path.glob(f"*/snapshots/*/{name}"), key=lambda p: p.stat().st_mtime, reverse=True)
            if found:
                return found[0]
        if not expected:
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES)
            if len(files) == 1:
                return files[0]
        raise ConfigError(f"--weights {path}: no {wanted} in this folder{for_whom}; pass the file itself or its folder")
    if not path.exists():
        raise ConfigError(f"--weights {path}: not found; expected {wanted}{for_whom}")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ConfigError(f"--weights {path}: not a {'/'.join(CHECKPOINT_SUFFIXES)} file; expected {wanted}{for_whom}")
    return path


def load_state_dict_file(path: str | os.PathLike) -> dict[str, "torch.Tensor"]:
    """Read a checkpoint file into a flat ``{key: tensor}`` on the CPU.

    ``.safetensors`` through safetensors; anything else through ``torch.load`` with
    ``weights_only=True`` (no arbitrary code). Common wrappers (``{'model': ...}``,
    ``{'state_dict': ...}``) are unwrapped and the ``module.``/``backbone.`` prefixes stripped.
    """
    import torch

    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for unreadable files
        hint = ""
        if isinstance(exc, pickle.UnpicklingError):
            hint = (
                "; it stores Python objects besides tensors, which are not unpickled for safety: "
                "re-save only the weights once, e.g. torch.save(torch.load(p, weights_only=False)"
                "['model'], 'clean.pth'), if you trust the file"
            )
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch colours its messages
        first_line = (text.splitlines() or [""])[0][:300]
        raise CheckpointError(
            f"{path}: cannot read this checkpoint ({type(exc).__name__}: {first_line}); expected a "
            f"PyTorch state dict (.pth/.pt/.bin) or a .safetensors file{hint}"
        ) from exc
    for _ in range(3):  # {'model': {'state_dict': ...}} happens
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is not None and not _is_tensor_dict(obj):
                obj = inner
                continue
        break
    if not _is_tensor_dict(obj):
        keys = list(obj) if isinstance(obj, dict) else [type(obj).__name__]
        raise CheckpointError(
            f"{path}: no state dict of tensors found (top-level keys: {preview(keys)}); "
            f"expected a dict of tensors, possibly under one of {list(_WRAPPER_KEYS)}"
        )
    out = {}
    for key, value in obj.items():
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _is_tensor_dict(obj) -> bool:
    import torch

    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def preview(keys, limit: int = 12) -> str:
    """``[a, b, ...] (n)``: a short, bounded listing of keys for error messages."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"


def select_keys(state: dict, keep: tuple[str, ...], strip: str = "") -> dict:
    """Only the keys starting with one of ``keep``, with ``strip`` removed from their front.

    For files that hold more than the encoder (CONCH v1 stores its text tower next to
    ``visual.``): the rest is dropped on purpose, and what is kept is then loaded strictly.
    """
    return {k[len(strip):] if strip and k.startswith(strip) else k: v
            for k, v in state.items() if k.startswith(keep)}


def load_strict(
    model: "nn.Module",
    state: dict,
    source: str,
    ignore_prefixes: tuple[str, ...] = (),
    expected: str = "",
) -> None:
    """Load ``state`` into ``model`` strictly, except keys under ``ignore_prefixes``.

    A model built on the ``meta`` device receives the checkpoint's tensors directly (cast to
    the model's dtype), so a 1B-parameter encoder is never randomly initialised first.

    Raises :class:`CheckpointError` listing missing, unexpected and shape-mismatched keys
    (and ``expected``, the file the encoder's publisher ships, when given).
    """
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {preview(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches {preview(mismatched)}")
        advice = (f"pass {expected}" if expected else
                  "pass the checkpoint of this architecture or pick the backbone it was trained with")
        raise CheckpointError(
            f"{source}: checkpoint does not match {type(model).__name__} ({'; '.join(parts)}); {advice}"
        )
    on_meta = any(t.is_meta for t in own.values())
    if on_meta:
        state = {k: v.to(dtype=own[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
    else:
        model.load_state_dict(state, strict=True)
