"""Figures of the initialization experiment: ``plot_<what>(sweep, ...) -> Figure``.

The conventions of :mod:`batchnorm.lab.plots`: :class:`matplotlib.figure.Figure` objects outside
pyplot; a panel function draws into ``ax`` if given and returns its figure; every seed is drawn
next to the mean; BN and no-BN keep the lab's colour pair (:data:`batchnorm.lab.plots.COLORS`);
each figure makes one comparison, named in its title.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._figures import figure_and_axes, figure_class
from .plots import COLORS, LABELS

__all__ = ["plot_accuracy", "plot_accuracy_panel", "plot_curves", "plot_curves_panel"]

# The arm's norm -> the lab's colour key.
_KEY = {"none": "baseline", "bn": "bn"}


def plot_accuracy_panel(sweep: Any, net: str, ax: Any = None) -> Any:
    """Final test accuracy against the weight scale :math:`c` (log axis) for one net, without
    and with BN: one thin line per seed, the mean thick, diverged runs as crosses at chance.

    Args:
        sweep: A :class:`~batchnorm.lab.experiments._initialization_summary.ScaleSweep`.
        net: ``"relu6"`` or ``"sigmoid3"``.
        ax: Axes to draw into; ``None`` makes a new figure.

    Returns:
        The figure.
    """
    from .experiments._initialization_config import CHANCE
    from .experiments._learning_rate_nets import NET_LABELS, NORMS, arm_name

    figure, ax = figure_and_axes(ax, (5.6, 4.2))
    scales = sweep.scales
    for norm in NORMS:
        arm = arm_name(net, norm)
        color, label = COLORS[_KEY[norm]], LABELS[_KEY[norm]]
        test = sweep.test[arm]
        for row in test:
            ax.plot(scales, row, color=color, lw=0.7, alpha=0.35)
        lr = sweep.config.lrs[arm]
        ax.plot(
            scales,
            test.mean(axis=0),
            color=color,
            lw=2.0,
            marker="o",
            ms=4,
            label=f"{label} (lr {lr:g})",
        )
        seeds, where = np.nonzero(sweep.diverged[arm])
        if len(seeds):
            jitter = 1.0 + 0.04 * (NORMS.index(norm) * 2 - 1)
            ax.scatter(
                scales[where] * jitter,
                np.full(len(where), CHANCE),
                marker="x",
                s=28,
                color=color,
                lw=1.2,
                zorder=3,
                label=f"diverged, {label}",
            )
    ax.axhline(CHANCE, color="0.6", lw=0.8, ls="--")
    ax.axvline(1.0, color="0.6", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("weight scale c (every weight times c; log scale)")
    ax.set_ylabel("final test accuracy (fraction correct)")
    n = len(sweep.seeds)
    seeds_text = f"{n} seeds: thin lines, thick = mean" if n > 1 else "1 seed"
    ax.set_title(f"{NET_LABELS[net]}\n({seeds_text})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    return figure


def plot_accuracy(sweep: Any) -> Any:
    """:func:`plot_accuracy_panel` for both nets side by side, with the claim as the title."""
    from .experiments._learning_rate_nets import NETS

    figure = figure_class()(figsize=(11.5, 4.6), dpi=100, layout="constrained")
    axes = figure.subplots(1, len(NETS), sharey=True)
    for ax, net in zip(axes, NETS, strict=True):
        plot_accuracy_panel(sweep, net, ax=ax)
    config = sweep.config
    figure.suptitle(
        "Resilient to the initial weight scale with BN? Final test accuracy vs the scale c, "
        f"without vs with BN\n({config.dataset}, {config.steps} SGD steps of "
        f"{config.batch_size} at each arm's c = 1 rate; crosses: diverged runs, counted as "
        "chance)",
        fontsize=11,
    )
    return figure


def plot_curves_panel(sweep: Any, net: str, ax: Any = None) -> Any:
    """With BN, validation accuracy over training at each scale (mean over seeds, band min to
    max), from dark (small :math:`c`) to light (large).

    Args:
        sweep: A :class:`~batchnorm.lab.experiments._initialization_summary.ScaleSweep`.
        net: ``"relu6"`` or ``"sigmoid3"``.
        ax: Axes to draw into; ``None`` makes a new figure.

    Returns:
        The figure.
    """
    from matplotlib import colormaps

    from .experiments._learning_rate_nets import NET_LABELS, arm_name

    figure, ax = figure_and_axes(ax, (5.6, 4.2))
    arm = arm_name(net, "bn")
    curves = sweep.curves[arm]
    # One colour per scale, ordered (viridis: tells seven lines apart, dark = small c).
    shades = colormaps["viridis"](np.linspace(0.0, 0.9, len(sweep.scales)))
    for k, c in enumerate(sweep.scales):
        values = curves[:, k, :]
        with np.errstate(invalid="ignore"):
            mean = np.nanmean(values, axis=0) if np.isfinite(values).any() else values[0]
        ax.plot(sweep.steps, mean, color=shades[k], lw=1.6, label=f"c = {c:g}")
        if len(values) > 1 and np.isfinite(values).any():
            ax.fill_between(
                sweep.steps,
                np.nanmin(values, axis=0),
                np.nanmax(values, axis=0),
                color=shades[k],
                alpha=0.12,
                lw=0,
            )
    ax.set_xlabel("training step (mini-batches)")
    ax.set_ylabel("validation accuracy (fraction correct)")
    n = len(sweep.seeds)
    band = f"mean of {n} seeds, band min-max" if n > 1 else "1 seed"
    ax.set_title(f"{NET_LABELS[net]} with BN\n({band})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7, ncol=2)
    return figure


def plot_curves(sweep: Any) -> Any:
    """:func:`plot_curves_panel` for both nets side by side, with the comparison as the title."""
    from .experiments._learning_rate_nets import NETS

    figure = figure_class()(figsize=(11.5, 4.6), dpi=100, layout="constrained")
    axes = figure.subplots(1, len(NETS), sharey=True)
    for ax, net in zip(axes, NETS, strict=True):
        plot_curves_panel(sweep, net, ax=ax)
    figure.suptitle(
        "How the weight scale c changes BN's training: validation accuracy over training at "
        "each c\n(the forward pass ignores c; the effective step lr/||W||^2 scales as 1/c^2)",
        fontsize=11,
    )
    return figure
