"""Patch-level quality control at extraction time: focus, background and ink per patch.

Cheap measures computed on the uint8 patch batch the extractor already holds, stored in the bag
(``qc_focus``, ``qc_background``, ``qc_ink``: float32 ``[N]``, one per row) so that training and
evaluation can drop blurred, empty or inked patches later without re-extracting:

- ``blur`` -> ``focus``: variance of the Laplacian of the grey patch (3 x 3 kernel, grey 0-255).
  Sharp tissue at 20x gives hundreds to thousands; an out-of-focus patch tens or less.
- ``background`` -> fraction of pixels that are glass: HSV saturation < 20 and value > 200.
- ``ink`` -> fraction of pixels matched by the marker rules of :mod:`extract.ink`, evaluated on
  the patch shrunk to 32 x 32 (about the thumbnail scale the rules were measured at).

    values = patch_qc(batch, ("blur", "background"))     # {'focus': [B], 'background': [B]}
    keep = QCFilter.parse("focus>=50,background<=0.5").keep(values)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import BagError, ConfigError

__all__ = ["QC_KINDS", "QC_COLUMNS", "parse_qc", "patch_qc", "QCFilter", "read_qc", "write_qc"]

#: What ``--qc`` accepts, and the measure (bag dataset ``qc_<name>``) each one writes.
QC_KINDS = {"blur": "focus", "background": "background", "ink": "ink"}
QC_COLUMNS = tuple(QC_KINDS.values())
BACKGROUND_MAX_SAT = 20
BACKGROUND_MIN_VALUE = 200
INK_SIDE_PX = 32


def parse_qc(spec: str | tuple | list | None) -> tuple[str, ...]:
    """``'blur,background'`` -> ``('blur', 'background')``; empty or None -> ``()``."""
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    kinds = tuple(dict.fromkeys(str(k).strip().lower() for k in items if str(k).strip()))
    bad = [k for k in kinds if k not in QC_KINDS]
    if bad:
        raise ConfigError(f"The 'qc' parameter must list measures among {', '.join(QC_KINDS)}. Got {spec!r} instead.")
    return kinds


def patch_qc(patches, kinds=tuple(QC_KINDS)) -> dict[str, np.ndarray]:
    """QC measures of a batch of patches.

    Parameters
    ----------
    patches : uint8 ``[B, H, W, 3]`` RGB (numpy or a CPU torch tensor)
    kinds : among ``'blur'``, ``'background'``, ``'ink'``

    Returns
    -------
    dict measure name -> float32 ``[B]`` (``focus`` in grey-level^2, the others fractions 0-1)
    """
    import cv2

    kinds = parse_qc(kinds)
    batch = patches.numpy() if hasattr(patches, "numpy") and not isinstance(patches, np.ndarray) else np.asarray(patches)
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
        raise ConfigError(
            f"The 'patches' parameter of patch_qc must be uint8 [B, H, W, 3]. Got {batch.dtype} {batch.shape} instead."
        )
    out = {QC_KINDS[k]: np.zeros(len(batch), np.float32) for k in kinds}
    for i, patch in enumerate(batch):
        patch = np.ascontiguousarray(patch)
        if "blur" in kinds:
            grey = cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY)
            out["focus"][i] = cv2.Laplacian(grey, cv2.CV_32F, ksize=1).var()
        if "background" in kinds:
            hsv = cv2.cvtColor(patch, cv2.COLOR_RGB2HSV)
            out["background"][i] = np.mean((hsv[..., 1] < BACKGROUND_MAX_SAT) & (hsv[..., 2] > BACKGROUND_MIN_VALUE))
        if "ink" in kinds:
            from .ink import ink_masks

            small = cv2.resize(patch, (INK_SIDE_PX, INK_SIDE_PX), interpolation=cv2.INTER_AREA)
            marks = ink_masks(small, blur_px=3)
            ink = np.zeros(small.shape[:2], bool)
            for m in marks.values():
                ink |= m
            out["ink"][i] = ink.mean()
    return out


_RULE = re.compile(r"^\s*(focus|background|ink)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class QCFilter:
    """Rules such as ``focus>=50`` that a patch must all pass to be kept."""

    rules: tuple[tuple[str, str, float], ...] = ()

    @classmethod
    def parse(cls, spec: str | None) -> "QCFilter":
        """``'focus>=50,background<=0.5,ink<=0.05'``; measures: focus, background, ink."""
        if spec is None or not str(spec).strip():
            return cls()
        rules = []
        for part in str(spec).split(","):
            m = _RULE.match(part)
            if m is None:
                raise ConfigError(
                    f"The 'qc_filter' parameter must be comma-separated rules like 'focus>=50,background<=0.5' "
                    f"(measures: {', '.join(QC_COLUMNS)}; operators >=, <=, >, <). Got {part.strip()!r} in {spec!r}."
                )
            rules.append((m.group(1), m.group(2), float(m.group(3))))
        return cls(tuple(rules))

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for name, _, _ in self.rules))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __str__(self) -> str:
        return ",".join(f"{n}{op}{v:g}" for n, op, v in self.rules)

    def keep(self, values: dict[str, np.ndarray]) -> np.ndarray:
        """bool ``[N]``: the patches passing every rule."""
        n = len(next(iter(values.values()))) if values else 0
        keep = np.ones(n, bool)
        for name, op, v in self.rules:
            x = np.asarray(values[name], dtype=np.float64)
            keep &= {">=": x >= v, "<=": x <= v, ">": x > v, "<": x < v}[op]
        return keep


def read_qc(path, columns=QC_COLUMNS) -> dict[str, np.ndarray]:
    """The QC datasets ``qc_<name>`` of a bag; a :class:`BagError` naming the ones it lacks."""
    import h5py

    with h5py.File(path, "r") as f:
        missing = [c for c in columns if f"qc_{c}" not in f]
        if missing:
            kinds = ",".join(k for k, c in QC_KINDS.items() if c in missing)
            raise BagError(f"{path}: no patch QC {', '.join(missing)} in this bag; re-extract with --qc {kinds}")
        return {c: f[f"qc_{c}"][:] for c in columns}


def write_qc(path, values: dict[str, np.ndarray]) -> None:
    """Add ``qc_<name>`` float32 datasets ``[N]`` to a bag written by :func:`extract.bags.write_bag`."""
    import h5py

    with h5py.File(path, "a") as f:
        n = f["features"].shape[0]
        for name, v in values.items():
            v = np.asarray(v, np.float32).reshape(-1)
            if len(v) != n:
                raise BagError(f"{path}: QC {name} has {len(v)} values for {n} patches")
            if f"qc_{name}" in f:
                del f[f"qc_{name}"]
            f.create_dataset(f"qc_{name}", data=v)
