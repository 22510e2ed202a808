"""Feature bags: one HDF5 file per slide, ours and CLAM's, plus the ``.pt`` export.

    write_bag("s1.h5", features, coords, attrs={"backbone": "resnet50_trunc", ...})
    bag = read_bag("s1.h5")          # Bag(features float32 [N, D], coords int64 [N, 2], attrs)
    export_pt("s1.h5", "pt_files/s1.pt")   # torch.Tensor [N, D] as MHIM/CLAM expect

Layout: dataset ``features`` ``[N, D]`` (float16 by default, float32 on request) and
``coords`` int64 ``[N, 2]`` (level-0 top-left ``x, y``) in the same row order; attributes per
docs (``backbone``, ``weights``, ``feature_dim``, ``input_size``, ``patch_size_level0``,
``target_mpp``, ``format_version``, ``dropped_patches``, ``fingerprint``). Row chunks of about
1 MiB, no compression: bags are read whole and float16 already halves the size.
:func:`write_bag` writes exactly the path it is given; the stage runner writes a temporary
name and renames it into place.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BagError, ConfigError

__all__ = ["Bag", "write_bag", "read_bag", "find_bag", "export_pt", "FORMAT_VERSION", "BAG_ATTRS", "BAG_PATTERNS"]

FORMAT_VERSION = 1
# Attributes a bag written by the extract stage carries (write_bag accepts any JSON-able extra).
BAG_ATTRS = (
    "backbone", "weights", "feature_dim", "input_size", "patch_size_level0", "target_mpp",
    "format_version", "dropped_patches", "fingerprint",
)
_CHUNK_BYTES = 1 << 20
#: Where a slide's bag may lie in a feature folder, first match wins: ours, CLAM's ``h5_files/``,
#: a ``.pt`` tensor, the ``pt_files/`` export.
BAG_PATTERNS = ("{sid}.h5", "h5_files/{sid}.h5", "{sid}.pt", "pt_files/{sid}.pt")


def find_bag(features_dir: str | os.PathLike, slide_id: str) -> Path | None:
    """The bag file of ``slide_id`` in ``features_dir`` (:data:`BAG_PATTERNS`), None without one."""
    base = Path(features_dir)
    for pattern in BAG_PATTERNS:
        path = base / pattern.format(sid=slide_id)
        if path.is_file():
            return path
    return None


@dataclass
class Bag:
    """A slide's features.

    Attributes
    ----------
    features : ndarray ``[N, D]`` float32 (float16 if read with ``keep_float16``)
    coords : ndarray int64 ``[N, 2]`` level-0 top-left ``(x, y)``, or None (``.pt`` files)
    attrs : dict of the file's attributes (empty for CLAM files and ``.pt`` tensors)
    path : the file it came from
    """

    features: np.ndarray
    coords: np.ndarray | None
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _attr_value(value):
    """HDF5-storable form: numbers/strings as-is, arrays of numbers, everything else JSON."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, float, str, np.integer, np.floating)):
        return value
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, np.ndarray)) and np.asarray(value).dtype.kind in "iuf" and np.asarray(value).ndim == 1:
        return np.asarray(value)
    return json.dumps(value, sort_keys=True, default=str)


