"""The package's exception classes: each is also the class torch raises for the same mistake.

A drop-in user's code catches what torch raises. Where this package raises for a mistake torch
reports with another class (a wrong channel count: torch's ``RuntimeError``, ours a
``ValueError``), the class here derives from both, so ``except RuntimeError`` written for torch
and ``except ValueError`` written for this package both catch it; the message carries this
package's explanation and, in parentheses, torch's own words for the same mistake
(:func:`with_torch_words`), so code matching torch's text keeps working too.
"""

from __future__ import annotations

import torch

__all__ = [
    "MixedDtypeError",
    "MomentumTypeError",
    "NonFiniteStatisticsError",
    "NonFiniteStatisticsWarning",
    "NotATensorError",
    "RankError",
    "ShapeError",
    "UnsupportedDtypeError",
    "torch_dtype_name",
    "with_torch_words",
]


class NonFiniteStatisticsError(FloatingPointError):
    """A training batch had NaN or infinite statistics and the policy was ``"raise"``.

    Raised before any state changed: running statistics and ``num_batches_tracked`` are as they
    were before the call.
    """


class NonFiniteStatisticsWarning(RuntimeWarning):
    """A training batch had NaN or infinite statistics and was left out of the running ones.

    Turn it into an error with ``warnings.simplefilter("error", NonFiniteStatisticsWarning)``,
    or silence it with ``"ignore"``; modules also count such batches in
    ``nonfinite_batches_skipped``.
    """


class ShapeError(ValueError, RuntimeError):
    """A tensor of the wrong shape or device, or missing statistics (torch: ``RuntimeError``)."""


class MixedDtypeError(TypeError, RuntimeError):
    """An input whose dtype does not go with the parameters' (torch: ``RuntimeError``)."""


class UnsupportedDtypeError(TypeError, NotImplementedError):
    """A non-floating input (torch: ``NotImplementedError``, "not implemented for 'Long'")."""


class RankError(ValueError, IndexError):
    """A functional input of fewer than 2 dims (torch: ``IndexError``, dimension out of range)."""


class MomentumTypeError(ValueError, TypeError):
    """``momentum=None`` where no counter makes it meaningful (torch: ``TypeError``)."""


class NotATensorError(TypeError, AttributeError):
    """An input that is not a tensor (torch: ``AttributeError``, "has no attribute 'dim'")."""


# torch's names of the scalar types, as its "not implemented for" messages print them.
_TORCH_DTYPE_NAMES = {
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.float32: "Float",
    torch.float64: "Double",
    torch.bool: "Bool",
    torch.uint8: "Byte",
    torch.int8: "Char",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def torch_dtype_name(dtype: torch.dtype) -> str:
    """The name torch's kernels give ``dtype`` in their messages (``torch.int64`` -> ``Long``)."""
    return _TORCH_DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def with_torch_words(message: str, torch_words: str) -> str:
    """``message`` with torch's own words for the same mistake appended in parentheses.

    Example:
        >>> with_torch_words("f(): expected x, got y.", "x must be y")
        'f(): expected x, got y. (torch: x must be y)'
    """
    return f"{message} (torch: {torch_words})"
