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

import torch

from .activations import Activation, get_activation, resolve_param
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase

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
        device=None,
        dtype=None,
        **kwargs,
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

        Padding under a mask stays 0 (every activation of the table maps 0 to 0).
        """
        output = BatchNormBase.forward(self, input, mask)
        return self.activation_spec.forward(output, self.activation_param)


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
