"""Seconds per named stage of a device loop, measured without waiting for the device.

    clock = StageClock()
    with clock.span("transfer", device):
        x = batch.to(device, non_blocking=True)
    ...
    features.cpu()                 # the loop's own synchronisation point
    clock.seconds()                # {'transfer': 0.41, 'model:uni': 12.3}

On a CUDA device a span is a pair of CUDA events recorded on the device's current stream: the
time is what the device spent between them, read once in :meth:`seconds`, so timing adds no
per-batch host synchronisation (the reader keeps overlapping the forward passes). On the CPU a
span is wall time.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager


class StageClock:
    """Accumulates the time of named spans, host or CUDA, per name."""

    def __init__(self):
        self._host: dict[str, float] = defaultdict(float)
        self._events: dict[str, list] = defaultdict(list)

    @contextmanager
    def span(self, name: str, device=None):
        """Time the body under ``name``; ``device`` a ``torch.device`` (CUDA: device time)."""
        if device is None or getattr(device, "type", "cpu") != "cuda":
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._host[name] += time.perf_counter() - t0
            return
        import torch

        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        try:
            yield
        finally:
            end.record(stream)
            self._events[name].append((start, end))

    def add(self, name: str, seconds: float) -> None:
        """Add host seconds measured elsewhere (e.g. waiting for the reader)."""
        self._host[name] += float(seconds)

    def seconds(self) -> dict[str, float]:
        """Total seconds per name; waits for the recorded CUDA events (call after the loop's sync)."""
        totals = dict(self._host)
        for name, pairs in self._events.items():
            for _, end in pairs:
                end.synchronize()  # returns at once for events already passed
            totals[name] = totals.get(name, 0.0) + sum(s.elapsed_time(e) for s, e in pairs) / 1000.0
        return totals
