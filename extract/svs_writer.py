"""A real pyramidal Aperio-layout SVS writer.

The files written here are genuine tiled, JPEG-compressed, pyramidal TIFFs laid out the way
Aperio scanners write them (level 0, a stripped thumbnail, then the reduced levels as full
pages), so OpenSlide opens them with vendor ``aperio``, ``openslide.mpp-x`` and the pyramid,
and a tile-level reader sees the same structure as on a real SVS.

    write_svs("a.svs", rgb, mpp=0.5)                                  # small image held in memory
    write_svs_tiles("big.svs", (80_000, 60_000), render, mpp=0.25)   # never holds level 0

Tissue-like scenes and the demo cohort that use it: :mod:`extract.synthetic`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ConfigError

__all__ = ["write_svs", "write_svs_tiles", "pyramid_dimensions", "Render"]

# A render callback: ``render(downsample, x, y, w, h) -> uint8 [h, w, 3]`` returns the pixels of
# the pyramid level with that downsample; ``x, y, w, h`` are in that level's own pixels.
Render = Callable[[int, int, int, int, int], np.ndarray]

_APERIO_VERSION = "Aperio Image Library v12.0.15"
_THUMBNAIL_MAX_PX = 1024


# ---------------------------------------------------------------------------------------------
# SVS writer
# ---------------------------------------------------------------------------------------------
def pyramid_dimensions(
    size_wh: tuple[int, int], min_level_px: int = 512, downsample_factor: int = 4
) -> list[tuple[int, int]]:
    """Level sizes ``[(w, h), ...]`` of the pyramid :func:`write_svs` writes.

    Level ``k`` has downsample ``downsample_factor ** k`` and size ``ceil(W / ds) x ceil(H / ds)``.
    Levels are added while both sides of the new level are at least ``min_level_px``.

    Ceil, not Aperio's floor: with floor the measured downsample comes out a hair above the
    nominal one (80000 x 60000 at 64x -> 64.03), and ``get_best_level_for_downsample(64)``
    then skips that level and segments at 16x instead.
    """
    w0, h0 = int(size_wh[0]), int(size_wh[1])
    if w0 < 1 or h0 < 1:
        raise ConfigError(f"The 'size_wh' parameter must be positive. Got {size_wh!r} instead.")
    if downsample_factor < 2:
        raise ConfigError(
            "The 'downsample_factor' parameter of write_svs must be an int >= 2. "
            f"Got {downsample_factor!r} instead."
        )
    dims = [(w0, h0)]
    ds = downsample_factor
    while True:
        w, h = math.ceil(w0 / ds), math.ceil(h0 / ds)
        if min(w, h) < min_level_px:
            break
        dims.append((w, h))
        ds *= downsample_factor
    return dims


def _description(size0: tuple[int, int], size: tuple[int, int] | None, tile: int, quality: int,
                 mpp: float, first: bool, stem: str) -> str:
    """Aperio ImageDescription; OpenSlide parses the ``|key = value`` pairs of the first page."""
    w0, h0 = size0
    if first:
        head = f"{_APERIO_VERSION}\r\n{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile}) JPEG/RGB Q={quality}"
        return f"{head}|AppMag = {10.0 / mpp:g}|MPP = {mpp}|Filename = {stem}"
    w, h = size
    if tile:
        return f"{_APERIO_VERSION}\r\n{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile}) -> {w}x{h} JPEG/RGB Q={quality}"
    return f"{_APERIO_VERSION}\r\n{w0}x{h0} -> {w}x{h} - "


def _check_writer_args(mpp: float, tile: int, quality: int) -> None:
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise ConfigError(f"The 'mpp' parameter of write_svs must be a float > 0. Got {mpp!r} instead.")
    if not (isinstance(tile, int) and tile >= 16 and tile % 16 == 0):
        raise ConfigError(
            f"The 'tile' parameter of write_svs must be a multiple of 16 (TIFF tiles). Got {tile!r} instead."
        )
    if not (isinstance(quality, int) and 1 <= quality <= 100):
        raise ConfigError(f"The 'quality' parameter of write_svs must be an int in [1, 100]. Got {quality!r} instead.")


def _strip_tiles(render: Render, ds: int, size: tuple[int, int], tile: int):
    """Yield ``tile x tile`` blocks of one level in TIFF order (rows of tiles, left to right).

    Renders one full-width strip of ``tile`` rows at a time, so memory is one strip
    (80,000 px wide: 60 MB), never the level.
    """
    w, h = size
    for ty in range(0, h, tile):
        th = min(tile, h - ty)
        strip = render(ds, 0, ty, w, th)
        if strip.shape != (th, w, 3) or strip.dtype != np.uint8:
            raise ConfigError(
                f"render({ds}, 0, {ty}, {w}, {th}) must return uint8 [{th}, {w}, 3]. "
                f"Got {strip.dtype} {strip.shape} instead."
            )
        for tx in range(0, w, tile):
            # Edge tiles are passed short; tifffile zero-pads them and OpenSlide crops them.
            yield strip[:, tx:tx + tile]


def write_svs_tiles(
    path: str | os.PathLike,
    size_wh: tuple[int, int],
    render: Render,
    mpp: float,
    tile: int = 256,
    quality: int = 85,
    min_level_px: int = 512,
    downsample_factor: int = 4,
    thumbnail: bool = True,
) -> Path:
    """Write an Aperio-layout pyramidal SVS whose pixels come from a render callback.

    Every level is rendered independently at its own scale, strip by strip, so slides far
    larger than memory (80,000 x 60,000 px) can be written.

    Parameters
    ----------
    path : str or Path
        Output file (``.svs``); overwritten if it exists.
    size_wh : (int, int)
        Level-0 ``(width, height)`` in pixels.
    render : callable
        ``render(downsample, x, y, w, h) -> uint8 [h, w, 3]``: pixels of the level with integer
        ``downsample`` (1 for level 0); ``x, y, w, h`` in that level's pixels.
    mpp : float
        Level-0 microns per pixel, written as ``MPP`` (and ``AppMag = 10 / mpp``).
    tile : int
        Tile side in pixels (multiple of 16).
    quality : int
        JPEG quality 1-100.
    min_level_px : int
        Reduced levels are added while both sides stay >= this many pixels.
    downsample_factor : int
        Downsample between consecutive levels (Aperio uses 4).
    thumbnail : bool
        Write Aperio's stripped thumbnail page after level 0 (OpenSlide's associated image
        ``thumbnail``), as scanners do.

    Returns
    -------
    Path of the written file.
    """
    import tifffile

    _check_writer_args(mpp, tile, quality)
    path = Path(path)
    dims = pyramid_dimensions(size_wh, min_level_px, downsample_factor)
    w0, h0 = dims[0]
    # Classic TIFF offsets are 32-bit; compressed data of a big slide can pass 4 GB.
    bigtiff = w0 * h0 * 3 > 2**31
    kw = dict(
        photometric="rgb",  # what Aperio writes; OpenSlide decodes YCbCr-tagged JPEG wrongly
        compression="jpeg",
        compressionargs={"level": quality},
        metadata=None,
        software=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for k, (w, h) in enumerate(dims):
            ds = downsample_factor**k
            tw.write(
                _strip_tiles(render, ds, (w, h), tile),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                description=_description((w0, h0), (w, h), tile, quality, mpp, k == 0, path.stem),
                **kw,
            )
            if k == 0 and thumbnail:
                tw.write(_thumbnail(render, dims, downsample_factor), rowsperstrip=64,
                         description=_description((w0, h0), _thumb_size(dims[0]), 0, quality, mpp, False, path.stem),
                         **kw)
    return path


def _thumb_size(size0: tuple[int, int]) -> tuple[int, int]:
    w0, h0 = size0
    scale = _THUMBNAIL_MAX_PX / max(w0, h0)
    return max(1, round(w0 * scale)), max(1, round(h0 * scale))


def _thumbnail(render: Render, dims: list[tuple[int, int]], factor: int) -> np.ndarray:
    """Aperio-style thumbnail (<= 1024 px) resized from the smallest level."""
    import cv2

    k = len(dims) - 1
    w, h = dims[k]
    small = render(factor**k, 0, 0, w, h)
    tw, th = _thumb_size(dims[0])
    return cv2.resize(small, (tw, th), interpolation=cv2.INTER_AREA)


def write_svs(
    path: str | os.PathLike,
    image_rgb: np.ndarray,
    mpp: float,
    tile: int = 256,
    quality: int = 85,
    min_level_px: int = 512,
    downsample_factor: int = 4,
) -> Path:
    """Write an in-memory RGB image as a pyramidal, tiled, JPEG Aperio SVS.

    Parameters
    ----------
    path : str or Path
        Output file; overwritten if it exists.
    image_rgb : uint8 ndarray ``[H, W, 3]``
        Level-0 pixels.
    mpp : float
        Level-0 microns per pixel.
    tile, quality, min_level_px, downsample_factor
        As in :func:`write_svs_tiles`.

    Returns
    -------
    Path of the written file. OpenSlide reports vendor ``aperio``, ``openslide.mpp-x = mpp``
    and the levels of :func:`pyramid_dimensions`.
    """
    import cv2

    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ConfigError(
            "The 'image_rgb' parameter of write_svs must be a uint8 array [H, W, 3]. "
            f"Got {image.dtype} {image.shape} instead."
        )
    dims = pyramid_dimensions((image.shape[1], image.shape[0]), min_level_px, downsample_factor)
    # Each level from the previous one by area averaging, as scanners build their pyramids.
    levels = {1: np.ascontiguousarray(image)}
    for k in range(1, len(dims)):
        prev = levels[downsample_factor ** (k - 1)]
        levels[downsample_factor**k] = cv2.resize(prev, dims[k], interpolation=cv2.INTER_AREA)

    def render(ds: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return levels[ds][y:y + h, x:x + w]

    return write_svs_tiles(path, dims[0], render, mpp, tile, quality, min_level_px, downsample_factor)
