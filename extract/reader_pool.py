"""Reader processes kept alive across slides: a slide's read starts without starting processes.

    pool = acquire_pool(num_workers=2, mp_context="forkserver")
    try:
        for result in pool.run(reader, coords, groups, prefetch=4):   # GroupResult, arrival order
            ...
    finally:
        release_pool(pool)

Starting reader workers costs 0.15-0.3 s per slide on a loaded 2-core box (process start,
unpickling, the first handles), as much as reading a few hundred patches; the extract stage
reads slide after slide, so the workers are started once per process and reused. Each worker
keeps the handles of the slide it is reading (reopened when the next slide arrives) and decodes
every group straight into a shared-memory slab the consumer lent it with the task, so pixels
reach the consumer without a pickled copy. Slabs go back to the pool once every row is in a
batch and are lent again (next group, next slide): a fresh segment costs a page fault per 4 KiB
in the worker and again in the consumer, ~0.1 ms per 256-px patch each. The pool keeps at most
``4 * num_workers + 2`` slabs (about a read's peak of groups in flight, up to 48 MiB each for
256 patches of 256 px) while it lives; on Linux they are anonymous (``extract/slabs.py``), so
a killed process leaves nothing in /dev/shm. Workers whose consumer was killed exit within a
second (daemon processes otherwise end only with a clean exit).

A pool serves one read at a time (``acquire_pool`` hands a second, concurrent read another pool).
Results of an abandoned read (the consumer stopped early) are recognised by their job number and
dropped; its queued groups are skipped by the workers, and the slabs it had lent are freed,
never lent again (a worker may still be writing into one). A worker that dies (killed, crashed
decoder) makes the read raise ``RuntimeError`` naming its exit code; the pool is then discarded
and the next read starts a fresh one. An exception raised while reading a group is re-raised in
the consumer as the same exception (its worker traceback appended as a note).
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import queue
import threading
import time
import traceback

import numpy as np

_POLL_S = 2.0  # how often a waiting consumer checks that the workers are alive
_WORKER_SLABS = 16  # slabs a worker keeps mapped (the consumer frees those it no longer lends)
_free: dict[tuple[int, str], list["ReaderPool"]] = {}
_lock = threading.Lock()
_jobs = itertools.count(1)


class ReaderPool:
    """``num_workers`` reader processes fed through one task queue."""

    def __init__(self, num_workers: int, mp_context: str):
        from .patch_reader import _worker_context

        ctx = _worker_context(mp_context)
        self.key = (int(num_workers), mp_context)
        self.pid = os.getpid()
        self.tasks = ctx.Queue()
        self.results = ctx.Queue()
        self.active = ctx.Value("q", 0, lock=False)  # job being served; workers skip other jobs' tasks
        self.procs = [ctx.Process(target=_worker_main, args=(self.tasks, self.results, self.active, os.getpid()),
                                  daemon=True,
                                  name=f"wsi-reader-{k}") for k in range(num_workers)]
        for proc in self.procs:
            proc.start()
        self.started = num_workers  # reported by the first read only
        self.broken = False
        from .slabs import SlabPool

        self.slabs = SlabPool(keep=max(2, 4 * num_workers + 2))

    def alive(self) -> bool:
        return not self.broken and self.pid == os.getpid() and all(p.is_alive() for p in self.procs)

    def run(self, reader, coords: np.ndarray, groups: list[np.ndarray], prefetch: int):
        """Yield the :class:`~extract.patch_reader.GroupResult` of every group (arrival order),
        at most ``prefetch`` groups per worker queued ahead. ``result.patches`` is a view of a
        shared-memory slab; ``result.release()`` hands the slab back once its rows are copied."""
        job = next(_jobs)
        self.active.value = job
        limit = max(1, prefetch) * len(self.procs)
        S = reader.out_px
        rows = max((len(g) for g in groups), default=0)
        lent: dict[tuple, object] = {}
        pending = sent = 0
        try:
            while sent < len(groups) or pending:
                while sent < len(groups) and pending < limit:
                    group = groups[sent]
                    slab = self.slabs.take(rows * S * S * 3)
                    lent[slab.key] = slab
                    self.tasks.put((job, reader, coords[group], group, slab.key))
                    sent += 1
                    pending += 1
                got_job, payload = self._next_result()
                if got_job != job:
                    continue  # left over from an abandoned read
                pending -= 1
                if isinstance(payload, BaseException):
                    raise payload
                slab = lent.pop(payload.patches)
                payload.patches = np.ndarray((len(payload.indices), S, S, 3), np.uint8, buffer=slab.buf)
                payload.release = functools.partial(self.slabs.give, slab)
                yield payload
        finally:
            self.active.value = 0
            for slab in lent.values():  # a worker may still write into these: never lend them again
                slab.free()
            if pending:  # abandoned: queued groups are skipped, late results dropped by job number
                self.broken = self.broken or not self.alive()

    def _next_result(self):
        while True:
            try:
                return self.results.get(timeout=_POLL_S)
            except queue.Empty:
                self._raise_if_dead(0.0)
            except (OSError, EOFError):
                # A result whose sender died before handing over its shared memory: name the death.
                self._raise_if_dead(5.0)
                raise

    def _raise_if_dead(self, wait_s: float) -> None:
        """RuntimeError naming a dead worker (waiting up to ``wait_s`` for the death to show)."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = [p for p in self.procs if not p.is_alive()]
            if dead:
                self.broken = True
                raise RuntimeError(
                    f"reader worker {dead[0].name} (pid {dead[0].pid}) exited unexpectedly with code "
                    f"{dead[0].exitcode} (killed for memory, or a crash in a decoder); rerun, or use "
                    "--num-workers 0 to read in the main process") from None
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def close(self) -> None:
        if self.pid != os.getpid():
            return
        self.slabs.close()
        for _ in self.procs:
            try:
                self.tasks.put(None)
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.terminate()


