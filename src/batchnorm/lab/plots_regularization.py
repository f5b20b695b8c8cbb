"""Figures of the regularization experiment: ``plot_<what>(result, ax=None) -> Figure``.

The conventions of :mod:`batchnorm.lab.plots`: figures are :class:`matplotlib.figure.Figure`
objects outside pyplot, a function draws into ``ax`` if given and returns its figure, every
seed is shown next to the mean, and the network without regularizer and the one with BN keep
the lab's colour pair (:data:`batchnorm.lab.plots.COLORS`); the other arms take the remaining
colours of the same palette (ColorBrewer Dark2). Each figure makes one comparison, named in its
title.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ._figures import figure_and_axes
from .experiments._regularization_config import ARMS
from .experiments._regularization_summary import ARM_LABELS
from .plots import COLORS

__all__ = ["ARM_COLORS", "plot_accuracy", "plot_curves", "plot_gap"]

ARM_COLORS = {
    "none": COLORS["baseline"],
    "dropout": "#7570b3",
    "bn": COLORS["bn"],
    "bn+dropout": "#e7298a",
    "ghost": "#66a61e",
}


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def _dots(ax: Any, x: float, values: np.ndarray, jitter: Any, width: float) -> None:
    finite = values[np.isfinite(values)]
    ax.scatter(
        x + jitter.uniform(-0.25, 0.25, size=len(finite)) * width,
        finite,
        s=14,
        color="black",
        alpha=0.8,
        lw=0,
        zorder=3,
    )


def _arm_ticks(ax: Any) -> None:
    ax.set_xticks(range(len(ARMS)), [ARM_LABELS[a].replace(" (", "\n(") for a in ARMS], fontsize=8)


def _mean_over_seeds(rows: np.ndarray) -> np.ndarray:
    """The mean over seeds (axis 0) of the seeds still measured; NaN where none is (after
    every seed diverged)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice"
        return np.nanmean(rows, axis=0)


def plot_accuracy(result: Any, ax: Any = None) -> Any:
    """Final training and test accuracy per arm (eval mode): bars at the mean, every seed a
    dot; training pale, test full.

    Args:
        result: A :class:`~batchnorm.lab.experiments.regularization.RegularizationResult`.
        ax: Axes to draw into; ``None`` makes a new figure.

    Returns:
        The figure.
    """
    figure, ax = figure_and_axes(ax, (7.2, 4.6))
    jitter = np.random.default_rng(0)  # fixed: redrawing gives the same picture
    width = 0.38
    for j, arm in enumerate(ARMS):
        for k, (split, values) in enumerate(
            (("train", result.train_accuracy[arm]), ("test", result.test_accuracy[arm]))
        ):
            x = j + (k - 0.5) * width
            ax.bar(
                x,
                100.0 * np.nanmean(values),
                width=0.9 * width,
                color=ARM_COLORS[arm],
                alpha=0.35 if split == "train" else 1.0,
                label=f"{split}" if j == 0 else None,
            )
            _dots(ax, x, 100.0 * values, jitter, width)
    _arm_ticks(ax)
    ax.set_ylabel("accuracy at the end of training (%; eval mode)")
    lows = [np.nanmin(100 * result.test_accuracy[a]) for a in ARMS]
    ax.set_ylim(max(0.0, np.nanmin(lows) - 10.0), 101.0)
    ax.set_title(
        "Does BN regularize? Final training (pale) vs test (full) accuracy per arm\n"
        f"(bars: mean; dots: {_seeds(len(result.seeds))})",
        fontsize=10,
    )
    ax.grid(alpha=0.3, axis="y")
    return figure


def plot_gap(result: Any, ax: Any = None) -> Any:
    """The train/test accuracy gap per arm (percentage points): a bar at the mean, every seed
    a dot.

    Args:
        result: A :class:`~batchnorm.lab.experiments.regularization.RegularizationResult`.
        ax: Axes to draw into; ``None`` makes a new figure.

    Returns:
        The figure.
    """
    figure, ax = figure_and_axes(ax, (6.4, 4.4))
    jitter = np.random.default_rng(0)
    for j, arm in enumerate(ARMS):
        values = result.gap[arm]
        mean = np.nanmean(values) if np.isfinite(values).any() else np.nan
        ax.bar(j, mean, width=0.6, color=ARM_COLORS[arm])
        _dots(ax, j, values, jitter, 0.6)
    ax.axhline(0.0, color="0.4", lw=0.8)
    _arm_ticks(ax)
    ax.set_ylabel("gap: train - test accuracy (percentage points)")
    ax.set_title(
        "Train/test gap per arm: does BN (or dropout) narrow it?\n"
        f"(bars: mean; dots: {_seeds(len(result.seeds))}; lower = less over-fitting)",
        fontsize=10,
    )
    ax.grid(alpha=0.3, axis="y")
    return figure


def plot_curves(result: Any, ax: Any = None) -> Any:
    """Validation accuracy against training steps for every arm: every seed thin, the mean
    bold.

    Args:
        result: A :class:`~batchnorm.lab.experiments.regularization.RegularizationResult`.
        ax: Axes to draw into; ``None`` makes a new figure.

    Returns:
        The figure.
    """
    figure, ax = figure_and_axes(ax, (6.8, 4.6))
    for arm in ARMS:
        rows = result.val_accuracy[arm]
        for row in rows:
            ax.plot(result.steps, 100.0 * row, color=ARM_COLORS[arm], lw=0.6, alpha=0.35)
        mean = _mean_over_seeds(rows)
        ax.plot(result.steps, 100.0 * mean, color=ARM_COLORS[arm], lw=2.0, label=ARM_LABELS[arm])
    ax.set_xlabel("training step (mini-batches)")
    ax.set_ylabel("validation accuracy (%; eval mode)")
    ax.set_title(
        "Validation accuracy over training, every arm at its tuned rate\n"
        f"({_seeds(len(result.seeds))} thin, mean bold)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return figure
