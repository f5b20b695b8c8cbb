"""Figures of the convergence experiment: ``plot_<what>(result, ..., ax=None) -> Figure``.

The conventions of :mod:`batchnorm.lab.plots`: figures are :class:`matplotlib.figure.Figure`
objects outside pyplot, a function draws into ``ax`` if given and returns its figure, every
seed is shown next to the mean, and BN and no-BN keep the lab's colour pair
(:data:`batchnorm.lab.plots.COLORS`). Each figure makes one comparison, named in its title.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ._figures import figure_and_axes
from .experiments._convergence_config import NETS, SPEEDUP_THRESHOLD, arm_name
from .plots import COLORS, LABELS

__all__ = ["NET_TITLES", "plot_curves", "plot_speedup"]

NET_TITLES = {"mlp": "3x100 sigmoid MLP", "cnn": "1-D CNN (3 conv blocks, ReLU)"}
_LAB_NAME = {"none": "baseline", "bn": "bn"}


def _color(norm: str) -> str:
    return COLORS[_LAB_NAME[norm]]


def _mean_over_seeds(rows: np.ndarray) -> np.ndarray:
    """The mean over seeds (axis 0) of the seeds still measured; NaN where none is (after
    every seed diverged)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice"
        return np.nanmean(rows, axis=0)


def plot_curves(result: Any, net: str, ax: Any = None) -> Any:
    """Smoothed validation accuracy against steps for one network, without and with BN: every
    seed a thin line, the mean bold, the mean target dotted, each seed's first arrival at its
    own target a dot.

    Args:
        result: A :class:`~batchnorm.lab.experiments.convergence.ConvergenceResult`.
        net: ``"mlp"`` or ``"cnn"``.
        ax: Axes to draw into; ``None`` makes a new figure.

    Returns:
        The figure.

    Raises:
        ValueError: If ``net`` is not one of the experiment's networks.
    """
    if net not in NETS:
        raise ValueError(f"plot_curves(): expected net in {list(NETS)}, got {net!r}.")
    figure, ax = figure_and_axes(ax, (6.4, 4.8))
    steps = result.steps[net]
    speed = result.speed[net]
    for norm in ("none", "bn"):
        arm = arm_name(net, norm)
        color = _color(norm)
        curves = result.smoothed[arm]
        for row in curves:
            ax.plot(steps, row, color=color, lw=0.7, alpha=0.45)
        mean = _mean_over_seeds(curves)
        ax.plot(steps, mean, color=color, lw=2.2, label=f"{LABELS[_LAB_NAME[norm]]} (mean)")
        reached = [(v["steps"][arm], v["target"]) for v in speed if v["reached"][arm]]
        if reached:
            x, y = zip(*reached, strict=True)
            ax.scatter(x, y, color=color, s=18, zorder=3, edgecolor="white", lw=0.5)
    targets = [v["target"] for v in speed]
    ax.axhline(np.mean(targets), color="0.3", ls=":", lw=1.2, label="target (mean over seeds)")
    ax.set_xlabel("training step (mini-batches)")
    ax.set_ylabel("validation accuracy (fraction; trailing mean)")
    n = len(result.seeds)
    ax.set_title(
        f"Steps to the no-BN arm's accuracy: {NET_TITLES[net]},\nwithout vs with BN, each at "
        f"its tuned rate ({n} seed{'s' if n != 1 else ''} thin, mean bold;\ndots: each seed's "
        "first arrival at its own target)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return figure


def plot_speedup(result: Any, ax: Any = None) -> Any:
    """The speed-up (no-BN steps / BN steps to the target) per seed and network: dots for the
    seeds (hollow where an arm's steps are a bound), a bar at the mean, the rule's threshold
    dashed and 1x grey (log scale).

    Args:
        result: A :class:`~batchnorm.lab.experiments.convergence.ConvergenceResult`.
        ax: Axes to draw into; ``None`` makes a new figure.

    Returns:
        The figure.
    """
    figure, ax = figure_and_axes(ax, (5.6, 4.6))
    from matplotlib.ticker import ScalarFormatter  # after figure_and_axes' install hint

    jitter = np.random.default_rng(0)  # fixed: redrawing gives the same picture
    for j, net in enumerate(NETS):
        values = np.array([v["speedup"] for v in result.speed[net]])
        exact = np.array([all(v["reached"].values()) for v in result.speed[net]])
        x = j + jitter.uniform(-0.12, 0.12, size=len(values))
        color = COLORS["bn"]
        ax.scatter(x[exact], values[exact], s=28, color=color, zorder=3, label=None)
        ax.scatter(x[~exact], values[~exact], s=28, facecolor="none", edgecolor=color, zorder=3)
        ax.plot([j - 0.3, j + 0.3], [values.mean()] * 2, color="black", lw=2.0)
        ax.annotate(
            f"mean {values.mean():.2f}x",
            (j + 0.3, values.mean()),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.axhline(SPEEDUP_THRESHOLD, color="0.2", ls="--", lw=1.0)
    ax.axhline(1.0, color="0.6", lw=1.0)
    ax.set_yscale("log")
    ax.set_xticks(range(len(NETS)), [NET_TITLES[n] for n in NETS], fontsize=8)
    ax.set_xlim(-0.5, len(NETS) - 0.1)
    ax.set_ylabel("speed-up: no-BN steps / BN steps to the target (log scale)")
    n = len(result.seeds)
    ax.set_title(
        "Is BN faster to the no-BN arm's accuracy?\nSpeed-up per seed "
        f"({n} seed{'s' if n != 1 else ''}: dots, hollow = a bound;\nbar: mean; dashed: the "
        f"{SPEEDUP_THRESHOLD:g}x rule; grey: 1x)",
        fontsize=10,
    )
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.grid(alpha=0.3, axis="y", which="both")
    return figure
