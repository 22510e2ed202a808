"""Group commit of finished slides: outputs made durable in batches, from a background thread.

Making one small file durable costs a disk flush (5 ms on the build machine's virtual disk,
plus 4 ms for its folder), which at thousands of quick slides was most of the runner's time.
Here the loop hands each finished slide (its complete temporary file, its lock, its outcome) to
a committer thread and goes on with the next slide. The committer takes everything queued so
far as one group and, in this order:

1. fsyncs the group's temporary files, concurrently (the filesystem merges concurrent flushes
   into one journal commit; an fsync per file, so no other process's data is waited for);
2. renames each over its final name (atomic: the final name holds the old file or the new one);
3. fsyncs each output folder once (the new names are now durable);
4. appends the group's records to this process's log and fsyncs it once;
5. releases the slides' locks.

A slow slide is a group of one, committed while the next slide is being worked on, so the flush
costs it no wall time; quick slides queue up behind a flush and share the next one.

What survives:

- **kill -9 (or an OOM kill, a pre-emption)** at any point: every final name holds a complete,
  fingerprinted file (it appears only by rename of a closed file); a slide whose rename had not
  happened yet left a temporary file and its lock, and is redone by the next run (same host:
  the lock's process is dead, taken over at once; other hosts: see the runner). Everything
  written before the kill, the log included, is in the page cache and is kept.
- **power loss or kernel crash**: every slide with a 'done' record in a log is durable, because
  its record was written only after steps 1-3 had returned. Slides of the group being committed
  at that instant may or may not have their final name; one that has it has its full data
  (fsynced before the rename). A slide without its output is redone; an output without a record
  still counts as done (the file, not the record, decides). The last line of a log may be
  torn; readers ignore it.
- With ``durable=False`` steps 1, 3 and the log fsync are skipped: kill -9 guarantees are the
  same, but after a power loss a final name may hold an empty or partial file (redone, since it
  fails the fingerprint check) and a record may claim 'done' for it.

At most ``max_pending`` finished slides wait for a flush (the loop blocks beyond that), which
bounds the work a kill can cost at one group.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from extract.runtime import fsync_dir, fsync_file

from .records import SlideRecords

log = logging.getLogger(__name__)

FSYNC_THREADS = 8


@dataclass
class Finished:
    """A slide whose work is complete: ``tmp`` is closed and fingerprinted, its lock held."""

    slide_id: str
    tmp: Path
    final: Path
    release: Callable[[], None]  # frees the slide's lock
    status: object  # the runner's SlideStatus, returned as is (or turned into a failure)
    record: Callable[[object], dict]  # the record to append for a (possibly updated) status
    error: BaseException | None = field(default=None, repr=False)
    queued: float = field(default_factory=time.monotonic)


class GroupCommitter:
    """Commits :class:`Finished` slides in groups on a background thread (see the module doc).

    ``fail(item, exc)`` turns an item whose commit raised into a failed status (the runner's
    choice of message); a filesystem problem that stops the batch (full disk, read-only
    workspace: ``fatal(exc)`` true) is re-raised in the submitting thread by :meth:`submit`
    and :meth:`close`, after the items still queued have been cleaned up.
    """

    def __init__(self, records: SlideRecords, durable: bool, fail: Callable[[Finished, BaseException], object],
                 fatal: Callable[[BaseException], bool], max_pending: int = 256, max_group: int = 128,
                 linger_s: float = 0.1):
        self.records, self.durable = records, durable
        self._fail, self._fatal = fail, fatal
        self.max_pending, self.max_group, self.linger_s = max_pending, max_group, linger_s
        self._queue: deque[Finished] = deque()
        self._results: deque = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False
        self._error: BaseException | None = None
        self._synced_parents: set[Path] = set()
        self._pool = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="fsync") if durable else None
        self._thread = threading.Thread(target=self._loop, name="slide-committer", daemon=True)
        self._thread.start()

    # -- the submitting side -------------------------------------------------------------------

    def submit(self, item: Finished) -> None:
        with self._cond:
            while len(self._queue) >= self.max_pending and self._error is None:
                self._cond.wait()
            if self._error is None:
                self._queue.append(item)
                # Wake the committer only when it waits for a first item or a group is full (it
                # wakes by itself when the oldest has lingered): a wake-up per slide costs
                # thread switches on a loaded machine.
                if len(self._queue) == 1 or len(self._queue) >= self.max_group:
                    self._cond.notify_all()
                return
        self._discard(item)
        raise self._error

    def results(self) -> list:
        """Statuses of the slides committed (or failed at commit) since the last call."""
        with self._cond:
            out = list(self._results)
            self._results.clear()
        return out

    def drain(self) -> None:
        """Wait until everything submitted so far is committed."""
        with self._cond:
            while (self._queue or self._busy) and self._error is None:
                self._cond.wait()

    def close(self) -> list:
        """Commit what is queued, stop the thread; returns the last statuses (re-raises a fatal
        filesystem error)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        if self._pool is not None:
            self._pool.shutdown()
        self.records.close()
        if self._error is not None:
            raise self._error
        return self.results()

    # -- the committer thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                # Let quick slides gather: every flush is a journal commit that stalls the
                # loop's own file creations and renames meanwhile, so fewer, larger groups.
                deadline = self._queue[0].queued + self.linger_s
                while not self._closing and len(self._queue) < self.max_group \
                        and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                group = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_group))]
                self._busy = True
                self._cond.notify_all()
            try:
                if self._error is None:
                    statuses = self._commit(group)
                else:
                    for item in group:
                        self._discard(item)
                    statuses = []
            except BaseException as exc:  # a full disk or a read-only workspace: stop the batch
                for item in group:
                    self._discard(item)
                statuses = []
                with self._cond:
                    self._error = exc
            with self._cond:
                self._results.extend(statuses)
                self._busy = False
                self._cond.notify_all()

    def _commit(self, group: list[Finished]) -> list:
        t0 = time.perf_counter()
        if self.durable:
            # One thread per file: the flushes overlap and share journal commits.
            for item, error in zip(group, self._pool.map(_try, [lambda p=i.tmp: fsync_file(p) for i in group])):
                item.error = error
        folders: set[Path] = set()
        for item in group:
            if item.error is None:
                try:
                    os.replace(item.tmp, item.final)
                    folders.add(item.final.parent)
                except OSError as exc:
                    item.error = exc
        for item in group:
            if item.error is not None and self._fatal(item.error):
                raise item.error
        if self.durable:
            for folder in folders:
                fsync_dir(folder)
                if folder not in self._synced_parents:  # a new output folder's own name
                    fsync_dir(folder.parent)
                    self._synced_parents.add(folder)
        statuses = []
        for item in group:
            if item.error is not None:
                item.tmp.unlink(missing_ok=True)
                item.status = self._fail(item, item.error)
            statuses.append(item.status)
        self.records.append([item.record(item.status) for item in group], durable=self.durable)
        for item in group:
            item.release()
        log.debug("committed %d slide(s) in %.1f ms", len(group), 1e3 * (time.perf_counter() - t0))
        return statuses

    def _discard(self, item: Finished) -> None:
        """Leave a slide for the next run: no final name, no record, lock freed."""
        try:
            item.tmp.unlink(missing_ok=True)
        except OSError:
            pass
        item.release()


def _try(fn: Callable[[], None]) -> BaseException | None:
    try:
        fn()
    except OSError as exc:
        return exc
    return None
