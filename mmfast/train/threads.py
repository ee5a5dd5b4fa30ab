"""How many intra-op threads ``mmfast train`` / ``eval`` / ``demo`` give torch.

torch's default (one per logical CPU) oversubscribes a machine whose cores are shared: with other
processes on two cores, 20 training steps of a tiny model went from 0.4 s to 31 s (1.2 s with one
thread). The default here is one thread per *physical* core this process may run on."""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo / "physical_package_id").read_text().strip() + ":" + (topo / "core_id").read_text().strip())
        except OSError:  # no sysfs topology (containers, other systems): count the CPU itself
            cores.add(f"cpu{cpu}")
    return max(1, len(cores))


def choose_threads(requested: int | None) -> int:
    """Sets torch's intra-op thread count to ``requested`` (``--threads N``) or to the physical core
    count, and returns it."""
    import torch

    if requested is not None and requested < 1:
        raise ValueError(f"--threads: expected a positive number of threads, got {requested}")
    n = requested or physical_cores()
    torch.set_num_threads(n)
    return n
