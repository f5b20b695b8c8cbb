r"""Mergeable per-channel sufficient statistics: count, mean and M2.

A :class:`Moments` summarises the values of each channel of some data by

.. math::
    n, \qquad \bar{x}_c = \frac{1}{n}\sum_i x_{i,c}, \qquad M2_c = \sum_i (x_{i,c} - \bar{x}_c)^2 .

Two summaries of disjoint data merge exactly into the summary of their union
(Chan, Golub & LeVeque 1979), so statistics can be computed piecewise and combined: across
processes (SyncBatchNorm), across ghost batches, across the batches of a population pass, or
across the blocks of a kernel. :func:`finalize` turns a summary into the mean, the biased variance
``var`` (divide by :math:`n`, what batch norm normalises with) and the unbiased ``var_unbiased``
(divide by :math:`n - 1`, what torch stores in ``running_var``).

NumPy arrays, float64 throughout; no torch. The arithmetic is the kernels':
:meth:`Moments.from_array` runs the moments kernel's blocks (:mod:`batchnorm.kernels.moments`) and
:func:`merge_moments` the one scalar merge :func:`batchnorm.kernels.moments.chan_merge`, so a
summary computed or merged here has the bits the layers' own statistics have.

Example:
    >>> a = Moments.from_array(np.array([[1.0], [2.0]]))
    >>> b = Moments.from_array(np.array([[3.0], [4.0], [5.0]]))
    >>> mean, var, var_unbiased = finalize(merge_moments(a, b))
    >>> mean, var, var_unbiased
    (array([3.]), array([2.]), array([2.5]))
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .kernels import moments as _kernels

__all__ = ["Moments", "finalize", "merge_all", "merge_moments"]


@dataclass(frozen=True, eq=False)
class Moments:
    """Count, mean and M2 of each channel of some data.

    Attributes:
        count: Number of values per channel: a Python int, or an integer array of shape ``(C,)``
            when channels have different counts. 0 means "no data" (the merge identity).
        mean: float64 array of shape ``(C,)``; the per-channel mean (0 where ``count`` is 0).
        m2: float64 array of shape ``(C,)``; the per-channel sum of squared deviations from
            ``mean`` (0 where ``count`` is 0).
    """

    count: int | np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @property
    def num_features(self) -> int:
        """Number of channels ``C``."""
        return self.mean.shape[0]

    @classmethod
    def empty(cls, num_features: int) -> Moments:
        """The summary of no data: the identity of :func:`merge_moments`.

        Args:
            num_features: Number of channels ``C``.

        Returns:
            ``Moments(0, zeros(C), zeros(C))``.
        """
        return cls(0, np.zeros(num_features), np.zeros(num_features))

    @classmethod
    def from_array(cls, x: np.ndarray) -> Moments:
        r"""Summarise the channels (axis 1) of an ``(N, C, *)`` array.

        Computed by the moments kernel in float64: shifted one-pass blocks, summed again about
        their own mean where the shift would cancel, so a large mean does not cancel a small
        spread (see :mod:`batchnorm.kernels.moments`).

        Args:
            x: Array-like of shape ``(N, C, *)``, any real dtype; converted to float64.
                ``N = 0`` gives the empty summary.

        Returns:
            The summary, with ``count = N * prod(spatial)`` as a Python int.

        Raises:
            ValueError: If ``x`` has fewer than 2 dimensions.

        Example:
            >>> s = Moments.from_array(np.array([[0.0, 10.0], [2.0, 10.0]]))
            >>> s.count, s.mean, s.m2
            (2, array([ 1., 10.]), array([2., 0.]))
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim < 2:
            raise ValueError(
                f"Moments.from_array(): expected an array of shape (N, C, *), got shape {x.shape}."
            )
        num_features = x.shape[1]
        count = x.size // num_features if num_features else 0
        if count == 0:
            return cls.empty(num_features)
        data = np.ascontiguousarray(x).reshape(x.shape[0], num_features, -1)
        mean = np.empty(num_features)
        m2 = np.empty(num_features)
        # The serial kernel: a NumPy helper starts no thread pool (and so stays safe in a
        # process made by fork).
        _kernels.moments_serial(data, mean, m2)
        return cls(count, mean, m2)


