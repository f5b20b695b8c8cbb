"""One measurement of the population experiment: a model tested with its running averages
and with three exact passes over the training set, and the gap between their statistics.

:func:`measure_statistics` is what :func:`~batchnorm.lab.experiments.population.run_seed`
calls at every measured step; :func:`statistics_gap` is the gap metric and
:func:`statistics_batches` cuts the training set into the batches of the exact passes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ...tools.population import recompute_statistics
from ._population_spec import COMPARED, EXACT, GAPS, REFERENCE

__all__ = ["bn_layers", "measure_statistics", "statistics_batches", "statistics_gap"]


def statistics_gap(
    mean: np.ndarray,
    var: np.ndarray,
    ref_mean: np.ndarray,
    ref_var: np.ndarray,
    eps: float = 0.0,
) -> dict[str, float]:
    r"""How far one layer's inference statistics are from reference ones, in two numbers.

    For :math:`C` channels with statistics :math:`(\mu_c, v_c)` and reference statistics
    :math:`(\mu^*_c, v^*_c)`:

    .. math::
        \text{mean\_shift} = \frac{1}{C}\sum_c \frac{|\mu_c - \mu^*_c|}{\sqrt{v^*_c + \epsilon}},
        \qquad
        \text{log\_var\_ratio} = \frac{1}{C}\sum_c
            \left|\log\frac{v_c + \epsilon}{v^*_c + \epsilon}\right| .

    With :math:`\epsilon` the layer's own ``eps``, both are what the layer's output sees:
    normalising with :math:`(\mu_c, v_c)` instead of the reference shifts :math:`\hat{x}` by
    ``mean_shift`` reference standard deviations (on average over channels) and scales it by
    :math:`e^{\pm\text{log\_var\_ratio}/2}`. ``eps`` also keeps both finite for a channel whose
    variance is 0.

    Args:
        mean: Means, shape ``(C,)``.
        var: Variances, shape ``(C,)``.
        ref_mean: Reference means, shape ``(C,)``.
        ref_var: Reference variances, shape ``(C,)``.
        eps: Added to every variance; computed in float64.

    Returns:
        ``{"mean_shift": float, "log_var_ratio": float}``.

    Raises:
        ValueError: If the four arrays do not share one shape ``(C,)`` with ``C >= 1``, or a
            variance plus ``eps`` is not positive.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in (mean, var, ref_mean, ref_var)]
    shapes = [a.shape for a in arrays]
    if len(set(shapes)) != 1 or len(shapes[0]) != 1 or shapes[0][0] < 1:
        raise ValueError(
            f"statistics_gap(): expected mean, var, ref_mean, ref_var of one shape (C,), got "
            f"{', '.join(map(str, shapes))}."
        )
    mean, var, ref_mean, ref_var = arrays
    var, ref_var = var + eps, ref_var + eps
    if not (var > 0).all() or not (ref_var > 0).all():
        low = float(min(var.min(), ref_var.min()))
        raise ValueError(
            f"statistics_gap(): expected every variance + eps to be > 0, got a minimum of {low!r}."
        )
    return {
        "mean_shift": float(np.mean(np.abs(mean - ref_mean) / np.sqrt(ref_var))),
        "log_var_ratio": float(np.mean(np.abs(np.log(var) - np.log(ref_var)))),
    }


