r"""Batch Normalization as the paper writes it: the specification and the test oracle.

Plain NumPy in float64, written to be read rather than to be fast. Every other implementation in
the package (the Numba kernels, the torch op, the modules) is tested against these functions.

Names follow Ioffe & Szegedy (2015). Their torch counterparts:

============  ==========================  =============================================
paper         here                        torch
============  ==========================  =============================================
gamma         ``gamma``                   ``weight``
beta          ``beta``                    ``bias``
mu_B          ``mu_B``                    batch mean (``save_mean``)
sigma_B^2     ``sigma2_B``                biased batch variance
x_hat         ``x_hat``                   normalized input
E[x]          ``mean``                    ``running_mean`` (population estimate)
Var[x]        ``var_unbiased``            ``running_var`` (population estimate)
m             ``m``                       values per channel: ``N * prod(spatial)``
============  ==========================  =============================================

Layout: ``x`` has shape ``(N, C, *)``; the channel axis is 1 and statistics are taken over every
other axis (Sec. 3.2 of the paper: for convolutions, one gamma/beta per feature map, statistics
over the batch *and* the spatial locations).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

__all__ = [
    "activation",
    "activation_derivative",
    "batch_norm_act_train",
    "batch_norm_act_train_backward",
    "batch_norm_train",
    "batch_norm_train_backward",
    "batch_norm_inference",
    "batch_norm_inference_backward",
    "population_statistics",
    "update_running_statistics",
]


def _reduce_axes(x: np.ndarray) -> tuple[int, ...]:
    if x.ndim < 2:
        raise ValueError(f"expected x of shape (N, C, *), got shape {x.shape}.")
    return (0, *range(2, x.ndim))


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a ``(C,)`` vector so that it broadcasts along axis 1 of an ``ndim`` array."""
    return np.asarray(v, dtype=np.float64).reshape((1, -1) + (1,) * (ndim - 2))


