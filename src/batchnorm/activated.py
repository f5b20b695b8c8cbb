r"""``BatchNormAct1d/2d/3d``: BatchNorm followed by a pointwise activation, in one pass each way.

.. math::
    y = a\Big(\gamma\,\frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta\Big)

with :math:`a` one of :mod:`batchnorm.activations` (identity, ReLU, LeakyReLU, ELU, SiLU, exact
GELU), :math:`\mu, \sigma^2` the batch's statistics in training and the running ones in
evaluation, exactly as the BatchNorm layer computes them. On the CPU, for float32 and float64,
the forward is one kernel call (statistics, normalization and activation, writing only
:math:`y`) and the backward one more (reading :math:`\delta = \partial\ell/\partial y` and
:math:`x`, writing :math:`\partial\ell/\partial x`): :math:`z = \gamma\hat{x} + \beta` is
recomputed from the saved input and :math:`\delta_z = \delta\,a'(z)` enters BatchNorm's
backward in place of :math:`\delta`. The unfused pair makes four passes over the activations
forward and seven backward, and keeps both :math:`x` and :math:`z` alive for the backward; the
fused layer makes two and five and keeps only :math:`x`.

Each class subclasses this package's ``BatchNorm*d`` (so it is a ``torch.nn.BatchNorm*d``): the
``state_dict`` is BatchNorm's, the weights of a (BatchNorm, activation) pair load unchanged, and
the activation is a plain attribute (``activation``, ``activation_param``), not state. Every
other input (another device or dtype, a mask, ``torch.compile``, ``torch.func``) computes
BatchNorm and then the activation in torch ops, with the same values.
"""

from __future__ import annotations

from typing import Any

import torch

from ._interop import traced_call, twin_of
from ._route import forward_layer
from .activations import Activation, get_activation, resolve_param
from .families import known_family
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormBase,
    forward_with_running,
    uses_running_instead,
)

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "BatchNormActBase"]


class BatchNormActBase(BatchNormBase):
    """What the ``BatchNormAct*d`` classes add to their BatchNorm class: the activation.

    Attributes:
        activation: The activation's name (see :mod:`batchnorm.activations`).
        activation_param: LeakyReLU's negative slope or ELU's alpha (a float), ``None`` for
            the activations without a parameter.
    """

    activation: str = "identity"
    activation_param: float | None = None

    def __init__(
        self,
        num_features: int,
        activation: str = "relu",
        activation_param: float | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        where = f"{type(self).__name__}()"
        spec = get_activation(where, activation)
        param = resolve_param(where, spec, activation_param)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        self.activation = spec.name
        self.activation_param = param

    @property
    def activation_spec(self) -> Activation:
        """The table entry of :attr:`activation`."""
        return get_activation(type(self).__name__, self.activation)

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", activation={self.activation!r}"
        if self.activation_param is not None:
            text += f", activation_param={self.activation_param!r}"
        return text

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """BatchNorm's forward (see :meth:`batchnorm.BatchNorm2d.forward`), then the activation.

        Without a mask, on the CPU in float32 or float64 and above the serial kernels' size,
        both run in the fused kernels; everything else normalizes first and applies the
        activation in torch ops. Padding under a mask stays 0 (every activation of the table
        maps 0 to 0).
        """
        spec = self.activation_spec
        if isinstance(input, torch.fx.Proxy):
            return self._traced(input, mask)
        if mask is None and isinstance(input, torch.Tensor):
            # The identity is BatchNorm itself: its own kernels, no activation to apply.
            fused = None if spec.name == "identity" else (spec, self.activation_param)
            try:
                return forward_layer(self, input, fused)
            except ValueError:
                # One value per channel (see BatchNormBase.forward): the layer's policy decides.
                if not uses_running_instead(self, input):
                    raise
            output = forward_with_running(self, input)
        else:
            output = BatchNormBase.forward(self, input, mask)
        return spec.forward(output, self.activation_param)

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """What ``torch.jit.script`` compiles instead: torch.nn's BatchNorm (same tensors)
        followed by the activation module (TorchScript cannot compile the Numba kernels)."""
        twin = twin_of(self, known_family(type(self)).torch)
        for name in ("nonfinite", "nonfinite_batches_skipped", "single_value"):
            twin.__dict__.pop(name, None)
        for name in ("activation", "activation_param"):
            twin.__dict__.pop(name, None)
        return torch.nn.Sequential(
            twin, self.activation_spec.make_module(self.activation_param)
        ).train(self.training)

    def _traced(self, proxy, mask):
        """Under ``torch.fx``: one ``call_module`` node, as a BatchNorm layer is (the node runs
        this layer, activation included); traced as the root, BatchNorm's forward then the
        activation in torch ops."""
        node = getattr(mask, "node", None)
        if node is not None and node.op == "placeholder" and node.args == (None,):
            mask = None  # a root's mask argument, traced as a placeholder with default None
        if mask is not None:
            return BatchNormBase.forward(self, proxy, mask)
        spec, param = self.activation_spec, self.activation_param

        def root_forward(layer, x):
            return spec.forward(torch.nn.modules.batchnorm._BatchNorm.forward(layer, x), param)

        return traced_call(self, proxy, root_forward)


def _doc(name: str, bn: str) -> str:
    return (
        f"{bn} followed by an activation, fused: see :mod:`batchnorm.activated`.\n\n"
        f"    Args:\n"
        f"        num_features: Channels ``C``.\n"
        f'        activation: One of ``"identity"``, ``"relu"`` (default),\n'
        f'            ``"leaky_relu"``, ``"elu"``, ``"silu"``, ``"gelu"`` (exact).\n'
        f"        activation_param: LeakyReLU's negative slope (default 0.01) or ELU's alpha\n"
        f"            (default 1.0); ``None`` for the default, and for the others.\n"
        f"        eps, momentum, affine, track_running_stats, device, dtype: as {bn}'s.\n\n"
        f"    Example:\n"
        f'        >>> layer = {name}(4, activation="leaky_relu", activation_param=0.1)\n'
        f"        >>> layer.activation, layer.activation_param\n"
        f"        ('leaky_relu', 0.1)\n"
    )


class BatchNormAct1d(BatchNormActBase, BatchNorm1d):
    __doc__ = _doc("BatchNormAct1d", "BatchNorm1d")


class BatchNormAct2d(BatchNormActBase, BatchNorm2d):
    __doc__ = _doc("BatchNormAct2d", "BatchNorm2d")


class BatchNormAct3d(BatchNormActBase, BatchNorm3d):
    __doc__ = _doc("BatchNormAct3d", "BatchNorm3d")


# ------------------------------------------------------------------------------------------
# Family registration (batchnorm.families): the tools know fused layers through the table.
# ------------------------------------------------------------------------------------------
# Each class is its family's BatchNorm followed by its activation, with the family's state; the
# tools switch it to the plain class and back (see add_activated for what they rely on).
from .families import add_activated  # noqa: E402  (the registration block stays in one place)

for _activated in (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d):
    add_activated(_activated.__name__.replace("Act", ""), _activated)
