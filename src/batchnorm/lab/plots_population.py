"""Figures of the population-statistics experiment: ``plot_<what>(result, ax=None) -> Figure``.

The same conventions as :mod:`batchnorm.lab.plots`: figures are
:class:`matplotlib.figure.Figure` objects outside pyplot, a function draws into ``ax`` if given
and returns its figure, and variation across seeds is a band (min to max over seeds) around the
mean. The four sources of inference statistics keep one colour and one line style each
(:data:`COLORS`), chosen from the same ColorBrewer Dark2 palette as the lab's BN/no-BN pair but
distinct from it, since every network here has BN. The gaps are drawn to the sequential
statistics, those of the inference network (see
:mod:`batchnorm.lab.experiments.population`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._figures import figure_and_axes, figure_class
from .experiments._population_spec import COMPARED, EXACT, METHODS, REFERENCE

__all__ = [
    "COLORS",
    "LABELS",
    "plot_difference_to_ema",
    "plot_inference_accuracy",
    "plot_population",
    "plot_statistics_gap",
    "plot_variance_ratio",
]

# Dark2's brown for sequential: its yellow is too pale on white for a line this thin.
COLORS = {"ema": "#7570b3", "pooled": "#e7298a", "paper": "#66a61e", "sequential": "#a6761d"}
LABELS = {
    "ema": "EMA (torch's running averages)",
    "pooled": "pooled (exact pass)",
    "paper": "paper (Alg. 2 as written)",
    "sequential": "sequential (eval-mode passes)",
}
_STYLES = {"ema": "-", "pooled": "--", "paper": ":", "sequential": "-."}
_SHORT = {"ema": "EMA", "pooled": "pooled", "paper": "paper", "sequential": "sequential"}
_GAP_LABELS = {
    "mean_shift": "mean shift (sequential std)",
    "log_var_ratio": "|log variance ratio|",
}
_LINE_NAMES = {"-": "solid", "--": "dashed", ":": "dotted", "-.": "dash-dot"}
_METRIC_LABELS = {"test_accuracy": "test accuracy", "test_loss": "test loss (cross-entropy)"}


def _spread(n: int) -> str:
    return f"mean of {n} seeds, band min-max" if n > 1 else "1 seed"


def _band(ax: Any, x: np.ndarray, values: np.ndarray, color: str, **line: Any) -> None:
    """Mean over axis 0 as a line, min-max over axis 0 as a band (with more than one row)."""
    ax.plot(x, values.mean(axis=0), color=color, **line)
    if len(values) > 1:
        ax.fill_between(x, values.min(axis=0), values.max(axis=0), color=color, alpha=0.2, lw=0)


def _layer_colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    return [colormaps["viridis"](v) for v in np.linspace(0.0, 0.8, n)]


def plot_inference_accuracy(result: Any, ax: Any = None) -> Any:
    """Test accuracy against training steps with each source of inference statistics.

    Args:
        result: A :class:`~batchnorm.lab.experiments.population.PopulationResult`.
        ax: Axes to draw into; ``None`` makes a new figure.

    Returns:
        The figure.
    """
    figure, ax = figure_and_axes(ax, (5.0, 3.8))
    for method in METHODS:
        acc = result.test_accuracy[method]
        _band(
            ax,
            result.steps,
            acc,
            COLORS[method],
            ls=_STYLES[method],
            lw=1.6,
            label=f"{LABELS[method]} (final {acc[:, -1].mean():.3f})",
        )
    ax.set_xlabel("training step (mini-batches)")
    ax.set_ylabel("test accuracy (fraction correct)")
    ax.set_title(
        f"(a) Test accuracy by inference statistics\n({_spread(len(result.seeds))})", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return figure


def plot_difference_to_ema(result: Any, metric: str = "test_accuracy", ax: Any = None) -> Any:
    """Each exact pass (pooled, paper, sequential) minus the EMA in a test metric, over training.

    Step 0 is left out: the running averages then still hold their initial values (mean 0,
    variance 1), and the difference there would set the scale of the whole panel.

    Args:
        result: A :class:`~batchnorm.lab.experiments.population.PopulationResult`.
        metric: ``"test_accuracy"`` (above 0: the exact statistics are better) or
            ``"test_loss"`` (below 0: they are better).
        ax: Axes to draw into; ``None`` makes a new figure.

    Returns:
        The figure.

    Raises:
        ValueError: If ``metric`` is not one of the two.
    """
    if metric not in _METRIC_LABELS:
        raise ValueError(
            f"plot_difference_to_ema(): expected metric in {list(_METRIC_LABELS)!r}, got "
            f"{metric!r}."
        )
    figure, ax = figure_and_axes(ax, (5.0, 3.8))
    values = result.test_accuracy if metric == "test_accuracy" else result.test_loss
    keep = result.steps > 0
    steps = result.steps[keep]
    for method in EXACT:
        diff = values[method][:, keep] - values["ema"][:, keep]
        _band(
            ax,
            steps,
            diff,
            COLORS[method],
            ls=_STYLES[method],
            lw=1.4,
            label=f"{LABELS[method]} (final {diff[:, -1].mean():+.4f})",
        )
    ax.axhline(0.0, color=COLORS["ema"], lw=1.0, label="EMA (reference)")
    better = "above 0" if metric == "test_accuracy" else "below 0"
    panel = "(b)" if metric == "test_accuracy" else "(c)"
    ax.set_title(
        f"{panel} {_METRIC_LABELS[metric].capitalize()} minus the EMA's\n"
        f"({better}: the exact pass is better)",
        fontsize=10,
    )
    ax.set_xlabel("training step (mini-batches)")
    ax.set_ylabel(f"difference in {_METRIC_LABELS[metric]}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return figure


def plot_statistics_gap(result: Any, gap: str = "mean_shift", ax: Any = None) -> Any:
    """Per BN layer, the gap of the EMA's, pooled's and paper's statistics to the sequential ones.

    The sequential statistics are those of the inference network, so the gap is how far each
    source is from what the layer sees at test time. One colour per layer, one line style per
    source (as in the other panels); log scale. A gap that is exactly 0 at every step (pooled's
    in the first layer, where the two passes are the same computation) cannot be drawn on a
    log scale: it gets a legend entry that says so instead of a line.

    Args:
        result: A :class:`~batchnorm.lab.experiments.population.PopulationResult`.
        gap: ``"mean_shift"`` or ``"log_var_ratio"`` (see
            :func:`~batchnorm.lab.experiments.population.statistics_gap`).
        ax: Axes to draw into; ``None`` makes a new figure.

    Returns:
        The figure.

    Raises:
        ValueError: If ``gap`` is not one of the two.
    """
    if gap not in _GAP_LABELS:
        raise ValueError(
            f"plot_statistics_gap(): expected gap in {list(_GAP_LABELS)!r}, got {gap!r}."
        )
    figure, ax = figure_and_axes(ax, (5.0, 3.8))
    colors = _layer_colors(len(result.layers))
    drawn = False
    for method in COMPARED:
        values = result.gap[method][gap]
        for i, name in enumerate(result.layers):
            style = {"color": colors[i], "ls": _STYLES[method], "lw": 1.4}
            label = f"{name}, {_SHORT[method]}"
            if not values[:, i].any():
                ax.plot([], [], label=f"{label}: 0 (identical)", **style)
                continue
            _band(ax, result.steps, values[:, i], label=label, **style)
            drawn = True
    # Log scale only when there is something positive to show; a gap that is 0 at some steps
    # only leaves its line, as matplotlib masks the zeros.
    if drawn:
        ax.set_yscale("log")
    panel = "(d)" if gap == "mean_shift" else "(e)"
    styles = ", ".join(f"{_LINE_NAMES[_STYLES[m]]}: {_SHORT[m]}" for m in COMPARED)
    ax.set_title(
        f"{panel} Gap to the sequential statistics: {_GAP_LABELS[gap]}\n"
        f"(mean over channels; {styles})",
        fontsize=10,
    )
    ax.set_xlabel("training step (mini-batches)")
    ax.set_ylabel(_GAP_LABELS[gap])
    ax.grid(alpha=0.3, which="both")
    # Below the axes: inside, nine entries cover lines wherever they are put, since the EMA's
    # gaps fall through the whole range during training.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=7, ncol=len(COMPARED))
    return figure


def plot_variance_ratio(result: Any, ax: Any = None) -> Any:
    """At the final step, each channel's variance over the sequential one, per BN layer.

    A strip per layer and source (EMA, pooled, paper): one point per channel and seed, at
    ``100 * (ratio - 1)`` % (:meth:`~batchnorm.lab.experiments.population.PopulationResult.
    variance_ratios`, with the layer's ``eps``), and a bar at the mean over seeds of the
    geometric mean over channels (the summary's ``variance_bias``). On the zero line a source
    has the inference network's spread; below it, it under-estimates it. Points are spread
    sideways with a fixed generator, so redrawing gives the same picture.

    The y axis is linear and spans the points' 0.5th to 99.5th percentile (and every bar and
    0): a few channels of the running averages lie tens of per cent off, and an axis stretched
    to them would flatten the 1-2 % by which the pooled variances are low. Points beyond the
    axis are drawn at its edge and counted in the title. (A symmetric log axis was tried: it
    draws the dense middle of a strip thinly and makes it look bimodal.)

    Args:
        result: A :class:`~batchnorm.lab.experiments.population.PopulationResult`.
        ax: Axes to draw into; ``None`` makes a new figure.

    Returns:
        The figure.

    Raises:
        ValueError: If no seed has final statistics of the sequential and another source for
            any layer.
    """
    ratios = {
        (m, name): result.variance_ratios(m, name)
        for m in COMPARED
        for name in result.layers
        if result.variance_ratios(m, name).size
    }
    if not ratios:
        raise ValueError(
            "plot_variance_ratio(): expected final statistics of the sequential and another "
            "source in at least one seed, got none."
        )
    percents = {key: 100 * (r.ravel() - 1) for key, r in ratios.items()}
    bars = {key: 100 * np.expm1(np.log(r).mean(axis=1)).mean() for key, r in ratios.items()}
    low, high = np.percentile(np.concatenate(list(percents.values())), [0.5, 99.5])
    low, high = min(low, *bars.values(), 0.0), max(high, *bars.values(), 0.0)
    pad = 0.05 * (high - low) or 1.0
    low, high = low - pad, high + pad
    figure, ax = figure_and_axes(ax, (5.0, 3.8))
    jitter = np.random.default_rng(0)
    offsets = np.linspace(-0.25, 0.25, len(COMPARED))
    seeds = max(len(r) for r in ratios.values())
    beyond = 0
    for j, method in enumerate(COMPARED):
        labelled = False
        for i, name in enumerate(result.layers):
            if (method, name) not in ratios:
                continue
            percent = percents[method, name]
            beyond += int(np.count_nonzero((percent < low) | (percent > high)))
            x = i + offsets[j] + jitter.uniform(-0.06, 0.06, size=percent.size)
            ax.scatter(
                x,
                np.clip(percent, low, high),
                s=6,
                color=COLORS[method],
                alpha=0.35,
                lw=0,
                label=None if labelled else LABELS[method],
            )
            labelled = True
            ax.plot(
                [i + offsets[j] - 0.1, i + offsets[j] + 0.1],
                [bars[method, name]] * 2,
                color=COLORS[method],
                lw=2.4,
                solid_capstyle="butt",
            )
    ax.axhline(0.0, color=COLORS[REFERENCE], lw=1.0, ls=_STYLES[REFERENCE], label=LABELS[REFERENCE])
    ax.set_ylim(low, high)
    ax.set_xticks(range(len(result.layers)), result.layers)
    ax.set_xlim(-0.5, len(result.layers) - 0.5)
    steps = int(result.steps[-1])
    edge = (
        f"\n{beyond} dot{'s' if beyond != 1 else ''} beyond the axis, drawn at its edge"
        if beyond
        else ""
    )
    ax.set_title(
        f"(f) Variance at step {steps} relative to sequential's\n"
        f"(dots: channels of {seeds} seed{'s' if seeds != 1 else ''}; bars: geometric mean){edge}",
        fontsize=10,
    )
    ax.set_xlabel("BN layer")
    ax.set_ylabel("variance / sequential variance - 1 (%)")
    ax.grid(alpha=0.3, axis="y")
    # Below the axes, as in the gap panels: the dots fill the axes at every height.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=7, ncol=2, markerscale=2)
    return figure


def plot_population(result: Any) -> Any:
    """The experiment's figure: what inference gains (top row) and why (bottom row).

    Top: (a) test accuracy with each source of statistics, (b, c) the exact passes' test
    accuracy and loss minus the EMA's. Bottom: (d, e) the per-layer gaps to the sequential
    statistics over training, (f) every layer's per-channel variances at the end relative to
    the sequential ones.

    Args:
        result: A :class:`~batchnorm.lab.experiments.population.PopulationResult`.

    Returns:
        The figure.
    """
    figure = figure_class()(figsize=(15.0, 9.8), dpi=100, layout="constrained")
    axes = figure.subplots(2, 3)
    plot_inference_accuracy(result, ax=axes[0, 0])
    plot_difference_to_ema(result, "test_accuracy", ax=axes[0, 1])
    plot_difference_to_ema(result, "test_loss", ax=axes[0, 2])
    plot_statistics_gap(result, "mean_shift", ax=axes[1, 0])
    plot_statistics_gap(result, "log_var_ratio", ax=axes[1, 1])
    if any(result.variance_ratios(m, name).size for m in COMPARED for name in result.layers):
        plot_variance_ratio(result, ax=axes[1, 2])
    else:
        axes[1, 2].set_axis_off()
    config = result.config
    held = [c["held"] for c in (result.summary or {}).get("claims", [])]
    verdict = f" - held in this run: {sum(held)} of {len(held)} parts" if held else ""
    momentum = "cumulative" if config.momentum is None else f"{config.momentum:g}"
    n = len(result.seeds)
    spread = " (bands: min-max over seeds)" if n > 1 else ""
    figure.suptitle(
        "Claim: exact population statistics (Alg. 2) are at least as good for inference as the "
        f"running averages{verdict}\n"
        f"Ioffe & Szegedy (2015), Sec. 3.1: {config.depth}x{config.hidden} {config.activation} "
        f"MLP with BN (momentum {momentum}), {config.dataset}, SGD lr {config.lr:g}, batch "
        f"{config.batch_size}, exact passes in batches of {config.pass_batch_size}, {n} "
        f"seed{'s' if n != 1 else ''}{spread}\n"
        "EMA = torch's running averages, pooled = exact mean and variance over the training set, "
        "paper = mean of batch statistics (Alg. 2),\nsequential = pooled, layer by layer, with "
        "the other layers in eval mode (the statistics the inference network computes; the "
        "reference of the gaps)",
        fontsize=11,
    )
    return figure