def batch_norm_train(
    x: np.ndarray,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Algorithm 1: the Batch Normalizing Transform over one mini-batch.

    .. math::
        \mu_B = \frac{1}{m}\sum_i x_i, \qquad
        \sigma_B^2 = \frac{1}{m}\sum_i (x_i - \mu_B)^2, \qquad
        \hat{x}_i = \frac{x_i - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}, \qquad
        y_i = \gamma \hat{x}_i + \beta

    The variance that normalizes is the *biased* one (divide by :math:`m`), as in the paper and
    in torch.

    Args:
        x: Input of shape ``(N, C, *)``, any real dtype; computed in float64.
        gamma: Per-channel scale, shape ``(C,)``; ``None`` means 1.
        beta: Per-channel shift, shape ``(C,)``; ``None`` means 0.
        eps: Added to the variance before the square root.

    Returns:
        ``(y, mu_B, sigma2_B)``: ``y`` float64 of the shape of ``x``; the batch mean and biased
        batch variance, float64 of shape ``(C,)``.

    Example:
        >>> y, mu, var = batch_norm_train(np.array([[1.0], [3.0]]))
        >>> mu, var
        (array([2.]), array([1.]))
        >>> np.round(y.ravel(), 4)
        array([-1.,  1.])
    """
    x = np.asarray(x, dtype=np.float64)
    axes = _reduce_axes(x)
    mu_B = x.mean(axis=axes)
    # Two passes (mean first, then squared deviations) so that a large mean cannot cancel the
    # variance away: this is the numerically trustworthy form the kernels are measured against.
    sigma2_B = ((x - _per_channel(mu_B, x.ndim)) ** 2).mean(axis=axes)
    x_hat = (x - _per_channel(mu_B, x.ndim)) / np.sqrt(_per_channel(sigma2_B, x.ndim) + eps)
    y = x_hat
    if gamma is not None:
        y = y * _per_channel(gamma, x.ndim)
    if beta is not None:
        y = y + _per_channel(beta, x.ndim)
    return y, mu_B, sigma2_B


def batch_norm_train_backward(
    dy: np.ndarray, x: np.ndarray, gamma: np.ndarray | None = None, eps: float = 1e-5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Exact gradients of Algorithm 1 with respect to ``x``, ``gamma`` and ``beta``.

    With :math:`\sigma = \sqrt{\sigma_B^2 + \epsilon}` and sums over the :math:`m` values of a
    channel, the chain rule through :math:`\mu_B` and :math:`\sigma_B^2` (paper, Sec. 3) gives

    .. math::
        \frac{\partial \ell}{\partial \hat{x}_i} = \frac{\partial \ell}{\partial y_i}\,\gamma

        \frac{\partial \ell}{\partial \sigma_B^2}
            = -\tfrac{1}{2}\,\sigma^{-3}
              \sum_i \frac{\partial \ell}{\partial \hat{x}_i}(x_i - \mu_B)

        \frac{\partial \ell}{\partial \mu_B}
            = -\sigma^{-1}\sum_i \frac{\partial \ell}{\partial \hat{x}_i}
            \quad\text{(the term through } \sigma_B^2 \text{ vanishes:}
            \textstyle\sum_i (x_i - \mu_B) = 0)

        \frac{\partial \ell}{\partial x_i} = \frac{\partial \ell}{\partial \hat{x}_i}\,\sigma^{-1}
            + \frac{\partial \ell}{\partial \sigma_B^2}\,\frac{2(x_i - \mu_B)}{m}
            + \frac{\partial \ell}{\partial \mu_B}\,\frac{1}{m}

    which collapses to the form every kernel implements:

    .. math::
        \frac{\partial \ell}{\partial x_i} = \frac{\gamma}{m\,\sigma}
            \Big(m\,\delta_i - \sum_j \delta_j - \hat{x}_i \sum_j \delta_j \hat{x}_j\Big),
            \qquad \delta = \frac{\partial \ell}{\partial y}

        \frac{\partial \ell}{\partial \gamma} = \sum_i \delta_i \hat{x}_i, \qquad
        \frac{\partial \ell}{\partial \beta} = \sum_i \delta_i

    Args:
        dy: Gradient of the loss with respect to ``y``, shape of ``x``.
        x: The forward input, shape ``(N, C, *)``.
        gamma: Per-channel scale used in the forward pass; ``None`` means 1.
        eps: The forward pass's epsilon.

    Returns:
        ``(dx, dgamma, dbeta)`` in float64; ``dx`` has the shape of ``x``, the others ``(C,)``.
    """
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    axes = _reduce_axes(x)
    m = x.size // x.shape[1]
    _, mu_B, sigma2_B = batch_norm_train(x, eps=eps)
    inv_sigma = 1.0 / np.sqrt(sigma2_B + eps)
    x_hat = (x - _per_channel(mu_B, x.ndim)) * _per_channel(inv_sigma, x.ndim)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * x_hat).sum(axis=axes)
    g = np.ones(x.shape[1]) if gamma is None else np.asarray(gamma, dtype=np.float64)
    dx = _per_channel(g * inv_sigma / m, x.ndim) * (
        m * dy - _per_channel(dbeta, x.ndim) - x_hat * _per_channel(dgamma, x.ndim)
    )
    return dx, dgamma, dbeta


def batch_norm_inference(
    x: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    eps: float = 1e-5,
) -> np.ndarray:
    r"""Algorithm 2, step 11: the inference transform with fixed population statistics.

    .. math::
        y = \frac{\gamma}{\sqrt{\mathrm{Var}[x] + \epsilon}}\, x
            + \Big(\beta - \frac{\gamma\,\mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}\Big)

    computed here in the equivalent, better-conditioned order
    :math:`\gamma (x - \mathrm{E}[x]) / \sqrt{\mathrm{Var}[x] + \epsilon} + \beta`.

    Args:
        x: Input of shape ``(N, C, *)``; computed in float64.
        mean: Population mean :math:`\mathrm{E}[x]`, shape ``(C,)``.
        var: Population variance :math:`\mathrm{Var}[x]`, shape ``(C,)`` (the unbiased estimate,
            as :func:`population_statistics` returns and torch's ``running_var`` holds).
        gamma: Per-channel scale; ``None`` means 1.
        beta: Per-channel shift; ``None`` means 0.
        eps: Added to the variance before the square root.

    Returns:
        ``y``, float64 of the shape of ``x``. Nothing about ``x`` is measured: the output of one
        example does not depend on the others in the batch.
    """
    x = np.asarray(x, dtype=np.float64)
    _reduce_axes(x)
    y = (x - _per_channel(mean, x.ndim)) / np.sqrt(_per_channel(var, x.ndim) + eps)
    if gamma is not None:
        y = y * _per_channel(gamma, x.ndim)
    if beta is not None:
        y = y + _per_channel(beta, x.ndim)
    return y


