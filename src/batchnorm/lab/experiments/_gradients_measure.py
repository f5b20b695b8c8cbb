r"""The gradients experiment's measures: per-layer weight-gradient norms of an MLP on one batch,
and the two numbers made of them (the first/last ratio and the growth per layer).

The networks are :func:`batchnorm.lab.models.make_mlp`'s: hidden affine maps ``fc1 .. fcD``
(the only layers measured), each followed by an optional BN layer and an activation, then the
output layer ``out``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["first_last_ratio", "growth_rate", "hidden_weights", "layer_gradient_norms"]


def hidden_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights of ``fc1 .. fcD`` in layer order."""
    layers = [
        (int(name[2:]), module.get_parameter("weight"))
        for name, module in model.named_children()
        if name.startswith("fc") and name[2:].isdigit()
    ]
    return [weight for _, weight in sorted(layers)]


def gradient_norms(model: nn.Module) -> list[float]:
    r"""The Frobenius norms :math:`\|\partial L/\partial W_l\|` now held in the ``.grad`` of
    ``fc1 .. fcD`` (``nan`` for a layer without a gradient)."""
    return [
        math.nan if w.grad is None else float(torch.linalg.vector_norm(w.grad.double()))
        for w in hidden_weights(model)
    ]


def layer_gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    r"""Per hidden layer, :math:`\|\partial L / \partial W_l\|_F` of the mean cross-entropy of
    ``model`` on the batch ``(x, y)``, in training mode (BN normalises with the batch's own
    statistics), in the model's dtype.

    The model's gradients are overwritten (and its BN running buffers updated, as by any
    training-mode forward); nothing else changes.

    Returns:
        ``D`` floats, layer ``fc1`` first.
    """
    model.train()
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)), y)
    loss.backward()
    return gradient_norms(model)


def first_last_ratio(norms: Sequence[float | None]) -> float | None:
    r""":math:`\|\partial L/\partial W_1\| / \|\partial L/\partial W_D\|` (below 1: smaller
    towards the input); ``None`` unless both are finite and positive."""
    first, last = norms[0], norms[-1]
    if first is None or last is None:
        return None
    ok = all(math.isfinite(v) and v > 0 for v in (first, last))
    return float(first) / float(last) if ok else None


def growth_rate(norms: Sequence[float | None]) -> float | None:
    r"""The growth per layer towards the input: :math:`e^{-b}` for the least-squares slope
    :math:`b` of :math:`\log \|\partial L/\partial W_l\|` against :math:`l` over the interior
    layers :math:`l = 2 .. D-1`.

    A norm that is exactly :math:`c\,\lambda^{D-l}` gives :math:`\lambda` (above 1: larger
    towards the input, exploding; below 1: vanishing). ``None`` if there are fewer than two
    interior layers or an interior norm is not finite and positive.
    """
    interior = list(norms[1:-1])
    if len(interior) < 2 or not all(v is not None and math.isfinite(v) and v > 0 for v in interior):
        return None
    layers = np.arange(2, len(norms), dtype=np.float64)
    slope = np.polyfit(layers, np.log(np.asarray(interior, dtype=np.float64)), 1)[0]
    return float(math.exp(-slope))
