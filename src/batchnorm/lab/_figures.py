"""What every figure module of the lab shares: matplotlib, imported only when a figure is drawn,
and the one way a ``plot_<what>(result, ax=None)`` function gets its figure and axes.

Figures are :class:`matplotlib.figure.Figure` objects built outside pyplot, so they render with
the Agg backend whatever the session's backend is, and need no ``plt.close``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["figure_and_axes", "figure_class"]


def figure_class() -> type:
    """matplotlib's :class:`~matplotlib.figure.Figure`, imported on first use.

    Raises:
        ModuleNotFoundError: If matplotlib is not installed; the message names the lab extra.
    """
    # Imported here, not at the top: the lab's experiments run and test without matplotlib,
    # which only the figures need.
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "batchnorm.lab.plots: expected matplotlib to be installed, got no module "
            "'matplotlib'. Install the lab extra: pip install \"batchnorm[lab]\"."
        ) from err
    return Figure


def figure_and_axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """The figure and axes a plot function draws into.

    Args:
        ax: The caller's axes, or ``None``.
        figsize: Size in inches of the new figure made when ``ax`` is ``None``.

    Returns:
        ``(ax.figure, ax)``, or a new single-axes figure and its axes.
    """
    if ax is not None:
        return ax.figure, ax
    figure = figure_class()(figsize=figsize, dpi=100, layout="constrained")
    return figure, figure.add_subplot()
