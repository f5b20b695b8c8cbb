r"""The anatomy experiment's measures: pure functions of one BN layer's input and output on one
batch (float64 throughout; ``(N, C)`` tensors, ``N`` the batch and ``C`` the units).

:func:`measure_layer` gathers, per unit, what the experiment reports and judges; the others are
its pieces, each tested on batches with known answers.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from ._anatomy_config import GAUSSIAN_SHARE

__all__ = [
    "SHARE_TOLERANCE",
    "SKEW_TOLERANCE",
    "excess_kurtosis",
    "layer_batch_statistics",
    "looks_gaussian",
    "measure_layer",
    "moments",
    "share_within_one",
    "skewness",
    "standardize",
]

# A unit "looks Gaussian" when the share of its x_hat within +-1 is this close to a standard
# normal's 0.6827 and its skewness this close to 0 (the anatomy module's docstring works out
# how often a truly Gaussian unit passes at a batch of 256: about 99 %).
SHARE_TOLERANCE = 0.05
SKEW_TOLERANCE = 0.5


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit batch mean and *biased* variance (divide by ``N``) of ``x``, in float64."""
    x = x.double()
    mean = x.mean(dim=0)
    var = ((x - mean) ** 2).mean(dim=0)
    return mean, var


def standardize(x: torch.Tensor, eps: float) -> torch.Tensor:
    r"""Algorithm 1's :math:`\hat{x} = (x - \mu_B)/\sqrt{\sigma_B^2 + \epsilon}` per unit, with
    the batch's own mean and biased variance, in float64 (what
    ``torch.nn.functional.batch_norm(x, None, None, training=True, eps=eps)`` computes)."""
    mean, var = moments(x)
    return (x.double() - mean) / torch.sqrt(var + eps)


def _standardized_powers(x: torch.Tensor) -> torch.Tensor:
    """``x`` standardised per unit by its own mean and biased standard deviation (NaN for a
    unit whose values are all equal)."""
    mean, var = moments(x)
    std = torch.sqrt(var)
    std = torch.where(std > 0, std, torch.full_like(std, math.nan))
    return (x.double() - mean) / std


def skewness(x: torch.Tensor) -> torch.Tensor:
    r"""Per-unit sample skewness :math:`E[z^3]`, :math:`z` standardised by the unit's own mean and
    biased standard deviation (the moment estimator; NaN for a constant unit). Invariant under
    :math:`x \mapsto a x + b` for :math:`a > 0`; a Gaussian's is 0, an exponential's 2."""
    return (_standardized_powers(x) ** 3).mean(dim=0)


def excess_kurtosis(x: torch.Tensor) -> torch.Tensor:
    r"""Per-unit sample excess kurtosis :math:`E[z^4] - 3` (the moment estimator; a Gaussian's
    is 0, an exponential's 6; NaN for a constant unit)."""
    return (_standardized_powers(x) ** 4).mean(dim=0) - 3.0


def share_within_one(x_hat: torch.Tensor) -> torch.Tensor:
    r"""Per-unit share of values with :math:`|\hat{x}| \le 1` (a standard normal's: 0.6827)."""
    return (x_hat.double().abs() <= 1.0).double().mean(dim=0)


def looks_gaussian(share: torch.Tensor, skew: torch.Tensor) -> torch.Tensor:
    """Per-unit: the share within +-1 is within :data:`SHARE_TOLERANCE` of a standard normal's
    and the skewness within :data:`SKEW_TOLERANCE` of 0 (NaN never looks Gaussian)."""
    near_share = (share.double() - GAUSSIAN_SHARE).abs() < SHARE_TOLERANCE
    return near_share & (skew.double().abs() < SKEW_TOLERANCE)


