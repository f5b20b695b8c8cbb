r"""The activations of :mod:`batchnorm.activations` as scalar Numba functions, by integer code.

``apply(z, code, p)`` is :math:`a(z)` and ``derivative(z, code, p)`` is :math:`a'(z)`, both in
float64. The fused kernels call them in their inner loops with a ``code`` that is the same for
the whole call: LLVM hoists the branch out of the loop (loop unswitching), so the identity path
runs the plain normalization's loop. Codes: 0 identity, 1 ReLU, 2 LeakyReLU (``p`` its negative
slope), 3 ELU (``p`` its alpha), 4 SiLU, 5 GELU (exact). NaN propagates as in torch: every
branch test is ``z > 0``, false for NaN, and the ``z <= 0`` branches keep a NaN.
"""

from __future__ import annotations

import math

from ._config import njit_kernel

__all__ = ["IDENTITY", "apply", "derivative", "derivative_from_output", "invert"]

IDENTITY = 0
RELU = 1
LEAKY_RELU = 2
ELU = 3
SILU = 4
GELU = 5

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@njit_kernel(inline="always")
def apply(z, code, p):
    """:math:`a(z)` for activation ``code`` with parameter ``p``."""
    if code == IDENTITY:
        return z
    if code == RELU:
        return z if not z <= 0.0 else 0.0
    if code == LEAKY_RELU:
        return z if z > 0.0 else z * p
    if code == ELU:
        return z if z > 0.0 else p * math.expm1(z)
    if code == SILU:
        return z / (1.0 + math.exp(-z))
    return 0.5 * z * (1.0 + math.erf(z * _INV_SQRT2))


@njit_kernel(inline="always")
def derivative(z, code, p):
    """:math:`a'(z)` for activation ``code``: torch's value at the kinks (the ``z <= 0`` side)
    and at NaN (the branch torch's backward takes for it)."""
    if code == IDENTITY:
        return 1.0
    if code == RELU:
        return 0.0 if z <= 0.0 else 1.0
    if code == LEAKY_RELU:
        return 1.0 if z > 0.0 else p
    if code == ELU:
        return p * math.exp(z) if z <= 0.0 else 1.0
    if code == SILU:
        s = 1.0 / (1.0 + math.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    cdf = 0.5 * (1.0 + math.erf(z * _INV_SQRT2))
    return cdf + z * math.exp(-0.5 * z * z) * _INV_SQRT_2PI


@njit_kernel(inline="always")
def invert(y, code, p):
    """:math:`z = a^{-1}(y)` for the invertible codes (identity, LeakyReLU and ELU, ``p > 0``)."""
    if code == LEAKY_RELU:
        return y if y > 0.0 else y / p
    if code == ELU:
        return y if y > 0.0 else math.log1p(max(y / p, -1.0))
    return y


@njit_kernel(inline="always")
def derivative_from_output(y, code, p):
    """:math:`a'(z)` from :math:`y = a(z)` for the invertible codes, as torch's in-place
    LeakyReLU and ELU take it: ``p`` where ``y <= 0`` (LeakyReLU), ``y + p`` there (ELU:
    :math:`pe^z`, without an exponential)."""
    if code == LEAKY_RELU:
        return 1.0 if y > 0.0 else p
    if code == ELU:
        return 1.0 if y > 0.0 else y + p
    return 1.0
