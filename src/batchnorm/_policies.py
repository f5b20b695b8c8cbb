"""The layers' policies and how messages name their caller: what a layer does with a batch of
non-finite statistics (``nonfinite``) or of one value per channel (``single_value``), the checks
of those arguments, and the reports and errors they lead to. Split from :mod:`._validate`,
which re-exports every name here, so callers import them from either.
"""

from __future__ import annotations

import warnings

import numpy as np

from ._errors import NonFiniteStatisticsError, NonFiniteStatisticsWarning, with_torch_words

__all__ = [
    "NONFINITE_POLICIES",
    "SINGLE_VALUE_POLICIES",
    "caller_name",
    "check_nonfinite_policy",
    "check_single_value_policy",
    "layer_name",
    "report_nonfinite",
    "single_value_error",
]

# What to do with a training batch whose statistics are NaN or infinite (in the dtype of the
# running buffers): leave the running statistics as they were and warn, or raise. There is
# deliberately no "fold it in" choice: a NaN in a running average never leaves it (pytorch#88474).
NONFINITE_POLICIES = ("skip", "raise")

# A layer's training batch of one value per channel: raise (torch), or use the running stats.
SINGLE_VALUE_POLICIES = ("raise", "use_running")


def caller_name(where) -> str:
    """The caller's name for a message: ``where`` itself, or its value if it is a callable.

    Layers pass a callable so that the name is only formatted when there is an error to
    report: forward runs on every batch, errors almost never.
    """
    return where() if callable(where) else where


_name = caller_name


def layer_name(layer) -> str:
    """How a message names a layer: its class and ``num_features``, as the user built it."""
    return f"{type(layer).__name__}(num_features={layer.num_features})"


def report_nonfinite(nonfinite: str, where, mean, var) -> None:
    """Report a training batch left out of the running statistics: raise, or warn.

    Args:
        nonfinite: ``"raise"`` (raise :class:`NonFiniteStatisticsError`) or ``"skip"`` (warn
            with :class:`NonFiniteStatisticsWarning`).
        where: The caller's name (or a callable returning it).
        mean, var: The batch's per-channel statistics; the non-finite channels are named.
    """
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    bad = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(var)))
    shown = ", ".join(map(str, bad[:8])) + (", ..." if bad.size > 8 else "")
    what = (
        f"the batch's mean or variance is NaN or infinite (in channels {shown})"
        if bad.size
        else "the batch's variance is too large for the running statistics' dtype"
    )
    if nonfinite == "raise":
        raise NonFiniteStatisticsError(
            f"{_name(where)}: expected finite batch statistics, but {what}; the running "
            "statistics and num_batches_tracked were left unchanged."
        )
    warnings.warn(
        NonFiniteStatisticsWarning(
            f"{_name(where)}: {what}; this batch was left out of the running statistics "
            "(and not counted in num_batches_tracked). Pass nonfinite='raise' to stop instead."
        ),
        stacklevel=3,
    )


def check_nonfinite_policy(where, nonfinite) -> None:
    """Reject a policy for non-finite batch statistics that is not one of NONFINITE_POLICIES.

    Raises:
        ValueError: ``nonfinite`` is not ``"skip"`` or ``"raise"``.
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(
            f"{_name(where)}: expected nonfinite to be one of "
            f"{', '.join(map(repr, NONFINITE_POLICIES))}, got {nonfinite!r}."
        )


def check_single_value_policy(where, single_value, track_running_stats: bool) -> None:
    """ValueError for a policy not in SINGLE_VALUE_POLICIES, or "use_running" without stats."""
    if single_value not in SINGLE_VALUE_POLICIES:
        raise ValueError(
            f"{_name(where)}: expected single_value to be one of "
            f"{', '.join(map(repr, SINGLE_VALUE_POLICIES))}, got {single_value!r}."
        )
    if single_value == "use_running" and not track_running_stats:
        raise ValueError(
            f"{_name(where)}: expected track_running_stats=True with "
            "single_value='use_running' (it normalizes with the running statistics), got "
            "track_running_stats=False. Keep running statistics, or use single_value='raise'."
        )


def single_value_error(where, input, count: int | None = None) -> ValueError:
    """The error for fewer than 2 values per channel in training; ``count``: a mask's real ones."""
    given = f"input of shape {tuple(input.shape)}"
    if count is not None:
        given = f"{count} value(s) per channel that mask marks as real, in {given}"
    return ValueError(
        with_torch_words(
            f"{_name(where)}: expected more than 1 value per channel when using batch "
            f"statistics (training), got {given}.",
            f"Expected more than 1 value per channel when training, got input size {input.size()}",
        )
    )
