"""Side-by-side timing of step functions (the demo's fused vs eager table, the CPU benchmarks)."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional


def interleaved_medians(steps: dict, rounds: int, warmup: int = 2,
                        sync: Optional[Callable[[], None]] = None) -> dict:
    """Median seconds per call of each function in ``steps`` ({name: fn}), after ``warmup`` calls of
    each. Every round calls each once, the order alternating, so that load from other processes
    falls on all alike (blocks of calls per function let it fall on one). ``sync`` runs before each
    clock read (``torch.cuda.synchronize`` on a GPU)."""
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            if sync:
                sync()
            t = time.perf_counter()
            steps[n]()
            if sync:
                sync()
            times[n].append(time.perf_counter() - t)
    return {n: statistics.median(v) for n, v in times.items()}
