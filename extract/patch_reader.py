"""Fast, exact patch reading: decode each stored tile once, crop every patch that needs it.

    geometry = plan_geometry(level_downsamples, patch_px_level0=512, out_px=256)
    with PatchReader("a.svs", patch_px_level0=512, out_px=256) as reader:
        indices, patches, report = reader.read(coords)            # all in this process
    batches = iter_patch_batches("a.svs", coords, 512, 256, batch_size=64, num_workers=2)
    for indices, patches in batches:      # int64 [b], uint8 [b, 256, 256, 3], coords order
        ...
    batches.report.dropped                 # indices of patches that could not be read

Coordinates are level-0 top-left ``(x, y)``; ``patch_px_level0`` is the patch side in level-0
pixels (``round(out_px * target_mpp / slide_mpp)``).

Level choice: the deepest pyramid level whose downsample ``d`` keeps at least the requested
resolution, ``patch_px_level0 / d >= out_px`` (1 % tolerance: level sizes are rounded, so a
nominal 4x level measures e.g. 3.9996x); the patch is cropped there (``round(P0 / d)`` level
pixels) and resized to ``out_px`` (``cv2.INTER_AREA`` when shrinking) only when sizes differ.
Level coordinates are ``round(x / d)`` with ``d`` the nominal integer downsample; OpenSlide
instead samples at the fractional position ``x / d`` with bilinear interpolation, so the two
agree exactly whenever ``x`` is a multiple of ``d`` (always at level 0) and otherwise differ by
a sub-pixel shift, never by a blur.

Work is planned in *groups*: patches are binned into bands of about ``block_px`` level pixels
along the coordinates' slow axis (aligned to the file's tile grid) and segments along the fast
axis; a group is swept along the fast axis through a per-process cache of decoded tiles
(a hot LRU sized to the sweep, plus the tiles on the group's far edges carried for the
neighbouring segment and the next band), so every stored tile a process's groups touch is
decoded once. Groups go to reader processes (``extract/reader_pool.py``: started once per
process and reused by the next slide) that each open their own handles and decode into
shared-memory slabs the consumer lends them (``extract/slabs.py``); the consumer re-assembles
batches in coordinate order (``ordered=True``) or in arrival order with their indices
(``ordered=False``: less memory).

Memory is reused rather than allocated per tile, group or batch (a fresh array costs a page
fault per 4 KiB written, ~48 per 256-px tile: 30-60 % of its decode time again): decoded tiles
go into evicted tiles' buffers (kept across slides, up to 64 MiB), group buffers and slabs are
handed back once their rows are in batches, and a numpy batch the consumer no longer refers to
(CPython's reference count says so) is filled again.

Pixel sources, per pyramid level:
- ``tiff`` (fast path) for Aperio SVS and generic tiled TIFF: the level's TIFF page is found by
  size; tiles are read with ``os.pread`` at the page's tile offsets and decoded with
  libjpeg-turbo (``imagecodecs.jpeg8_decode``, JPEG tables from the TIFF header, colour space
  from the photometric tag: Aperio's non-JFIF RGB JPEG is decoded as RGB) or tifffile's
  decoders (JPEG 2000, deflate, LZW, ...). The first tile decoded per level is compared with
  OpenSlide's pixels; a mismatch disables the fast path for that level (logged).
- ``openslide`` for every other format: ``read_region`` blocks of whole file tiles (>= 512 px)
  cached the same way.
Patches past the slide edge are white, as ``read_region`` returns them.

Failures: a tile (or OpenSlide block) that cannot be decoded sends each patch that needs it
to a per-patch OpenSlide read at the same level; if that fails too, the patch is read once from another level (the next finer one,
else the next coarser one) and resized (listed in ``retried``); if that fails it is dropped
(listed in ``dropped``). OpenSlide handles are reopened after any error (its errors are sticky).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import ConfigError, SlideError
from .runtime import check_int
from .slide import Slide

__all__ = [
    "ReadGeometry",
    "ReadReport",
    "GroupResult",
    "choose_read_level",
    "nominal_downsample",
    "plan_geometry",
    "plan_groups",
    "PatchReader",
    "PatchBatches",
    "iter_patch_batches",
]

logger = logging.getLogger(__name__)

_LEVEL_TOLERANCE = 0.01  # relative; rounded level sizes make downsamples drift this much
_FAST_VENDORS = ("aperio", "generic-tiff")
_MIN_OPENSLIDE_BLOCK = 512
_MAX_ERRORS_KEPT = 20
_MAX_GROUP_PATCHES = 256  # patches per work group (plan_groups' max_patches)


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------
def nominal_downsample(downsample: float) -> float:
    """The integer downsample a level was built with when ``downsample`` is within 1 % of it.

    OpenSlide reports the mean of ``W0 / w`` and ``H0 / h`` of rounded level sizes (2.0005 for a
    2x level of a 4443 px slide); the pyramid itself was sampled at the integer factor.
    """
    rounded = round(float(downsample))
    if rounded >= 1 and abs(downsample - rounded) <= _LEVEL_TOLERANCE * rounded:
        return float(rounded)
    return float(downsample)


def choose_read_level(level_downsamples, patch_px_level0: int, out_px: int) -> int:
    """Deepest level whose downsample ``d`` keeps ``patch_px_level0 / d >= out_px`` (1 % tol.).

    Level 0 when no level qualifies (the patch is then upsampled: the slide is coarser than
    asked for).
    """
    best = 0
    for level, ds in enumerate(level_downsamples):
        d = nominal_downsample(ds)
        if patch_px_level0 / d >= out_px * (1.0 - _LEVEL_TOLERANCE):
            if d >= nominal_downsample(level_downsamples[best]):
                best = level
    return best


@dataclass(frozen=True)
class ReadGeometry:
    """How a patch maps onto the pyramid.

    Attributes
    ----------
    level : int
        Pyramid level read.
    downsample : float
        Level-0 pixels per level pixel used to map coordinates (nominal integer when close).
    read_px : int
        Patch side in pixels of ``level`` (``round(patch_px_level0 / downsample)``).
    out_px : int
        Patch side delivered (after resizing when ``read_px != out_px``).
    patch_px_level0 : int
        Patch side in level-0 pixels.
    level_wh : (int, int)
        Size of ``level``.
    """

    level: int
    downsample: float
    read_px: int
    out_px: int
    patch_px_level0: int
    level_wh: tuple[int, int]

    def to_level(self, coords: np.ndarray) -> np.ndarray:
        """Level-0 top-left ``[N, 2]`` -> top-left in level pixels (int64, rounded)."""
        return np.floor(np.asarray(coords, dtype=np.float64) / self.downsample + 0.5).astype(np.int64)


def plan_geometry(
    level_downsamples,
    level_dimensions,
    patch_px_level0: int,
    out_px: int,
    level: int | None = None,
) -> ReadGeometry:
    """Choose the read level (or use ``level``) and the crop size there."""
    if level is None:
        level = choose_read_level(level_downsamples, patch_px_level0, out_px)
    elif not (0 <= level < len(level_downsamples)):
        raise ConfigError(
            f"The 'level' parameter must be in [0, {len(level_downsamples) - 1}]. Got {level!r} instead."
        )
    d = nominal_downsample(level_downsamples[level])
    read_px = max(1, int(round(patch_px_level0 / d)))
    w, h = level_dimensions[level]
    return ReadGeometry(int(level), d, read_px, int(out_px), int(patch_px_level0), (int(w), int(h)))


def plan_groups(
    level_xy: np.ndarray,
    read_px: int,
    tile_wh: tuple[int, int],
    block_px: int = 4096,
    max_patches: int = _MAX_GROUP_PATCHES,
) -> list[np.ndarray]:
    """Split patches into work groups that each touch a compact set of tiles.

    Parameters
    ----------
    level_xy : int64 ``[N, 2]``
        Patch top-left in pixels of the read level.
    read_px : int
        Patch side at the read level.
    tile_wh : (int, int)
        Tile grid of the pixel source at that level.
    block_px : int
        Band height and segment width, in level pixels (rounded to whole tiles, at least two
        patches).
    max_patches : int
        Groups larger than this are split along the sweep.

    Returns
    -------
    list of int64 index arrays, each sorted along the sweep (fast) axis; the list is ordered
    by each group's smallest index so ordered consumption buffers about one band.
    """
    n = len(level_xy)
    if n == 0:
        return []
    xy = np.asarray(level_xy, dtype=np.int64)
    # The slow axis is the one that changes least often between consecutive coordinates
    # (y for row-major rasters, x for CLAM's column-major meshgrid order).
    changes = np.count_nonzero(np.diff(xy, axis=0), axis=0) if n > 1 else np.array([1, 0])
    slow = 1 if changes[1] <= changes[0] else 0
    fast = 1 - slow
    span = max(block_px, 2 * read_px)
    band = max(1, span // tile_wh[slow]) * tile_wh[slow]
    seg = max(1, span // tile_wh[fast]) * tile_wh[fast]
    band_id = np.floor_divide(xy[:, slow], band)
    seg_id = np.floor_divide(xy[:, fast], seg)
    order = np.lexsort((np.arange(n), xy[:, slow], xy[:, fast], seg_id, band_id))
    key = np.stack([band_id[order], seg_id[order]], axis=1)
    cuts = np.flatnonzero(np.any(np.diff(key, axis=0) != 0, axis=1)) + 1
    groups = []
    for part in np.split(order, cuts):
        for start in range(0, len(part), max_patches):
            groups.append(part[start:start + max_patches].astype(np.int64))
    groups.sort(key=lambda g: int(g.min()))
    return groups


# ---------------------------------------------------------------------------------------------
# Pixel sources
# ---------------------------------------------------------------------------------------------
class TileDecodeError(Exception):
    """A stored tile could not be read or decoded (internal; becomes a retry or a drop)."""


_MISS = object()


class _Spares:
    """Arrays no one holds, kept for the next use in this process (all readers, next slide):
    writing into memory already mapped saves a page fault per 4 KiB (~48 per 256-px tile,
    ~12,000 per 256-patch group buffer). The oldest are dropped past ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.items: list[np.ndarray] = []

    def take(self, fits) -> np.ndarray | None:
        """The most recently given array for which ``fits(array)`` holds (removed), or None."""
        for k in range(len(self.items) - 1, -1, -1):
            if fits(self.items[k]):
                return self.items.pop(k)
        return None

    def give(self, array: np.ndarray) -> None:
        if array.flags.c_contiguous and array.flags.writeable:
            self.items.append(array)
            while sum(a.nbytes for a in self.items) > self.max_bytes:
                self.items.pop(0)


