r"""The pointwise activations a BatchNorm layer can apply to its output: one table.

Each :class:`Activation` names a function :math:`a(z)` of the normalized, scaled and shifted
value :math:`z = \gamma\hat{x} + \beta`, its torch.nn module and functional form, its
derivative written in terms of :math:`z` (the fused backward recomputes :math:`z` from the
saved input and never stores it), and, for the invertible ones, :math:`z = a^{-1}(y)` (what
:class:`batchnorm.InPlaceABN2d` needs to work from its output alone).

============== ============================================ ======================== ==========
name           :math:`a(z)`                                 :math:`a'(z)`            invertible
============== ============================================ ======================== ==========
``identity``   :math:`z`                                    1                        yes
``relu``       :math:`\max(z, 0)`                           :math:`[z > 0]`          no
``leaky_relu`` :math:`z` if :math:`z > 0` else :math:`pz`   1 or :math:`p`           yes (p>0)
``elu``        :math:`z` or :math:`p(e^z - 1)`              1 or :math:`pe^z`        yes (p>0)
``silu``       :math:`z\,s(z)`, :math:`s` the logistic      :math:`s(1 + z(1 - s))`  no
``gelu``       :math:`z\,\Phi(z)` (exact, erf-based)        :math:`\Phi + z\varphi`  no
============== ============================================ ======================== ==========

:math:`p` is ``activation_param``: LeakyReLU's negative slope (default 0.01) or ELU's alpha
(default 1.0); the other activations take none. The derivative at :math:`z = 0` is torch's
(ReLU, LeakyReLU and ELU take the :math:`z \le 0` branch there). NaN propagates as in torch.

Each activation has a small integer ``code`` that the Numba kernels branch on
(:mod:`batchnorm.kernels.activation`); this module is the only place codes and names meet.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "activation_from_module",
    "activation_module",
    "get_activation",
    "resolve_param",
]


@dataclasses.dataclass(frozen=True)
class Activation:
    """One activation of the table (see the module docstring).

    Attributes:
        name: ``"identity"``, ``"relu"``, ``"leaky_relu"``, ``"elu"``, ``"silu"`` or ``"gelu"``.
        code: The integer the kernels branch on.
        default_param: The default ``activation_param`` (``None``: the activation takes none).
        module: The torch.nn module class that computes it (``torch.nn.Identity`` for identity).
        invertible: Whether :math:`z` can be recovered from :math:`a(z)` (for ``p > 0``).
    """

    name: str
    code: int
    default_param: float | None
    module: type[torch.nn.Module]
    invertible: bool

    def forward(self, z: torch.Tensor, param: float | None) -> torch.Tensor:
        """:math:`a(z)` in torch ops (differentiable; the composite path and the tests' oracle)."""
        return _FORWARD[self.name](z, param)

    def derivative(self, z: torch.Tensor, param: float | None) -> torch.Tensor:
        """:math:`a'(z)` in torch ops, with torch's value at the kinks."""
        return _DERIVATIVE[self.name](z, param)

    def inverse(self, y: torch.Tensor, param: float | None) -> torch.Tensor:
        """:math:`z = a^{-1}(y)` for the invertible activations."""
        if not self.invertible:
            raise ValueError(f"activation {self.name!r} is not invertible")
        return _INVERSE[self.name](y, param)

    def make_module(self, param: float | None) -> torch.nn.Module:
        """A fresh torch.nn module computing this activation with ``param``."""
        if self.name in ("leaky_relu", "elu"):
            if param is None:
                raise ValueError(f"activation {self.name!r} needs a param, got None")
            if self.name == "leaky_relu":
                return torch.nn.LeakyReLU(param)
            return torch.nn.ELU(param)
        if self.name == "gelu":
            return torch.nn.GELU()
        return self.module()


def _gelu_derivative(z: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + z * pdf


def _silu_derivative(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


_FORWARD: dict[str, Callable] = {
    "identity": lambda z, p: z,
    "relu": lambda z, p: F.relu(z),
    "leaky_relu": lambda z, p: F.leaky_relu(z, p),
    "elu": lambda z, p: F.elu(z, p),
    "silu": lambda z, p: F.silu(z),
    "gelu": lambda z, p: F.gelu(z),
}
_DERIVATIVE: dict[str, Callable] = {
    "identity": lambda z, p: torch.ones_like(z),
    "relu": lambda z, p: (~(z <= 0)).to(z.dtype),
    "leaky_relu": lambda z, p: torch.where(z > 0, torch.ones_like(z), torch.full_like(z, p)),
    "elu": lambda z, p: torch.where(z <= 0, p * torch.exp(z), torch.ones_like(z)),
    "silu": lambda z, p: _silu_derivative(z),
    "gelu": lambda z, p: _gelu_derivative(z),
}
_INVERSE: dict[str, Callable] = {
    "identity": lambda y, p: y,
    "leaky_relu": lambda y, p: torch.where(y > 0, y, y / p),
    # log1p(y / p) for y <= 0; clamped so the branch not taken never makes NaN (y > 0 there).
    "elu": lambda y, p: torch.where(y > 0, y, torch.log1p((y / p).clamp(min=-1.0))),
}

ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", 0, None, torch.nn.Identity, True),
        Activation("relu", 1, None, torch.nn.ReLU, False),
        Activation("leaky_relu", 2, 0.01, torch.nn.LeakyReLU, True),
        Activation("elu", 3, 1.0, torch.nn.ELU, True),
        Activation("silu", 4, None, torch.nn.SiLU, False),
        Activation("gelu", 5, None, torch.nn.GELU, False),
    )
}


def get_activation(where: str, name: object) -> Activation:
    """The table's entry for ``name``; ``ValueError`` naming ``where`` for anything else."""
    if isinstance(name, str) and name in ACTIVATIONS:
        return ACTIVATIONS[name]
    raise ValueError(f"{where}: expected activation in {tuple(ACTIVATIONS)!r}, got {name!r}.")


def resolve_param(where: str, activation: Activation, param: object) -> float | None:
    """``activation_param`` checked and defaulted: a finite float for LeakyReLU and ELU
    (``None`` gives the default), ``None`` for the others (which take no parameter)."""
    if activation.default_param is None:
        if param is not None:
            raise ValueError(
                f"{where}: activation {activation.name!r} takes no activation_param, got {param!r}."
            )
        return None
    if param is None:
        return activation.default_param
    if isinstance(param, bool) or not isinstance(param, (int, float)) or not math.isfinite(param):
        raise TypeError(
            f"{where}: expected activation_param to be a finite number for {activation.name!r}, "
            f"got {param!r}."
        )
    return float(param)


def activation_module(name: str, param: float | None = None) -> torch.nn.Module:
    """A torch.nn module for ``(name, param)`` (``param=None``: the activation's default).

    Example:
        >>> activation_module("leaky_relu")
        LeakyReLU(negative_slope=0.01)
        >>> activation_from_module(torch.nn.ELU(0.5))
        ('elu', 0.5)
    """
    activation = get_activation("activation_module()", name)
    return activation.make_module(resolve_param("activation_module()", activation, param))


def activation_from_module(module: torch.nn.Module) -> tuple[str, float | None] | None:
    """``(name, param)`` when ``module`` is a plain torch.nn module computing one of the table's
    activations (its exact class; GELU without the tanh approximation; in place or not, the
    values are the same), else ``None``."""
    cls = type(module)
    if cls is torch.nn.Identity:
        return "identity", None
    if cls is torch.nn.ReLU:
        return "relu", None
    if cls is torch.nn.LeakyReLU and isinstance(module, torch.nn.LeakyReLU):
        return "leaky_relu", float(module.negative_slope)
    if cls is torch.nn.ELU and isinstance(module, torch.nn.ELU):
        return "elu", float(module.alpha)
    if cls is torch.nn.SiLU:
        return "silu", None
    if cls is torch.nn.GELU and module.approximate == "none":
        return "gelu", None
    return None
