"""Figures of the population-statistics experiment: ``plot_<what>(result, ax=None) -> Figure``.

The same conventions as :mod:`batchnorm.lab.plots`: figures are
:class:`matplotlib.figure.Figure` objects outside pyplot, a function draws into ``ax`` if given
and returns its figure, and every seed is shown (as a dot, or a band from min to max) next to
the mean. Each figure makes one comparison, named in its title; legends sit outside the axes.
The running averages are shades of one purple, darker for a larger momentum; the exact
statistics keep the brown they had in earlier versions of this figure, the batch-own control is
grey.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._figures import figure_and_axes
from .experiments._population_spec import CONTROL, EXACT, PHASES, ema_method

__all__ = ["COLORS", "color", "label", "plot_end_loss", "plot_fit", "plot_lag"]

COLORS = {EXACT: "#a6761d", CONTROL: "#666666", "pooled": "#e7298a", "paper": "#66a61e"}
_LABELS = {
    EXACT: "exact (population, sequential pass)",
    CONTROL: "batch-own (test batches' own statistics)",
    "pooled": "pooled (one training-mode pass)",
    "paper": "paper (Alg. 2 as written)",
}
_PHASE_STYLE = {"early": {"ls": "--", "marker": "o"}, "end": {"ls": "-", "marker": "s"}}


def color(result: Any, method: str) -> Any:
    """The colour of a source of statistics in every figure of this experiment."""
    if method.startswith("ema"):
        from matplotlib import colormaps

        n = len(result.momenta)
        rank = sorted(result.momenta).index(float(method[3:]))
        return colormaps["Purples"](0.4 + 0.55 * rank / (n - 1) if n > 1 else 0.75)
    return COLORS[method]


def label(method: str) -> str:
    """A source of statistics as the legends name it."""
    if method.startswith("ema"):
        return f"running averages, momentum {method[3:]}"
    return _LABELS[method]


def _spread(n: int) -> str:
    return f"{n} seeds: dots, bar = mean" if n > 1 else "1 seed"


def plot_end_loss(result: Any, ax: Any = None) -> Any:
    """End-of-training test loss per batch size, with each running average, the exact
    statistics and the batch-own control side by side (dots: seeds; bar: mean).

    Args:
        result: A :class:`~batchnorm.lab.experiments.population.PopulationResult`.
        ax: Axes to draw into; ``None`` makes a new figure.

    Returns:
        The figure.
    """
    figure, ax = figure_and_axes(ax, (6.4, 5.6))
    shown = [ema_method(m) for m in sorted(result.momenta)] + [EXACT, CONTROL]
    width = 0.8 / len(shown)
    jitter = np.random.default_rng(0)  # fixed: redrawing gives the same picture
    test = result.loss["test"]["end"]
    for k, method in enumerate(shown):
        offset = -0.4 + width * (k + 0.5)
        for j in range(len(result.batch_sizes)):
            values = test[method][:, j]
            x = j + offset
            ax.scatter(
                x + jitter.uniform(-0.2, 0.2, size=len(values)) * width,
                values,
                s=12,
                color=color(result, method),
                alpha=0.7,
                lw=0,
                zorder=3,
            )
            ax.plot(
                [x - 0.4 * width, x + 0.4 * width],
                [values.mean()] * 2,
                color=color(result, method),
                lw=2.4,
                solid_capstyle="butt",
                label=label(method) if j == 0 else None,
            )
    ax.set_xticks(
        range(len(result.batch_sizes)),
        [
            f"{b}\n({int(s)} steps)"
            for b, s in zip(result.batch_sizes, result.steps["end"], strict=True)
        ],
    )
    ax.set_xlim(-0.5, len(result.batch_sizes) - 0.5)
    ax.set_xlabel("training batch size")
    ax.set_ylabel("test loss at the end of training (nats)")
    ax.set_title(
        "End-of-training test loss: running averages (per momentum)\n"
        "vs exact vs batch-own statistics, by batch size\n"
        f"({result.config.epochs:g} epochs per network; {_spread(len(result.seeds))})",
        fontsize=10,
    )
    ax.grid(alpha=0.3, axis="y")
    # Below the axes: the points fill the axes at every height.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.24), fontsize=8, ncol=2, frameon=False)
    return figure


def plot_lag(result: Any, ax: Any = None) -> Any:
    """Test loss with the running averages minus with the exact statistics, against momentum,
    at the early checkpoint (dashed) and at the end (solid), one colour per batch size (mean
    line, band min to max over seeds). Above zero the running averages are worse.

    Args:
        result: A :class:`~batchnorm.lab.experiments.population.PopulationResult`.
        ax: Axes to draw into; ``None`` makes a new figure.

    Returns:
        The figure.
    """
    from matplotlib import colormaps

    figure, ax = figure_and_axes(ax, (6.4, 5.6))
    momenta = sorted(result.momenta)
    x = np.arange(len(momenta))
    shades = [colormaps["viridis"](v) for v in np.linspace(0.0, 0.8, len(result.batch_sizes))]
    for j, b in enumerate(result.batch_sizes):
        for phase in PHASES:
            test = result.loss["test"][phase]
            diff = np.stack([test[ema_method(m)][:, j] - test[EXACT][:, j] for m in momenta], 1)
            step = int(result.steps[phase][j])
            ax.plot(
                x,
                diff.mean(axis=0),
                color=shades[j],
                lw=1.6,
                ms=5,
                label=f"batch {b}, {phase} (step {step})",
                **_PHASE_STYLE[phase],
            )
            if len(diff) > 1:
                ax.fill_between(x, diff.min(axis=0), diff.max(axis=0), color=shades[j], alpha=0.15)
    ax.axhline(0.0, color=COLORS[EXACT], lw=1.0)
    ax.set_xticks(x, [f"{m:g}" for m in momenta])
    ax.set_xlabel("BN momentum of the running averages (weight of the newest batch)")
    ax.set_ylabel("test loss: running averages - exact (nats)")
    band = "; bands: min-max over seeds" if len(result.seeds) > 1 else ""
    ax.set_title(
        "The running averages' lag: test loss with EMA(momentum) minus\n"
        "with exact statistics, early checkpoint (dashed) and end (solid)\n"
        f"(above 0: the running averages are worse{band})",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    # Below the axes: the points fill the axes at every height.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, ncol=2, frameon=False)
    return figure


def plot_fit(result: Any, ax: Any = None) -> Any:
    """Training-set loss against validation loss, both with the exact statistics, per batch
    size, early and at the end (bars: means; dots: seeds): the memorisation check.

    Args:
        result: A :class:`~batchnorm.lab.experiments.population.PopulationResult`.
        ax: Axes to draw into; ``None`` makes a new figure.

    Returns:
        The figure.
    """
    figure, ax = figure_and_axes(ax, (6.4, 5.0))
    bars = [("train", phase, result.train_loss[phase]) for phase in PHASES] + [
        ("validation", phase, result.loss["val"][phase][EXACT]) for phase in PHASES
    ]
    bars.sort(key=lambda item: (PHASES.index(item[1]), item[0] != "train"))
    width = 0.8 / len(bars)
    fills = {"train": "#1b9e77", "validation": "#d95f02"}
    for k, (split, phase, values) in enumerate(bars):
        x = np.arange(len(result.batch_sizes)) - 0.4 + width * (k + 0.5)
        ax.bar(
            x,
            values.mean(axis=0),
            width=0.9 * width,
            color=fills[split],
            alpha=1.0 if phase == "end" else 0.45,
            label=f"{split}, {phase}",
        )
        for j in range(len(result.batch_sizes)):
            ax.scatter([x[j]] * len(values), values[:, j], s=8, color="black", lw=0, zorder=3)
    ax.set_xticks(range(len(result.batch_sizes)), [str(b) for b in result.batch_sizes])
    ax.set_xlabel("training batch size")
    ax.set_ylabel("loss with the exact statistics (nats)")
    ax.set_title(
        "Memorisation check: training-set vs validation loss (exact statistics)\n"
        f"(pale: early checkpoint, full: end; dots: {len(result.seeds)} seed"
        f"{'s' if len(result.seeds) != 1 else ''})",
        fontsize=10,
    )
    ax.grid(alpha=0.3, axis="y")
    # Below the axes: the points fill the axes at every height.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, ncol=2, frameon=False)
    return figure
