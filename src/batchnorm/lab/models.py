"""Small models for the lab, with a ``norm=`` switch between no normalisation and BatchNorm.

The batch-normalised variants use this library's :class:`batchnorm.BatchNorm1d`, so the lab's
experiments also exercise the Numba kernels end to end.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .. import BatchNorm1d

__all__ = ["ACTIVATIONS", "NORMS", "make_mlp"]

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}
NORMS = ("none", "batchnorm")


def make_mlp(
    n_in: int,
    n_out: int,
    *,
    hidden: int = 100,
    depth: int = 3,
    activation: str = "sigmoid",
    norm: str = "none",
    init_std: float | None = None,
    generator: torch.Generator | None = None,
    init: str | None = None,
) -> nn.Sequential:
    r"""A fully connected net: ``depth`` hidden layers of ``hidden`` units and a linear output.

    Each hidden layer is ``fc<i>`` (``nn.Linear``), then with ``norm="batchnorm"`` ``bn<i>``
    (:class:`batchnorm.BatchNorm1d`, normalising each unit over the batch) and then ``act<i>``,
    for ``i = 1 .. depth``; the output layer is ``out``. As in Ioffe & Szegedy (2015), Sec. 3.2,
    the normalisation sits between the affine map and the nonlinearity, and the ``fc<i>`` of a
    normalised layer has no bias, since BN's own shift :math:`\beta` takes its place.

    Args:
        n_in: Input values per example.
        n_out: Outputs (classes).
        hidden: Units per hidden layer.
        depth: Number of hidden layers.
        activation: ``"sigmoid"``, ``"tanh"`` or ``"relu"``.
        norm: ``"none"`` or ``"batchnorm"``.
        init_std: If given, every ``nn.Linear`` weight is drawn from
            :math:`\mathcal{N}(0, \text{init\_std}^2)` and every bias is zero (the paper's
            "small random Gaussian values"); ``None`` keeps torch's default initialisation.
        generator: The generator the weights are drawn from (with ``init_std`` or ``init``);
            two calls with generators in the same state give equal ``nn.Linear`` weights
            whatever ``norm`` is.
        init: ``"glorot"`` draws every ``nn.Linear`` weight from
            :math:`\mathcal{N}(0, 2 / (\text{fan\_in} + \text{fan\_out}))` (Glorot & Bengio
            2010, the standard scale for sigmoid networks) and zeroes the biases; ``None``
            leaves the choice to ``init_std``. Not both.

    Returns:
        The model, float32, in training mode.

    Raises:
        ValueError: If a size is below 1, ``init_std`` is negative, or ``activation``/``norm``
            is not one of the names above.
    """
    where = "make_mlp()"
    for name, value in (("n_in", n_in), ("n_out", n_out), ("hidden", hidden), ("depth", depth)):
        if value < 1:
            raise ValueError(f"{where}: expected {name} to be an int >= 1, got {value!r}.")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{where}: expected activation in {list(ACTIVATIONS)!r}, got {activation!r}."
        )
    if norm not in NORMS:
        raise ValueError(f"{where}: expected norm in {list(NORMS)!r}, got {norm!r}.")
    if init_std is not None and init_std < 0:
        raise ValueError(f"{where}: expected init_std >= 0 or None, got {init_std!r}.")
    if init not in (None, "glorot"):
        raise ValueError(f"{where}: expected init to be None or 'glorot', got {init!r}.")
    if init is not None and init_std is not None:
        raise ValueError(
            f"{where}: expected init_std or init, got both (init_std={init_std!r}, init={init!r})."
        )

    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width = n_in
    for i in range(1, depth + 1):
        layers[f"fc{i}"] = nn.Linear(width, hidden, bias=norm == "none")
        if norm == "batchnorm":
            layers[f"bn{i}"] = BatchNorm1d(hidden)
        layers[f"act{i}"] = ACTIVATIONS[activation]()
        width = hidden
    layers["out"] = nn.Linear(width, n_out)
    model = nn.Sequential(layers)
    if init_std is not None or init == "glorot":
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    std = init_std
                    if init == "glorot":
                        fan_out, fan_in = module.weight.shape
                        std = (2.0 / (fan_in + fan_out)) ** 0.5
                    module.weight.normal_(0.0, std, generator=generator)
                    if module.bias is not None:
                        module.bias.zero_()
    return model