def batch_norm_inference_backward(
    dy: np.ndarray,
    x: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    gamma: np.ndarray | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Gradients of :func:`batch_norm_inference`: an affine map per channel.

    .. math::
        \frac{\partial \ell}{\partial x}
            = \frac{\gamma\,\delta}{\sqrt{\mathrm{Var}[x]+\epsilon}},\qquad
        \frac{\partial \ell}{\partial \gamma} = \sum \delta\,\hat{x},\qquad
        \frac{\partial \ell}{\partial \beta} = \sum \delta

    Returns:
        ``(dx, dgamma, dbeta)`` in float64.
    """
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    axes = _reduce_axes(x)
    inv_sigma = 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)
    x_hat = (x - _per_channel(mean, x.ndim)) * _per_channel(inv_sigma, x.ndim)
    g = np.ones(x.shape[1]) if gamma is None else np.asarray(gamma, dtype=np.float64)
    dx = dy * _per_channel(g * inv_sigma, x.ndim)
    return dx, (dy * x_hat).sum(axis=axes), dy.sum(axis=axes)


def population_statistics(
    batches: Iterable[np.ndarray], method: str = "pooled"
) -> tuple[np.ndarray, np.ndarray]:
    r"""Algorithm 2, steps 8-10: population mean and variance from many mini-batches.

    ``method="paper"`` is the paper's estimator: with :math:`B` batches of :math:`m` values each,

    .. math::
        \mathrm{E}[x] = \mathrm{E}_B[\mu_B], \qquad
        \mathrm{Var}[x] = \frac{m}{m-1}\,\mathrm{E}_B[\sigma_B^2]

    ``method="pooled"`` treats all batches as one sample (mean and unbiased variance of the
    concatenation), which is exact for batches of unequal size.

    Args:
        batches: Iterable of arrays of shape ``(N_b, C, *)``.
        method: ``"pooled"`` or ``"paper"``.

    Returns:
        ``(mean, var_unbiased)``, float64 arrays of shape ``(C,)``.

    Example:
        >>> population_statistics([np.array([[0.0], [2.0]]), np.array([[4.0], [6.0]])])
        (array([3.]), array([6.66666667]))
    """
    batches = [np.asarray(b, dtype=np.float64) for b in batches]
    if not batches:
        raise ValueError("population_statistics(): expected at least one batch, got none.")
    if method == "pooled":
        channels_last = [np.moveaxis(b, 1, -1).reshape(-1, b.shape[1]) for b in batches]
        allx = np.concatenate(channels_last, axis=0)
        m = allx.shape[0]
        bessel = m / (m - 1)
        return allx.mean(axis=0), allx.var(axis=0) * bessel
    if method == "paper":
        stats = [batch_norm_train(b)[1:] for b in batches]
        m = batches[0].size // batches[0].shape[1]
        bessel = m / (m - 1)
        mean = np.mean([s[0] for s in stats], axis=0)
        var_unbiased = bessel * np.mean([s[1] for s in stats], axis=0)
        return mean, var_unbiased
    raise ValueError(
        f"population_statistics(): expected method 'pooled' or 'paper', got {method!r}."
    )


def update_running_statistics(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    mu_B: np.ndarray,
    sigma2_B: np.ndarray,
    m: int,
    momentum: float,
) -> tuple[np.ndarray, np.ndarray]:
    r"""One update of torch's running averages after a training step.

    .. math::
        \hat{\mu} \leftarrow (1 - \alpha)\,\hat{\mu} + \alpha\,\mu_B, \qquad
        \hat{\sigma}^2 \leftarrow (1 - \alpha)\,\hat{\sigma}^2 + \alpha\,\frac{m}{m-1}\,\sigma_B^2

    :math:`\alpha` is torch's ``momentum`` (the weight of the *new* batch: the opposite of the
    decay parameter of flax and equinox). The variance folded in is the unbiased one.

    Returns:
        ``(running_mean, running_var)``, new float64 arrays.
    """
    bessel = m / (m - 1)
    running_mean = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mu_B
    running_var = (1 - momentum) * np.asarray(running_var, np.float64)
    running_var = running_var + momentum * bessel * sigma2_B
    return running_mean, running_var


def activation(z: np.ndarray, name: str, p: float | None = None) -> np.ndarray:
    r"""The activations a BatchNorm layer may apply after normalizing (``batchnorm.activations``).

    ``identity`` :math:`z`; ``relu`` :math:`\max(z, 0)`; ``leaky_relu`` :math:`z` if
    :math:`z > 0` else :math:`pz`; ``elu`` :math:`z` or :math:`p(e^z - 1)`; ``silu``
    :math:`z/(1 + e^{-z})`; ``gelu``
    :math:`z\,\Phi(z) = \tfrac{z}{2}(1 + \mathrm{erf}(z/\sqrt{2}))`.

    Example:
        >>> activation(np.array([-2.0, 3.0]), "leaky_relu", 0.1)
        array([-0.2,  3. ])
    """
    z = np.asarray(z, dtype=np.float64)
    if name == "identity":
        return z.copy()
    if name == "relu":
        return np.where(z > 0, z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, p * z)
    if name == "elu":
        return np.where(z > 0, z, p * np.expm1(np.minimum(z, 0.0)))
    if name == "silu":
        return z / (1.0 + np.exp(-z))
    if name == "gelu":
        return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))
    raise ValueError(f"activation(): unknown activation {name!r}")


def activation_derivative(z: np.ndarray, name: str, p: float | None = None) -> np.ndarray:
    r""":math:`a'(z)` of :func:`activation`, taking the :math:`z \le 0` branch at the kinks.

    ``silu``: :math:`s(1 + z(1 - s))` with :math:`s` the logistic of :math:`z`; ``gelu``:
    :math:`\Phi(z) + z\varphi(z)`.
    """
    z = np.asarray(z, dtype=np.float64)
    if name == "identity":
        return np.ones_like(z)
    if name == "relu":
        return np.where(z > 0, 1.0, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, p * np.ones_like(z))
    if name == "elu":
        return np.where(z > 0, 1.0, p * np.exp(np.minimum(z, 0.0)))
    if name == "silu":
        s = 1.0 / (1.0 + np.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    if name == "gelu":
        cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
        return cdf + z * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    raise ValueError(f"activation_derivative(): unknown activation {name!r}")


def _erf(v):
    return np.vectorize(math.erf, otypes=[np.float64])(v)


def batch_norm_act_train(
    x: np.ndarray,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    eps: float = 1e-5,
    name: str = "relu",
    p: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Algorithm 1 followed by an activation: :math:`y = a(\gamma\hat{x} + \beta)`.

    Returns:
        ``(y, mu_B, sigma2_B)`` as :func:`batch_norm_train`.
    """
    z, mu_B, sigma2_B = batch_norm_train(x, gamma, beta, eps)
    return activation(z, name, p), mu_B, sigma2_B


def batch_norm_act_train_backward(
    dy: np.ndarray,
    x: np.ndarray,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    eps: float = 1e-5,
    name: str = "relu",
    p: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Gradients of :func:`batch_norm_act_train`: :math:`\delta_z = \delta\,a'(z)` through
    :func:`batch_norm_train_backward`.

    Returns:
        ``(dx, dgamma, dbeta)`` in float64.
    """
    z, _, _ = batch_norm_train(x, gamma, beta, eps)
    dz = np.asarray(dy, dtype=np.float64) * activation_derivative(z, name, p)
    return batch_norm_train_backward(dz, x, gamma, eps)
