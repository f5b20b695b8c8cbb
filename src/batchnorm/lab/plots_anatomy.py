"""Figures of the anatomy experiment: ``plot_<what>(config, results, ax=None) -> Figure``.

The conventions of :mod:`batchnorm.lab.plots`: :class:`matplotlib.figure.Figure` objects built
outside pyplot, a single-axes function draws into ``ax`` if given and returns its figure, every
seed is shown, each figure makes one comparison and its title names it. Both networks of the
experiment have BN, so the lab's BN/no-BN colour pair does not apply: the ReLU network is
purple and the sigmoid network pink (ColorBrewer Dark2, like the pair), and a Gaussian
reference is drawn in black.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._figures import figure_and_axes, figure_class
from .experiments._anatomy_config import ACTIVATIONS, GAUSSIAN_SHARE
from .experiments._anatomy_measure import SHARE_TOLERANCE, SKEW_TOLERANCE

__all__ = ["COLORS", "plot_affine", "plot_histograms", "plot_shape"]

COLORS = {"relu": "#7570b3", "sigmoid": "#e7298a"}
# A standardized exponential's share within +-1 (P(0 <= E <= 2) = 1 - e^-2) and skewness: the
# reference point of a distribution that is standardized but not Gaussian.
_EXPONENTIAL = (1.0 - math.exp(-2.0), 2.0)
_STAGES = (
    ("x", "input x (pre-BN)"),
    ("x_hat", "normalized x_hat"),
    ("y", "output y = gamma x_hat + beta"),
)


def _array(values: list) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def _gaussian_overlay(ax: Any, values: np.ndarray) -> None:
    values = values[np.isfinite(values)]
    if values.size < 2:
        return
    mean, std = float(values.mean()), float(values.std())
    if not std > 0:
        return
    grid = np.linspace(values.min() - std, values.max() + std, 200)
    density = np.exp(-0.5 * ((grid - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    ax.plot(grid, density, color="black", lw=1.0, label="Gaussian, same mean and variance")


def plot_histograms(config: Any, results: Mapping[int, dict]) -> Any:
    """Histograms of the raw input, the normalized :math:`\\hat{x}` and the output of the shown
    units of layer ``config.layer`` (rows; both networks), on the first seed's measured batch,
    each with the Gaussian density of the same mean and variance.

    Args:
        config: The run's :class:`~batchnorm.lab.experiments.anatomy.AnatomyConfig`.
        results: Seed -> ``run_seed`` result.

    Returns:
        The figure.
    """
    seed = min(results)
    rows = [(name, j) for name in ACTIVATIONS for j in range(config.show_units)]
    figure = figure_class()(figsize=(11, 1.9 * len(rows) + 1.0), dpi=100, layout="constrained")
    axes = figure.subplots(len(rows), len(_STAGES), squeeze=False)
    layer = str(config.layer)
    for r, (name, j) in enumerate(rows):
        unit = results[seed]["units"][name]
        measured = unit["layers"][layer]
        k = unit["shown"]["units"][j]
        y = _array(unit["shown"]["y"][j])
        gamma, beta = measured["gamma"][k], measured["beta"][k]
        # The layer's own x_hat, (y - beta) / gamma: what the shown share and skew are of.
        x_hat = (y - beta) / gamma if gamma and beta is not None else np.full_like(y, np.nan)
        stages = {"x": _array(unit["shown"]["x"][j]), "x_hat": x_hat, "y": y}
        for c, (key, title) in enumerate(_STAGES):
            ax = axes[r][c]
            values = stages[key]
            finite = values[np.isfinite(values)]
            if finite.size:
                ax.hist(finite, bins=30, density=True, color=COLORS[name], alpha=0.6)
            _gaussian_overlay(ax, values)
            if key == "x_hat":
                share = measured["share"][k]
                skew = measured["skew"][k]
                text = (
                    f"within ±1: {100 * share:.1f} % (Gaussian {100 * GAUSSIAN_SHARE:.1f} %)\n"
                    f"skew {skew:+.2f}"
                    if share is not None and skew is not None
                    else "not measured"
                )
                ax.text(0.02, 0.95, text, transform=ax.transAxes, va="top", fontsize=7)
                ax.axvspan(-1, 1, color="0.85", zorder=0)
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{name}, unit {k}\ndensity", fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("value (the unit's own scale)", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7, loc="upper right", frameon=False)
    figure.suptitle(
        f"BN standardizes but keeps each unit's shape: hidden layer {layer}, seed {seed}, one "
        f"batch of {results[seed]['units'][ACTIVATIONS[0]]['batch']}\n"
        "(rows: units from least to most skewed; shaded: |x_hat| <= 1)",
        fontsize=10,
    )
    return figure


def plot_shape(config: Any, results: Mapping[int, dict], ax: Any = None) -> Any:
    """Every unit of layer ``config.layer``, every seed and both networks: the share of its
    :math:`\\hat{x}` within :math:`\\pm 1` against its skewness, with the box the "looks
    Gaussian" test accepts around a standard normal's (0.683, 0) and, for reference, a
    standardized exponential's (0.865, 2).

    Returns:
        The figure.
    """
    figure, ax = figure_and_axes(ax, (7.0, 5.4))
    layer = str(config.layer)
    for name in ACTIVATIONS:
        share = np.concatenate(
            [_array(results[s]["units"][name]["layers"][layer]["share"]) for s in results]
        )
        skew = np.concatenate(
            [_array(results[s]["units"][name]["layers"][layer]["skew"]) for s in results]
        )
        ax.scatter(skew, 100 * share, s=10, alpha=0.55, lw=0, color=COLORS[name], label=name)
    ax.add_patch(
        _rectangle(
            (-SKEW_TOLERANCE, 100 * (GAUSSIAN_SHARE - SHARE_TOLERANCE)),
            2 * SKEW_TOLERANCE,
            200 * SHARE_TOLERANCE,
        )
    )
    ax.scatter(
        [0.0],
        [100 * GAUSSIAN_SHARE],
        marker="*",
        s=140,
        color="black",
        zorder=4,
        label="standard normal",
    )
    ax.scatter(
        [_EXPONENTIAL[1]],
        [100 * _EXPONENTIAL[0]],
        marker="X",
        s=80,
        color="0.4",
        zorder=4,
        label="standardized exponential",
    )
    ax.set_xlabel("skewness of x_hat (moment estimator)")
    ax.set_ylabel("share of x_hat within ±1 (%)")
    n = len(results)
    ax.set_title(
        f"Is x_hat Gaussian? Each unit of hidden layer {layer} against a standard normal\n"
        f"(box: the 'looks Gaussian' test; {n} seed{'s' if n != 1 else ''}, both networks)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, frameon=False)
    return figure


def _rectangle(corner: tuple[float, float], width: float, height: float) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle(corner, width, height, fill=False, ec="black", ls="--", lw=1.0, zorder=3)


def plot_affine(config: Any, results: Mapping[int, dict], ax: Any = None) -> Any:
    """The learned :math:`\\gamma` (scale) against :math:`\\beta` (shift) of every unit of
    every hidden layer, every seed and both networks (marker: layer), with their start (1, 0).

    Returns:
        The figure.
    """
    figure, ax = figure_and_axes(ax, (7.0, 5.4))
    markers = ("o", "s", "^", "D", "v", "P")
    for name in ACTIVATIONS:
        for k in range(1, config.depth + 1):
            gamma = np.concatenate(
                [_array(results[s]["units"][name]["layers"][str(k)]["gamma"]) for s in results]
            )
            beta = np.concatenate(
                [_array(results[s]["units"][name]["layers"][str(k)]["beta"]) for s in results]
            )
            ax.scatter(
                beta,
                gamma,
                s=10,
                alpha=0.5,
                lw=0,
                color=COLORS[name],
                marker=markers[(k - 1) % len(markers)],
                label=f"{name}, layer {k}",
            )
    ax.scatter([0.0], [1.0], marker="+", s=160, color="black", zorder=4, label="start (1, 0)")
    ax.set_xlabel("beta (shift of the output)")
    ax.set_ylabel("gamma (scale of the output)")
    n = len(results)
    ax.set_title(
        "What training made of BN's scale and shift: gamma vs beta of every unit\n"
        f"({config.steps} steps; {n} seed{'s' if n != 1 else ''}, every hidden layer)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, frameon=False)
    return figure