def statistics_batches(x: torch.Tensor, batch_size: int, seed: int) -> list[torch.Tensor]:
    """The training set cut into the batches of the exact passes, in one seeded order.

    Every example is used once. The last batch is smaller when ``batch_size`` does not divide
    the set; if it would hold a single example, that example joins the batch before it
    instead, because BatchNorm cannot normalise one value per channel.

    Args:
        x: The training inputs, ``(N, D)``.
        batch_size: Examples per batch, ``>= 2``.
        seed: Seeds the order (a generator of its own; global RNGs are untouched).

    Returns:
        The batches, views of a permuted copy of ``x``.

    Raises:
        ValueError: If ``batch_size < 2`` or ``x`` has fewer than 2 examples.
    """
    n = len(x)
    if batch_size < 2 or n < 2:
        raise ValueError(
            f"statistics_batches(): expected batch_size >= 2 and at least 2 examples, got "
            f"batch_size={batch_size!r} and {n} examples."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    shuffled = x[order]
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return [shuffled[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """Every BatchNorm layer of ``model`` (torch's and ours) with its name, in module order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def _test_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).double().mean().item()
    return accuracy, loss


def measure_statistics(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    x_test: torch.Tensor,
    y_test: torch.Tensor,
) -> dict[str, Any]:
    """Test a model with its running averages and with three exact statistics; compare them.

    Works on a deep copy in eval mode: ``model`` itself (parameters, buffers, modes) is left
    exactly as it was. The copy is tested with its running averages (``"ema"``), then its BN
    statistics are recomputed over ``batches`` with
    :func:`~batchnorm.tools.population.recompute_statistics` (``method="pooled"``) and it is
    tested again, then likewise with ``method="paper"`` and ``method="sequential"`` (one pass
    over ``batches`` per BN layer).

    Args:
        model: A model with BN layers that track running statistics.
        batches: The batches of the exact passes (e.g. :func:`statistics_batches`); a sequence,
            since ``method="sequential"`` iterates it once per BN layer.
        x_test: Test inputs, one batch.
        y_test: Test labels.

    Returns:
        A dict with ``test_accuracy`` and ``test_loss`` (each of :data:`METHODS` -> float),
        ``layers`` (the BN layers' names, in module order), ``eps`` (layer -> its ``eps``),
        ``statistics`` (layer -> method -> ``(mean, var)``, float64 arrays ``(C,)``; ``var``
        is the unbiased variance, the one torch's ``running_var`` holds) and ``gap``
        (each of :data:`COMPARED` -> gap name -> layer -> float: :func:`statistics_gap` to the
        :data:`REFERENCE` (sequential) statistics with the layer's ``eps``).

    Raises:
        ValueError: If ``model`` has no BN layer with running statistics.
    """
    probe = copy.deepcopy(model).eval()
    layers = [(n, m) for n, m in bn_layers(probe) if m.running_mean is not None]
    if not layers:
        raise ValueError(
            f"measure_statistics(): expected a model with BatchNorm layers that track running "
            f"statistics, got none in {type(model).__name__}."
        )
    names = [n for n, _ in layers]
    # Three calls, sequential's one pass per layer: a generator would be spent after the first.
    batches = list(batches)
    statistics: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {
        n: {
            "ema": (
                m.running_mean.detach().double().numpy().copy(),
                m.running_var.detach().double().numpy().copy(),
            )
        }
        for n, m in layers
    }
    accuracy, loss = {}, {}
    accuracy["ema"], loss["ema"] = _test_metrics(probe, x_test, y_test)
    for method in EXACT:
        # Each call overwrites the copy's buffers, and none reads what the one before wrote:
        # pooled and paper normalise with batch statistics only, and sequential's first pass
        # does too, after which the layers in eval mode use the values sequential itself wrote.
        found = recompute_statistics(probe, batches, method=method, progress=False)
        for name in names:
            statistics[name][method] = (found[name].mean, found[name].var_unbiased)
        accuracy[method], loss[method] = _test_metrics(probe, x_test, y_test)
    eps = {n: float(m.eps) for n, m in layers}
    gap = {method: {g: {} for g in GAPS} for method in COMPARED}
    for name in names:
        ref_mean, ref_var = statistics[name][REFERENCE]
        for method in COMPARED:
            values = statistics_gap(*statistics[name][method], ref_mean, ref_var, eps[name])
            for g in GAPS:
                gap[method][g][name] = values[g]
    return {
        "test_accuracy": accuracy,
        "test_loss": loss,
        "layers": names,
        "eps": eps,
        "statistics": statistics,
        "gap": gap,
    }
