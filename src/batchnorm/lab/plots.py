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

__all__ = ["COLORS", "LABELS", "plot_accuracy", "plot_figure1", "plot_percentiles"]

# One colour pair for the whole lab (ColorBrewer Dark2, distinguishable with the common forms
# of colour blindness): the network without BN, and the network with BN.
COLORS = {"baseline": "#d95f02", "bn": "#1b9e77"}
LABELS = {"baseline": "without BN", "bn": "with BN"}


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
        acc = result.test_accuracy[name]
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
    ax.set_title(f"(a) Test accuracy ({spread})", fontsize=10)
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
    trace = result.traces[network][seed_index]
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
    stability = (result.summary or {}).get("percentile_range", {}).get(network)
    if stability is not None:
        title += f"\npercentile range {stability['mean']:.2f} (all units, mean of seeds)"
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
    held = [c["held"] for c in (result.summary or {}).get("claims", [])]
    verdict = ""
    if held:
        verdict = f" - held in this run: {sum(held)} of {len(held)} parts"
    figure.suptitle(
        f"Claim: BN trains faster and keeps each sigmoid's input distribution stable{verdict}\n"
        f"Ioffe & Szegedy (2015), Fig. 1: {config.depth}x{config.hidden} sigmoid MLP, "
        f"{config.dataset}, SGD lr {config.lr:g}, batch {config.batch_size}, "
        f"{len(result.seeds)} seed{'s' if len(result.seeds) != 1 else ''}",
        fontsize=11,
    )
    return figure
