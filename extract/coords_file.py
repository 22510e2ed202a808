"""The coordinates file: one HDF5 per slide, readable by CLAM's tools.

Layout (CLAM's ``save_hdf5`` layout, attributes on the ``coords`` dataset):

    coords            int64 [N, 2]   level-0 top-left (x, y) of each patch; N may be 0
    coords.attrs
        patch_size        int        patch side at ``patch_level`` (CLAM)
        patch_level       int        pyramid level the patch size refers to (CLAM)
        downsample        float [2]  that level's downsample along x, y (CLAM)
        level_dim         int [2]    that level's (width, height) (CLAM)
        name              str        slide name (CLAM)
        patch_size_level0 int        patch side in level-0 pixels
        target_mpp        float      microns per pixel the patches are meant to be read at
        slide_mpp         float      level-0 microns per pixel of the slide
        params            str        JSON of the segmentation/tiling parameters
        format_version    int
        fingerprint       str        digest of everything that determined the coordinates

Writing is plain (the runner writes to a temporary name and renames); reading also accepts
files written by CLAM's ``create_patches_fp.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BagError, ConfigError

__all__ = ["write_coords", "read_coords", "FORMAT_VERSION", "CLAM_ATTRS"]

FORMAT_VERSION = 1
CLAM_ATTRS = ("patch_size", "patch_level", "downsample", "level_dim", "name")


def write_coords(path: str | os.PathLike, coords: np.ndarray, attrs: dict[str, Any]) -> Path:
    """Write patch coordinates and their attributes to ``path`` (overwritten if present).

    Parameters
    ----------
    path : str or Path
        The exact file to write; the caller owns atomicity (temp name + rename).
    coords : int ndarray ``[N, 2]``
        Level-0 top-left ``(x, y)``; ``N = 0`` is valid (a slide with no tissue patches).
    attrs : dict
        Attributes stored on the ``coords`` dataset (module docstring). ``params`` may be a
        dict (stored as JSON); ``None`` values are not written; ``format_version`` is added.

    Returns
    -------
    Path of the written file.
    """
    import h5py

    array = np.asarray(coords)
    if array.size == 0:
        array = array.reshape(0, 2)
    if array.ndim != 2 or array.shape[1] != 2 or not (
        np.issubdtype(array.dtype, np.integer) or array.size == 0
    ):
        raise ConfigError(
            f"The 'coords' parameter of write_coords must be an integer array [N, 2]. "
            f"Got {array.dtype} {array.shape} instead."
        )
    array = array.astype(np.int64)
    values = {"format_version": FORMAT_VERSION, **dict(attrs)}
    if isinstance(values.get("params"), dict):
        values["params"] = json.dumps(values["params"], sort_keys=True)

    path = Path(path)
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("coords", data=array)
        for key, value in values.items():
            if value is None:
                continue
            try:
                dset.attrs[key] = value
            except (TypeError, ValueError) as exc:
                raise ConfigError(
                    f"write_coords: attribute {key!r} = {value!r} cannot be stored in HDF5 ({exc}); "
                    "use numbers, strings or small arrays"
                ) from exc
    return path


def read_coords(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a coordinates file (ours or CLAM's).

    Returns
    -------
    coords : int64 ndarray ``[N, 2]``
        Level-0 top-left ``(x, y)``.
    attrs : dict
        The ``coords`` dataset's attributes (file-level ones underneath), with strings decoded,
        numpy scalars as Python numbers, and ``params`` parsed from JSON into a dict.

    Raises
    ------
    BagError
        The file is missing, not HDF5, has no ``coords`` dataset, or ``coords`` is not [N, 2].
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise BagError(f"{path}: coordinates file not found; run the segment stage for this slide")
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f or not isinstance(f["coords"], h5py.Dataset):
                raise BagError(
                    f"{path}: no 'coords' dataset (found: {', '.join(f.keys()) or 'nothing'}); "
                    "the file is not a coordinates file or was left incomplete; delete it and rerun segment"
                )
            dset = f["coords"]
            if dset.ndim != 2 or dset.shape[1] != 2:
                raise BagError(
                    f"{path}: 'coords' has shape {dset.shape}, expected [N, 2]; delete it and rerun segment"
                )
            coords = dset[()].astype(np.int64, copy=False) if dset.shape[0] else np.zeros((0, 2), np.int64)
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            attrs.update({k: _plain(v) for k, v in dset.attrs.items()})
    except BagError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise BagError(f"{path}: cannot read the coordinates file ({exc}); delete it and rerun segment") from exc
    if isinstance(attrs.get("params"), str):
        try:
            attrs["params"] = json.loads(attrs["params"])
        except json.JSONDecodeError as exc:
            raise BagError(f"{path}: attribute 'params' is not valid JSON ({exc})") from exc
    return coords, attrs


def _plain(value: Any) -> Any:
    """HDF5 attribute -> plain Python (str, int, float, bool) or ndarray."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "SO":
            return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v for v in value.tolist()]
        return value
    if isinstance(value, np.generic):
        return value.item()
    return value
