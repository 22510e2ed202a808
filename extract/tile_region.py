"""One work group's tiles decoded side by side into one array, so each patch is a view of it.

    carry = TileCarry(budget_bytes=128 << 20)
    region = fill_region(source, level_xy, read_px, carry, buffers, decode_errors)
    view = region.view(x, y)          # uint8 [read_px, read_px, 3] or None (patch leaves the level)
    region.bad                        # bool [n]: the patch touches a tile that could not be read

Every stored tile the group's patches touch is decoded once (or copied from ``carry``, where
the previous groups in this process left the tiles on their far edges) straight into its
place in a reused array; a patch is then resized (or copied) from a view, with no per-patch
assembly of tile pieces and no per-tile cache lookups. The array is reused group after group
(a fresh one costs a page fault per 4 KiB).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

__all__ = ["TileCarry", "Region", "fill_region", "RegionBuffer"]

_MISS = object()
# Tile-sized buffers no store holds, kept for the next carried tile in this process.
_SPARES: list[np.ndarray] = []
_SPARES_BYTES = 64 << 20


class TileCarry:
    """Full-resolution tiles kept for the next work groups in this process (LRU, byte budget).

    A group's far edges (its last tile column and row of patches onwards) are the next segment's
    and the next band's first tiles; carrying them means a tile is decoded once per process.
    """

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.tiles: "OrderedDict[tuple[int, int], np.ndarray | None]" = OrderedDict()
        self.bytes = 0

    def get(self, key):
        tile = self.tiles.get(key, _MISS)
        if tile is not _MISS:
            self.tiles.move_to_end(key)
        return tile

    def put(self, key, pixels: np.ndarray | None) -> None:
        """Keep a copy of ``pixels`` (None: a tile the file leaves out, white)."""
        if key in self.tiles:
            return
        copy = None
        if pixels is not None:
            copy = _spare(pixels.shape)
            if copy is None:
                copy = np.empty(pixels.shape, np.uint8)
            np.copyto(copy, pixels)
        self.tiles[key] = copy
        self.bytes += 64 if copy is None else copy.nbytes
        while self.bytes > self.budget and len(self.tiles) > 1:
            _, old = self.tiles.popitem(last=False)
            self.bytes -= 64 if old is None else old.nbytes
            _recycle(old)

    def release(self) -> None:
        """Hand every carried tile's memory to the next reader in this process."""
        for tile in self.tiles.values():
            _recycle(tile)
        self.tiles.clear()
        self.bytes = 0


class RegionBuffer:
    """A uint8 array reused for each group's region (grown when a group needs more)."""

    def __init__(self):
        self.flat = np.zeros(0, np.uint8)

    def take(self, height: int, width: int) -> np.ndarray:
        size = height * width * 3
        if self.flat.size < size:
            self.flat = np.empty(size, np.uint8)
        return self.flat[:size].reshape(height, width, 3)

    def release(self) -> None:
        self.flat = np.zeros(0, np.uint8)


