"""Figures of the learning-rate sweep: ``plot_<what>(sweep, ...) -> Figure``.

The conventions of :mod:`batchnorm.lab.plots`: :class:`matplotlib.figure.Figure` objects outside
pyplot; a panel function draws into ``ax`` if given and returns its figure; every seed is drawn
(thin lines or dots) next to the mean; BN and no-BN keep the lab's colour pair
(:data:`batchnorm.lab.plots.COLORS`); each figure makes one comparison, named in its title.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._figures import figure_and_axes, figure_class
from .plots import COLORS, LABELS

__all__ = [
    "plot_accuracy",
    "plot_accuracy_panel",
    "plot_effective_rate",
    "plot_effective_rate_panel",
]

# The arm's norm -> the lab's colour key.
_KEY = {"none": "baseline", "bn": "bn"}


def _geometric_mean(values: np.ndarray) -> np.ndarray:
    """Per column, the geometric mean of the finite positive values (NaN where none)."""
    out = np.full(values.shape[1], np.nan)
    for k, column in enumerate(values.T):
        keep = column[np.isfinite(column) & (column > 0)]
        if len(keep):
            out[k] = np.exp(np.log(keep).mean())
    return out


def _seeds(n: int) -> str:
    return f"{n} seeds: thin lines, thick = mean" if n > 1 else "1 seed"


def plot_accuracy_panel(sweep: Any, net: str, ax: Any = None) -> Any:
    """Final test accuracy against the learning rate (log axis) for one net, without and with
    BN: one thin line per seed, the mean thick; diverged runs as crosses at chance; each arm's
    largest stable rate (median over seeds) as a dotted vertical.

    Args:
        sweep: A :class:`~batchnorm.lab.experiments._learning_rate_summary.Sweep`.
        net: ``"relu6"`` or ``"sigmoid3"``.
        ax: Axes to draw into; ``None`` makes a new figure.

    Returns:
        The figure.
    """
    from .experiments._learning_rate_config import CHANCE, largest_stable_rate
    from .experiments._learning_rate_nets import NET_LABELS, NORMS, arm_name

    figure, ax = figure_and_axes(ax, (5.6, 4.2))
    lrs = sweep.lrs
    for norm in NORMS:
        arm = arm_name(net, norm)
        color = COLORS[_KEY[norm]]
        test, bad = sweep.test[arm], sweep.diverged[arm]
        for row in test:
            ax.plot(lrs, row, color=color, lw=0.7, alpha=0.35)
        ax.plot(
            lrs, test.mean(axis=0), color=color, lw=2.0, marker="o", ms=4, label=LABELS[_KEY[norm]]
        )
        hits = np.nonzero(bad)
        if len(hits[0]):
            jitter = 1.0 + 0.04 * (NORMS.index(norm) * 2 - 1)
            ax.scatter(
                lrs[hits[1]] * jitter,
                np.full(len(hits[0]), CHANCE),
                marker="x",
                s=28,
                color=color,
                lw=1.2,
                zorder=3,
                label=f"diverged, {LABELS[_KEY[norm]]}",
            )
        rates = [largest_stable_rate(lrs.tolist(), b.tolist()) for b in bad]
        stable = [r for r in rates if r is not None]
        if stable:
            ax.axvline(float(np.median(stable)), color=color, ls=":", lw=1.4)
    ax.axhline(CHANCE, color="0.6", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (plain SGD; log scale)")
    ax.set_ylabel("final test accuracy (fraction correct)")
    ax.set_title(
        f"{NET_LABELS[net]}\n({_seeds(len(sweep.seeds))}; dotted: largest stable rate)", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=7)
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
        "Higher usable learning rate with BN? Final test accuracy at each rate, without vs with "
        f"BN\n({config.dataset}, {config.steps} SGD steps of {config.batch_size} per run; "
        "crosses: runs that diverged, counted as chance)",
        fontsize=11,
    )
    return figure


def plot_effective_rate_panel(sweep: Any, net: str, ax: Any = None) -> Any:
    """BN's effective rate lr/||W||^2 (geometric mean over the hidden layers) at the start
    (hollow) and at the end of training (filled) against the nominal rate, log-log; dots per
    seed, lines through the means. Diverged runs have no end point.

    Args:
        sweep: A :class:`~batchnorm.lab.experiments._learning_rate_summary.Sweep`.
        net: ``"relu6"`` or ``"sigmoid3"``.
        ax: Axes to draw into; ``None`` makes a new figure.

    Returns:
        The figure.
    """
    from .experiments._learning_rate_nets import NET_LABELS, arm_name

    figure, ax = figure_and_axes(ax, (5.6, 4.2))
    arm = arm_name(net, "bn")
    color = COLORS["bn"]
    lrs = sweep.lrs
    start = sweep.effective_rate(arm, "start")
    end = np.where(sweep.diverged[arm], np.nan, sweep.effective_rate(arm, "end"))
    for values, filled, label in ((start, False, "at the start"), (end, True, "at the end")):
        for row in values:
            ax.scatter(
                lrs,
                row,
                s=16,
                facecolors=color if filled else "none",
                edgecolors=color,
                lw=0.8,
                alpha=0.6,
            )
        mean = _geometric_mean(values)
        ax.plot(
            lrs,
            mean,
            color=color,
            lw=1.8 if filled else 1.0,
            ls="-" if filled else "--",
            label=label,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("nominal learning rate (log scale)")
    ax.set_ylabel("effective rate lr / ||W||^2 (log scale)")
    n = len(sweep.seeds)
    dots = f"{n} seeds: dots, lines through the geometric means" if n > 1 else "1 seed"
    ax.set_title(
        f"{NET_LABELS[net]} with BN, geometric mean over hidden layers\n({dots})", fontsize=9
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", fontsize=8)
    return figure


def plot_effective_rate(sweep: Any) -> Any:
    """:func:`plot_effective_rate_panel` for both nets side by side, with the claim as the title."""
    from .experiments._learning_rate_nets import NETS

    figure = figure_class()(figsize=(11.5, 4.6), dpi=100, layout="constrained")
    axes = figure.subplots(1, len(NETS))
    for ax, net in zip(axes, NETS, strict=True):
        plot_effective_rate_panel(sweep, net, ax=ax)
    figure.suptitle(
        "Auto rate-tuning (Arora et al. 2019)? BN's effective rate lr/||W||^2 at the start vs "
        "the end of training, per nominal rate\n(the weights' norm can only grow under plain "
        "SGD with BN; the gap is how much it lowered the step by itself)",
        fontsize=11,
    )
    return figure