def merge_moments(a: Moments, b: Moments) -> Moments:
    r"""Summary of the union of the data summarised by ``a`` and ``b`` (Chan et al.).

    .. math::
        n = n_a + n_b, \quad \delta = \bar{x}_b - \bar{x}_a, \quad
        \bar{x} = \bar{x}_a + \delta\,\tfrac{n_b}{n}, \quad
        M2 = M2_a + M2_b + \delta^2\,\tfrac{n_a n_b}{n}

    Per channel this is :func:`batchnorm.kernels.moments.chan_merge`, the merge the kernels use
    between their blocks. A side with count 0 is an exact identity: the other side is returned
    unchanged (bit for bit), whatever mean and M2 the empty side carries; two empty sides give
    mean and M2 of 0. Equal means merge exactly (a constant channel keeps an M2 of 0). Where
    the update form of the mean is not finite, the weighted average
    :math:`\tfrac{n_a}{n}\bar{x}_a + \tfrac{n_b}{n}\bar{x}_b` is used, which keeps an infinite
    mean infinite when finite data is merged into it.

    Args:
        a: First summary.
        b: Second summary, same number of channels.

    Returns:
        The merged summary. ``count`` is ``a.count + b.count`` (int stays int).

    Raises:
        ValueError: If ``a`` and ``b`` have different numbers of channels.

    Example:
        >>> whole = Moments.from_array(np.arange(6.0).reshape(6, 1))
        >>> parts = merge_moments(
        ...     Moments.from_array(np.arange(2.0).reshape(2, 1)),
        ...     Moments.from_array(np.arange(2.0, 6.0).reshape(4, 1)),
        ... )
        >>> parts.count, parts.mean, parts.m2, whole.m2
        (6, array([2.5]), array([17.5]), array([17.5]))
    """
    if a.mean.shape != b.mean.shape:
        raise ValueError(
            f"merge_moments(): expected statistics with the same number of channels, got "
            f"{a.mean.shape} and {b.mean.shape}."
        )
    channels = a.mean.shape[0]
    counts = [
        np.ascontiguousarray(np.broadcast_to(np.asarray(m.count, np.float64), (channels,)))
        for m in (a, b)
    ]
    parts = [np.ascontiguousarray(v, dtype=np.float64) for v in (a.mean, a.m2, b.mean, b.m2)]
    merged_count = np.empty(channels)
    mean = np.empty(channels)
    m2 = np.empty(channels)
    _kernels.merge_moments_into(
        counts[0], parts[0], parts[1], counts[1], parts[2], parts[3], merged_count, mean, m2
    )
    return Moments(a.count + b.count, mean, m2)


def merge_all(parts: Iterable[Moments]) -> Moments:
    """Merge summaries left to right: ``merge_moments(merge_moments(p0, p1), p2) ...``.

    Args:
        parts: A non-empty iterable of summaries with the same number of channels.

    Returns:
        The summary of the union of all parts.

    Raises:
        ValueError: If ``parts`` is empty (the number of channels would be unknown; use
            :meth:`Moments.empty` as an explicit start), or the channel counts differ.

    Example:
        >>> parts = [Moments.from_array(np.full((2, 1), v)) for v in (1.0, 2.0, 3.0)]
        >>> merged = merge_all(parts)
        >>> merged.count, merged.mean, merged.m2
        (6, array([2.]), array([4.]))
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_all(): expected at least one Moments, got none.")
    return functools.reduce(merge_moments, parts)


def finalize(moments: Moments) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Mean, biased variance and unbiased variance of a summary.

    .. math::
        \mathrm{var} = \frac{M2}{n}, \qquad
        \mathrm{var\_unbiased} = \mathrm{var} \cdot \mathrm{bessel}, \qquad
        \mathrm{bessel} = \frac{n}{n - 1}

    ``var`` is what batch norm normalises with; ``var_unbiased`` is what torch folds into
    ``running_var``.

    Args:
        moments: The summary.

    Returns:
        ``(mean, var, var_unbiased)``, float64 arrays of shape ``(C,)``. Where the count is 0,
        all three are NaN; where it is 1, ``var`` is 0 and ``var_unbiased`` is NaN (one value
        says nothing about the spread; torch's ``var(unbiased=True)`` of one value is NaN too).

    Example:
        >>> finalize(Moments.from_array(np.array([[1.0, 5.0], [3.0, 5.0]])))
        (array([2., 5.]), array([1., 0.]), array([2., 0.]))
        >>> finalize(Moments.from_array(np.array([[7.0]])))
        (array([7.]), array([0.]), array([nan]))
    """
    m = np.asarray(moments.count, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = moments.m2 / m
        bessel = m / (m - 1)
        var_unbiased = var * bessel
    mean = np.where(m > 0, moments.mean, np.nan)
    var = np.where(m > 0, var, np.nan)
    var_unbiased = np.where(m > 1, var_unbiased, np.nan)
    return mean, var, var_unbiased
