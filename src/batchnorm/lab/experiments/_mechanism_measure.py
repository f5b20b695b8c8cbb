r"""The mechanism experiment's two measurements of a network at one point of its training:
Santurkar et al.'s gradient-based internal covariate shift (:func:`gradient_shift`) and the
loss landscape along the gradient (:func:`landscape`).

Both run on a deep copy of the network in training mode (BatchNorm normalises with the probe
batch's own statistics, as in training), so the network being trained, its BatchNorm buffers
and its noise generators are never touched. A noisy BatchNorm layer
(:class:`~batchnorm.lab.models.NoisyBatchNorm1d`) draws its noise from its own generator; every
forward pass of one measurement reseeds each layer's generator to the same state first
(:func:`reseed_noise`), so the network compared at two parameter points is the same function
of its parameters, and the difference measured is the parameters' alone.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..models import NoisyBatchNorm1d

__all__ = ["gradient_shift", "landscape", "model_loss", "reseed_noise", "weight_layers"]


def weight_layers(model: nn.Sequential) -> list[str]:
    """The layers whose weight gradient the shift is measured on, input to output: every
    ``nn.Linear`` child (``fc1 .. fcD`` and ``out`` for :func:`~batchnorm.lab.models.make_mlp`)."""
    return [name for name, module in model.named_children() if isinstance(module, nn.Linear)]


def reseed_noise(model: nn.Module, seed: int) -> None:
    """Put every noisy BatchNorm layer's generator of ``model`` in a fixed state: layer ``k``
    (in module order) is seeded ``seed + k``, so layers draw different noise."""
    k = 0
    for module in model.modules():
        if isinstance(module, NoisyBatchNorm1d):
            module.generator.manual_seed((int(seed) + k) % 2**63)
            k += 1


def model_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise_seed: int
) -> Callable[[], torch.Tensor]:
    """A closure: the mean cross-entropy of ``model`` on ``(x, y)`` in its current mode, each
    call with the same noise (:func:`reseed_noise`)."""

    def loss() -> torch.Tensor:
        reseed_noise(model, noise_seed)
        return nn.functional.cross_entropy(model(x), y)

    return loss


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    # float64 sums: the differences of two nearby gradients are small next to each gradient.
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def gradient_shift(
    model: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    noise_seed: int = 0,
) -> dict[str, list[Any]]:
    r"""Santurkar et al.'s (2018, Def. 2.1) internal covariate shift of each weight layer.

    For layer :math:`i` with weight :math:`W_i`, on the batch ``(x, y)``:

    .. math::
        G_i = \nabla_{W_i} L(\theta_{<i}, \theta_{\ge i}), \qquad
        G'_i = \nabla_{W_i} L(\theta_{<i} - \eta\, \nabla_{\theta_{<i}} L, \theta_{\ge i}),

    where :math:`\theta_{<i}` are the parameters of every module before layer :math:`i` (the
    earlier layers' weights and biases, their BatchNorm :math:`\gamma, \beta`) and
    :math:`\theta_{\ge i}` the layer's own and every later parameter, which stay where they
    are: :math:`G'_i` is the layer's gradient after only the earlier layers took their SGD step
    of size :math:`\eta` on this batch. Returned per layer: the shift
    :math:`\|G_i - G'_i\|`, the relative shift :math:`\|G_i - G'_i\| / \|G_i\|` and
    :math:`\cos(G_i, G'_i)` (Frobenius norms, float64). The first layer has no earlier
    layers, so its shift is exactly 0 and its cosine 1 (as for every layer when ``lr`` is 0).

    Args:
        model: A :class:`torch.nn.Sequential` such as :func:`~batchnorm.lab.models.make_mlp`
            builds; only a deep copy is used (in training mode).
        x, y: The batch.
        lr: :math:`\eta`, the earlier layers' step.
        noise_seed: The noise of noisy BatchNorm layers in every forward (see the module).

    Returns:
        ``{"layers", "l2", "relative", "cos"}``: the layer names (:func:`weight_layers`) and
        one float per layer each (``nan`` where a norm is 0).
    """
    work = copy.deepcopy(model).train()
    layers = weight_layers(work)
    params = dict(work.named_parameters())
    names = list(params)
    loss = model_loss(work, x, y, noise_seed)
    grads = torch.autograd.grad(loss(), [params[n] for n in names])
    start = {n: p.detach().clone() for n, p in params.items()}
    step = dict(zip(names, grads, strict=True))
    children = [name for name, _ in work.named_children()]
    out: dict[str, list[float]] = {"l2": [], "relative": [], "cos": []}
    for layer in layers:
        earlier = set(children[: children.index(layer)])
        with torch.no_grad():
            for n, p in params.items():
                moved = n.split(".", 1)[0] in earlier
                p.copy_(start[n] - lr * step[n] if moved else start[n])
        weight = params[f"{layer}.weight"]
        (shifted,) = torch.autograd.grad(loss(), [weight])
        g = step[f"{layer}.weight"].double()
        g_shifted = shifted.double()
        l2 = float((g - g_shifted).norm())
        norm, norm_shifted = float(g.norm()), float(g_shifted.norm())
        out["l2"].append(l2)
        out["relative"].append(l2 / norm if norm > 0 else math.nan)
        both = norm * norm_shifted
        out["cos"].append(float((g * g_shifted).sum()) / both if both > 0 else math.nan)
    return {"layers": layers, **out}


def landscape(
    params: Sequence[torch.Tensor], loss: Callable[[], torch.Tensor], etas: Sequence[float]
) -> dict[str, Any]:
    r"""The loss and the gradient along the gradient direction (Santurkar et al. 2018, Sec. 3.1).

    With :math:`g = \nabla L(\theta)` and :math:`\theta_\eta = \theta - \eta g` for each
    :math:`\eta` in ``etas``: the losses :math:`L(\theta_\eta)` (their range is the "loss
    landscape" measure), the gradient changes
    :math:`\Delta_\eta = \|\nabla L(\theta) - \nabla L(\theta_\eta)\|` ("gradient
    predictiveness"), and :math:`\|g\|`; the effective :math:`\beta`-smoothness is
    :math:`\max_\eta \Delta_\eta / (\eta \|g\|)`. For a quadratic
    :math:`L(\theta) = \tfrac12 \theta^\top A \theta + b^\top\theta`,
    :math:`\Delta_\eta = \eta \|A g\|` exactly.

    Args:
        params: The parameters (leaf tensors that require grad); moved in place and restored
            to their values before returning, also on error.
        loss: Computes the loss from ``params``' current values.
        etas: The step sizes, each > 0.

    Returns:
        ``{"loss0", "loss", "grad_change", "grad_norm"}``: :math:`L(\theta)`, a list of
        :math:`L(\theta_\eta)` and a list of :math:`\Delta_\eta` (one per ``eta``), and
        :math:`\|g\|`; floats, ``nan``/``inf`` where the loss was not finite.
    """
    params = list(params)
    loss0 = loss()
    g = [t.detach() for t in torch.autograd.grad(loss0, params)]
    start = [p.detach().clone() for p in params]
    losses, changes = [], []
    try:
        for eta in etas:
            with torch.no_grad():
                for p, p0, gp in zip(params, start, g, strict=True):
                    p.copy_(p0 - eta * gp)
            value = loss()
            moved = torch.autograd.grad(value, params)
            losses.append(float(value.detach()))
            changes.append(_norm([a - b for a, b in zip(g, moved, strict=True)]))
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
    return {
        "loss0": float(loss0.detach()),
        "loss": losses,
        "grad_change": changes,
        "grad_norm": _norm(g),
    }
