"""Runtime helpers shared by every stage: device, autocast rule, atomic writes, parameter checks.

One owner for rules that must not drift apart between extraction, training and evaluation.
Torch is imported inside the functions that need it, so configuration modules can use the
validators without loading it (a config error answers in well under a second).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np

from extract.errors import ConfigError

__all__ = ["resolve_device", "autocast_dtype", "autocast", "atomic_write", "atomic_write_text", "fsync_file",
           "fsync_dir", "is_number", "check_int", "PRECISIONS"]

#: Accepted ``precision`` settings: ``auto`` (a half type on CUDA, fp32 on the CPU) or explicit.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# --------------------------------------------------------------------------------------------
# device and precision
# --------------------------------------------------------------------------------------------


def resolve_device(spec: str = "auto"):
    """``'auto'`` -> the first CUDA device when one is present, else the CPU.

    Parameters
    ----------
    spec : 'auto', 'cpu', 'cuda' or 'cuda:N'.

    Returns
    -------
    torch.device

    Raises
    ------
    ConfigError
        A malformed spec, or a CUDA device asked for where there is none (or not that many).
    """
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"The 'device' parameter must be auto, cpu, cuda or cuda:N. Got {spec!r} instead.") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} was asked for but CUDA is not available on this machine; "
                              "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def autocast_dtype(device, precision: str, preferred: str = "bf16"):
    """The autocast dtype of ``precision`` on ``device`` (None = run in fp32).

    The one rule of the project: an explicit ``bf16``/``fp16`` is honoured on every device
    (CPU autocast runs both; bf16 is fast on CPUs with AMX/AVX-512 BF16); ``auto`` means the
    ``preferred`` half type on CUDA (bf16 -> fp16 where the GPU lacks bf16) and fp32 on the
    CPU, where autocast is slower than fp32 on most processors.

    Parameters
    ----------
    device : torch.device
    precision : one of :data:`PRECISIONS`.
    preferred : 'bf16', 'fp16' or 'fp32': what ``auto`` picks on CUDA (an encoder's card).

    Returns
    -------
    torch.dtype or None
    """
    import torch

    if precision not in PRECISIONS:
        raise ConfigError(f"The 'precision' parameter must be one of {', '.join(PRECISIONS)}. "
                          f"Got {precision!r} instead.")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type != "cuda" or preferred == "fp32":
        return None
    if preferred == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device, dtype):
    """``torch.autocast`` on ``device`` with ``dtype``, or a no-op context when ``dtype`` is None."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, write: Callable[[IO], Any], mode: str = "wb") -> Path:
    """Write ``path`` through ``write(file)``: a temporary file in the same folder, flush, fsync,
    then ``os.replace``. A reader sees the old file or the whole new one, never half of it, and
    after a crash the new one is on disk.

    Parameters
    ----------
    path : the final file (its folder is created).
    write : called once with the open temporary file.
    mode : ``'wb'`` or ``'w'``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a text."""
    return atomic_write(path, lambda f: f.write(text), mode="w")


def fsync_file(path: str | os.PathLike) -> None:
    """Put a closed file's data on disk (it survives a power loss); OS errors propagate."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the names in ``folder`` (new, renamed, removed) durable; a no-op where folders cannot
    be opened or fsynced (some network filesystems, whose servers commit names synchronously)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# parameter checks (scikit-learn's message template)
# --------------------------------------------------------------------------------------------


def is_number(v: Any, finite: bool = True) -> bool:
    """A real number (Python or NumPy), not a bool; finite unless ``finite=False``."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (numbers.Real, np.number)):
        return False
    return not finite or math.isfinite(v)


def check_int(name: str, value: Any, owner: str | None = None, *, minimum: int = 1) -> int:
    """``value`` as an int when it is one (Python or NumPy, not a bool) and ``>= minimum``.

    Raises
    ------
    ConfigError
        "The 'name' parameter [of owner] must be an int >= minimum. Got value instead."
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        of = f" of {owner}" if owner else ""
        raise ConfigError(f"The '{name}' parameter{of} must be an int >= {minimum}. Got {value!r} instead.")
    return int(value)
