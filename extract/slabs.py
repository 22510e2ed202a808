"""Shared memory the consumer lends to its reader workers: created, reused and freed by the consumer.

    pool = SlabPool(keep=10)
    slab = pool.take(nbytes)              # consumer: a free slab of >= nbytes, else a new one
    task = (..., slab.key)                # a worker maps it with attach(slab.key) (cached)
    pixels = np.ndarray(shape, np.uint8, buffer=slab.buf)
    pool.give(slab)                       # rows copied out: lend it again
    pool.close()

On Linux a slab is an anonymous ``memfd`` that workers open through ``/proc/<pid>/fd/<fd>``:
it has no name in /dev/shm, so a consumer killed with SIGKILL (a preempted Slurm job) leaves
nothing behind, and its memory goes with the last process mapping it. Elsewhere it is a named
``multiprocessing.shared_memory`` segment, unlinked when freed (and by the interpreter's
resource tracker if the consumer dies).
"""

from __future__ import annotations

import itertools
import mmap
import os

__all__ = ["Slab", "SlabPool", "attach"]

_ROUND = 1 << 20  # slab sizes rounded up to this, so slides with similar groups share slabs
_ids = itertools.count(1)
_orphans: list = []  # freed slabs a consumer still views (closing them would raise BufferError)


def _memfd_ok() -> bool:
    return hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd")


class Slab:
    """One shared buffer of ``size`` bytes; ``key`` is what :func:`attach` needs to map it."""

    def __init__(self, size: int):
        self.size = int(size)
        self.id = next(_ids)
        if _memfd_ok():
            self.fd = os.memfd_create(f"wsi-reader-slab-{os.getpid()}-{self.id}", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, self.size)
            self.buf = mmap.mmap(self.fd, self.size)
            self.key = ("memfd", os.getpid(), self.fd, self.id, self.size)
            self.named = None
        else:
            from multiprocessing import shared_memory

            self.fd = None
            self.named = shared_memory.SharedMemory(create=True, size=self.size)
            self.buf = self.named.buf
            self.key = ("named", self.named.name, self.id, self.size)

    def free(self) -> None:
        """Release the consumer's hold (a worker's mapping keeps the memory until it unmaps)."""
        try:
            if self.named is not None:
                self.named.close()
            else:
                self.buf.close()
        except BufferError:  # a view still exists: the mapping goes with the last view
            _orphans.append(self)
        if self.named is not None:
            try:
                self.named.unlink()
            except FileNotFoundError:
                pass
        elif self.fd is not None:
            os.close(self.fd)
            self.fd = None


class SlabPool:
    """Free slabs kept for the next groups (at most ``keep``; the rest are freed)."""

    def __init__(self, keep: int):
        self.keep = int(keep)
        self.free: list[Slab] = []

    def take(self, nbytes: int) -> Slab:
        fits = [slab for slab in self.free if slab.size >= nbytes]
        if fits:
            slab = min(fits, key=lambda s: s.size)
            self.free.remove(slab)
            return slab
        return Slab(max(1, -(-int(nbytes) // _ROUND) * _ROUND))

    def give(self, slab: Slab) -> None:
        self.free.append(slab)
        while len(self.free) > self.keep:
            self.free.pop(0).free()

    def close(self) -> None:
        while self.free:
            self.free.pop().free()


class _Mapped:
    def __init__(self, buf, holder=None):
        self.buf, self._holder = buf, holder

    def close(self) -> None:
        if self._holder is not None:
            self._holder.close()
        else:
            self.buf.close()


def attach(key: tuple) -> _Mapped:
    """Map the slab ``key`` names in this (worker) process; ``.buf`` is its memory."""
    if key[0] == "memfd":
        _, pid, fd, slab_id, size = key
        rfd = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY)
        try:
            # The consumer may have freed the slab and reused the descriptor number for another
            # file (a slide!) since this task was queued: open for writing only the memfd the
            # key names.
            opened = os.readlink(f"/proc/self/fd/{rfd}")
            if opened.removesuffix(" (deleted)") != f"/memfd:wsi-reader-slab-{pid}-{slab_id}":
                raise RuntimeError(f"shared-memory slab {slab_id} of process {pid} is gone (found {opened!r})")
            wfd = os.open(f"/proc/self/fd/{rfd}", os.O_RDWR)
            try:
                return _Mapped(mmap.mmap(wfd, size))
            finally:
                os.close(wfd)
        finally:
            os.close(rfd)
    from multiprocessing import shared_memory

    named = shared_memory.SharedMemory(name=key[1])
    return _Mapped(named.buf, named)