@dataclass
class Region:
    """Tiles ``[col0, col0 + w/tw) x [row0, row0 + h/th)`` of one level, side by side."""

    pixels: np.ndarray  # uint8 [h, w, 3]
    x0: int  # level pixel of pixels[0, 0]
    y0: int
    read_px: int
    level_wh: tuple[int, int]
    bad: np.ndarray  # bool [n]
    failed: dict

    def view(self, x: int, y: int) -> np.ndarray | None:
        """The patch at level ``(x, y)`` as a view, or None when it leaves the level (the caller
        pads with white)."""
        R = self.read_px
        if x < 0 or y < 0 or x + R > self.level_wh[0] or y + R > self.level_wh[1]:
            return None
        return self.pixels[y - self.y0:y - self.y0 + R, x - self.x0:x - self.x0 + R]

    def paste_inside(self, x: int, y: int, dst: np.ndarray) -> None:
        """Copy the part of the patch at ``(x, y)`` inside the level into ``dst`` [R, R, 3]."""
        R, (lw, lh) = self.read_px, self.level_wh
        ax0, ax1, ay0, ay1 = max(x, 0), min(x + R, lw), max(y, 0), min(y + R, lh)
        if ax1 > ax0 and ay1 > ay0:
            dst[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = self.pixels[ay0 - self.y0:ay1 - self.y0,
                                                                 ax0 - self.x0:ax1 - self.x0]


def fill_region(source, lxy: np.ndarray, read_px: int, carry: TileCarry, buffer: RegionBuffer,
                decode_errors: tuple) -> Region:
    """Decode (or take from ``carry``) every tile the patches ``lxy`` (level top-left, int
    ``[n, 2]``, n >= 1) touch into one region; carry this group's far-edge tiles onwards.

    ``source``: ``tile(col, row)`` (an array valid until the next call, or None for a tile the
    file leaves out), ``tile_w``, ``tile_h``, ``ncols``, ``nrows``, ``level_w``, ``level_h``.
    """
    R = int(read_px)
    tw, th = int(source.tile_w), int(source.tile_h)
    lw, lh = int(source.level_w), int(source.level_h)
    x, y = lxy[:, 0], lxy[:, 1]
    c0 = np.clip(x // tw, 0, source.ncols - 1)
    c1 = np.clip((x + R - 1) // tw, 0, source.ncols - 1)
    r0 = np.clip(y // th, 0, source.nrows - 1)
    r1 = np.clip((y + R - 1) // th, 0, source.nrows - 1)
    inside = (x + R > 0) & (y + R > 0) & (x < lw) & (y < lh)
    n = len(lxy)
    if not inside.any():
        return Region(np.zeros((0, 0, 3), np.uint8), 0, 0, R, (lw, lh), np.zeros(n, bool), {})
    col0, row0 = int(c0[inside].min()), int(r0[inside].min())
    cols, rows = int(c1[inside].max()) - col0 + 1, int(r1[inside].max()) - row0 + 1
    needed = np.zeros((rows, cols), bool)
    for k in np.flatnonzero(inside):
        needed[r0[k] - row0:r1[k] - row0 + 1, c0[k] - col0:c1[k] - col0 + 1] = True
    pixels = buffer.take(rows * th, cols * tw)
    # Far edges: the tiles from this group's last patch column / row onwards, which the next
    # segment or band (or the rest of a split group) starts on.
    far_col, far_row = int(x.max()) // tw, int(y.max()) // th
    unread = np.zeros((rows, cols), bool)
    failed: dict = {}
    for i, j in np.argwhere(needed):
        c, r = col0 + int(j), row0 + int(i)
        block = pixels[i * th:(i + 1) * th, j * tw:(j + 1) * tw]
        tile = carry.get((c, r))
        fresh = tile is _MISS
        if fresh:
            try:
                tile = source.tile(c, r)
            except decode_errors as exc:
                failed[(c, r)] = exc
                unread[i, j] = True
                continue
        if tile is None:
            block.fill(255)
        else:
            h, w = min(th, tile.shape[0]), min(tw, tile.shape[1])
            block[:h, :w] = tile[:h, :w]
            if h < th or w < tw:  # a short tile at the level's edge: never read past it
                block[h:] = 255
                block[:, w:] = 255
        if fresh and (c >= far_col or r >= far_row):
            carry.put((c, r), None if tile is None else block)
    bad = np.zeros(n, bool)
    if failed:
        for k in np.flatnonzero(inside):
            bad[k] = unread[r0[k] - row0:r1[k] - row0 + 1, c0[k] - col0:c1[k] - col0 + 1].any()
    return Region(pixels, col0 * tw, row0 * th, R, (lw, lh), bad, failed)


def _spare(shape) -> np.ndarray | None:
    for k in range(len(_SPARES) - 1, -1, -1):
        if _SPARES[k].shape == shape:
            return _SPARES.pop(k)
    return None


def _recycle(tile) -> None:
    if tile is not None and tile.flags.c_contiguous and tile.flags.writeable:
        if len(_SPARES) * tile.nbytes < _SPARES_BYTES:
            _SPARES.append(tile)