def layer_batch_statistics(
    layer: nn.modules.batchnorm._BatchNorm, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch mean and biased variance *as the layer computes them* on ``x``.

    A copy of the layer with fresh buffers and ``momentum = 1`` runs one training-mode forward,
    after which (torch's update, ``running = (1 - momentum) * running + momentum * batch``) its
    running mean is the batch mean and its running variance the *unbiased* batch variance;
    multiplying by :math:`(m - 1)/m` gives the biased one the layer normalised with. The layer
    itself is not touched.

    Returns:
        ``(mean, var)``, float64 of shape ``(C,)``.
    """
    probe = copy.deepcopy(layer)
    probe.reset_running_stats()
    probe.momentum = 1.0
    probe.train()
    with torch.no_grad():
        probe(x)
    m = x.shape[0]
    mean, var = probe.running_mean, probe.running_var
    assert mean is not None and var is not None, "the layer tracks no running statistics"
    return mean.double().clone(), var.double() * (m - 1) / m


def _finite_list(values: torch.Tensor) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values.tolist()]


def _relative(difference: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return difference.abs() / torch.clamp(reference.abs(), min=1.0)


def measure_layer(
    layer: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, y: torch.Tensor
) -> dict[str, Any]:
    r"""Everything the experiment records of one BN layer on one batch, per unit.

    Args:
        layer: The BN layer (affine), in the state it was in for the forward.
        x: Its input ``(N, C)`` on the batch (training mode).
        y: Its output ``(N, C)``.

    Returns:
        Per-unit lists (``None`` where a value is not finite): ``mean``, ``var`` (the
        formula's :math:`\mu_B`, biased :math:`\sigma_B^2`), ``layer_mean``, ``layer_var``
        (the layer's own), ``xhat_mean``, ``xhat_var`` (of the layer's
        :math:`\hat{x} = (y - \beta)/\gamma`), ``xhat_var_expected``
        (:math:`\sigma_B^2/(\sigma_B^2+\epsilon)`), ``share`` (within :math:`\pm 1`),
        ``skew``, ``kurt`` (of the layer's :math:`\hat{x}`), ``input_skew``, ``input_kurt``,
        ``input_share`` (of :math:`x` standardised by its own standard deviation),
        ``gaussian`` and ``input_gaussian`` (bools, :func:`looks_gaussian` of :math:`\hat{x}`
        and of :math:`x`), ``gamma``, ``beta``, ``out_mean``, ``out_std``;
        and per unit the worst deviations the rules use: ``standardize_deviation`` (the max
        of :math:`|\text{mean}\,\hat{x}|`, :math:`|\text{var}\,\hat{x} - \sigma^2/(\sigma^2
        + \epsilon)|`, :math:`|\mu_\text{layer} - \mu_B|/\sqrt{\sigma_B^2+\epsilon}` and
        :math:`|\sigma^2_\text{layer} - \sigma_B^2|/(\sigma_B^2+\epsilon)`) and
        ``shape_deviation`` (the max of the skewness's and kurtosis's differences, each
        divided by ``max(1, |input's value|)``).
    """
    eps = float(layer.eps)
    mean, var = moments(x)
    layer_mean, layer_var = layer_batch_statistics(layer, x)
    gamma = layer.weight.detach().double()
    beta = layer.bias.detach().double()
    # The layer's own x_hat, recovered from its output: a gamma of exactly 0 leaves nothing to
    # recover, and its unit is reported as not measured (None).
    safe_gamma = torch.where(gamma != 0, gamma, torch.full_like(gamma, math.nan))
    x_hat = (y.double() - beta) / safe_gamma
    xhat_mean, xhat_var = moments(x_hat)
    expected = var / (var + eps)
    skew, kurt = skewness(x_hat), excess_kurtosis(x_hat)
    input_skew, input_kurt = skewness(x), excess_kurtosis(x)
    # The same test on the input, standardised by its own standard deviation: BN cannot change
    # the verdict (it only shifts and rescales), so this says whether the input already was
    # Gaussian-looking.
    input_share = share_within_one(_standardized_powers(x))
    input_share = torch.where(
        torch.isfinite(input_skew), input_share, torch.full_like(input_share, math.nan)
    )
    share = share_within_one(x_hat)
    share = torch.where(torch.isfinite(xhat_mean), share, torch.full_like(share, math.nan))
    out_mean, out_var = moments(y)
    standardize_deviation = (
        torch.stack(
            [
                xhat_mean.abs(),
                (xhat_var - expected).abs(),
                (layer_mean - mean).abs() / torch.sqrt(var + eps),
                (layer_var - var).abs() / (var + eps),
            ]
        )
        .max(dim=0)
        .values
    )
    shape_deviation = torch.maximum(
        _relative(skew - input_skew, input_skew), _relative(kurt - input_kurt, input_kurt)
    )
    # torch's max propagates NaN, so an unmeasurable unit stays None in every deviation.
    return {
        "mean": _finite_list(mean),
        "var": _finite_list(var),
        "layer_mean": _finite_list(layer_mean),
        "layer_var": _finite_list(layer_var),
        "xhat_mean": _finite_list(xhat_mean),
        "xhat_var": _finite_list(xhat_var),
        "xhat_var_expected": _finite_list(expected),
        "share": _finite_list(share),
        "skew": _finite_list(skew),
        "kurt": _finite_list(kurt),
        "input_skew": _finite_list(input_skew),
        "input_kurt": _finite_list(input_kurt),
        "input_share": _finite_list(input_share),
        "gaussian": [bool(v) for v in looks_gaussian(share, skew).tolist()],
        "input_gaussian": [bool(v) for v in looks_gaussian(input_share, input_skew).tolist()],
        "gamma": _finite_list(gamma),
        "beta": _finite_list(beta),
        "out_mean": _finite_list(out_mean),
        "out_std": _finite_list(torch.sqrt(out_var)),
        "standardize_deviation": _finite_list(standardize_deviation),
        "shape_deviation": _finite_list(shape_deviation),
    }
