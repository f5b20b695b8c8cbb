"""What every lab experiment's training loop shares: the seeded batch order, the environment
guards around a run, the per-step bookkeeping, config checks and per-seed summaries.

One definition of "the batches of step k" (so that a resumed run draws exactly what the
uninterrupted run would have), and one measured reasoning about threads and denormals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "batch_indices",
    "check_config",
    "checkpoint_steps",
    "denormals_flushed",
    "end_of_step",
    "mean_std",
    "measured_steps",
    "threads",
    "trailing_mean",
]


@contextlib.contextmanager
def denormals_flushed(enabled: bool) -> Iterator[None]:
    """Flush float32 denormals to zero inside the block (a tiny sigmoid MLP without BN produced
    denormal gradients that made it ~30x slower); restored afterwards."""
    if not enabled:
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Pin torch's and Numba's thread counts to ``n`` inside the block (``None``: leave them)."""
    if n is None:
        yield
        return
    import numba

    before = torch.get_num_threads(), numba.get_num_threads()
    # numba.config sets its settings at run time, so numba's inline types miss them.
    n_numba = min(n, numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    torch.set_num_threads(n)
    numba.set_num_threads(n_numba)
    try:
        yield
    finally:
        numba.set_num_threads(before[1])
        torch.set_num_threads(before[0])


def batch_indices(seed: int, step: int, n_train: int, batch_size: int, cache: dict) -> torch.Tensor:
    """The mini-batch of a step: epochs are seeded permutations, drop-last.

    A pure function of ``(seed, step)``, so a resumed run draws exactly the batches the
    uninterrupted run would have.
    """
    per_epoch = n_train // batch_size
    epoch, position = divmod(step, per_epoch)
    if cache.get("epoch") != epoch:
        generator = torch.Generator().manual_seed(1_000_003 * (seed + 1) + epoch)
        cache["epoch"], cache["perm"] = epoch, torch.randperm(n_train, generator=generator)
    return cache["perm"][position * batch_size : (position + 1) * batch_size]


def end_of_step(
    step: int,
    config: Any,
    measure: Callable[[], None],
    save_checkpoint: Callable[[dict], None] | None,
    state: Callable[[], dict],
    advance: Callable[[int], None] | None,
) -> None:
    """After training step ``step`` (counted from 1): measure every ``config.eval_every`` steps
    and at the end, checkpoint every ``config.checkpoint_every`` steps before the end, and
    advance the progress bar by one."""
    if step % config.eval_every == 0 or step == config.steps:
        measure()
    if save_checkpoint is not None and step % config.checkpoint_every == 0:
        if step < config.steps:
            save_checkpoint(state())
    if advance is not None:
        advance(1)


def measured_steps(config: Any, until: int | None = None) -> list[int]:
    """The steps :func:`end_of_step` measures at (step 0 included), up to ``until`` (default:
    the end of training): every ``config.eval_every`` steps, and the last step."""
    until = config.steps if until is None else until
    steps = list(range(0, until + 1, config.eval_every))
    if until == config.steps and config.steps % config.eval_every:
        steps.append(config.steps)
    return steps


def checkpoint_steps(config: Any) -> range:
    """The steps :func:`end_of_step` saves a checkpoint at: every ``config.checkpoint_every``
    steps, before the end (the last step writes the seed's result instead)."""
    return range(config.checkpoint_every, config.steps, config.checkpoint_every)


def check_config(owner: str, checks: Iterable[tuple[str, bool, str]], config: Any) -> None:
    """Raise for the first ``(field, ok, expected)`` that is not ok, then, for a config that
    checkpoints every so many steps, require ``checkpoint_every`` to be a multiple of
    ``eval_every`` (checkpoints land on measurements).

    Raises:
        ValueError: ``"<owner>(): expected <field> <expected>, got <value>."``
    """
    for name, ok, expected in checks:
        if not ok:
            value = getattr(config, name)
            raise ValueError(f"{owner}(): expected {name} {expected}, got {value!r}.")
    if not hasattr(config, "checkpoint_every"):
        return  # checkpointed per unit (batchnorm.lab._units), not per step
    if config.checkpoint_every % config.eval_every:
        raise ValueError(
            f"{owner}(): expected checkpoint_every to be a multiple of eval_every "
            f"({config.eval_every}), got {config.checkpoint_every}."
        )


def mean_std(values: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Per-seed values, their mean and sample standard deviation (0 for a single seed)."""
    a = np.asarray(values, dtype=np.float64)
    return {
        "per_seed": [float(v) for v in a],
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
    }


def trailing_mean(values: Sequence[float] | np.ndarray, width: int) -> np.ndarray:
    """The mean of each value and the ``width - 1`` before it (fewer at the start)."""
    a = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.concatenate([[0.0], a]))
    count = np.arange(1, len(a) + 1)
    low = np.maximum(count - width, 0)
    return (sums[1:] - sums[low]) / (count - low)