def acquire_pool(num_workers: int, mp_context: str) -> ReaderPool:
    """A free, healthy pool of ``num_workers`` workers (started when none is free)."""
    key = (int(num_workers), mp_context)
    with _lock:
        free = _free.setdefault(key, [])
        while free:
            pool = free.pop()
            if pool.alive():
                return pool
            pool.close()
    return ReaderPool(num_workers, mp_context)


def release_pool(pool: ReaderPool) -> None:
    """Return ``pool`` for the next read (a broken one is shut down instead)."""
    if not pool.alive():
        pool.close()
        return
    with _lock:
        _free.setdefault(pool.key, []).append(pool)


@atexit.register
def _close_all() -> None:
    with _lock:
        pools = [p for free in _free.values() for p in free]
        _free.clear()
    for pool in pools:
        pool.close()


def _worker_main(tasks, results, active, consumer: int) -> None:
    """Worker loop: read each task's group into the slab it names, answer ``(job, GroupResult)``
    with ``patches`` set to the slab's key (kept rows first)."""
    from collections import OrderedDict

    from .patch_reader import _worker_init
    from .slabs import attach

    _worker_init(0)
    mapped: OrderedDict = OrderedDict()
    current_job, reader = None, None
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if not _running(consumer):  # killed (daemon workers die with a clean exit only)
                break
            if reader is not None and active.value != current_job:  # its read is over: let the file go
                reader.close()
                current_job, reader = None, None
            continue
        if task is None:
            break
        job, task_reader, coords, group, slab_key = task
        if job != active.value:
            continue  # its read was abandoned
        if job != current_job:
            if reader is not None:
                reader.close()
            current_job, reader = job, task_reader
        try:
            slab = mapped.pop(slab_key, None) or attach(slab_key)
            mapped[slab_key] = slab
            while len(mapped) > _WORKER_SLABS:
                mapped.popitem(last=False)[1].close()
            S = reader.out_px
            out = np.ndarray((len(group), S, S, 3), np.uint8, buffer=slab.buf)
            result = reader.read_group(coords, np.arange(len(group)), out=out)
            if len(result.indices) < len(group):  # some patches dropped: kept rows first
                out[:len(result.indices)] = result.patches
            del out
            result.patches = slab_key
            # back to the slide's coordinate indices
            result.indices = group[result.indices]
            result.dropped = group[result.dropped]
            result.retried = group[result.retried]
            results.put((job, result))
        except Exception as exc:
            results.put((job, _portable(exc)))


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (a killed process its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: signal 0 tells whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def _portable(exc: Exception) -> Exception:
    """``exc`` with the worker's traceback as a note, if it survives pickling (the queue pickles
    in a background thread, where a failure would leave the consumer waiting); else a
    RuntimeError quoting it."""
    from multiprocessing.reduction import ForkingPickler

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if hasattr(exc, "add_note"):
        exc.add_note(f"in reader worker {os.getpid()}:\n{text}")
    try:
        ForkingPickler.loads(ForkingPickler.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"reader worker {os.getpid()}: {text}")