def write_bag(
    path: str | os.PathLike,
    features,
    coords,
    attrs: dict[str, Any] | None = None,
    dtype: str = "float16",
) -> Path:
    """Write a bag file to exactly ``path`` (overwritten).

    Parameters
    ----------
    path : str or Path
    features : array-like or torch.Tensor ``[N, D]``
    coords : array-like int ``[N, 2]``, level-0 top-left ``(x, y)`` of each row's patch
    attrs : dict
        Stored as HDF5 attributes (numbers and strings as-is, other values as JSON);
        ``feature_dim`` and ``format_version`` are filled in when absent.
    dtype : {'float16', 'float32'}
        Storage type of ``features``.
    """
    import h5py

    if dtype not in ("float16", "float32"):
        raise ConfigError(f"The 'dtype' parameter of write_bag must be 'float16' or 'float32'. Got {dtype!r} instead.")
    feats = _to_numpy(features)
    xy = _to_numpy(coords)
    if feats.ndim != 2:
        raise BagError(f"{path}: features must be [N, D]. Got shape {feats.shape} instead.")
    if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] != feats.shape[0]:
        raise BagError(
            f"{path}: coords must be [N, 2] with N = {feats.shape[0]} (the features' rows). "
            f"Got shape {xy.shape} instead."
        )
    if feats.dtype.kind not in "fiu" or xy.dtype.kind not in "iuf":
        raise BagError(f"{path}: features and coords must be numeric. Got {feats.dtype} and {xy.dtype} instead.")
    if feats.dtype.kind == "f" and feats.size and not np.isfinite(feats).all():
        raise BagError(f"{path}: features contain NaN or inf; refusing to write a poisoned bag")
    if xy.dtype.kind == "f":
        if not np.all(np.isfinite(xy)) or not np.all(xy == np.round(xy)):
            raise BagError(f"{path}: coords must be integers")
    feats = feats.astype(dtype, copy=False)
    xy = xy.astype(np.int64, copy=False)
    attrs = dict(attrs or {})
    attrs.setdefault("feature_dim", int(feats.shape[1]))
    attrs.setdefault("format_version", FORMAT_VERSION)
    if int(attrs["feature_dim"]) != feats.shape[1]:
        raise BagError(f"{path}: attrs feature_dim={attrs['feature_dim']} but features have {feats.shape[1]} columns")

    path = Path(path)
    n, d = feats.shape
    row_bytes = max(1, d * feats.dtype.itemsize)
    rows = int(max(1, min(n, _CHUNK_BYTES // row_bytes)))
    with h5py.File(path, "w") as f:
        # Chunked only when there is more than one chunk's worth; empty bags stay contiguous.
        f.create_dataset("features", data=feats, chunks=(rows, d) if n > rows and d > 0 else None)
        f.create_dataset("coords", data=xy)
        for key, value in attrs.items():
            f.attrs[key] = _attr_value(value)
    return path


def _decode_attr(value):
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str) and (value[:1] in ("[", "{") or value == "null"):
        try:
            return json.loads(value)
        except (ValueError, TypeError):
            return value
    return value


def read_bag(path: str | os.PathLike, keep_float16: bool = False) -> Bag:
    """Read our bags, CLAM's feature files (``features`` + ``coords``, no attrs) or ``.pt``.

    Parameters
    ----------
    path : str or Path
        ``.h5``/``.hdf5`` bag, or a ``.pt`` file holding one tensor ``[N, D]`` (or a dict with
        ``features`` and optionally ``coords``).
    keep_float16 : bool
        Return float16 features as stored instead of converting to float32.

    Raises
    ------
    BagError naming the file for missing datasets, unreadable files and shape mismatches.
    """
    path = Path(path)
    if not path.is_file():
        raise BagError(f"{path}: bag file not found; run the extract stage for this slide")
    if path.suffix.lower() in (".pt", ".pth"):
        return _read_pt(path, keep_float16)
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise BagError(f"{path}: not a readable HDF5 bag ({exc}); delete it and re-extract this slide") from exc
    with f:
        if "features" not in f:
            raise BagError(
                f"{path}: no 'features' dataset (found {sorted(f.keys())}); this is not a feature "
                "bag (a coords file from the segment stage?)"
            )
        feats = f["features"][()]
        coords = f["coords"][()] if "coords" in f else None
        attrs = {k: _decode_attr(v) for k, v in f.attrs.items()}
    # CLAM's legacy writer stores [N, 1, D] in some versions; squeeze a singleton middle axis.
    if feats.ndim == 3 and feats.shape[1] == 1:
        feats = feats[:, 0]
    if feats.ndim != 2:
        raise BagError(f"{path}: 'features' must be [N, D]. Got shape {feats.shape} instead.")
    if coords is not None:
        if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] != feats.shape[0]:
            raise BagError(
                f"{path}: 'coords' must be [N, 2] with N = {feats.shape[0]} (the features' rows). "
                f"Got shape {coords.shape} instead; the file is inconsistent, re-extract it."
            )
        coords = coords.astype(np.int64, copy=False)
    if "feature_dim" in attrs and int(attrs["feature_dim"]) != feats.shape[1]:
        raise BagError(f"{path}: attribute feature_dim={attrs['feature_dim']} but 'features' has {feats.shape[1]} columns")
    return Bag(_features_dtype(feats, keep_float16), coords, attrs, path)


def _features_dtype(feats: np.ndarray, keep_float16: bool) -> np.ndarray:
    if keep_float16 and feats.dtype == np.float16:
        return feats
    return feats.astype(np.float32, copy=False)


def _read_pt(path: Path, keep_float16: bool) -> Bag:
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for unreadable files
        raise BagError(f"{path}: cannot read this .pt file ({type(exc).__name__}: {exc})") from exc
    coords = None
    if isinstance(obj, dict):
        if "features" not in obj:
            raise BagError(f"{path}: .pt dict without a 'features' entry (keys {sorted(map(str, obj))})")
        coords = obj.get("coords")
        obj = obj["features"]
    if not isinstance(obj, torch.Tensor):
        raise BagError(f"{path}: expected a tensor [N, D] in the .pt file. Got {type(obj).__name__} instead.")
    feats = obj.detach().cpu()
    if feats.dtype == torch.bfloat16:
        feats = feats.float()
    feats = feats.numpy()
    if feats.ndim != 2:
        raise BagError(f"{path}: the tensor must be [N, D]. Got shape {tuple(feats.shape)} instead.")
    if coords is not None:
        coords = _to_numpy(coords).astype(np.int64)
        if coords.shape != (feats.shape[0], 2):
            raise BagError(f"{path}: 'coords' must be [{feats.shape[0]}, 2]. Got {coords.shape} instead.")
    return Bag(_features_dtype(feats, keep_float16), coords, {}, path)


def export_pt(h5_path: str | os.PathLike, pt_path: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write a bag's features as one torch tensor ``[N, D]`` (MHIM/CLAM ``pt_files/<slide>.pt``).

    ``dtype`` is ``'float32'`` (what those codebases assume) or ``'float16'``. Writes exactly
    ``pt_path``; parent folders are created.
    """
    import torch

    if dtype not in ("float16", "float32"):
        raise ConfigError(f"The 'dtype' parameter of export_pt must be 'float16' or 'float32'. Got {dtype!r} instead.")
    bag = read_bag(h5_path, keep_float16=True)
    tensor = torch.from_numpy(np.ascontiguousarray(bag.features.astype(dtype, copy=False)))
    pt_path = Path(pt_path)
    pt_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensor, str(pt_path))
    return pt_path
