"""Checks of what a run reads back: a seed's result, a checkpoint's training state.

Each check raises ``ValueError("expected <what>, got <what>.")`` and names the entry by its
path in the data, such as ``result['networks']['bn']['steps']``; the runner puts the file in
front (house style b.4). The experiments use them to say what their results and checkpoints
hold, so that a file that was cut short, changed by hand or written by another configuration
is refused before it is trusted, not found out by a ``KeyError`` in the middle of a run or,
worse, not found out at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "array",
    "at",
    "describe",
    "equal",
    "integer",
    "item",
    "number",
    "numbers",
    "sgd_state",
    "tensors",
]


def at(where: str, key: Any) -> str:
    """The path of ``key`` inside ``where``: ``at("result", "seed") == "result['seed']"``."""
    return f"{where}[{key!r}]"


def describe(value: Any) -> str:
    """A short description of a value for an error message (never the whole of a big one)."""
    if isinstance(value, Mapping):
        keys = [str(k) for k in list(value)[:8]]
        more = ", ..." if len(value) > 8 else ""
        return f"a dict with keys [{', '.join(keys)}{more}]" if value else "an empty dict"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def item(data: Any, key: str, where: str) -> Any:
    """``data[key]``, requiring ``data`` to be a dict holding ``key``."""
    if not isinstance(data, Mapping):
        raise ValueError(f"expected {where} to be a dict, got {describe(data)}.")
    if key not in data:
        raise ValueError(f"expected {where} to have the key {key!r}, got {describe(data)}.")
    return data[key]


def equal(value: Any, want: Any, where: str) -> None:
    """Require ``value == want`` (lists and tuples compare as lists)."""
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(want, tuple):
        want = list(want)
    same_kind = type(value) is type(want) or (_is_number(value) and _is_number(want))
    if not same_kind or value != want:
        shown = repr(want) if len(repr(want)) <= 60 else describe(want)
        raise ValueError(f"expected {where} to be {shown}, got {describe(value)}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number(value: Any, where: str, *, low: float = -math.inf) -> float:
    """Require a finite int or float ``>= low``; return it as a float."""
    if not (_is_number(value) and math.isfinite(value) and value >= low):
        bound = "" if low == -math.inf else f" >= {low:g}"
        raise ValueError(f"expected {where} to be a finite number{bound}, got {describe(value)}.")
    return float(value)


def integer(value: Any, where: str, allowed: Sequence[int], expected: str) -> int:
    """Require an int (not a bool) among ``allowed``; ``expected`` says which in words."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value in allowed):
        raise ValueError(f"expected {where} to be {expected}, got {describe(value)}.")
    return value


def numbers(value: Any, where: str, length: int, *, none_first: bool = False) -> None:
    """Require a list of ``length`` finite numbers; with ``none_first`` the first may be None."""
    expected = f"a list of {length} finite numbers" + (" (the first may be None)" * none_first)
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise ValueError(f"expected {where} to be {expected}, got {describe(value)}.")
    for k, v in enumerate(value):
        if not ((none_first and k == 0 and v is None) or (_is_number(v) and math.isfinite(v))):
            raise ValueError(f"expected {where} to be {expected}, got {describe(v)} at {k}.")


def array(value: Any, where: str, shape: tuple[int, ...]) -> None:
    """Require nested lists of finite numbers of this shape."""
    expected = f"nested lists of finite numbers of shape {shape}"
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"expected {where} to be {expected}, got ragged or non-numeric lists."
        ) from err
    if a.shape != shape or not np.isfinite(a).all():
        got = f"shape {a.shape}" if a.shape != shape else "non-finite values"
        raise ValueError(f"expected {where} to be {expected}, got {got}.")


def tensors(value: Any, reference: Mapping[str, torch.Tensor], where: str) -> None:
    """Require a state dict with exactly ``reference``'s keys, shapes and dtypes."""
    if not isinstance(value, Mapping):
        raise ValueError(f"expected {where} to be a state dict, got {describe(value)}.")
    missing = [k for k in reference if k not in value]
    unknown = [k for k in value if k not in reference]
    if missing or unknown:
        raise ValueError(
            f"expected {where} to hold the model's tensors {list(reference)}, got one "
            + (f"without {missing}" if missing else f"with unknown {unknown}")
            + "."
        )
    for key, want in reference.items():
        got = value[key]
        if not (
            isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype
        ):
            raise ValueError(
                f"expected {at(where, key)} to be a tensor of shape {tuple(want.shape)} and "
                f"dtype {want.dtype}, got {describe(got)}."
            )


def sgd_state(value: Any, n_params: int, lr: float, where: str) -> None:
    """Require the state dict of a plain ``torch.optim.SGD`` over ``n_params`` parameters."""
    groups = item(value, "param_groups", where)
    state = item(value, "state", where)
    if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], Mapping)):
        raise ValueError(
            f"expected {at(where, 'param_groups')} to be a list of one dict, got "
            f"{describe(groups)}."
        )
    group = at(at(where, "param_groups"), 0)
    equal(item(groups[0], "params", group), list(range(n_params)), at(group, "params"))
    equal(item(groups[0], "lr", group), lr, at(group, "lr"))
    if not isinstance(state, Mapping) or not all(
        k in range(n_params) and isinstance(v, Mapping) for k, v in state.items()
    ):
        raise ValueError(
            f"expected {at(where, 'state')} to map parameter indices to dicts, got "
            f"{describe(state)}."
        )
