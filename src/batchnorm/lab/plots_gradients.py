"""Figures of the gradients experiment: ``plot_<what>(config, results) -> Figure``.

The conventions of :mod:`batchnorm.lab.plots`: :class:`matplotlib.figure.Figure` objects built
outside pyplot, every seed shown (thin lines or dots) next to the mean, the lab's colour pair
for without and with BN (:data:`batchnorm.lab.plots.COLORS`), one comparison per figure (without
vs with BN), named in the title. Each figure has one panel per activation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._figures import figure_class
from .experiments._gradients_config import ACTIVATIONS, NORMS, arm_name
from .experiments._gradients_training import init_unit_name, train_unit_name
from .plots import COLORS as LAB_COLORS
from .plots import LABELS as LAB_LABELS

__all__ = ["COLORS", "LABELS", "plot_growth", "plot_profile", "plot_training"]

# Yang et al. (2019): ReLU + BN's per-layer growth of the gradient norm at large batches.
_YANG_RATE = math.sqrt(math.pi / (math.pi - 1.0))
COLORS = {"none": LAB_COLORS["baseline"], "batchnorm": LAB_COLORS["bn"]}
LABELS = {"none": LAB_LABELS["baseline"], "batchnorm": LAB_LABELS["bn"]}
_INITS = {"sigmoid": "Glorot init", "relu": "He init"}
_DEPTH_STYLES = ("-", "--", ":", "-.")


def _seeds(results: Mapping[int, dict]) -> str:
    return f"{len(results)} seed{'s' if len(results) != 1 else ''}"


def _panels(title: str, height: float = 4.6) -> tuple[Any, Any]:
    figure = figure_class()(figsize=(11, height), dpi=100, layout="constrained")
    axes = figure.subplots(1, len(ACTIVATIONS), squeeze=False)[0]
    figure.suptitle(title, fontsize=10)
    return figure, axes


def _legend(figure: Any, axes: Any) -> None:
    handles, labels = [], []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    figure.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8, frameon=False)


def plot_profile(config: Any, results: Mapping[int, dict]) -> Any:
    """Per hidden layer, :math:`\\|\\partial L/\\partial W_l\\|` relative to the last hidden
    layer's at initialization (log scale), deepest depth and largest batch size, without and
    with BN, every seed a thin line and the geometric mean a thick one; on the ReLU panel,
    Yang et al.'s :math:`1.21^{D-l}` for reference.

    Args:
        config: The run's :class:`~batchnorm.lab.experiments.gradients.GradientsConfig`.
        results: Seed -> ``run_seed`` result.

    Returns:
        The figure.
    """
    depth, batch = max(config.depths), max(config.batch_sizes)
    figure, axes = _panels(
        f"Per-layer gradient norm at initialization, without vs with BN (depth {depth}, width "
        f"{config.width}, batch {batch}; {_seeds(results)})"
    )
    layers = np.arange(1, depth + 1)
    for ax, activation in zip(axes, ACTIVATIONS, strict=True):
        for norm in NORMS:
            rows = []
            for s in sorted(results):
                norms = results[s]["units"][init_unit_name(activation, norm, depth, batch)]["norms"]
                row = np.asarray([np.nan if v is None else v for v in norms], dtype=np.float64)
                rows.append(row / row[-1])
                ax.plot(layers, rows[-1], color=COLORS[norm], lw=0.6, alpha=0.5)
            with np.errstate(divide="ignore", invalid="ignore"):
                mean = np.exp(np.nanmean(np.log(np.asarray(rows)), axis=0))
            ax.plot(layers, mean, color=COLORS[norm], lw=2.0, label=LABELS[norm])
        if activation == "relu":
            ax.plot(
                layers,
                _YANG_RATE ** (depth - layers),
                color="black",
                ls=":",
                lw=1.2,
                label="Yang et al.: 1.21 per layer",
            )
        ax.set_yscale("log")
        ax.set_xlabel("hidden layer l (1 = next to the input)")
        ax.set_ylabel("|dL/dW_l| / |dL/dW_D|")
        ax.set_title(f"{activation} ({_INITS[activation]})", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    _legend(figure, axes)
    return figure


def _growth(result: Mapping[str, Any], activation: str, norm: str, depth: int, batch: int) -> float:
    growth = result["units"][init_unit_name(activation, norm, depth, batch)]["growth"]
    return np.nan if growth is None else growth


def plot_growth(config: Any, results: Mapping[int, dict]) -> Any:
    """The growth per layer towards the input at initialization against the batch size (log
    scale), per depth (line style) and norm (colour), every seed a dot and the mean a line;
    1 (even) and Yang et al.'s 1.21 for reference.

    Returns:
        The figure.
    """
    figure, axes = _panels(
        "Growth of the gradient per layer towards the input at initialization vs batch size, "
        f"without vs with BN (width {config.width}; {_seeds(results)})"
    )
    sizes = np.asarray(config.batch_sizes, dtype=np.float64)
    jitter = np.random.default_rng(0)  # fixed: redrawing gives the same picture
    for ax, activation in zip(axes, ACTIVATIONS, strict=True):
        for norm in NORMS:
            for k, depth in enumerate(config.depths):
                values = np.asarray(
                    [
                        [
                            _growth(results[s], activation, norm, depth, b)
                            for b in config.batch_sizes
                        ]
                        for s in sorted(results)
                    ],
                    dtype=np.float64,
                )
                for row in values:
                    ax.scatter(
                        sizes * np.exp(jitter.uniform(-0.06, 0.06, len(sizes))),
                        row,
                        s=9,
                        color=COLORS[norm],
                        alpha=0.5,
                        lw=0,
                    )
                ax.plot(
                    sizes,
                    np.nanmean(values, axis=0),
                    color=COLORS[norm],
                    ls=_DEPTH_STYLES[k % len(_DEPTH_STYLES)],
                    lw=1.6,
                    label=f"{LABELS[norm]}, depth {depth}",
                )
        ax.axhline(1.0, color="0.5", lw=0.8)
        if activation == "relu":  # Yang et al.'s number is ReLU's
            ax.axhline(_YANG_RATE, color="black", ls=":", lw=1.2, label="Yang et al.: 1.21")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(sizes, [str(b) for b in config.batch_sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel("growth per layer towards the input (x)")
        ax.set_title(f"{activation} ({_INITS[activation]})", fontsize=9)
        ax.grid(alpha=0.3)
    _legend(figure, axes)
    return figure


def plot_training(config: Any, results: Mapping[int, dict]) -> Any:
    """log10 of the first over the last hidden layer's gradient norm over training (per
    recorded update), without and with BN, every seed a thin line and the mean a thick one.

    Returns:
        The figure.
    """
    figure, axes = _panels(
        "How far apart the per-layer gradients are while training, without vs with BN "
        f"({config.train_depth}x{config.train_width}, {config.train_steps} steps; "
        f"{_seeds(results)})"
    )
    for ax, activation in zip(axes, ACTIVATIONS, strict=True):
        for norm in NORMS:
            curves = []
            for s in sorted(results):
                unit = results[s]["units"][train_unit_name(activation, norm)]
                values = [
                    np.nan
                    if n[0] is None or n[-1] is None or not (n[0] > 0 and n[-1] > 0)
                    else math.log10(n[0] / n[-1])
                    for n in unit["norms"]
                ]
                ax.plot(unit["updates"], values, color=COLORS[norm], lw=0.6, alpha=0.5)
                curves.append(values)
            updates = config.record_updates()
            full = np.full((len(curves), len(updates)), np.nan)
            for k, values in enumerate(curves):
                full[k, : len(values)] = values
            with np.errstate(invalid="ignore"):
                ax.plot(
                    updates,
                    np.nanmean(full, axis=0),
                    color=COLORS[norm],
                    lw=2.0,
                    label=LABELS[norm],
                )
        ax.axhline(0.0, color="0.5", lw=0.8)
        ax.set_xlabel("SGD updates before the gradient")
        ax.set_ylabel("log10 |dL/dW_1| / |dL/dW_D|")
        lrs = ", ".join(
            f"{'BN' if n == 'batchnorm' else 'no BN'} {config.lrs[arm_name(activation, n)]:g}"
            for n in NORMS
        )
        ax.set_title(f"{activation} ({_INITS[activation]}; lr {lrs})", fontsize=9)
        ax.grid(alpha=0.3)
    _legend(figure, axes)
    return figure
