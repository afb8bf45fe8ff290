"""What one rank did in one forward-backward call: the operations it executed (order.py notation, built
from what actually ran), when each ran, and the bytes of activations alive for the backward.

Live activation bytes = the storage of every tensor autograd saved for the backward of (chunk,
micro-batch) pairs whose backward has not run yet (counted once per storage, parameters excluded), plus
what deferred weight grads keep (their layers' inputs and output grads). The peak is taken after every
operation. ``LAST`` holds the latest record; callables in ``SINKS`` receive each record (the tests'
and the benchmark's drivers write them to files).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import torch

LAST: dict = {}
SINKS: list[Callable[[dict], None]] = []


class Recorder:
    def __init__(self, schedule: str, rank: int, n: int, m: int):
        self.meta = dict(schedule=schedule, pp_rank=rank, pp=n, microbatches=m)
        self.t0 = time.perf_counter()
        self.ops: list[str] = []
        self.timeline: list[tuple[str, float, float]] = []
        self.wait_s = 0.0
        self.live: dict = {}
        self.peak_bytes = 0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def done(self, op: str, start: float, end: float, held_bytes: int = 0) -> None:
        self.ops.append(op)
        self.timeline.append((op, start, end))
        self.peak_bytes = max(self.peak_bytes, sum(self.live.values()) + held_bytes)

    @contextmanager
    def saving(self, key, exclude: set):
        """Count the bytes autograd saves while the forward of ``key`` runs."""
        seen: dict = {}

        def pack(t):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in exclude and ptr not in seen:
                seen[ptr] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.live[key] = sum(seen.values())

    def release(self, key) -> None:
        self.live.pop(key, None)

    def publish(self, **extra) -> dict:
        end = self.now()
        busy = sum(e - s for _, s, e in self.timeline)
        record = dict(self.meta, ops=self.ops, timeline=self.timeline, step_s=end, busy_s=busy,
                      idle_s=end - busy, wait_s=self.wait_s, peak_activation_bytes=self.peak_bytes, **extra)
        LAST.clear()
        LAST.update(record)
        for sink in SINKS:
            sink(record)
        return record