_TILE_SPARES = _Spares(64 << 20)  # decoded tiles the caches let go
_GROUP_SPARES = _Spares(96 << 20)  # in-process group buffers: two of 256 patches of 256 px


class _TileLRU:
    """Decoded tiles of one level: a small hot LRU for the sweep, a larger one for carried tiles.

    A group's sweep needs only the few tile columns (or rows) its current patches span, so the
    hot LRU holds about that many tiles (:meth:`fit`) and its evicted tiles' memory is reused as
    the next decode target: a fresh array per tile costs a page fault per 4 KiB (~48 per 256-px
    JPEG tile, 30-60 % of the decode time again) and a long LRU hands back memory long out of
    the CPU caches. Tiles on a group's far edge (:meth:`fit`'s ``carry_from``), which the
    neighbouring segment or next band will read again, leave the hot LRU for the carry LRU
    (byte budget) instead, so they are decoded once.
    """

    def __init__(self, carry_bytes: int):
        from collections import OrderedDict

        self.hot: "OrderedDict[tuple[int, int], np.ndarray | None]" = OrderedDict()
        self.carry: "OrderedDict[tuple[int, int], np.ndarray | None]" = OrderedDict()
        self.hot_tiles = 16
        self.carry_budget = int(carry_bytes)
        self.carry_bytes = 0
        self.carry_from = (0, 0)  # (col, row): evicted tiles at or past either are carried

    @staticmethod
    def _size(tile) -> int:
        return 64 if tile is None else int(tile.nbytes)

    def fit(self, hot_tiles: int, carry_from: tuple[int, int]) -> None:
        """Size the hot LRU for the coming group and name its far edge (tile col, row)."""
        self.hot_tiles = max(4, int(hot_tiles))
        self.carry_from = carry_from

    def get(self, key):
        tile = self.hot.get(key, _MISS)
        if tile is not _MISS:
            self.hot.move_to_end(key)
            return tile
        tile = self.carry.pop(key, _MISS)
        if tile is not _MISS:
            self.carry_bytes -= self._size(tile)
            self.put(key, tile)
        return tile

    def put(self, key, tile) -> None:
        self.hot.pop(key, None)
        self.hot[key] = tile
        while len(self.hot) > self.hot_tiles:
            old_key, old = self.hot.popitem(last=False)
            if old_key[0] >= self.carry_from[0] or old_key[1] >= self.carry_from[1]:
                self.carry[old_key] = old
                self.carry_bytes += self._size(old)
                while self.carry_bytes > self.carry_budget and self.carry:
                    _, dropped = self.carry.popitem(last=False)
                    self.carry_bytes -= self._size(dropped)
                    self._recycle(dropped)
            else:
                self._recycle(old)

    @staticmethod
    def _recycle(tile) -> None:
        if tile is not None:
            _TILE_SPARES.give(tile)

    @staticmethod
    def spare(shape: tuple[int, ...]) -> np.ndarray | None:
        """A released tile buffer of ``shape`` to decode into, or None."""
        return _TILE_SPARES.take(lambda a: a.shape == shape)

    def release(self) -> None:
        """Hand every cached tile's memory to the next reader in this process (the next slide)."""
        for store in (self.hot, self.carry):
            for tile in store.values():
                self._recycle(tile)
            store.clear()
        self.carry_bytes = 0


