"""Docstring fragments written once and composed into the public docstrings with str.format.

PyTorch keeps four hand-copied BatchNorm docstrings that have drifted apart; here the math, the
estimator note, the momentum note and the mutation note exist once.
"""

from __future__ import annotations

__all__ = ["FORMULA", "MODULE_DOC", "module_doc"]

FORMULA = r"""
    .. math::
        y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} \gamma + \beta
"""

MODULE_DOC = r"""Batch Normalization over {what} (Ioffe & Szegedy, 2015), on Numba CPU kernels.

    A drop-in replacement for :class:`torch.nn.{name}` (and a subclass of it): the same
    constructor, parameters, buffers, ``state_dict`` keys and ``_version``, so checkpoints move
    between the two in both directions.
{formula}
    Statistics are per channel (axis 1), over {axes}. In training mode the batch's mean and its
    *biased* variance (divide by :math:`m`, the number of values per channel) normalize the
    input. In evaluation mode the running estimates do, unless ``track_running_stats=False``,
    in which case batch statistics are used in both modes.

    Running statistics: when training with ``track_running_stats=True``, ``running_mean`` and
    ``running_var`` are updated in place after each forward,
    ``running = (1 - momentum) * running + momentum * batch``, where the batch variance folded
    in is the *unbiased* one (times :math:`m/(m-1)`, as torch does); ``num_batches_tracked`` is
    incremented. ``momentum`` is the weight of the *new* batch (the opposite of the decay
    parameter of flax and equinox); ``momentum=None`` gives the cumulative average
    ``1 / num_batches_tracked``. Every input check runs before any of this: a rejected call
    changes no buffer. A batch with no values (``N == 0``) changes nothing either (torch's
    module would still count it in ``num_batches_tracked``).

    Non-finite batches: a training batch whose mean or unbiased variance is NaN or infinite in
    any channel (or too large for the buffers' dtype) is never folded into the running
    statistics, where it would stay forever (torch keeps it: pytorch#88474; it happens, for
    example, when a float16 forward overflows and the loss scaler skips the step). With
    ``nonfinite="skip"`` (the default) the buffers and ``num_batches_tracked`` stay as they
    were, ``nonfinite_batches_skipped`` counts the batch (eager mode; not inside
    ``torch.compile`` graphs) and a :class:`batchnorm.NonFiniteStatisticsWarning` is issued.
    With ``nonfinite="raise"`` a :class:`batchnorm.NonFiniteStatisticsError` is raised instead,
    equally before any change. The policy is the attribute ``nonfinite``; layers converted from
    torch.nn by :func:`batchnorm.convert` start with ``"skip"``.

    Dtypes: CPU float32/float64 inputs run on the Numba kernels with float64 statistics and
    arithmetic, rounded once to the input dtype; other devices and dtypes fall back to torch's
    native op (see :func:`batchnorm.backend_for`). ``weight`` starts at 1 and ``bias`` at 0.

    Args:
        num_features: :math:`C`, the number of channels.
        eps: Added to the variance before the square root; must be ``>= 0``.
        momentum: Weight of the new batch in the running averages, in ``[0, 1]``, or ``None``
            for a cumulative average.
        affine: Learn a per-channel ``weight`` :math:`\gamma` and ``bias`` :math:`\beta`.
        track_running_stats: Keep running estimates for evaluation mode.
        device: Device of parameters and buffers.
        dtype: Dtype of parameters and buffers.
        bias: With ``affine``, also learn ``bias`` (torch 2.13's keyword).
        nonfinite: ``"skip"`` or ``"raise"``: what a training batch with non-finite statistics
            does (see above).

    Raises:
        TypeError: ``num_features`` not an int.
        ValueError: ``num_features < 1``, ``eps < 0``, ``momentum`` outside ``[0, 1]``, or
            ``nonfinite`` not ``"skip"``/``"raise"``.

    Shape:
        - Input: {shape}
        - Output: the shape, dtype and memory format of the input.

    Example:
        >>> import torch, batchnorm
        >>> layer = batchnorm.{name}(3)
        >>> layer({example}).shape
        torch.Size({example_shape})
"""


def module_doc(name: str, what: str, axes: str, shape: str, example: str, example_shape: str):
    return MODULE_DOC.format(
        name=name,
        what=what,
        axes=axes,
        shape=shape,
        example=example,
        example_shape=example_shape,
        formula=FORMULA.format(),
    )
