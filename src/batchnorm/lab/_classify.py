"""One short classifier training run, measured: what the claims experiments' units share.

:func:`train_classifier` trains a model with plain SGD (optionally momentum and weight decay)
on the seeded mini-batches of :func:`batchnorm.lab._training.batch_indices`, measures it in
eval mode every ``eval_every`` steps, and stops early, marked *diverged*, once the training
loss is not finite. :func:`diverged` also calls a run diverged whose training loss never went
below where it started (the issue's "non-finite or not-decreasing loss").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import _checks as check
from ._training import batch_indices, denormals_flushed, threads, trailing_mean

__all__ = [
    "CURVE_KEYS",
    "best_smoothed",
    "check_curve",
    "diverged",
    "evaluate",
    "finite_or_none",
    "train_classifier",
]

# The per-measurement series of a curve (each a list as long as ``steps``).
CURVE_KEYS = ("train_loss", "val_accuracy", "val_loss")


def finite_or_none(value: float) -> float | None:
    """``value`` as a float, or ``None`` if it is not finite (JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` in eval mode on ``(x, y)``; the model's
    mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y).item()
            accuracy = (logits.argmax(dim=1) == y).double().mean().item()
    finally:
        model.train(was_training)
    return accuracy, loss


def train_classifier(
    model: nn.Module,
    data: Any,
    *,
    lr: float,
    steps: int,
    batch_size: int,
    seed: int,
    eval_every: int,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    advance: Callable[[int], None] | None = None,
    after_step: Callable[[int, nn.Module], None] | None = None,
    lr_at: Callable[[int], float] | None = None,
    n_threads: int | None = 1,
    flush_denormals: bool = True,
) -> dict[str, Any]:
    """Train ``model`` on ``data`` (a :class:`~batchnorm.lab.data.Dataset` with a validation
    split) and return its curve.

    Args:
        model: In training mode; trained in place.
        data: ``x_train``, ``y_train``, ``x_val``, ``y_val``, ``x_test``, ``y_test``.
        lr: Learning rate of ``torch.optim.SGD``.
        steps: SGD steps.
        batch_size: Examples per step (seeded permutations per epoch, drop-last).
        seed: The batch order's seed.
        eval_every: Steps between measurements (step 0 and the last step are measured too).
        momentum, weight_decay: Of ``torch.optim.SGD``.
        advance: Called with 1 after each step (and with the steps skipped when training
            stops early), for the progress bar.
        after_step: Called as ``after_step(step, model)`` after each step (counted from 1).
        lr_at: A schedule: step ``t`` (counted from 0) runs with learning rate ``lr_at(t)``
            instead of ``lr``.
        n_threads: torch's and Numba's threads while training (``None``: leave them).
        flush_denormals: Flush float32 denormals while training (see
            :func:`batchnorm.lab._training.denormals_flushed`).

    Returns:
        ``{"curve": {"steps", "train_loss", "val_accuracy", "val_loss"}, "diverged",
        "diverged_at", "first_loss", "test_accuracy", "test_loss", "train_accuracy",
        "train_eval_loss"}``; ``train_loss`` is the mean training loss since the previous
        measurement (``None`` at step 0), the final numbers are ``None`` for a diverged run.
    """
    if data.x_val is None:
        raise ValueError("train_classifier(): expected data with a validation split, got none.")
    advance = advance or (lambda n: None)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    n_train = len(data.y_train)
    cache: dict = {}
    curve: dict[str, list] = {"steps": [], **{k: [] for k in CURVE_KEYS}}
    running, counted = 0.0, 0
    first_loss: float | None = None
    diverged_at: int | None = None

    def measure(step: int) -> None:
        accuracy, loss = evaluate(model, data.x_val, data.y_val)
        curve["steps"].append(step)
        curve["train_loss"].append(running / counted if counted else None)
        curve["val_accuracy"].append(finite_or_none(accuracy))
        curve["val_loss"].append(finite_or_none(loss))

    with threads(n_threads), denormals_flushed(flush_denormals):
        model.train()
        measure(0)
        for step in range(1, steps + 1):
            index = batch_indices(seed, step - 1, n_train, batch_size, cache)
            loss = nn.functional.cross_entropy(model(data.x_train[index]), data.y_train[index])
            value = loss.item()
            if not math.isfinite(value):
                diverged_at = step
                advance(steps - step + 1)
                break
            first_loss = value if first_loss is None else first_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if lr_at is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step - 1)
            optimizer.step()
            running += value
            counted += 1
            if after_step is not None:
                after_step(step, model)
            if step % eval_every == 0 or step == steps:
                measure(step)
                running, counted = 0.0, 0
            advance(1)
        out: dict[str, Any] = {
            "curve": curve,
            "diverged": diverged_at is not None,
            "diverged_at": diverged_at,
            "first_loss": first_loss,
        }
        finals = ("test_accuracy", "test_loss", "train_accuracy", "train_eval_loss")
        if diverged_at is None:
            test = evaluate(model, data.x_test, data.y_test)
            train = evaluate(model, data.x_train, data.y_train)
            for key, value in zip(finals, (*test, *train), strict=True):
                out[key] = finite_or_none(value)
        else:
            out.update(dict.fromkeys(finals))
    return out


def diverged(run: Mapping[str, Any]) -> bool:
    """Whether a :func:`train_classifier` run diverged: its loss became non-finite, or its
    last measured training loss is not below its first step's loss."""
    if run["diverged"]:
        return True
    losses = [v for v in run["curve"]["train_loss"] if v is not None]
    first = run["first_loss"]
    return first is None or not losses or not losses[-1] < first


def best_smoothed(values: Sequence[float | None], width: int) -> float:
    """The best trailing mean of ``width`` measurements (``None`` counts as NaN); NaN if none."""
    clean = [math.nan if v is None else float(v) for v in values]
    if not clean or all(math.isnan(v) for v in clean):
        return math.nan
    smoothed = trailing_mean(clean, width)
    finite = [v for v in smoothed if math.isfinite(v)]
    return max(finite) if finite else math.nan


def check_curve(run: Any, where: str, n_measured: int | None = None) -> None:
    """Raise ``ValueError`` unless ``run`` is a :func:`train_classifier` result."""
    curve = check.item(run, "curve", where)
    steps = check.item(curve, "steps", check.at(where, "curve"))
    if not isinstance(steps, list) or not steps:
        raise ValueError(
            f"expected {where}['curve']['steps'] to be a non-empty list, got "
            f"{check.describe(steps)}."
        )
    if n_measured is not None and not check.item(run, "diverged", where):
        check.equal(len(steps), n_measured, f"the length of {where}['curve']['steps']")
    for key in CURVE_KEYS:
        values = check.item(curve, key, check.at(where, "curve"))
        if not isinstance(values, list) or len(values) != len(steps):
            raise ValueError(
                f"expected {where}['curve'][{key!r}] to be a list of {len(steps)} values, got "
                f"{check.describe(values)}."
            )
    for key in ("diverged", "diverged_at", "first_loss", "test_accuracy", "test_loss"):
        check.item(run, key, where)