class _TiffLevel:
    """One pyramid level's TIFF page: tile offsets + a decoder, read with ``os.pread``."""

    kind = "tiff"

    def __init__(self, fd: int, page, level_wh: tuple[int, int], cache_bytes: int):
        self.cache = _TileLRU(cache_bytes)
        self.fd = fd
        self.page = page
        self.tile_w, self.tile_h = int(page.tilewidth), int(page.tilelength)
        self.level_w, self.level_h = level_wh
        self.ncols = -(-self.level_w // self.tile_w)
        self.nrows = -(-self.level_h // self.tile_h)
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.counts = np.asarray(page.databytecounts, dtype=np.int64)
        if len(self.offsets) < self.ncols * self.nrows:
            raise TileDecodeError(f"page has {len(self.offsets)} tiles, expected {self.ncols * self.nrows}")
        self.compression = int(page.compression)
        self.photometric = int(page.photometric)
        self.jpegtables = page.jpegtables
        self.decoded = 0

    def tile(self, col: int, row: int) -> np.ndarray | None:
        """Decoded tile ``[>=h, >=w, 3]`` or None for a tile the file leaves out (white)."""
        index = row * self.ncols + col
        offset, count = int(self.offsets[index]), int(self.counts[index])
        if count == 0 or offset == 0:
            return None
        try:
            data = os.pread(self.fd, count, offset)
        except OSError as exc:
            raise TileDecodeError(f"tile ({col}, {row}) at offset {offset}: {exc}") from exc
        if len(data) != count:
            raise TileDecodeError(f"tile ({col}, {row}): file truncated ({len(data)} of {count} bytes)")
        try:
            if self.compression == 7 and self.photometric in (2, 6):
                import imagecodecs

                # Aperio writes RGB JPEG without a JFIF marker: libjpeg would assume YCbCr.
                rgb_stream = self.photometric == 2 and b"JFIF" not in data[:24]
                arr = imagecodecs.jpeg8_decode(
                    data, tables=self.jpegtables, colorspace="RGB" if rgb_stream else None,
                    outcolorspace="RGB", out=self.cache.spare((self.tile_h, self.tile_w, 3)),
                )
            else:
                arr = self.page.decode(data, index, jpegtables=self.jpegtables)[0]
                arr = arr.reshape(arr.shape[-3:]) if arr.ndim == 4 else arr
        except Exception as exc:  # codecs raise their own error types (Jpeg8Error, ...)
            raise TileDecodeError(f"tile ({col}, {row}): {type(exc).__name__}: {exc}") from exc
        need_h = min(self.tile_h, self.level_h - row * self.tile_h)
        need_w = min(self.tile_w, self.level_w - col * self.tile_w)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < need_h or arr.shape[1] < need_w or arr.dtype != np.uint8:
            raise TileDecodeError(f"tile ({col}, {row}) decoded to {arr.dtype} {arr.shape}, expected uint8 [{self.tile_h}, {self.tile_w}, 3]")
        self.decoded += 1
        return arr


class _OpenSlideLevel:
    """Virtual tiles of one level read as ``read_region`` blocks (whole file tiles, >= 512 px)."""

    kind = "openslide"

    def __init__(self, owner: "_Handles", level: int, downsample: float, level_wh, file_tile, cache_bytes: int):
        self.cache = _TileLRU(cache_bytes)
        self.owner = owner
        self.level = level
        self.downsample = downsample
        self.level_w, self.level_h = level_wh
        tw, th = file_tile or (_MIN_OPENSLIDE_BLOCK, _MIN_OPENSLIDE_BLOCK)
        self.tile_w = tw * max(1, -(-_MIN_OPENSLIDE_BLOCK // tw))
        self.tile_h = th * max(1, -(-_MIN_OPENSLIDE_BLOCK // th))
        self.ncols = -(-self.level_w // self.tile_w)
        self.nrows = -(-self.level_h // self.tile_h)
        self.decoded = 0

    def tile(self, col: int, row: int) -> np.ndarray:
        loc = (int(round(col * self.tile_w * self.downsample)), int(round(row * self.tile_h * self.downsample)))
        try:
            arr = self.owner.slide.read_region(loc, self.level, (self.tile_w, self.tile_h))
        except SlideError as exc:
            self.owner.reopen_slide()
            raise TileDecodeError(str(exc)) from exc
        self.decoded += 1
        return arr


class _Handles:
    """Per-process open handles (OpenSlide + raw fd + TIFF pages), reopened after a fork."""

    def __init__(self, path: Path, mpp: float | None, backend: str, verify: bool, cache_bytes: int):
        self.path, self.mpp, self.backend, self.verify = path, mpp, backend, verify
        self.cache_bytes = cache_bytes
        self.pid = os.getpid()
        self.slide = Slide(path, mpp=mpp)
        self.fd: int | None = None
        self.tif = None
        self._levels: dict[int, object] = {}
        self._verified: set[int] = set()
        self._pages = self._match_pages() if backend in ("auto", "tiff") else {}
        if backend == "tiff" and not self._pages:
            self.close()
            raise ConfigError(
                f"The 'backend' parameter is 'tiff' but {path} has no tiled TIFF pyramid levels the "
                "fast path can read; use backend='auto'"
            )

    def close(self) -> None:
        if self.pid != os.getpid():
            return  # inherited through fork: the parent owns these
        for source in self._levels.values():
            source.cache.release()
        self._levels.clear()
        self.slide.close()
        if self.tif is not None:
            self.tif.close()
            self.tif = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def reopen_slide(self) -> None:
        try:
            self.slide.close()
        except Exception:  # a handle in OpenSlide's sticky error state may fail to close
            pass
        self.slide = Slide(self.path, mpp=self.mpp)

    # -- level -> TIFF page ---------------------------------------------------------------------
    def _match_pages(self) -> dict[int, object]:
        if self.slide.vendor not in _FAST_VENDORS:
            return {}
        import tifffile

        try:
            self.tif = tifffile.TiffFile(str(self.path))
            self.fd = os.open(str(self.path), os.O_RDONLY)
        except (OSError, ValueError, tifffile.TiffFileError) as exc:
            logger.info("%s: TIFF fast path unavailable (%s); using OpenSlide", self.path, exc)
            return {}
        pages: dict[int, object] = {}
        for level, (w, h) in enumerate(self.slide.level_dimensions):
            found = [
                p for p in self.tif.pages
                if getattr(p, "is_tiled", False) and (p.imagewidth, p.imagelength) == (w, h)
            ]
            if len(found) != 1:
                continue
            page = found[0]
            tile = self.slide.tile_size(level)
            if (
                page.samplesperpixel == 3 and page.bitspersample == 8 and page.planarconfig == 1
                and page.imagedepth == 1 and (tile is None or tile == (page.tilewidth, page.tilelength))
            ):
                pages[level] = page
        return pages

    def level_source(self, level: int, downsample: float):
        source = self._levels.get(level)
        if source is None:
            wh = self.slide.level_dimensions[level]
            if level in self._pages:
                try:
                    source = _TiffLevel(self.fd, self._pages[level], wh, self.cache_bytes)
                except TileDecodeError as exc:
                    logger.warning("%s level %d: TIFF fast path off (%s)", self.path, level, exc)
            if source is None:
                source = _OpenSlideLevel(self, level, downsample, wh, self.slide.tile_size(level), self.cache_bytes)
            self._levels[level] = source
        return source

    def disable_fast(self, level: int, downsample: float, why: str) -> None:
        logger.warning("%s level %d: TIFF fast path disabled, using OpenSlide (%s)", self.path, level, why)
        self._pages.pop(level, None)
        self._levels.pop(level, None)
        self.level_source(level, downsample)

    def verify_level(self, level: int, downsample: float) -> bool:
        """Compare one decoded tile with OpenSlide's pixels; False disabled the fast path."""
        source = self._levels.get(level)
        if not self.verify or level in self._verified or not isinstance(source, _TiffLevel):
            return True
        self._verified.add(level)
        os_ds = self.slide.level_downsamples[level]
        # Tiles whose level-0 origin OpenSlide maps to an integer level position (no
        # interpolation): all of them for integer downsamples, (0, 0) always.
        candidates = [(0, 0)] + [
            (c, r) for r in range(min(source.nrows, 3)) for c in range(min(source.ncols, 3))
            if (c, r) != (0, 0) and float(c * source.tile_w * os_ds).is_integer()
            and float(r * source.tile_h * os_ds).is_integer()
        ]
        for col, row in candidates[:4]:
            try:
                ours = source.tile(col, row)
            except TileDecodeError:
                continue
            if ours is None:
                continue
            w = min(source.tile_w, source.level_w - col * source.tile_w)
            h = min(source.tile_h, source.level_h - row * source.tile_h)
            loc = (int(round(col * source.tile_w * os_ds)), int(round(row * source.tile_h * os_ds)))
            try:
                ref = self.slide.read_region(loc, level, (w, h))
            except SlideError:
                self.reopen_slide()
                continue
            diff = int(np.abs(ours[:h, :w].astype(np.int16) - ref.astype(np.int16)).max())
            if diff > 2:
                self.disable_fast(level, downsample, f"decoded tile ({col}, {row}) differs from OpenSlide by up to {diff}")
                return False
            logger.debug("%s level %d: fast path verified (max abs diff %d)", self.path, level, diff)
            return True
        logger.debug("%s level %d: no tile available to verify the fast path", self.path, level)
        return True


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------
@dataclass
class GroupResult:
    """Pixels of one work group. ``patches[k]`` belongs to coordinate ``indices[k]``."""

    indices: np.ndarray
    patches: object  # uint8 [n, S, S, 3] ndarray, or a torch tensor from a worker
    dropped: np.ndarray
    retried: np.ndarray
    tiles_decoded: int
    source: str
    errors: list[str] = field(default_factory=list)
    release: object = None  # called once every row of ``patches`` was copied out (buffer reuse)


@dataclass
class ReadReport:
    """What happened while reading one slide's patches."""

    n_requested: int
    level: int
    downsample: float
    read_px: int
    out_px: int
    n_read: int = 0
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    retried: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tiles_decoded: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    workers_started: int = 0  # reader processes started for this read (0: an earlier read's reused)

    @property
    def patches_per_s(self) -> float:
        return self.n_read / self.seconds if self.seconds > 0 else float("nan")

    def add(self, result: GroupResult) -> None:
        self.n_read += len(result.indices)
        if len(result.dropped):
            self.dropped = np.sort(np.concatenate([self.dropped, result.dropped]))
        if len(result.retried):
            self.retried = np.sort(np.concatenate([self.retried, result.retried]))
        self.tiles_decoded += result.tiles_decoded
        self.sources[result.source] = self.sources.get(result.source, 0) + len(result.indices)
        for message in result.errors:
            if len(self.errors) < _MAX_ERRORS_KEPT and message not in self.errors:
                self.errors.append(message)


def _check_coords(coords) -> np.ndarray:
    xy = np.asarray(coords)
    if xy.ndim != 2 or xy.shape[1] != 2 or (xy.size and xy.dtype.kind not in "iu"):
        raise ConfigError(
            "The 'coords' parameter must be an integer array [N, 2] of level-0 top-left (x, y). "
            f"Got {xy.dtype} {xy.shape} instead."
        )
    return xy.astype(np.int64, copy=False)


class PatchReader:
    """Reads square patches of one slide at a fixed level-0 size, tile-aligned.

    Parameters
    ----------
    slide_path : str or Path
    patch_px_level0 : int
        Patch side in level-0 pixels.
    out_px : int
        Patch side delivered.
    mpp : float, optional
        Level-0 mpp override handed to :class:`~extract.slide.Slide` (reported only; the
        geometry is fixed by ``patch_px_level0``).
    level : int, optional
        Force the read level (default: :func:`choose_read_level`).
    backend : {'auto', 'tiff', 'openslide'}
        ``auto`` uses the TIFF fast path where the file allows, OpenSlide elsewhere.
    verify : bool
        Check the first decoded tile per level against OpenSlide.
    block_px : int
        Work-group size in level pixels (see :func:`plan_groups`).
    tile_cache_mb : int
        Decoded-tile LRU cache per process (MiB); it must hold one group's tiles (~10-20 MB)
        and lets consecutive groups in a process share their boundary tiles.

    Raises
    ------
    SlideError when the slide cannot be opened.
    """

    def __init__(
        self,
        slide_path: str | os.PathLike,
        patch_px_level0: int,
        out_px: int = 256,
        mpp: float | None = None,
        level: int | None = None,
        backend: str = "auto",
        verify: bool = True,
        block_px: int = 4096,
        tile_cache_mb: int = 128,
    ):
        self.path = Path(slide_path)
        self.patch_px_level0 = check_int("patch_px_level0", patch_px_level0, minimum=1)
        self.out_px = check_int("out_px", out_px, minimum=1)
        self.block_px = check_int("block_px", block_px, minimum=1)
        self.tile_cache_mb = check_int("tile_cache_mb", tile_cache_mb, minimum=1)
        if backend not in ("auto", "tiff", "openslide"):
            raise ConfigError(f"The 'backend' parameter must be 'auto', 'tiff' or 'openslide'. Got {backend!r} instead.")
        self.mpp, self.backend, self.verify = mpp, backend, bool(verify)
        self._handles: _Handles | None = None
        handles = self._open()
        self.geometry = plan_geometry(
            handles.slide.level_downsamples, handles.slide.level_dimensions,
            self.patch_px_level0, self.out_px, level,
        )
        self.slide_mpp = handles.slide.mpp

    # -- resources --------------------------------------------------------------------------
    def _open(self) -> _Handles:
        if self._handles is None or self._handles.pid != os.getpid():
            self._handles = _Handles(self.path, self.mpp, self.backend, self.verify, self.tile_cache_mb << 20)
        return self._handles

    def close(self) -> None:
        if self._handles is not None:
            self._handles.close()
            self._handles = None

    def __enter__(self) -> "PatchReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = None  # each process opens its own
        return state

    @property
    def source_kind(self) -> str:
        """``'tiff'`` or ``'openslide'``: the pixel source of the read level in this process."""
        g = self.geometry
        return self._open().level_source(g.level, g.downsample).kind

    # -- planning ---------------------------------------------------------------------------
    def plan(self, coords) -> list[np.ndarray]:
        """Work groups (index arrays) for ``coords`` level-0 ``[N, 2]``."""
        xy = _check_coords(coords)
        g = self.geometry
        source = self._open().level_source(g.level, g.downsample)
        return plan_groups(g.to_level(xy), g.read_px, (source.tile_w, source.tile_h), self.block_px)

    # -- reading ----------------------------------------------------------------------------
    def read(self, coords) -> tuple[np.ndarray, np.ndarray, ReadReport]:
        """Read every patch in this process.

        Returns
        -------
        indices : int64 ``[n]`` ascending (requested rows minus dropped ones)
        patches : uint8 ``[n, out_px, out_px, 3]``
        report : ReadReport
        """
        xy = _check_coords(coords)
        batches = iter_patch_batches(self, xy, batch_size=max(1, len(xy)), num_workers=0)
        parts = list(batches)
        S = self.out_px
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, S, S, 3), np.uint8), batches.report
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), batches.report

    def read_group(self, coords: np.ndarray, indices: np.ndarray, out: np.ndarray | None = None) -> GroupResult:
        """Read the patches ``coords[indices]`` (one work group, sorted along its sweep).

        ``out``: optional uint8 ``[len(indices), S, S, 3]`` buffer to fill (e.g. shared memory).
        """
        import cv2

        g = self.geometry
        handles = self._open()
        source = handles.level_source(g.level, g.downsample)
        if isinstance(source, _TiffLevel) and not handles.verify_level(g.level, g.downsample):
            source = handles.level_source(g.level, g.downsample)
        indices = np.asarray(indices, dtype=np.int64)
        lxy = g.to_level(coords[indices])
        n, R, S = len(indices), g.read_px, g.out_px
        if out is None:
            out = np.empty((n, S, S, 3), dtype=np.uint8)
        elif out.shape != (n, S, S, 3) or out.dtype != np.uint8:
            raise ValueError(f"out must be uint8 {(n, S, S, 3)}, got {out.dtype} {out.shape}")
        scratch = np.empty((R, R, 3), dtype=np.uint8) if R != S else None
        tw, th, lw, lh = source.tile_w, source.tile_h, source.level_w, source.level_h
        lru = source.cache
        if n:
            # Hot set: the group's whole extent across the sweep times one patch (+1 tile)
            # along it; the sweep axis is not known here, so the larger of the two.
            span_x = (int(lxy[:, 0].max()) - int(lxy[:, 0].min()) + R) // tw + 2
            span_y = (int(lxy[:, 1].max()) - int(lxy[:, 1].min()) + R) // th + 2
            lru.fit(max(span_x * (R // th + 2), span_y * (R // tw + 2)),
                    (int(lxy[:, 0].max()) // tw + 1, int(lxy[:, 1].max()) // th + 1))
        failed: dict[tuple[int, int], TileDecodeError] = {}
        errors: list[str] = []
        ok = np.ones(n, dtype=bool)
        decoded_before = source.decoded
        for k in range(n):
            x, y = int(lxy[k, 0]), int(lxy[k, 1])
            c0, c1 = max(0, x // tw), min(source.ncols - 1, (x + R - 1) // tw)
            r0, r1 = max(0, y // th), min(source.nrows - 1, (y + R - 1) // th)
            canvas = out[k] if scratch is None else scratch
            if x < 0 or y < 0 or x + R > lw or y + R > lh:
                canvas.fill(255)
            for r in range(r0, r1 + 1):
                for c in range(c0, c1 + 1):
                    key = (c, r)
                    tile = failed.get(key, _MISS)
                    if tile is _MISS:
                        tile = lru.get(key)
                    if tile is _MISS:
                        try:
                            tile = source.tile(c, r)
                        except TileDecodeError as exc:
                            tile = failed[key] = exc
                        else:
                            lru.put(key, tile)
                    # Intersection of patch, tile and level, in level pixels.
                    ax0, ax1 = max(x, c * tw, 0), min(x + R, (c + 1) * tw, lw)
                    ay0, ay1 = max(y, r * th, 0), min(y + R, (r + 1) * th, lh)
                    if ax1 <= ax0 or ay1 <= ay0:
                        continue
                    dst = canvas[ay0 - y:ay1 - y, ax0 - x:ax1 - x]
                    if isinstance(tile, Exception):
                        ok[k] = False
                    elif tile is None:
                        dst.fill(255)
                    else:
                        dst[...] = tile[ay0 - r * th:ay1 - r * th, ax0 - c * tw:ax1 - c * tw]
            if ok[k] and scratch is not None:
                _resize_into(scratch, out[k], cv2)
        tiles_decoded = source.decoded - decoded_before
        for exc in failed.values():
            if len(errors) < _MAX_ERRORS_KEPT:
                errors.append(f"{self.path.name} level {g.level} {source.kind} {exc}")

        retried: list[int] = []
        dropped: list[int] = []
        for k in np.flatnonzero(~ok):
            outcome = self._rescue(coords[indices[k]], lxy[k], out[k], source, errors)
            if outcome == "retried":
                retried.append(int(indices[k]))
            if outcome == "dropped":
                dropped.append(int(indices[k]))
                ok[k] = False
            else:
                ok[k] = True
        keep = np.flatnonzero(ok)
        return GroupResult(
            indices=indices[keep],
            patches=out if len(keep) == n else out[keep],
            dropped=np.asarray(dropped, dtype=np.int64),
            retried=np.asarray(retried, dtype=np.int64),
            tiles_decoded=tiles_decoded,
            source=source.kind,
            errors=errors,
        )

    def _rescue(self, xy0, lxy, dst: np.ndarray, source, errors: list[str]) -> str:
        """Re-read one patch whose block failed: 'same' level via OpenSlide, 'retried' from
        another level, or 'dropped'."""
        import cv2

        g = self.geometry
        handles = self._open()
        # Same level through OpenSlide first: a different decoder for the fast path, and a
        # region of just this patch for OpenSlide blocks (the bad tile may lie outside it).
        loc = (int(round(lxy[0] * g.downsample)), int(round(lxy[1] * g.downsample)))
        attempts = [("same", g.level, loc, g.read_px)]
        downsamples = handles.slide.level_downsamples
        alt = g.level - 1 if g.level > 0 else (g.level + 1 if g.level + 1 < len(downsamples) else None)
        if alt is not None:
            size = max(1, int(round(g.patch_px_level0 / nominal_downsample(downsamples[alt]))))
            attempts.append(("retried", alt, (int(xy0[0]), int(xy0[1])), size))
        for outcome, level, loc, size in attempts:
            try:
                pixels = handles.slide.read_region(loc, level, (size, size))
            except SlideError as exc:
                handles.reopen_slide()
                if len(errors) < _MAX_ERRORS_KEPT:
                    errors.append(f"{self.path.name} patch at {tuple(int(v) for v in xy0)} level {level} openslide: {exc}")
                continue
            _resize_into(pixels, dst, cv2)
            return outcome
        return "dropped"


def _resize_into(src: np.ndarray, dst: np.ndarray, cv2) -> None:
    """Resize ``src`` into ``dst`` in place (no temporary: OpenCV writes a matching ``dst`` view)."""
    if src.shape[:2] == dst.shape[:2]:
        dst[...] = src
        return
    shrink = src.shape[0] > dst.shape[0]
    out = cv2.resize(src, (dst.shape[1], dst.shape[0]), dst=dst,
                     interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if out is not dst:  # an OpenCV build that reallocated instead of writing in place
        dst[...] = out


# ---------------------------------------------------------------------------------------------
# Worker pool
# ---------------------------------------------------------------------------------------------
# Modules the fork server imports once, so each reader worker starts in milliseconds.
_FORKSERVER_PRELOAD = ["numpy", "cv2", "torch", "openslide", "tifffile", "imagecodecs", "extract.patch_reader",
                      "extract.reader_pool"]


def _worker_context(name: str):
    """Start method for reader workers.

    'forkserver' (default): workers fork from a clean, thread-free server process. Plain
    'fork' from a process that has used OpenCV's or OpenMP's thread pools (any real
    pipeline run) can deadlock the child (seen: cv2.setNumThreads hanging in the worker).
    """
    import multiprocessing

    ctx = multiprocessing.get_context(name)
    if name == "forkserver":
        ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)  # no effect once the server runs
    return ctx


def _worker_init(_worker_id: int) -> None:
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


class PatchBatches:
    """Iterator of ``(indices int64 [b], patches uint8 [b, S, S, 3])`` with a ``report``.

    ``patches`` is a numpy array, or a pinned torch tensor when ``pin_memory=True``. Iterate
    once; :attr:`report` is complete when iteration ends.
    """

    def __init__(self, reader: PatchReader, coords: np.ndarray, batch_size: int, num_workers: int,
                 ordered: bool, pin_memory: bool, prefetch_groups: int, owns_reader: bool,
                 mp_context: str = "forkserver"):
        self.reader, self.coords = reader, coords
        self.batch_size, self.num_workers = batch_size, num_workers
        self.ordered, self.pin_memory, self.prefetch_groups = ordered, pin_memory, prefetch_groups
        self._owns_reader = owns_reader
        self.mp_context = mp_context
        g = reader.geometry
        self.groups = reader.plan(coords)
        self.report = ReadReport(len(coords), g.level, g.downsample, g.read_px, g.out_px)
        self._started = False
        self._ring: list[np.ndarray] = []  # full-size numpy batches, reused once released

    def __len__(self) -> int:
        """Upper bound on the number of batches (dropped patches can make it smaller)."""
        return -(-len(self.coords) // self.batch_size)

    def _results(self) -> Iterator[GroupResult]:
        if self.num_workers == 0 or not self.groups:
            S = self.reader.out_px
            for group in self.groups:
                buf = _GROUP_SPARES.take(lambda a: a.shape[0] >= len(group) and a.shape[1] == S)
                if buf is None:
                    buf = np.empty((max(len(group), _MAX_GROUP_PATCHES), S, S, 3), dtype=np.uint8)
                result = self.reader.read_group(self.coords, group, out=buf[:len(group)])
                if np.may_share_memory(result.patches, buf):
                    result.release = functools.partial(_GROUP_SPARES.give, buf)
                else:  # some patches dropped: ``patches`` is a copy of the kept rows
                    _GROUP_SPARES.give(buf)
                yield result
            return
        from .reader_pool import acquire_pool, release_pool

        # Workers outlive this slide: the next slide's read starts without starting processes.
        pool = acquire_pool(self.num_workers, self.mp_context)
        self.report.workers_started = pool.started
        pool.started = 0
        try:
            yield from pool.run(self.reader, self.coords, self.groups, self.prefetch_groups)
        finally:
            release_pool(pool)

    def _numpy_batch(self, b: int, S: int) -> np.ndarray:
        """A ``[b, S, S, 3]`` array for the next batch: one the consumer let go of, else new.

        A fresh 12 MiB batch costs ~3,000 page faults. An array only this ring refers to (no
        consumer variable, view or ``torch.from_numpy`` tensor holds it: CPython's reference
        count says so) is overwritten instead. Pinned torch batches are never reused this way:
        an asynchronous copy may still read one the consumer dropped (torch's pinned
        allocator recycles those safely itself).
        """
        for k, buf in enumerate(self._ring):
            # the ring's list slot, the loop variable and getrefcount's own argument
            if buf.shape[0] == b and sys.getrefcount(buf) <= 3:
                self._ring.append(self._ring.pop(k))
                return buf
        buf = np.empty((b, S, S, 3), dtype=np.uint8)
        if b == self.batch_size:
            self._ring.append(buf)
            del self._ring[:-3]  # the batch being filled, the one the consumer holds, one spare
        return buf

    def _emit(self, parts: list[tuple[np.ndarray, int]], indices: list[int]):
        b = len(parts)
        S = self.reader.out_px
        if self.pin_memory:
            import torch

            # Page-locked only where CUDA exists (elsewhere pinning is impossible and moot);
            # the type is a torch tensor either way.
            pin = torch.cuda.is_available()
            batch = torch.empty((b, S, S, 3), dtype=torch.uint8, pin_memory=pin)
            view = batch.numpy()
        else:
            batch = view = self._numpy_batch(b, S)
        for k, (chunk, row) in enumerate(parts):
            view[k] = chunk[row]
        return np.asarray(indices, dtype=np.int64), batch

    def __iter__(self):
        if self._started:
            raise RuntimeError("PatchBatches can be iterated once")
        self._started = True
        t0 = time.perf_counter()
        n = len(self.coords)
        status = np.zeros(n, dtype=np.int8)  # 0 pending, 1 ready, 2 dropped/emitted
        ready: dict[int, tuple[np.ndarray, int]] = {}
        parts: list[tuple[np.ndarray, int]] = []
        part_idx: list[int] = []
        # id(chunk) -> [rows not yet in a batch, release]: a chunk's buffer goes back for reuse
        # once its last row was copied into a batch.
        unemitted: dict[int, list] = {}
        nxt = 0

        def emit():
            batch = self._emit(parts, part_idx)
            for chunk, _ in parts:
                entry = unemitted.get(id(chunk))
                if entry is not None:
                    entry[0] -= 1
                    if entry[0] == 0:
                        del unemitted[id(chunk)]
                        entry[1]()
            parts.clear()
            part_idx.clear()
            return batch

        try:
            for result in self._results():
                self.report.add(result)
                chunk = result.patches.numpy() if hasattr(result.patches, "numpy") else result.patches
                if result.release is not None:
                    if len(result.indices):
                        unemitted[id(chunk)] = [len(result.indices), result.release]
                    else:
                        result.release()
                if not self.ordered:
                    for row, idx in enumerate(result.indices):
                        parts.append((chunk, row))
                        part_idx.append(int(idx))
                        if len(parts) == self.batch_size:
                            yield emit()
                    continue
                for row, idx in enumerate(result.indices):
                    ready[int(idx)] = (chunk, row)
                    status[idx] = 1
                status[result.dropped] = 2
                while nxt < n and status[nxt] != 0:
                    if status[nxt] == 1:
                        parts.append(ready.pop(nxt))
                        part_idx.append(nxt)
                        if len(parts) == self.batch_size:
                            yield emit()
                    nxt += 1
            if parts:
                yield emit()
        finally:
            self.report.seconds = time.perf_counter() - t0
            if self._owns_reader:
                self.reader.close()

    def __enter__(self) -> "PatchBatches":
        return self

    def __exit__(self, *exc) -> None:
        if self._owns_reader:
            self.reader.close()


def iter_patch_batches(
    slide_path: str | os.PathLike | PatchReader,
    coords,
    patch_px_level0: int | None = None,
    out_px: int = 256,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    mpp: float | None = None,
    ordered: bool = True,
    pin_memory: bool = False,
    level: int | None = None,
    backend: str = "auto",
    prefetch_groups: int = 4,
    mp_context: str = "forkserver",
) -> PatchBatches:
    """Batches of patches for ``coords``, read with ``num_workers`` processes.

    Parameters
    ----------
    slide_path : str, Path or PatchReader
        The slide (opened here first, so an unopenable slide raises :class:`SlideError`
        before any work) or an open reader (then ``patch_px_level0``/``out_px``/``mpp``/
        ``level``/``backend`` come from it).
    coords : int ``[N, 2]``
        Level-0 top-left ``(x, y)`` of each patch.
    patch_px_level0, out_px : int
        Patch side in level-0 pixels; side delivered.
    batch_size : int
        Patches per batch (the last one may be smaller).
    num_workers : int
        Reader processes (0 = read in this process); each opens its own slide handles.
    ordered : bool
        True: batches follow the coordinates' order (buffers about one band of patches);
        False: arrival order, less memory, indices tell where each patch belongs.
    pin_memory : bool
        Deliver batches as torch tensors, page-locked (when CUDA is available) for
        ``non_blocking`` host-to-device copies.
    prefetch_groups : int
        Work groups each worker reads ahead.
    mp_context : {'forkserver', 'spawn', 'fork'}
        Start method of the workers (see :func:`_worker_context`; 'fork' can deadlock).

    Returns
    -------
    PatchBatches
        Iterable of ``(indices int64 [b], uint8 [b, out_px, out_px, 3])``; ``.report`` holds
        dropped/retried indices, tiles decoded, sources and timing after iteration.
    """
    xy = _check_coords(coords)
    check_int("batch_size", batch_size, minimum=1)
    check_int("num_workers", num_workers, minimum=0)
    check_int("prefetch_groups", prefetch_groups, minimum=1)
    if mp_context not in ("forkserver", "spawn", "fork"):
        raise ConfigError(f"The 'mp_context' parameter must be 'forkserver', 'spawn' or 'fork'. Got {mp_context!r} instead.")
    if isinstance(slide_path, PatchReader):
        reader, owns = slide_path, False
    else:
        if patch_px_level0 is None:
            raise ConfigError("The 'patch_px_level0' parameter must be an int >= 1. Got None instead.")
        reader = PatchReader(slide_path, patch_px_level0, out_px, mpp=mpp, level=level, backend=backend)
        owns = True
    return PatchBatches(reader, xy, batch_size, num_workers, bool(ordered), bool(pin_memory),
                        prefetch_groups, owns, mp_context)
