"""Figures of the batch-size experiment: ``plot_<what>(result, ax=None) -> Figure``.

The same conventions as :mod:`batchnorm.lab.plots`: figures are
:class:`matplotlib.figure.Figure` objects outside pyplot, a function draws into ``ax`` if given
and returns its figure, and every seed is shown (as a dot) next to the mean. BatchNorm and no
normalisation keep the lab's colour pair (:data:`batchnorm.lab.plots.COLORS`); the other arms
take the rest of the same ColorBrewer Dark2 palette.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._figures import figure_and_axes
from .experiments._batch_size_config import ARM_LABELS
from .plots import COLORS as LAB_COLORS

__all__ = ["ARM_COLORS", "ARM_MARKERS", "plot_test_error"]

ARM_COLORS = {
    "none": LAB_COLORS["baseline"],
    "batchnorm": LAB_COLORS["bn"],
    "groupnorm": "#7570b3",
    "renorm": "#e7298a",
    "ghost": "#66a61e",
}
ARM_MARKERS = {"none": "o", "batchnorm": "s", "groupnorm": "^", "renorm": "D", "ghost": "v"}


def plot_test_error(result: Any, ax: Any = None, *, own_statistics: bool = False) -> Any:
    """Test error against the training batch size (log2 axis), one colour per arm: every
    seed as a dot, the mean as a line; diverged networks as crosses at chance level.

    Args:
        result: A :class:`~batchnorm.lab.experiments.batch_size.BatchSizeResult`.
        ax: Axes to draw into; ``None`` makes a new figure.
        own_statistics: Test batches of the training batch size normalised by their own
            statistics instead of the running statistics (eval mode).

    Returns:
        The figure.
    """
    figure, ax = figure_and_axes(ax, (6.4, 5.2))
    config = result.config
    sizes = np.asarray(result.batch_sizes, dtype=float)
    table = result.error_own if own_statistics else result.error
    arms = list(table)
    # Each arm's dots sit a little to the side of the batch size (a fixed offset on the log
    # axis), so that five arms at one batch size do not hide each other.
    offsets = np.linspace(-0.12, 0.12, len(arms))
    for k, arm in enumerate(arms):
        errors = table[arm]
        x = sizes * 2.0 ** offsets[k]
        shared = result.shared[arm]
        label = ARM_LABELS.get(arm, arm)
        if arm == "ghost":
            label += f" ({config.virtual_batch_size} per ghost batch; BN at b <= "
            label += f"{config.virtual_batch_size + 1})"
        style = {"color": ARM_COLORS.get(arm), "marker": ARM_MARKERS.get(arm, "o")}
        ax.plot(x, errors.mean(axis=0), lw=1.6, ms=0, label=label, color=style["color"])
        for i in range(errors.shape[0]):
            ok = ~result.diverged[arm][i]
            ax.scatter(x[ok], errors[i, ok], s=14, alpha=0.75, lw=0, zorder=3, **style)
            if (~ok).any():
                ax.scatter(x[~ok], errors[i, ~ok], s=30, marker="x", color=style["color"], zorder=3)
        if shared.any():
            # Where ghost BN is BatchNorm its numbers are BatchNorm's network's: hollow marks.
            ax.scatter(
                x[shared],
                errors.mean(axis=0)[shared],
                s=40,
                facecolors="none",
                edgecolors=style["color"],
                marker=style["marker"],
                zorder=4,
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in result.batch_sizes])
    ax.minorticks_off()
    ax.axvline(config.reference_batch, color="#999999", lw=0.8, ls=":")
    ax.set_xlabel(
        f"training batch size (log2; lr scaled by b/{config.reference_batch}, same examples seen)"
    )
    where = "own statistics" if own_statistics else "running statistics"
    ax.set_ylabel(f"test error (%), {where}")
    n = len(result.seeds)
    spread = f"{n} seeds: dots, line = mean" if n > 1 else "1 seed"
    test = (
        "test batches of the training batch size normalised by their own statistics"
        if own_statistics
        else "running statistics at test (eval mode)"
    )
    title = (
        "Test error vs batch size per normalization\n"
        f"({test})\n"
        f"1-D CNN, {config.epochs:g} epoch(s) per network; {spread}; x: diverged"
    )
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    # Below the axes: the points fill the axes at every height.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncol=2, frameon=False)
    return figure
