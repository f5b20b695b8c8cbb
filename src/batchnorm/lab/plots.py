"""Figures of the lab: ``plot_<what>(result, ax=None) -> Figure``.

Every function draws into ``ax`` if given (and returns its figure) or into a new figure, and
never touches pyplot's global state: figures are built as :class:`matplotlib.figure.Figure`
objects, which render with the Agg backend whatever the session's backend is, and need no
``plt.close``. BN and no-BN use one colour pair throughout the lab (:data:`COLORS`); variation
across seeds is drawn as a band.
"""

from __future__ import annotations

from typing import Any

from ._figures import figure_and_axes, figure_class

__all__ = [
    "COLORS",
    "LABELS",
    "plot_accuracy",
    "plot_figure1",
    "plot_percentiles",
    "plot_shift",
    "plot_speed",
]

# One colour pair for the whole lab (ColorBrewer Dark2, distinguishable with the common forms
# of colour blindness): the network without BN, and the network with BN.
COLORS = {"baseline": "#d95f02", "bn": "#1b9e77"}
LABELS = {"baseline": "without BN", "bn": "with BN"}
# The initialisation of an arm by line style: the paper's small Gaussian solid, Glorot dashed.
INIT_STYLES = {"paper": "-", "glorot": "--"}
INIT_LABELS = {"paper": "paper's init", "glorot": "Glorot init"}


def _arm(network: str, init: str = "paper") -> str:
    return f"{network}/{init}"


def _arm_label(arm: str) -> str:
    network, init = arm.split("/")
    return f"{LABELS[network]}, {INIT_LABELS[init]}"


