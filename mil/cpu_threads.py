"""Intra-op threads for MIL on the CPU: one thread for small bags.

A MIL student on a bag of a few hundred patches runs many small matrix products (a
``[N, D] x [D, 512]`` product takes well under a millisecond). With several OpenMP threads each
of them pays a fork/join, and on a shared or loaded CPU a descheduled thread makes the others
spin: measured on the 2-vCPU build box at load ~7, one AB-MIL step on a 105 x 512 bag took
7 ms with 1 thread and 233 ms with 2 (BENCHMARKS.md). Large bags (thousands of patches of
foundation-model features) keep torch's default, where the threads pay for themselves.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

#: Mean bag size (instances x feature dimension) up to which the CPU runs one thread.
SMALL_BAG_ELEMENTS = 1_000_000


@contextlib.contextmanager
def cpu_threads_for(bags, device) -> Iterator[int]:
    """Run the block with one intra-op thread when ``device`` is the CPU and the bags are small.

    Parameters
    ----------
    bags : :class:`mil.data.BagSet`
    device : torch.device or str

    Yields
    ------
    The number of threads in effect; the previous setting is restored afterwards.
    """
    import torch

    before = torch.get_num_threads()
    ids = bags.slide_ids
    mean_elements = bags.nbytes(torch.float32) / 4 / max(len(ids), 1)
    small = torch.device(device).type == "cpu" and mean_elements <= SMALL_BAG_ELEMENTS
    if small:
        torch.set_num_threads(1)
    try:
        yield torch.get_num_threads()
    finally:
        if small:
            torch.set_num_threads(before)
