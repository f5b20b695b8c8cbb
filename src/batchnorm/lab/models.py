"""Small models for the lab, with a ``norm=`` switch between no normalisation, BatchNorm and its
batch-size-robust relatives.

The batch-normalised variants use this library's layers (:class:`batchnorm.BatchNorm1d`,
:class:`batchnorm.GhostBatchNorm1d`, :class:`batchnorm.BatchRenorm1d`), so the lab's
experiments also exercise the Numba kernels end to end. GroupNorm is torch's own (it has no
batch dependence to implement).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .. import BatchNorm1d, BatchRenorm1d, GhostBatchNorm1d

__all__ = [
    "ACTIVATIONS",
    "BATCH_NORMS",
    "INITS",
    "NORMS",
    "NoisyBatchNorm1d",
    "make_cnn1d",
    "make_mlp",
    "make_norm",
]

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}
NORMS = ("none", "batchnorm", "ghost", "renorm", "groupnorm", "noisy")
# The norms that normalise over the batch (their layers are named bn<i>; GroupNorm's gn<i>).
BATCH_NORMS = ("batchnorm", "ghost", "renorm", "noisy")
INITS = (None, "glorot", "he")


class NoisyBatchNorm1d(BatchNorm1d):
    r"""BatchNorm followed, in training only, by noise whose distribution changes every step.

    Santurkar et al. (2018, Sec. 2.1) test whether BatchNorm works *because* it keeps each
    layer's input distribution fixed: they inject "time-varying, non-zero mean and non-unit
    variance noise" after each BatchNorm, so the next layer sees a distribution that moves at
    every step, and ask whether the network still trains as well. Here, at every training
    forward, each unit :math:`j` draws a mean :math:`\mu_j \sim U(-s, s)` and a variance
    :math:`\nu_j \sim U(1, 1 + s)`, and each value :math:`y_{ij}` of BatchNorm's output becomes

    .. math:: y_{ij} \, a_{ij} + b_{ij}, \qquad a_{ij} \sim \mathcal{N}(1, \nu_j - 1 + 10^{-2}),
        \quad b_{ij} \sim \mathcal{N}(\mu_j, \nu_j),

    so every activation is noisy and the noise's mean and spread change from step to step. In
    eval mode the layer is BatchNorm. The noise comes from the layer's own generator (seeded by
    ``seed``), so two runs of the same seed see the same noise.

    Args:
        num_features: Units.
        strength: :math:`s` above (0 gives plain BatchNorm's output plus tiny noise).
        seed: Seed of the layer's noise generator.
    """

    def __init__(self, num_features: int, strength: float = 1.0, seed: int = 0, **kwargs: Any):
        super().__init__(num_features, **kwargs)
        if not strength >= 0:
            raise ValueError(f"NoisyBatchNorm1d(): expected strength >= 0, got {strength!r}.")
        self.strength = float(strength)
        self.generator = torch.Generator().manual_seed(int(seed))

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(input, mask)
        if not self.training:
            return out
        s, g = self.strength, self.generator
        shape = (1, out.shape[1]) + (1,) * (out.dim() - 2)
        mean = (torch.rand(shape, generator=g) * 2 - 1) * s
        var = 1 + torch.rand(shape, generator=g) * s
        scale = 1 + torch.randn(out.shape, generator=g) * (var - 1 + 1e-2).sqrt()
        shift = mean + torch.randn(out.shape, generator=g) * var.sqrt()
        return out * scale.to(out.dtype) + shift.to(out.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, strength={self.strength}"


def make_norm(norm: str, width: int, options: Mapping[str, Any] | None = None) -> nn.Module | None:
    """The normalisation layer ``norm`` for ``width`` units or channels (``None`` for
    ``"none"``).

    Args:
        norm: One of :data:`NORMS`.
        width: Units (MLP) or channels (CNN).
        options: Keyword arguments of the layer: ``virtual_batch_size`` (``"ghost"``, default
            8), ``warmup``/``rmax``/``dmax`` (``"renorm"``), ``groups`` (``"groupnorm"``,
            default 8, capped at ``width`` and lowered until it divides ``width``),
            ``strength``/``seed`` (``"noisy"``), ``momentum``/``eps`` (every BatchNorm).

    Raises:
        ValueError: If ``norm`` is unknown.
    """
    options = dict(options or {})
    if norm == "none":
        return None
    if norm == "batchnorm":
        return BatchNorm1d(width, **options)
    if norm == "ghost":
        options.setdefault("virtual_batch_size", 8)
        return GhostBatchNorm1d(width, **options)
    if norm == "renorm":
        return BatchRenorm1d(width, **options)
    if norm == "noisy":
        return NoisyBatchNorm1d(width, **options)
    if norm == "groupnorm":
        groups = min(int(options.pop("groups", 8)), width)
        while width % groups:
            groups -= 1
        return nn.GroupNorm(groups, width, **options)
    raise ValueError(f"make_norm(): expected norm in {list(NORMS)!r}, got {norm!r}.")


def _norm_name(norm: str, i: int) -> str:
    return f"{'gn' if norm == 'groupnorm' else 'bn'}{i}"


def _check(where: str, sizes: Mapping[str, int], activation: str, norm: str) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{where}: expected {name} to be an int >= 1, got {value!r}.")
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{where}: expected activation in {list(ACTIVATIONS)!r}, got {activation!r}."
        )
    if norm not in NORMS:
        raise ValueError(f"{where}: expected norm in {list(NORMS)!r}, got {norm!r}.")


def _initialise(
    model: nn.Module,
    *,
    init_std: float | None,
    init: str | None,
    weight_scale: float,
    generator: torch.Generator | None,
    where: str,
) -> None:
    """Draw every ``nn.Linear``/``nn.Conv1d`` weight (biases zeroed) as the arguments say."""
    if init_std is not None and init_std < 0:
        raise ValueError(f"{where}: expected init_std >= 0 or None, got {init_std!r}.")
    if init not in INITS:
        raise ValueError(f"{where}: expected init in {list(INITS)!r}, got {init!r}.")
    if init is not None and init_std is not None:
        raise ValueError(
            f"{where}: expected init_std or init, got both (init_std={init_std!r}, init={init!r})."
        )
    if not weight_scale > 0:
        raise ValueError(f"{where}: expected weight_scale > 0, got {weight_scale!r}.")
    if init_std is None and init is None:
        if weight_scale != 1.0:
            with torch.no_grad():
                for module in model.modules():
                    if isinstance(module, (nn.Linear, nn.Conv1d)):
                        module.weight.mul_(weight_scale)
        return
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                receptive = module.weight[0, 0].numel() if module.weight.dim() > 2 else 1
                fan_in = module.weight.shape[1] * receptive
                fan_out = module.weight.shape[0] * receptive
                if init == "glorot":
                    std = (2.0 / (fan_in + fan_out)) ** 0.5
                elif init == "he":
                    std = (2.0 / fan_in) ** 0.5
                else:
                    assert init_std is not None, "init is None here, so init_std is set"
                    std = init_std
                module.weight.normal_(0.0, std * weight_scale, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()


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
    weight_scale: float = 1.0,
    norm_options: Mapping[str, Any] | None = None,
    dropout: float = 0.0,
    dropout_layers: str = "all",
) -> nn.Sequential:
    r"""A fully connected net: ``depth`` hidden layers of ``hidden`` units and a linear output.

    Each hidden layer is ``fc<i>`` (``nn.Linear``), then the normalisation (``bn<i>`` for the
    batch norms of :data:`BATCH_NORMS`, ``gn<i>`` for GroupNorm), then ``act<i>``, then
    ``drop<i>`` where dropout applies, for ``i = 1 .. depth``; the output layer is ``out``. As
    in Ioffe & Szegedy (2015), Sec. 3.2, the normalisation sits between the affine map and the
    nonlinearity, and the ``fc<i>`` of a normalised layer has no bias, since the norm's own
    shift :math:`\beta` takes its place.

    Args:
        n_in: Input values per example.
        n_out: Outputs (classes).
        hidden: Units per hidden layer.
        depth: Number of hidden layers.
        activation: ``"sigmoid"``, ``"tanh"`` or ``"relu"``.
        norm: One of :data:`NORMS` (see :func:`make_norm`).
        init_std: If given, every ``nn.Linear`` weight is drawn from
            :math:`\mathcal{N}(0, \text{init\_std}^2)` and every bias is zero (the paper's
            "small random Gaussian values"); ``None`` keeps torch's default initialisation.
        generator: The generator the weights are drawn from (with ``init_std`` or ``init``);
            two calls with generators in the same state give equal ``nn.Linear`` weights
            whatever ``norm`` is.
        init: ``"glorot"`` draws every weight from
            :math:`\mathcal{N}(0, 2 / (\text{fan\_in} + \text{fan\_out}))` (Glorot & Bengio
            2010, the standard scale for sigmoid networks), ``"he"`` from
            :math:`\mathcal{N}(0, 2 / \text{fan\_in})` (He et al. 2015, for ReLU), and zeroes
            the biases; ``None`` leaves the choice to ``init_std``. Not both.
        weight_scale: Every weight is multiplied by this after it is drawn (the scale ``c`` of
            the initialization experiment).
        norm_options: Keyword arguments of each normalisation layer (:func:`make_norm`).
        dropout: Dropout probability after the activation (0: no dropout layers).
        dropout_layers: ``"all"`` hidden layers or only the ``"last"`` (Li et al. 2019: after
            BatchNorm, dropout only before the output layer avoids the variance shift).

    Returns:
        The model, float32, in training mode.

    Raises:
        ValueError: If a size is below 1, ``init_std`` is negative, or a name or probability
            is not one of those above.
    """
    where = "make_mlp()"
    _check(
        where, {"n_in": n_in, "n_out": n_out, "hidden": hidden, "depth": depth}, activation, norm
    )
    if not 0 <= dropout < 1:
        raise ValueError(f"{where}: expected dropout in [0, 1), got {dropout!r}.")
    if dropout_layers not in ("all", "last"):
        raise ValueError(
            f"{where}: expected dropout_layers 'all' or 'last', got {dropout_layers!r}."
        )
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width = n_in
    for i in range(1, depth + 1):
        layers[f"fc{i}"] = nn.Linear(width, hidden, bias=norm == "none")
        layer = make_norm(norm, hidden, norm_options)
        if layer is not None:
            layers[_norm_name(norm, i)] = layer
        layers[f"act{i}"] = ACTIVATIONS[activation]()
        if dropout > 0 and (dropout_layers == "all" or i == depth):
            layers[f"drop{i}"] = nn.Dropout(dropout)
        width = hidden
    layers["out"] = nn.Linear(width, n_out)
    model = nn.Sequential(layers)
    _initialise(
        model,
        init_std=init_std,
        init=init,
        weight_scale=weight_scale,
        generator=generator,
        where=where,
    )
    return model


def make_cnn1d(
    length: int,
    n_out: int,
    *,
    channels: tuple[int, ...] = (32, 32, 32),
    kernel_size: int = 5,
    activation: str = "relu",
    norm: str = "none",
    init: str | None = None,
    generator: torch.Generator | None = None,
    norm_options: Mapping[str, Any] | None = None,
) -> nn.Sequential:
    r"""A small 1-D convolutional net for sequences such as MNIST-1D's 40 values.

    The input ``(N, length)`` is viewed as one channel; each block ``i = 1 .. len(channels)``
    is ``conv<i>`` (``nn.Conv1d``, ``kernel_size``, same padding, stride 2 after the first
    block), the normalisation (``bn<i>``/``gn<i>``, over the batch and the positions of each
    channel), ``act<i>``; then ``pool`` (the mean over positions), and ``out`` (linear).

    Args:
        length: Values per example.
        n_out: Outputs (classes).
        channels: Channels of each block.
        kernel_size: Odd kernel width.
        activation: One of :data:`ACTIVATIONS`.
        norm: One of :data:`NORMS`.
        init: ``None`` (torch's default), ``"glorot"`` or ``"he"``.
        generator: The generator ``init`` draws from.
        norm_options: Keyword arguments of each normalisation layer.

    Raises:
        ValueError: If a size is below 1, ``kernel_size`` is even, or a name is unknown.
    """
    where = "make_cnn1d()"
    sizes = {"length": length, "n_out": n_out, "kernel_size": kernel_size}
    sizes.update({f"channels[{i}]": c for i, c in enumerate(channels)})
    _check(where, sizes, activation, norm)
    if not channels:
        raise ValueError(f"{where}: expected at least one channel count, got {channels!r}.")
    if kernel_size % 2 == 0:
        raise ValueError(f"{where}: expected an odd kernel_size, got {kernel_size!r}.")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["view"] = nn.Unflatten(1, (1, length))
    width = 1
    for i, c in enumerate(channels, start=1):
        layers[f"conv{i}"] = nn.Conv1d(
            width,
            c,
            kernel_size,
            stride=1 if i == 1 else 2,
            padding=kernel_size // 2,
            bias=norm == "none",
        )
        layer = make_norm(norm, c, norm_options)
        if layer is not None:
            layers[_norm_name(norm, i)] = layer
        layers[f"act{i}"] = ACTIVATIONS[activation]()
        width = c
    layers["pool"] = _MeanOverPositions()
    layers["out"] = nn.Linear(width, n_out)
    model = nn.Sequential(layers)
    _initialise(model, init_std=None, init=init, weight_scale=1.0, generator=generator, where=where)
    return model


class _MeanOverPositions(nn.Module):
    """``(N, C, L) -> (N, C)``: the mean over positions (global average pooling)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input.mean(dim=2)
