"""Independent lab jobs (seeds, tuning grid points) in parallel processes.

The lab's networks are small: one thread per process is as fast as two on one network, so on
a 2-core machine two seeds at once take about half the time of two in a row. Workers are
*spawned*, not forked: a forked child of a parent that has used torch's OpenMP pool can hang
in torch's own ops (see ``batchnorm._process``), and spawning costs a couple of seconds of
imports, which is why the runner only fans out when the work is large enough to pay for it.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

__all__ = ["parallel_map", "worth_parallel"]

# Below this many SGD steps in all, the seconds of spawning workers cost more than they save.
MIN_PARALLEL_STEPS = 5_000


def worth_parallel(total_steps: int, jobs: int) -> int:
    """Worker processes worth starting for ``jobs`` jobs of ``total_steps`` steps in all."""
    if jobs < 2 or total_steps < MIN_PARALLEL_STEPS:
        return 1
    return max(1, min(jobs, os.cpu_count() or 1))


def parallel_map(fn: Callable[..., Any], args: Sequence[Iterable[Any]], workers: int) -> list[Any]:
    """``[fn(*a) for a in args]``, in ``workers`` spawned processes when ``workers > 1``.

    ``fn`` must be a module-level function (it is pickled by name). Results come back in the
    order of ``args``; the first exception raised by a job is raised here.
    """
    args = [tuple(a) for a in args]
    if workers <= 1 or len(args) <= 1:
        return [fn(*a) for a in args]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(args)), mp_context=context) as pool:
        futures = [pool.submit(fn, *a) for a in args]
        return [f.result() for f in futures]
