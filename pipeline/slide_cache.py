"""A local copy of each slide for slow network storage, fetched while the previous one is processed.

``--cache-dir DIR --cache-gb N`` on segment and extract: when slide *i* starts, the next slides
still to do (no output and no lock yet) are copied in a background thread into ``DIR``, so that
the network transfer of slide *i+1* overlaps the compute of slide *i*; every slide is then read
from local disk (one that was not prefetched, e.g. the first, is copied when its turn comes).
Copies are evicted least recently used once they hold more than ``N`` GiB.

Which slides are copied: single-file formats (SVS, TIFF, NDPI, SCN, BIF, ...; MRXS and VSI keep
their data in side folders and are read in place) that live on another filesystem than the cache
(``st_dev`` differs). A slide already on the cache's filesystem is never copied, and neither is
one larger than the budget.

A copy is trusted only while it matches its source: same size, and its modification time set
to the source's at copy time (a source modified during the copy, or later, is copied again).
Copies are written to a private name and renamed into place, so a reader never sees half a
copy.

Processes never share copies: eviction knows which copies this process is reading, not which
ones another process is. Each process claims the first free slot ``DIR/slot-<k>/`` (k = 0, 1,
...) by an exclusive ``flock`` on ``DIR/.slot-<k>.lock``, held until it closes the cache (the
kernel drops it when the process dies, kill -9 included), so ``extract --devices 0,1``, or two
array tasks on one node, use two folders, and the next run finds its copies again in slot 0.
The budget ``N`` is per process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import shutil
import socket
import stat
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from extract.errors import ConfigError

log = logging.getLogger(__name__)

SINGLE_FILE_FORMATS = {".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".svslide", ".qptiff", ".dcm"}


def copy_file(src: Path, dst: Path) -> None:
    """Plain copy in 8 MiB blocks (the benchmark substitutes a throttled one)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 8 << 20)


