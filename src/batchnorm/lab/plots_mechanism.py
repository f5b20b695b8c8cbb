"""Figures of the mechanism experiment: ``plot_<what>(result) -> Figure``.

The lab's conventions (:mod:`batchnorm.lab.plots`): :class:`matplotlib.figure.Figure` objects
outside pyplot; no BN and BN keep the lab's colour pair, noisy BN is the third Dark2 colour;
lines are means over seeds with a band from the seeds' min to max (or a dot per seed); each
figure makes one comparison, named in its title.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ._figures import figure_class
from .experiments._mechanism_config import ARMS
from .plots import COLORS as LAB_COLORS

__all__ = [
    "COLORS",
    "LABELS",
    "plot_landscape",
    "plot_shift",
    "plot_shift_by_layer",
    "plot_training",
]

COLORS = {"none": LAB_COLORS["baseline"], "bn": LAB_COLORS["bn"], "noisy": "#7570b3"}
LABELS = {"none": "without BN", "bn": "with BN", "noisy": "noisy BN"}


def _figure(size: tuple[float, float]) -> Any:
    return figure_class()(figsize=size, dpi=100, layout="constrained")


def _spread(n: int) -> str:
    return f"mean of {n} seeds, band min-max" if n > 1 else "1 seed"


def _band(ax: Any, x: np.ndarray, values: np.ndarray, color: Any, label: str) -> None:
    """Mean over seeds (rows) as a line and, with several seeds, their min-max as a band; NaN
    (not measured) and non-finite values are left out."""
    clean = np.where(np.isfinite(values), values, np.nan)
    # An all-NaN column (a step no seed measured) gives NaN, which matplotlib leaves out.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(clean, axis=0)
        low, high = np.nanmin(clean, axis=0), np.nanmax(clean, axis=0)
    ax.plot(x, mean, color=color, lw=1.5, label=label)
    if values.shape[0] > 1:
        ax.fill_between(x, low, high, color=color, alpha=0.18, lw=0)


def _subtitle(result: Any) -> str:
    config = result.config
    lrs = ", ".join(f"{LABELS[a]} {result.lrs[a]:g}" for a in ARMS)
    return (
        f"{config.depth}x{config.hidden} {config.activation} MLP on {config.dataset}, SGD lr "
        f"(tuned per arm): {lrs}; {_spread(len(result.seeds))}"
    )


def plot_shift(result: Any) -> Any:
    """Per layer and arm, over training: the relative gradient shift
    :math:`\\|G - G'\\| / \\|G\\|` (top, log scale, ``fc1`` left out: it is 0 by construction)
    and :math:`\\cos(G, G')` (bottom).

    Args:
        result: A :class:`~batchnorm.lab.experiments.mechanism.MechanismResult`.

    Returns:
        The figure: 2 rows x 3 arms, rows sharing their y-axis.
    """
    from matplotlib import colormaps

    figure = _figure((13.0, 6.4))
    axes = figure.subplots(2, len(ARMS), sharex=True, sharey="row")
    shades = [colormaps["viridis"](v) for v in np.linspace(0.0, 0.85, len(result.layers))]
    x = result.probe_steps
    for col, arm in enumerate(ARMS):
        shift = result.shift[arm]["shift"]
        for j, layer in enumerate(result.layers):
            if j > 0:
                _band(axes[0, col], x, shift["relative"][:, :, j], shades[j], layer)
            _band(axes[1, col], x, shift["cos"][:, :, j], shades[j], layer)
        axes[0, col].set_title(f"{LABELS[arm]} (lr {result.lrs[arm]:g})", fontsize=10)
        axes[0, col].set_yscale("log")
        axes[1, col].set_xlabel("training step (mini-batches)")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("relative shift |G - G'| / |G| (log)")
    axes[1, 0].set_ylabel("cos(G, G')")
    axes[0, -1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, title="layer")
    axes[1, -1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, title="layer")
    figure.suptitle(
        "Does BN reduce internal covariate shift? Each layer's gradient change when only the "
        f"earlier layers take a step of {result.config.shift_lr:g} (Santurkar et al. 2018, "
        f"Def. 2.1)\n{_subtitle(result)}",
        fontsize=11,
    )
    return figure


def plot_shift_by_layer(result: Any) -> Any:
    """Per layer, each seed's median over training of the relative shift (left) and of
    :math:`1 - \\cos(G, G')` (right), the arms side by side (dots: seeds; bars: means).

    Args:
        result: A :class:`~batchnorm.lab.experiments.mechanism.MechanismResult`.

    Returns:
        The figure: two panels.
    """
    figure = _figure((12.0, 4.6))
    axes = figure.subplots(1, 2)
    layers = result.layers[1:]
    width = 0.8 / len(ARMS)
    jitter = np.random.default_rng(0)  # fixed: redrawing gives the same picture
    for ax, key, label in (
        (axes[0], "relative", "relative shift |G - G'| / |G| (log)"),
        (axes[1], "cos", "1 - cos(G, G') (log)"),
    ):
        for k, arm in enumerate(ARMS):
            values = result.shift[arm]["shift"][key][:, :, 1:]
            if key == "cos":
                values = 1.0 - values
            per_seed = np.stack(
                [_seed_medians(values[:, :, j]) for j in range(len(layers))], axis=1
            )
            x = np.arange(len(layers)) - 0.4 + width * (k + 0.5)
            for j in range(len(layers)):
                column = per_seed[:, j]
                column = column[np.isfinite(column) & (column > 0)]
                if not len(column):
                    continue
                ax.scatter(
                    x[j] + jitter.uniform(-0.25, 0.25, len(column)) * width,
                    column,
                    s=12,
                    color=COLORS[arm],
                    alpha=0.7,
                    lw=0,
                    zorder=3,
                )
                ax.plot(
                    [x[j] - 0.4 * width, x[j] + 0.4 * width],
                    [column.mean()] * 2,
                    color=COLORS[arm],
                    lw=2.4,
                    solid_capstyle="butt",
                    label=LABELS[arm] if j == 0 else None,
                )
        ax.set_xticks(range(len(layers)), layers)
        ax.set_xlabel("layer (its earlier layers take the step)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(loc="best", fontsize=8)
    figure.suptitle(
        "Gradient shift by layer, without BN vs with BN vs noisy BN (each seed's median over "
        f"training)\n{_subtitle(result)}",
        fontsize=11,
    )
    return figure


def _seed_medians(values: np.ndarray) -> np.ndarray:
    out = np.full(values.shape[0], np.nan)
    for i, row in enumerate(values):
        kept = row[~np.isnan(row)]
        if len(kept):
            out[i] = float(np.median(kept))
    return out


def plot_landscape(result: Any) -> Any:
    """Over training, per arm: the loss range along the gradient, the largest gradient change
    along it, and the effective beta-smoothness (log scales).

    Args:
        result: A :class:`~batchnorm.lab.experiments.mechanism.MechanismResult`.

    Returns:
        The figure: three panels.
    """
    figure = _figure((14.0, 4.4))
    axes = figure.subplots(1, 3, sharex=True)
    etas = ", ".join(f"{e:g}" for e in result.etas)
    panels = (
        ("loss range along the gradient (nats, log)", result.loss_range),
        ("max |grad L(x) - grad L(x - eta g)| (log)", result.max_grad_change),
        ("effective beta-smoothness (log)", result.beta),
    )
    for ax, (label, measure) in zip(axes, panels, strict=True):
        for arm in ARMS:
            _band(ax, result.probe_steps, measure(arm), COLORS[arm], LABELS[arm])
        ax.set_yscale("log")
        ax.set_xlabel("training step (mini-batches)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    figure.suptitle(
        "Does BN smooth the loss landscape? Loss and gradient along the gradient direction, "
        f"steps eta in ({etas}) (Santurkar et al. 2018, Fig. 4)\n{_subtitle(result)}",
        fontsize=11,
    )
    return figure


def plot_training(result: Any) -> Any:
    """Training loss (left, log) and validation accuracy (right) over training, per arm; the
    legend gives each arm's final test accuracy.

    Args:
        result: A :class:`~batchnorm.lab.experiments.mechanism.MechanismResult`.

    Returns:
        The figure: two panels.
    """
    figure = _figure((12.0, 4.4))
    axes = figure.subplots(1, 2, sharex=True)
    x = result.curve_steps
    for arm in ARMS:
        accuracy = result.test_accuracy[arm]
        finite = accuracy[np.isfinite(accuracy)]
        final = f"final test {finite.mean():.3f}" if len(finite) else "diverged"
        label = f"{LABELS[arm]} ({final})"
        _band(axes[0], x[1:], result.curves[arm]["train_loss"][:, 1:], COLORS[arm], label)
        _band(axes[1], x, result.curves[arm]["val_accuracy"], COLORS[arm], label)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("training loss since the last measurement (nats, log)")
    axes[1].set_ylabel("validation accuracy (fraction correct)")
    for ax in axes:
        ax.set_xlabel("training step (mini-batches)")
        ax.grid(alpha=0.3)
    axes[1].legend(loc="lower right", fontsize=8)
    figure.suptitle(
        "Does noisy BN (time-varying noise after each BN) train as well as BN? Without BN vs "
        f"with BN vs noisy BN (strength {result.config.strength:g})\n{_subtitle(result)}",
        fontsize=11,
    )
    return figure
