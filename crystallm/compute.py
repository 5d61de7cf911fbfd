"""What the machine that runs can give: torch threads that fit the cores free to this process, and whether bf16
autocast is faster than fp32 here, measured rather than read from CPU flags (docs/scaling.md, "Threads and bf16").
"""

from __future__ import annotations

import functools
import os
import statistics
import time

import torch


def _others_running() -> int:
    """Runnable tasks on the machine now besides this process (the fourth field of /proc/loadavg counts them, this
    process included); 0 where the kernel does not say."""
    try:
        with open("/proc/loadavg") as handle:
            running = int(handle.read().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return 0
    return max(0, running - 1)


def free_cores(samples: int = 5, interval: float = 0.02) -> int:
    """Cores this process may use (its CPU affinity) less those other processes keep busy (the median of a few
    looks at the run queue), at least 1.

    >>> 1 <= free_cores() <= (os.cpu_count() or 1)
    True
    """
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = []
    for index in range(samples):
        busy.append(_others_running())
        if index + 1 < samples:
            time.sleep(interval)
    return max(1, allowed - int(statistics.median(busy)))


def use_threads(threads: int | None = None) -> int:
    """Set torch's thread count to `threads`, or where None to the free cores (`free_cores`), and return it. Two
    threads on two cores beside a busy neighbour spin against each other: generation fell from 15 to 0.9
    structures/s (issue 36); one thread a free core does not.

    >>> use_threads(1), torch.get_num_threads()
    (1, 1)
    """
    chosen = threads or free_cores()
    torch.set_num_threads(chosen)
    return chosen


@functools.lru_cache(maxsize=None)
def bf16_pays(size: int = 256, repeats: int = 7) -> bool:
    """Whether bf16 autocast runs a transformer-sized matrix product faster than fp32 on this CPU: measured once per
    process (about 0.15 s), since CPU flags do not tell it (emulated bf16 on AVX2 is 10-50x slower, native bf16
    1.4-2.7x faster). On CUDA devices bf16 is chosen by the accelerator, not here.

    The choice must not depend on the machine's load, since it changes the samples: a neighbour only ever adds
    time, so the probe runs on one thread (threads spread over a busy core time the slowest one), alternates the
    two kinds and compares the fastest of each (two `generate` runs started together once chose differently from
    the median of five, docs/scaling.md).

    >>> isinstance(bf16_pays(), bool)
    True
    """
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(8 * size, size, generator=generator)
    right = torch.randn(size, 4 * size, generator=generator)

    def seconds(bf16: bool) -> float:
        begun = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            torch.matmul(left, right)
        return time.perf_counter() - begun

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds(False), seconds(True)  # warm-up
        fastest = {False: float("inf"), True: float("inf")}
        for _ in range(repeats):
            for bf16 in (False, True):
                fastest[bf16] = min(fastest[bf16], seconds(bf16))
    finally:
        torch.set_num_threads(threads)
    return fastest[True] < fastest[False]