class SlideCache:
    """Local copies of slides, fetched ahead of use, evicted least recently used.

    Parameters
    ----------
    cache_dir : local folder for the copies (created).
    max_gb : budget in GiB; a slide larger than the budget is read in place.
    ahead : how many upcoming slides to copy while the current one is processed.
    copy : ``copy(src, dst)`` that writes ``dst``; :func:`copy_file` by default.
    """

    def __init__(self, cache_dir: str | Path, max_gb: float, ahead: int = 1,
                 copy: Callable[[Path, Path], None] = copy_file):
        if max_gb <= 0:
            raise ConfigError(f"The '--cache-gb' parameter must be > 0. Got {max_gb} instead.")
        if ahead < 1:
            raise ConfigError(f"The cache's look-ahead must be >= 1 slide. Got {ahead} instead.")
        self.root = Path(cache_dir).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.dir, self._slot_fd = claim_slot(self.root)
        except OSError as exc:
            raise ConfigError(f"--cache-dir {cache_dir}: cannot create it ({exc.strerror})") from exc
        self.max_bytes = int(max_gb * 1024 ** 3)
        self.ahead = ahead
        self._copy = copy
        self._device = os.stat(self.root).st_dev
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slide-cache")
        self._pending: dict[Path, Future] = {}
        self._in_use: set[str] = set()
        self._guard = threading.Lock()
        # LRU order of the copies already there (oldest use first), from their access stamps.
        entries = [e for e in os.scandir(self.dir) if e.is_file() and not e.name.startswith(".")]
        entries.sort(key=lambda e: e.stat().st_atime)
        self._lru: OrderedDict[str, int] = OrderedDict((e.name, e.stat().st_size) for e in entries)
        self.hits = self.misses = self.copied = 0

    # -- what is cached where --------------------------------------------------------------------

    def cached_name(self, src: Path) -> str:
        digest = hashlib.sha1(str(Path(src).resolve()).encode()).hexdigest()[:12]
        return f"{digest}-{Path(src).name}"

    def wants(self, src: Path | None) -> bool:
        """Whether ``src`` is worth copying: a single-file slide on another filesystem, within budget."""
        if src is None or Path(src).suffix.lower() not in SINGLE_FILE_FORMATS:
            return False
        try:
            st = os.stat(src)
        except OSError:
            return False  # the stage reports the missing slide itself
        # Only regular files: copying a FIFO or device would block the prefetch thread forever;
        # left in place, the stage refuses it with its own one-line error.
        if not stat.S_ISREG(st.st_mode):
            return False
        return st.st_dev != self._device and st.st_size <= self.max_bytes

    def _fresh(self, src: Path, dst: Path) -> bool:
        try:
            s, d = os.stat(src), os.stat(dst)
        except OSError:
            return False
        return s.st_size == d.st_size and s.st_mtime_ns == d.st_mtime_ns

    # -- fetching --------------------------------------------------------------------------------

    def prefetch(self, paths: list[Path]) -> None:
        """Start copying the first ``ahead`` of ``paths`` that want a copy and lack a fresh one."""
        started = 0
        for src in paths:
            if started >= self.ahead:
                break
            if not self.wants(src):
                continue
            src = Path(src)
            with self._guard:
                if src in self._pending:
                    started += 1
                    continue
            if self._fresh(src, self.dir / self.cached_name(src)):
                started += 1
                continue
            with self._guard:
                self._pending[src] = self._pool.submit(self._fetch, src)
            started += 1

    def _fetch(self, src: Path) -> Path | None:
        name = self.cached_name(src)
        dst = self.dir / name
        before = os.stat(src)
        if not self._make_room(before.st_size, keep=name):
            return None
        tmp = self.dir / f".{name}.part-{os.getpid()}-{threading.get_ident()}"
        try:
            self._copy(src, tmp)
            after = os.stat(src)
            size = os.stat(tmp).st_size
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or size != after.st_size:
                log.warning("slide cache: %s changed during its copy (or the copy is short); reading it in place", src)
                return None
            os.utime(tmp, ns=(after.st_atime_ns, after.st_mtime_ns))
            os.replace(tmp, dst)
        except OSError as exc:
            log.warning("slide cache: could not copy %s (%s); reading it in place", src, exc)
            return None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        with self._guard:
            self._lru[name] = size
            self._lru.move_to_end(name)
            self.copied += 1
        return dst

    def _make_room(self, size: int, keep: str) -> bool:
        with self._guard:
            used = sum(self._lru.values())
            for name in list(self._lru):
                if used + size <= self.max_bytes:
                    break
                if name in self._in_use or name == keep:
                    continue
                with contextlib.suppress(OSError):
                    os.unlink(self.dir / name)
                used -= self._lru.pop(name)
            return used + size <= self.max_bytes

    # -- use -------------------------------------------------------------------------------------

    def acquire(self, src: Path | None) -> Path | None:
        """The path to read ``src`` from: its fresh local copy (waiting for one being made), or
        ``src`` itself. Pair with :meth:`release`."""
        if not self.wants(src):
            return src
        src = Path(src)
        with self._guard:
            future = self._pending.pop(src, None)
        dst = self.dir / self.cached_name(src)
        if future is not None:
            try:
                future.result()
            except Exception as exc:  # a failed prefetch is retried below, then read in place
                log.warning("slide cache: prefetching %s failed (%s)", src, exc)
        if self._fresh(src, dst):
            self.hits += 1
        else:  # not prefetched (the first slide, or another process took the one we fetched)
            self.misses += 1
            if self._fetch(src) is None:
                return src
        with self._guard:
            self._in_use.add(dst.name)
            if dst.name in self._lru:
                self._lru.move_to_end(dst.name)
        with contextlib.suppress(OSError):
            os.utime(dst, ns=(time.time_ns(), os.stat(dst).st_mtime_ns))  # access stamp: LRU across runs
        return dst

    def release(self, path: Path | None) -> None:
        if path is not None:
            with self._guard:
                self._in_use.discard(Path(path).name)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for tmp in self.dir.glob(f".*.part-{os.getpid()}-*"):
            tmp.unlink(missing_ok=True)
        if self._slot_fd is not None:
            os.close(self._slot_fd)  # frees the slot for the next process
            self._slot_fd = None

    def summary(self) -> str:
        return (f"slide cache {self.dir}: {self.hits} slide(s) prefetched or already there, {self.misses} "
                f"copied on demand, {self.copied} copies made")

    # -- the stage hook --------------------------------------------------------------------------

    def wrap(self, work, rows: list, output_path: Callable, lock_dir: Path, scan: int = 64):
        """``work(row, tmp)`` that reads each slide from its local copy and prefetches the next
        slides still to do (no output, no lock: another process's slides are not copied)."""
        index = {row.slide_id: i for i, row in enumerate(rows)}

        def upcoming(i: int) -> list[Path]:
            out = []
            for row in rows[i + 1:i + 1 + scan]:
                if row.path is None or output_path(row).exists() or (lock_dir / f"{row.slide_id}.lock").exists():
                    continue
                out.append(row.path)
            return out

        def cached_work(row, tmp):
            self.prefetch(upcoming(index.get(row.slide_id, len(rows))))
            local = self.acquire(row.path)
            try:
                return work(dataclasses.replace(row, path=local) if local != row.path else row, tmp)
            finally:
                self.release(local)

        return cached_work


def claim_slot(root: Path, slots: int = 256) -> tuple[Path, int | None]:
    """This process's own folder under ``root``: the first ``slot-<k>`` whose lock file no other
    open file holds; returns (folder, fd holding the lock). Where ``flock`` is not supported,
    a folder named after this host and pid (not reused by later runs)."""
    for k in range(slots):
        fd = os.open(root / f".slot-{k}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        except OSError:
            os.close(fd)
            break
        folder = root / f"slot-{k}"
        folder.mkdir(exist_ok=True)
        return folder, fd
    folder = root / f"proc-{socket.gethostname()}-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    return folder, None


@contextlib.contextmanager
def cache_from_args(args):
    """The ``--cache-dir/--cache-gb`` cache of a stage command (None without ``--cache-dir``);
    its copies are kept for the next run; on exit its thread stops and it prints what it did."""
    if getattr(args, "cache_dir", None) is None:
        yield None
        return
    # '$TMPDIR/slides' quoted on a submit line expands here, in the task, to the node's own folder
    cache = SlideCache(os.path.expandvars(str(args.cache_dir)), args.cache_gb)
    try:
        yield cache
    finally:
        cache.close()
        print(cache.summary())
