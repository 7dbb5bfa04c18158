"""How many intra-op threads a process given a CPU share should run.

Ray hands each worker or actor a CPU share (fractional on small machines, so trials pack). A
process given N CPUs runs floor(N) threads (at least one): fewer leaves its cores idle, more
contends with the neighbours that hold the other shares.
"""
from __future__ import annotations

import math


def threads_for_cpus(cpus: float) -> int:
    """max(1, floor(cpus)); a tiny epsilon absorbs float noise such as 2.9999999."""
    if not cpus > 0:
        raise ValueError(f"a CPU share must be positive, got {cpus!r}")
    return max(1, math.floor(cpus + 1e-9))


def use_cpu_share(cpus: float) -> int:
    """Set torch's intra-op threads to the share's count; returns it."""
    import torch

    threads = threads_for_cpus(cpus)
    torch.set_num_threads(threads)
    return threads
