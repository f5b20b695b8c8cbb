r"""The running statistics: the batch's weight, the one update, the counter, the non-finite guard.

Every path that folds a batch into ``running_mean``/``running_var`` (the fused kernels, torch's
op, the compiled graph, SyncBatchNorm, the population pass) ends here, so they share one
arithmetic and one set of rules:

.. math::
    \hat{\mu} \leftarrow (1 - \alpha)\hat{\mu} + \alpha\mu_B, \qquad
    \hat{\sigma}^2 \leftarrow (1 - \alpha)\hat{\sigma}^2 + \alpha\,\tfrac{m}{m-1}\sigma_B^2

in float64, rounded once to the buffers' dtype (:func:`batchnorm.kernels.update_running`), with
:math:`\alpha` torch's ``momentum`` (the weight of the *new* batch) or, for ``momentum=None``,
``1 / num_batches_tracked`` counting this batch. A batch whose statistics are not finite (or
would overflow the buffers' dtype) changes nothing: not the buffers, not the counter; it is
reported by the caller's policy, ``"skip"`` (warn, count it in the layer's
``nonfinite_batches_skipped``) or ``"raise"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from . import kernels
from ._bridge import limit_of, numpy_view
from ._validate import layer_name, report_nonfinite

__all__ = ["Guard", "batch_weight", "count_batch", "settle", "update"]


class Guard(NamedTuple):
    """What to do with a training batch whose statistics are not finite, and who asked.

    Attributes:
        nonfinite: ``"skip"`` (leave the running statistics alone and warn) or ``"raise"``.
        where: The caller's name for messages (a string, or a callable that returns it).
        on_skip: Called after a skipped batch, or ``None``.
        layer: A layer making the call, or ``None``. Messages then name it, and a skipped batch
            is counted in its ``nonfinite_batches_skipped``; both are worked out only when a
            batch is left out, so the guard of a layer's every call is one small tuple.
    """

    nonfinite: str = "skip"
    where: object = "batch_norm()"
    on_skip: Callable[[], None] | None = None
    layer: object = None


def batch_weight(num_batches_tracked: torch.Tensor | None, momentum: float | None) -> float:
    """The weight of this training batch's statistics in the running averages.

    ``momentum=None`` is torch's cumulative average: ``1 / num_batches_tracked``, counting this
    batch (the counter itself is advanced only once the update has happened).
    """
    if momentum is None:
        if num_batches_tracked is None:
            raise TypeError("momentum=None (a cumulative average) needs num_batches_tracked.")
        return 1.0 / (float(num_batches_tracked) + 1.0)
    return float(momentum)


def count_batch(num_batches_tracked: torch.Tensor | None) -> None:
    """Advance the counter by one (an integer tensor never needs grad)."""
    if num_batches_tracked is None:
        return
    # torch's own in-place add: 1.6 us, where a NumPy view, its increment and a manual version
    # bump took 2.9 us.
    if num_batches_tracked.is_cpu:
        num_batches_tracked.add_(1)
    else:
        with torch.no_grad():
            num_batches_tracked.add_(1)


def update(running_mean, running_var, mean, var, count: int, factor: float) -> bool:
    """The update itself, in place: :func:`batchnorm.kernels.update_running`'s arithmetic.

    In place on CPU float32/float64 buffers (through NumPy views); on a float64 host copy,
    written back, for any other device or dtype. A buffer written through NumPy has its
    autograd version bumped, exactly as after an in-place torch op, so that a graph that saved
    it (an evaluation-mode forward) refuses to backpropagate stale values.

    Args:
        running_mean, running_var: The ``(C,)`` buffers.
        mean, var: ``(C,)`` float64 arrays, the batch's mean and *biased* variance.
        count: Values per channel behind them (> 1).
        factor: The batch's weight (:func:`batch_weight`).

    Returns:
        ``False``, with nothing written, if a statistic is not finite or would overflow the
        buffers' dtype; ``True`` otherwise.
    """
    if running_mean.is_cpu and running_mean.dtype in (torch.float32, torch.float64):
        mean_a, var_a = numpy_view(running_mean), numpy_view(running_var)
        updated = kernels.update_running(
            mean_a, var_a, mean, var, count, factor, limit_of(mean_a.dtype)
        )
        if updated:
            torch.autograd.graph.increment_version(running_mean)
            torch.autograd.graph.increment_version(running_var)
        return updated
    mean_c, var_c = (t.detach().double().cpu().numpy() for t in (running_mean, running_var))
    limit = float(torch.finfo(running_mean.dtype).max)
    if not kernels.update_running(mean_c, var_c, mean, var, count, factor, limit):
        return False
    with torch.no_grad():
        running_mean.copy_(torch.from_numpy(mean_c))
        running_var.copy_(torch.from_numpy(var_c))
    return True


def settle(updated: bool, mean, var, num_batches_tracked, guard) -> None:
    """After an update: count the batch, or report the batch that was left out.

    Args:
        updated: What :func:`update` (or a fused kernel's update) returned.
        mean, var: The batch's statistics (float64 arrays), named in the report.
        num_batches_tracked: The counter, or ``None``.
        guard: The caller's policy for a batch left out: a :class:`Guard`, or a layer, whose
            own ``nonfinite`` policy then applies (a layer's every call passes itself, and the
            guard is built only for the rare batch that is left out).
    """
    if updated:
        count_batch(num_batches_tracked)
        return
    if not isinstance(guard, Guard):
        guard = Guard(guard.nonfinite, layer=guard)
    layer = guard.layer
    report_nonfinite(
        guard.nonfinite, guard.where if layer is None else layer_name(layer), mean, var
    )
    if layer is not None:
        layer.nonfinite_batches_skipped += 1
    if guard.on_skip is not None:
        guard.on_skip()
