"""All seeds of a population run as arrays: :class:`PopulationResult`, built from the
per-seed results (or their JSON), is what the summary and the figures read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ._population_config import PopulationConfig
from ._population_spec import COMPARED, EARLY_FRACTION, GAPS, METHODS, REFERENCE

__all__ = ["PopulationResult"]


@dataclass(frozen=True)
class PopulationResult:
    """All seeds of a run as arrays: what the plot functions take.

    Attributes:
        config: The run's settings.
        seeds: The seeds, in order.
        layers: The BN layers' names, in module order.
        steps: int64 array ``(T,)`` of measured steps (the same for every seed).
        test_accuracy: Method (each of :data:`METHODS`) -> float64 ``(S, T)``.
        test_loss: Method -> float64 ``(S, T)``.
        gap: Each of :data:`COMPARED` (``"ema"``, ``"pooled"``, ``"paper"``) ->
            ``"mean_shift"``/``"log_var_ratio"`` -> float64 ``(S, L, T)``, the gap to the
            :data:`REFERENCE` (sequential) statistics.
        final_statistics: Per seed, layer -> method -> ``{"mean", "var"}`` float64 ``(C,)``,
            and ``"eps"`` -> the layer's ``eps`` (a float) where the seed recorded it.
        summary: The dict :func:`summarize` returns (claims, numbers).
    """

    config: PopulationConfig
    seeds: tuple[int, ...]
    layers: tuple[str, ...]
    steps: np.ndarray
    test_accuracy: dict[str, np.ndarray]
    test_loss: dict[str, np.ndarray]
    gap: dict[str, dict[str, np.ndarray]]
    final_statistics: list[dict[str, dict[str, dict[str, np.ndarray]]]]
    summary: dict = field(default_factory=dict)

    @classmethod
    def from_seed_results(
        cls, config: PopulationConfig, results: Mapping[int, dict], summary: dict | None = None
    ) -> PopulationResult:
        """Build from a dict seed -> :func:`run_seed` result (e.g. read back from JSON).

        Raises:
            ValueError: If ``results`` is empty, the seeds were measured at different steps or
                on different layers, or a seed comes from an earlier version of this
                experiment (without the sequential statistics, gaps measured to pooled).
        """
        where = "PopulationResult.from_seed_results()"
        if not results:
            raise ValueError(f"{where}: expected results, got none.")
        seeds = tuple(sorted(results))
        rows = [results[s] for s in seeds]
        steps = np.asarray(rows[0]["steps"], dtype=np.int64)
        layers = tuple(rows[0]["layers"])
        for r in rows:
            if r.get("reference") != REFERENCE or any(m not in r["test_accuracy"] for m in METHODS):
                # Results without a "reference" predate it: they measured gaps to pooled.
                raise ValueError(
                    f"{where}: expected results measuring {list(METHODS)} with gaps to "
                    f"{REFERENCE!r}, got seed {r['seed']} measuring {list(r['test_accuracy'])} "
                    f"with gaps to {r.get('reference', 'pooled')!r}, from an earlier version of "
                    "this experiment; re-run it."
                )
            if list(r["steps"]) != steps.tolist() or tuple(r["layers"]) != layers:
                raise ValueError(
                    f"{where}: expected every seed to be measured at the same steps and layers, "
                    f"got steps {list(r['steps'])[:5]}... and layers {list(r['layers'])} for "
                    f"seed {r['seed']}, against {steps.tolist()[:5]}... and {list(layers)}."
                )

        def stack(key: str) -> dict[str, np.ndarray]:
            return {m: np.array([r[key][m] for r in rows], dtype=np.float64) for m in METHODS}

        gap = {
            m: {
                g: np.array(
                    [[r["gap"][m][g][name] for name in layers] for r in rows], dtype=np.float64
                )
                for g in GAPS
            }
            for m in COMPARED
        }
        final = []
        for r in rows:
            per_layer = {}
            for name in layers:
                recorded = r.get("final_statistics", {}).get(name, {})
                per_layer[name] = {
                    m: {k: np.asarray(v, dtype=np.float64) for k, v in by_method.items()}
                    for m, by_method in recorded.items()
                    if m in METHODS
                }
                if "eps" in recorded:
                    per_layer[name]["eps"] = float(recorded["eps"])
            final.append(per_layer)
        return cls(
            config,
            seeds,
            layers,
            steps,
            stack("test_accuracy"),
            stack("test_loss"),
            gap,
            final,
            dict(summary or {}),
        )

    def variance_ratios(self, method: str, layer: str) -> np.ndarray:
        r"""Per seed and channel, ``method``'s final variance over the sequential one.

        .. math::
            r_c = \frac{v_c + \epsilon}{v^*_c + \epsilon}

        with :math:`v^*` the :data:`REFERENCE` variances and :math:`\epsilon` the layer's
        ``eps`` (0 if not recorded), as in :func:`statistics_gap`, whose ``log_var_ratio`` is
        the mean of :math:`|\log r_c|`; the sign, which that gap drops, says whether
        ``method`` under- or over-estimates the spread the layer sees at inference.

        Args:
            method: One of :data:`METHODS`.
            layer: One of :attr:`layers`.

        Returns:
            float64 ``(S', C)``: one row per seed that recorded final statistics of both
            ``method`` and the reference for ``layer`` (``S' = 0`` if none did).

        Raises:
            ValueError: If ``method`` or ``layer`` is unknown.
        """
        if method not in METHODS or layer not in self.layers:
            raise ValueError(
                f"PopulationResult.variance_ratios(): expected method in {list(METHODS)!r} and "
                f"layer in {list(self.layers)!r}, got {method!r} and {layer!r}."
            )
        rows = []
        for per_layer in self.final_statistics:
            recorded = per_layer.get(layer, {})
            if method in recorded and REFERENCE in recorded:
                eps = recorded.get("eps", 0.0)
                rows.append((recorded[method]["var"] + eps) / (recorded[REFERENCE]["var"] + eps))
        width = len(rows[0]) if rows else 0
        return np.array(rows, dtype=np.float64).reshape(len(rows), width)

    def early_mask(self) -> np.ndarray:
        """Boolean ``(T,)``: the measured steps that count as early for the lag claim.

        Steps ``s`` with ``0 < s <= max(ceil(EARLY_FRACTION * steps), first measured s > 0)``.
        """
        positive = self.steps[self.steps > 0]
        if not len(positive):
            return np.zeros(len(self.steps), dtype=bool)
        until = max(math.ceil(EARLY_FRACTION * self.config.steps), int(positive[0]))
        return (self.steps > 0) & (self.steps <= until)
