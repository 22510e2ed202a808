"""Shared memory lent to reader workers: mapped by key, reused, never mistaken for another file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from extract.slabs import SlabPool, attach


def test_a_slab_written_through_its_key_is_what_the_lender_reads_and_is_reused():
    pool = SlabPool(keep=2)
    slab = pool.take(3 * 1024 * 1024)
    mapped = attach(slab.key)  # as a worker maps it
    np.ndarray((4, 8), np.uint8, buffer=mapped.buf)[:] = 7
    assert (np.ndarray((4, 8), np.uint8, buffer=slab.buf) == 7).all()
    mapped.close()
    pool.give(slab)
    assert pool.take(1024) is slab  # the smallest free slab that fits comes back
    pool.give(slab)
    pool.close()


@pytest.mark.skipif(not hasattr(os, "memfd_create") or not Path("/proc/self/fd").is_dir(), reason="Linux memfd")
def test_a_key_whose_descriptor_now_names_another_file_is_refused(tmp_path):
    """A freed slab's descriptor number reused for a slide file: the worker must not map it."""
    slide = tmp_path / "slide.svs"
    slide.write_bytes(b"\x00" * 4096)
    fd = os.open(slide, os.O_RDONLY)
    try:
        with pytest.raises(RuntimeError, match="is gone"):
            attach(("memfd", os.getpid(), fd, 12345, 4096))
    finally:
        os.close(fd)
    assert slide.read_bytes() == b"\x00" * 4096