def plot_accuracy(result: Any, ax: Any = None) -> Any:
    """Test accuracy against training steps, both networks: the paper's Figure 1(a).

    Args:
        result: A :class:`~batchnorm.lab.experiments.figure1.Figure1Result`.
        ax: Axes to draw into; ``None`` makes a new figure.

    Returns:
        The figure. Lines are the mean over seeds; the band spans the seeds' min to max.
    """
    figure, ax = figure_and_axes(ax, (5.0, 3.8))
    n = len(result.seeds)
    for name in ("baseline", "bn"):
        acc = result.test_accuracy[_arm(name)]
        final = acc[:, -1].mean()
        ax.plot(
            result.steps,
            acc.mean(axis=0),
            color=COLORS[name],
            lw=1.6,
            label=f"{LABELS[name]} (final {final:.3f})",
        )
        if n > 1:
            ax.fill_between(
                result.steps, acc.min(axis=0), acc.max(axis=0), color=COLORS[name], alpha=0.25
            )
    ax.set_xlabel("training step (mini-batches)")
    ax.set_ylabel("test accuracy (fraction correct)")
    spread = f"mean of {n} seeds, band min-max" if n > 1 else "1 seed"
    ax.set_title(f"(a) Test accuracy, paper's init ({spread})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return figure


def plot_percentiles(
    result: Any, network: str = "bn", ax: Any = None, *, seed_index: int = 0
) -> Any:
    """Percentiles of one last-hidden-layer sigmoid's input over training: Figure 1(b, c).

    The unit is ``result.config.unit`` of the seed ``result.seeds[seed_index]``: units of
    different seeds are different neurons, so their percentiles are not averaged. The panel
    also states the run's stability number (percentile range, mean over all units and seeds).

    Args:
        result: A :class:`~batchnorm.lab.experiments.figure1.Figure1Result`.
        network: ``"baseline"`` (panel b) or ``"bn"`` (panel c).
        ax: Axes to draw into; ``None`` makes a new figure.
        seed_index: Which seed's unit to show.

    Returns:
        The figure.

    Raises:
        ValueError: If ``network`` is not ``"baseline"`` or ``"bn"``.
    """
    if network not in COLORS:
        raise ValueError(
            f"plot_percentiles(): expected network in {list(COLORS)!r}, got {network!r}."
        )
    figure, ax = figure_and_axes(ax, (5.0, 3.8))
    trace = result.traces[_arm(network)][seed_index]
    unit = result.config.unit
    q = trace.quantiles[:, unit, :]
    color = COLORS[network]
    ax.fill_between(trace.steps, q[:, 0], q[:, -1], color=color, alpha=0.18, lw=0)
    styles = ["--", "-", ":"] if q.shape[1] == 3 else ["-"] * q.shape[1]
    for j, level in enumerate(trace.quantile_levels):
        ax.plot(trace.steps, q[:, j], color=color, ls=styles[j], lw=1.4, label=f"{100 * level:g}th")
    panel = "(b)" if network == "baseline" else "(c)"
    seed = result.seeds[seed_index]
    title = (
        f"{panel} {LABELS[network][0].upper()}{LABELS[network][1:]}: input of one sigmoid\n"
        f"(last hidden layer, unit {unit}, seed {seed}, fixed probe set)"
    )
    arms = (result.summary or {}).get("arms", {})
    stability = arms.get(_arm(network), {}).get("percentile_range")
    if stability is not None:
        title += f"\npercentile range after warm-up {stability['mean']:.2f} (mean of seeds)"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("training step (mini-batches)")
    ax.set_ylabel("sigmoid input (pre-activation)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, title="percentile", title_fontsize=8)
    return figure


def plot_figure1(result: Any) -> Any:
    """The paper's Figure 1 layout: (a) test accuracy, (b) without BN, (c) with BN.

    Panels (b) and (c) share their y-axis so the two distributions compare directly.

    Args:
        result: A :class:`~batchnorm.lab.experiments.figure1.Figure1Result`.

    Returns:
        The figure.
    """
    figure = figure_class()(figsize=(13.0, 4.2), dpi=100, layout="constrained")
    ax_a, ax_b, ax_c = figure.subplots(1, 3)
    plot_accuracy(result, ax=ax_a)
    plot_percentiles(result, "baseline", ax=ax_b)
    plot_percentiles(result, "bn", ax=ax_c)
    low = min(ax_b.get_ylim()[0], ax_c.get_ylim()[0])
    high = max(ax_b.get_ylim()[1], ax_c.get_ylim()[1])
    for ax in (ax_b, ax_c):
        ax.set_ylim(low, high)
    config = result.config
    lrs = config.lrs
    figure.suptitle(
        "Without vs with BN at the paper's init: how fast test accuracy rises (a), how much one "
        "sigmoid's input drifts (b, c)\n"
        f"Ioffe & Szegedy (2015), Fig. 1: {config.depth}x{config.hidden} sigmoid MLP, "
        f"{config.dataset}, SGD lr {lrs[_arm('baseline')]:g} / {lrs[_arm('bn')]:g} (tuned per "
        f"arm), batch {config.batch_size}, "
        f"{len(result.seeds)} seed{'s' if len(result.seeds) != 1 else ''}",
        fontsize=11,
    )
    return figure


def _band(ax: Any, x: Any, values: Any, color: str, style: str, label: str) -> None:
    """Mean over seeds as a line, min-max over seeds as a band (NaN-aware)."""
    import numpy as np

    with np.errstate(invalid="ignore"):
        mean = np.nanmean(values, axis=0)
    ax.plot(x, mean, color=color, ls=style, lw=1.6, label=label)
    if values.shape[0] > 1:
        ax.fill_between(
            x, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=color, alpha=0.15, lw=0
        )


def plot_speed(result: Any) -> Any:
    """Training loss (a) and smoothed validation accuracy (b) of every arm over training.

    The dotted lines in (b) are the speed targets of each initialisation (mean over seeds).

    Args:
        result: A :class:`~batchnorm.lab.experiments.figure1.Figure1Result`.

    Returns:
        The figure.
    """
    import numpy as np

    from ._training import trailing_mean

    figure = figure_class()(figsize=(12.0, 4.2), dpi=100, layout="constrained")
    ax_loss, ax_acc = figure.subplots(1, 2)
    config = result.config
    for arm in config.arms:
        network, init = arm.split("/")
        color, style = COLORS[network], INIT_STYLES[init]
        curves = result.curves[arm]
        keep = result.steps > 0
        _band(
            ax_loss,
            result.steps[keep],
            curves["train_loss"][:, keep],
            color,
            style,
            _arm_label(arm),
        )
        smoothed = np.array([trailing_mean(row, config.smooth) for row in curves["val_accuracy"]])
        _band(ax_acc, result.steps, smoothed, color, style, _arm_label(arm))
    for init, speed in (result.summary or {}).get("speed", {}).items():
        targets = [t for t in speed["target"] if t is not None]
        if targets:
            ax_acc.axhline(np.mean(targets), color="0.4", ls=":", lw=1.0)
            ax_acc.annotate(
                f"target, {INIT_LABELS[init]}",
                (result.steps[-1], np.mean(targets)),
                xytext=(-4, -11),
                textcoords="offset points",
                ha="right",
                fontsize=7,
                color="0.3",
            )
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("training step (mini-batches)")
    ax_loss.set_ylabel("training loss (cross-entropy, nats; log scale)")
    ax_loss.set_title("(a) Training loss (mean since previous measurement)", fontsize=10)
    ax_acc.set_xlabel("training step (mini-batches)")
    ax_acc.set_ylabel("validation accuracy (fraction, trailing mean)")
    ax_acc.set_title("(b) Smoothed validation accuracy and the speed targets", fontsize=10)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    handles, labels = ax_loss.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8)
    figure.suptitle(
        "Does BN train faster, and is it BN or the rescue of a small init? Four networks, "
        f"mean of {len(result.seeds)} seeds (band: min-max)",
        fontsize=11,
    )
    return figure


def plot_shift(result: Any) -> Any:
    """The shift caused by earlier layers over training, every arm (log scale).

    Args:
        result: A :class:`~batchnorm.lab.experiments.figure1.Figure1Result`.

    Returns:
        The figure.
    """
    figure, ax = figure_and_axes(None, (7.0, 4.4))
    config = result.config
    keep = result.steps > 0
    for arm in config.arms:
        network, init = arm.split("/")
        _band(
            ax,
            result.steps[keep],
            result.curves[arm]["shift"][:, keep],
            COLORS[network],
            INIT_STYLES[init],
            _arm_label(arm),
        )
    ax.set_yscale("log")
    ax.set_xlabel("training step (mini-batches)")
    ax.set_ylabel(f"shift per {config.eval_every} steps (W1 / spread; log scale)")
    ax.set_title(
        "Internal covariate shift: how far a unit's input moves because earlier layers\n"
        f"changed (hidden layers 2-{config.depth}, own parameters held fixed; mean of "
        f"{len(result.seeds)} seeds)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return figure
