"""Figures of the population-statistics experiment: ``plot_<what>(result, ax=None) -> Figure``.

The same conventions as :mod:`batchnorm.lab.plots`: figures are
:class:`matplotlib.figure.Figure` objects outside pyplot, a function draws into ``ax`` if given
and returns its figure, and variation across seeds is a band (min to max over seeds) around the
mean. The three sources of inference statistics keep one colour each (:data:`COLORS`), chosen
from the same ColorBrewer Dark2 palette as the lab's BN/no-BN pair but distinct from it, since
every network here has BN.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .plots import _axes, _figure_class

__all__ = [
    "COLORS",
    "LABELS",
    "plot_difference_to_ema",
    "plot_inference_accuracy",
    "plot_population",
    "plot_statistics_gap",
    "plot_variance_scatter",
]

COLORS = {"ema": "#7570b3", "pooled": "#e7298a", "paper": "#66a61e"}
LABELS = {
    "ema": "EMA (torch's running averages)",
    "pooled": "pooled (exact pass)",
    "paper": "paper (Alg. 2 as written)",
}
_STYLES = {"ema": "-", "pooled": "--", "paper": ":"}
_GAP_LABELS = {
    "mean_shift": "mean shift (population std)",
    "log_var_ratio": "|log variance ratio|",
}
_METRIC_LABELS = {"test_accuracy": "test accuracy", "test_loss": "test loss (cross-entropy)"}


def _spread(n: int) -> str:
    return f"mean of {n} seeds, band min-max" if n > 1 else "1 seed"


def _band(ax: Any, x: np.ndarray, values: np.ndarray, color: str, **line: Any) -> None:
    """Mean over axis 0 as a line, min-max over axis 0 as a band (with more than one row)."""
    ax.plot(x, values.mean(axis=0), color=color, **line)
    if len(values) > 1:
        ax.fill_between(x, values.min(axis=0), values.max(axis=0), color=color, alpha=0.2, lw=0)


def _plain_log_ticks(ax: Any) -> None:
    # Variances often span less than a decade, where matplotlib labels the minor ticks in
    # scientific notation and they collide; label 1, 2, 5 x 10^k in plain numbers instead.
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


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
    figure, ax = _axes(ax, (5.0, 3.8))
    for method in ("ema", "pooled", "paper"):
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
    """Pooled minus EMA and paper minus EMA of a test metric, against training steps.

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
    figure, ax = _axes(ax, (5.0, 3.8))
    values = result.test_accuracy if metric == "test_accuracy" else result.test_loss
    keep = result.steps > 0
    steps = result.steps[keep]
    for method in ("pooled", "paper"):
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
    """Per BN layer, the gap of the EMA and of the paper's statistics to the pooled ones.

    Solid lines: EMA vs pooled; dotted: paper vs pooled; one colour per layer; log scale.

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
    figure, ax = _axes(ax, (5.0, 3.8))
    colors = _layer_colors(len(result.layers))
    positive = []
    for method, style in (("ema", "-"), ("paper", ":")):
        values = result.gap[method][gap]
        for i, name in enumerate(result.layers):
            label = f"{name}, {'EMA' if method == 'ema' else 'paper'}"
            _band(ax, result.steps, values[:, i], colors[i], ls=style, lw=1.4, label=label)
            positive.append(values[values > 0])
    # Log scale only when there is something positive to show (a gap can be exactly 0).
    if any(p.size for p in positive):
        ax.set_yscale("log")
    panel = "(d)" if gap == "mean_shift" else "(e)"
    ax.set_title(
        f"{panel} Gap to the pooled statistics: {_GAP_LABELS[gap]}\n"
        "(mean over channels; solid: EMA, dotted: paper)",
        fontsize=10,
    )
    ax.set_xlabel("training step (mini-batches)")
    ax.set_ylabel(_GAP_LABELS[gap])
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=7, ncol=2)
    return figure


def plot_variance_scatter(result: Any, layer: str | None = None, ax: Any = None) -> Any:
    """At the final step, each channel's EMA (and paper) variance against its pooled variance.

    Points of all seeds; on the line ``y = x`` the two agree. Log-log axes.

    Args:
        result: A :class:`~batchnorm.lab.experiments.population.PopulationResult`.
        layer: A BN layer's name; ``None`` means the last one.
        ax: Axes to draw into; ``None`` makes a new figure.

    Returns:
        The figure.

    Raises:
        ValueError: If ``layer`` is not one of the result's layers, or no seed has final
            statistics for it.
    """
    layer = result.layers[-1] if layer is None else layer
    if layer not in result.layers:
        raise ValueError(
            f"plot_variance_scatter(): expected layer in {list(result.layers)!r}, got {layer!r}."
        )
    per_seed = [f[layer] for f in result.final_statistics if "pooled" in f.get(layer, {})]
    if not per_seed:
        raise ValueError(
            f"plot_variance_scatter(): expected final statistics of layer {layer!r} in at "
            "least one seed, got none."
        )
    figure, ax = _axes(ax, (5.0, 3.8))
    pooled = np.concatenate([f["pooled"]["var"] for f in per_seed])
    everything = [pooled]
    for method, marker in (("ema", "o"), ("paper", "x")):
        if not all(method in f for f in per_seed):
            continue
        var = np.concatenate([f[method]["var"] for f in per_seed])
        everything.append(var)
        ratio = np.median(np.abs(np.log(var / pooled)))
        ax.scatter(
            pooled,
            var,
            s=12 if marker == "o" else 14,
            marker=marker,
            color=COLORS[method],
            alpha=0.6,
            lw=0.8 if marker == "x" else 0,
            label=f"{LABELS[method].split(' (')[0]}: median |log ratio| {ratio:.3f}",
        )
    low = min(float(v.min()) for v in everything)
    high = max(float(v.max()) for v in everything)
    ax.plot([low, high], [low, high], color="0.3", lw=1.0, ls="--", label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    steps = int(result.steps[-1])
    n = len(per_seed)
    ax.set_title(
        f"(f) Per-channel variance at step {steps}, layer {layer}\n"
        f"({n} seed{'s' if n != 1 else ''} x {len(per_seed[0]['pooled']['var'])} channels)",
        fontsize=10,
    )
    ax.set_xlabel("pooled (exact) variance of the BN input")
    ax.set_ylabel("variance used at inference")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", fontsize=8)
    return figure


def plot_population(result: Any) -> Any:
    """The experiment's figure: what inference gains (top row) and why (bottom row).

    Top: (a) test accuracy with each source of statistics, (b, c) the exact passes' test
    accuracy and loss minus the EMA's. Bottom: (d, e) the per-layer gaps to the pooled
    statistics over training, (f) the last layer's per-channel variances at the end.

    Args:
        result: A :class:`~batchnorm.lab.experiments.population.PopulationResult`.

    Returns:
        The figure.
    """
    figure = _figure_class()(figsize=(15.0, 8.4), dpi=100, layout="constrained")
    axes = figure.subplots(2, 3)
    plot_inference_accuracy(result, ax=axes[0, 0])
    plot_difference_to_ema(result, "test_accuracy", ax=axes[0, 1])
    plot_difference_to_ema(result, "test_loss", ax=axes[0, 2])
    plot_statistics_gap(result, "mean_shift", ax=axes[1, 0])
    plot_statistics_gap(result, "log_var_ratio", ax=axes[1, 1])
    if any("pooled" in f.get(result.layers[-1], {}) for f in result.final_statistics):
        plot_variance_scatter(result, ax=axes[1, 2])
    else:
        axes[1, 2].set_axis_off()
    config = result.config
    held = [c["held"] for c in (result.summary or {}).get("claims", [])]
    verdict = f" - held in this run: {sum(held)} of {len(held)} parts" if held else ""
    momentum = "cumulative" if config.momentum is None else f"{config.momentum:g}"
    n = len(result.seeds)
    spread = "lines: mean over seeds, bands: min-max over seeds; " if n > 1 else ""
    figure.suptitle(
        "Claim: exact population statistics (Alg. 2) are at least as good for inference as the "
        f"running averages{verdict}\n"
        f"Ioffe & Szegedy (2015), Sec. 3.1: {config.depth}x{config.hidden} {config.activation} "
        f"MLP with BN (momentum {momentum}), {config.dataset}, SGD lr {config.lr:g}, batch "
        f"{config.batch_size}, exact pass in batches of {config.pass_batch_size}, {n} "
        f"seed{'s' if n != 1 else ''}\n{spread}EMA = torch's running averages, pooled = exact "
        "mean and variance over the training set, paper = mean of batch statistics (Alg. 2)",
        fontsize=11,
    )
    return figure
