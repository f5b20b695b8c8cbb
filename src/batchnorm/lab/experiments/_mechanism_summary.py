"""The verdict of a mechanism run: a run's results as arrays (:class:`MechanismResult`), each
seed's numbers per arm (:func:`seed_numbers`), the rules' per-seed effects, and the printable
report. The rules themselves are declared in :mod:`batchnorm.lab.experiments.mechanism`; this
module only knows how to measure each one by its key (:func:`effects`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._classify import best_smoothed
from .._training import measured_steps
from ..protocol import Rule, judge_rules, verdict_line
from ._mechanism_config import ARMS, CLAIM, MechanismConfig, probe_steps
from ._mechanism_training import SHIFT_KEYS, layer_names

__all__ = [
    "FIGURE_NOTES",
    "MechanismResult",
    "effects",
    "seed_numbers",
    "stats",
    "summarize",
]

# Figure name -> what to see in it (plot() draws exactly these).
FIGURE_NOTES = {
    "shift": (
        "Each layer's gradient shift over training, one column per arm: top, how much the "
        "layer's weight gradient changes (relative to its size) when only the earlier layers "
        "take a step; bottom, the cosine between the two gradients. Ioffe's account predicts "
        "lower shift and cosines nearer 1 with BN; Santurkar's, as much shift with BN."
    ),
    "shift_by_layer": (
        "The same shift per layer as each seed's median over training (dots: seeds, bars: "
        "means), the arms side by side: the numbers the two covariate-shift rules compare."
    ),
    "landscape": (
        "Along the gradient from the current weights: the loss's range, the largest change of "
        "the gradient, and the effective beta-smoothness, over training; lower means a "
        "smoother landscape, which Santurkar et al. credit BN with."
    ),
    "training": (
        "Training loss and validation accuracy of the three arms, each at its own tuned "
        "learning rate: does noisy BN, whose layer inputs move at every step, train as well "
        "as BN?"
    ),
}


def _floats(values: Any, missing: float = math.nan) -> np.ndarray:
    """Nested lists with ``None`` -> float64 array with ``missing`` in their place."""
    if isinstance(values, list):
        return np.array([_floats(v, missing) for v in values], dtype=np.float64)
    return np.float64(missing if values is None else values)


def _padded(rows: Sequence[np.ndarray], length: int, tail: tuple[int, ...]) -> np.ndarray:
    """Stack per-seed arrays of up to ``length`` steps, NaN after a seed's last step."""
    out = np.full((len(rows), length, *tail), np.nan)
    for i, row in enumerate(rows):
        if len(row):
            out[i, : len(row)] = np.asarray(row).reshape(len(row), *tail)
    return out


@dataclass(frozen=True)
class MechanismResult:
    """All seeds of a run as arrays: what the summary and the figures read.

    Attributes:
        config: The run's settings.
        seeds: The seeds, in order.
        layers: The measured layers (``fc1 .. out``).
        probe_steps: int64 ``(T,)``: the steps the shift and landscape were measured at.
        curve_steps: int64 ``(C,)``: the steps validation was measured at.
        shift: Arm -> ``"shift"``/``"shift_own"`` -> ``l2``/``relative``/``cos`` -> float64
            ``(S, T, L)`` (NaN where undefined or not measured).
        loss, grad_change: Arm -> float64 ``(S, T, E)``, one value per eta; ``inf`` where
            the loss along the gradient was not finite, NaN where not measured.
        grad_norm: Arm -> float64 ``(S, T)``.
        curves: Arm -> ``train_loss``/``val_accuracy``/``val_loss`` -> float64 ``(S, C)``.
        test_accuracy: Arm -> float64 ``(S,)`` at the end (NaN for a diverged run).
        lrs: Arm -> learning rate.
        summary: The dict :func:`summarize` returns.
    """

    config: MechanismConfig
    seeds: tuple[int, ...]
    layers: list[str]
    probe_steps: np.ndarray
    curve_steps: np.ndarray
    shift: dict[str, dict[str, dict[str, np.ndarray]]]
    loss: dict[str, np.ndarray]
    grad_change: dict[str, np.ndarray]
    grad_norm: dict[str, np.ndarray]
    curves: dict[str, dict[str, np.ndarray]]
    test_accuracy: dict[str, np.ndarray]
    lrs: dict[str, float]
    summary: dict = field(default_factory=dict)

    @property
    def etas(self) -> tuple[float, ...]:
        return self.config.etas

    @classmethod
    def from_seed_results(
        cls, config: MechanismConfig, results: Mapping[int, dict], summary: dict | None = None
    ) -> MechanismResult:
        """Build from seed -> :func:`run_seed` result (e.g. read back from JSON).

        Raises:
            ValueError: If ``results`` is empty.
        """
        if not results:
            raise ValueError("MechanismResult.from_seed_results(): expected results, got none.")
        seeds = tuple(sorted(results))
        steps = np.asarray(probe_steps(config), dtype=np.int64)
        curve_steps = np.asarray(measured_steps(config), dtype=np.int64)
        n_steps, n_layers, n_etas = len(steps), config.depth + 1, len(config.etas)
        shift, loss, change, norm, curves, test = {}, {}, {}, {}, {}, {}
        for arm in ARMS:
            units = [results[s]["units"][arm] for s in seeds]
            probes = [u["probe"] for u in units]
            shift[arm] = {
                kind: {
                    key: _padded([_floats(p[kind][key]) for p in probes], n_steps, (n_layers,))
                    for key in SHIFT_KEYS
                }
                for kind in ("shift", "shift_own")
            }
            # A loss or gradient that was not finite along the gradient: infinitely rough.
            loss[arm] = _padded([_floats(p["loss"], math.inf) for p in probes], n_steps, (n_etas,))
            change[arm] = _padded(
                [_floats(p["grad_change"], math.inf) for p in probes], n_steps, (n_etas,)
            )
            norm[arm] = _padded([_floats(p["grad_norm"]) for p in probes], n_steps, ())
            curves[arm] = {
                key: _padded([_floats(u["curve"][key]) for u in units], len(curve_steps), ())
                for key in ("train_loss", "val_accuracy", "val_loss")
            }
            test[arm] = np.array([_floats(u["test_accuracy"]) for u in units], dtype=np.float64)
        lrs = {arm: float(results[seeds[0]]["units"][arm]["lr"]) for arm in ARMS}
        return cls(
            config=config,
            seeds=seeds,
            layers=layer_names(config),
            probe_steps=steps,
            curve_steps=curve_steps,
            shift=shift,
            loss=loss,
            grad_change=change,
            grad_norm=norm,
            curves=curves,
            test_accuracy=test,
            lrs=lrs,
            summary=dict(summary or {}),
        )

    # --- per measurement, per seed (S, T) ---------------------------------------------------

    def layer_mean(self, arm: str, key: str = "relative", kind: str = "shift") -> np.ndarray:
        """``(S, T)``: the mean over the layers that have earlier layers (all but ``fc1``)."""
        values = self.shift[arm][kind][key][:, :, 1:]
        if key == "cos":
            values = 1.0 - values
        return values.mean(axis=2)

    def loss_range(self, arm: str) -> np.ndarray:
        """``(S, T)``: max - min over the etas of the loss along the gradient."""
        with np.errstate(invalid="ignore"):
            return self.loss[arm].max(axis=2) - self.loss[arm].min(axis=2)

    def max_grad_change(self, arm: str) -> np.ndarray:
        """``(S, T)``: the largest gradient change along the gradient."""
        return self.grad_change[arm].max(axis=2)

    def beta(self, arm: str) -> np.ndarray:
        """``(S, T)``: the effective beta-smoothness, max over eta of change / (eta |g|)."""
        etas = np.asarray(self.etas)[None, None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = self.grad_change[arm] / (etas * self.grad_norm[arm][:, :, None])
        return ratio.max(axis=2)


def _median(values: np.ndarray) -> np.ndarray:
    """Per seed: the median over measurements, NaN ignored (``inf`` counts as a large value)."""
    out = np.full(values.shape[0], np.nan)
    for i, row in enumerate(values):
        kept = row[~np.isnan(row)]
        if len(kept):
            out[i] = float(np.median(kept))
    return out


def seed_numbers(result: MechanismResult) -> dict[str, dict[str, np.ndarray]]:
    """Arm -> measure -> ``(S,)``: each seed's number (medians over the measurements)."""
    numbers = {}
    for arm in ARMS:
        numbers[arm] = {
            "test_accuracy": result.test_accuracy[arm],
            "best_val_accuracy": np.array(
                [
                    best_smoothed([None if math.isnan(v) else v for v in row], result.config.smooth)
                    for row in result.curves[arm]["val_accuracy"]
                ]
            ),
            "relative_shift": _median(result.layer_mean(arm)),
            "relative_shift_own": _median(result.layer_mean(arm, kind="shift_own")),
            "one_minus_cos": _median(result.layer_mean(arm, "cos")),
            "shift_l2": _median(result.layer_mean(arm, "l2")),
            "loss_range": _median(result.loss_range(arm)),
            "max_grad_change": _median(result.max_grad_change(arm)),
            "beta": _median(result.beta(arm)),
            "grad_norm": _median(result.grad_norm[arm]),
        }
    return numbers


def _ratio(a: np.ndarray, b: np.ndarray) -> list[float | None]:
    out = []
    for x, y in zip(a, b, strict=True):
        value = x / y if y > 0 else math.nan
        out.append(float(value) if math.isfinite(value) else None)
    return out


def _difference(a: np.ndarray, b: np.ndarray, plus: float = 0.0) -> list[float | None]:
    out = []
    for x, y in zip(a, b, strict=True):
        value = 100.0 * (x - y) + plus
        out.append(float(value) if math.isfinite(value) else None)
    return out


# The noisy-BN rule's margin, in percentage points; the rule's threshold is 0 on
# (noisy - bn) + margin. Declared with the rules in mechanism.py's RULES text.
NOISY_MARGIN_PP = 2.0


def effects(numbers: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, list[float | None]]:
    """Each rule's per-seed effect, by key (larger favours the claim; ``None``: undefined)."""
    none, bn, noisy = numbers["none"], numbers["bn"], numbers["noisy"]
    return {
        "ics_ioffe": _ratio(none["relative_shift"], bn["relative_shift"]),
        "ics_santurkar": _ratio(bn["relative_shift"], none["relative_shift"]),
        "loss_range": _ratio(none["loss_range"], bn["loss_range"]),
        "grad_change": _ratio(none["max_grad_change"], bn["max_grad_change"]),
        "beta": _ratio(none["beta"], bn["beta"]),
        "noisy_as_bn": _difference(noisy["test_accuracy"], bn["test_accuracy"], NOISY_MARGIN_PP),
        "noisy_above_none": _difference(noisy["test_accuracy"], none["test_accuracy"]),
    }


def stats(values: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Per-seed values (``None`` where not finite), the mean and sample std of the finite ones
    (``None`` if there are none): JSON without NaN."""
    per_seed = [float(v) if math.isfinite(v) else None for v in values]
    finite = np.array([v for v in per_seed if v is not None], dtype=np.float64)
    return {
        "per_seed": per_seed,
        "mean": float(finite.mean()) if len(finite) else None,
        "std": float(finite.std(ddof=1)) if len(finite) > 1 else (0.0 if len(finite) else None),
    }


def _mean_of(values: np.ndarray) -> str:
    finite = values[np.isfinite(values)]
    return f"{finite.mean():.4g}" if len(finite) else "-"


def _measured(numbers: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, str]:
    def pair(key: str, arms: Sequence[str] = ("none", "bn")) -> str:
        names = {"none": "without BN", "bn": "with BN", "noisy": "noisy BN"}
        return ", ".join(f"{names[a]} {_mean_of(numbers[a][key])}" for a in arms)

    accuracy = {a: 100 * numbers[a]["test_accuracy"] for a in ARMS}
    pp = {a: _mean_of(accuracy[a]) for a in ARMS}
    return {
        "ics_ioffe": f"relative gradient shift (means over seeds): {pair('relative_shift')}",
        "ics_santurkar": f"relative gradient shift (means over seeds): {pair('relative_shift')}",
        "loss_range": f"loss range along the gradient (nats, means): {pair('loss_range')}",
        "grad_change": f"largest gradient change (means): {pair('max_grad_change')}",
        "beta": f"effective beta-smoothness (means): {pair('beta')}",
        "noisy_as_bn": f"final test accuracy (%, means): noisy BN {pp['noisy']}, BN {pp['bn']}",
        "noisy_above_none": (
            f"final test accuracy (%, means): noisy BN {pp['noisy']}, without BN {pp['none']}"
        ),
    }


def summarize(config: MechanismConfig, results: Mapping[int, dict], rules: Sequence[Rule]) -> dict:
    """Judge ``rules`` on a run's results: numbers, the claims rows and a printable report.

    Returns:
        A JSON-serialisable dict: ``experiment``, ``claim``, ``seeds``, ``seconds``,
        ``dataset``, ``lrs``, ``layers``, ``etas``, ``shift_lr``, ``arms`` (per arm and
        measure: :func:`stats` of the seeds' numbers, and ``per_layer`` relative shift and
        ``1 - cos``, each seed's median over training, mean over seeds), ``claims``,
        ``figure_notes``, ``report``.
    """
    result = MechanismResult.from_seed_results(config, results)
    numbers = seed_numbers(result)
    claims = judge_rules(rules, effects(numbers), _measured(numbers))
    arms: dict[str, Any] = {}
    for arm in ARMS:
        arms[arm] = {key: stats(values) for key, values in numbers[arm].items()}
        per_layer = {}
        for key, transform in (("relative", lambda v: v), ("cos", lambda v: 1.0 - v)):
            by_seed = np.stack(
                [
                    _median(transform(result.shift[arm]["shift"][key][:, :, j]))
                    for j in range(len(result.layers))
                ],
                axis=1,
            )
            name = "relative_shift" if key == "relative" else "one_minus_cos"
            per_layer[name] = [stats(by_seed[:, j])["mean"] for j in range(len(result.layers))]
        arms[arm]["per_layer"] = per_layer
        arms[arm]["diverged"] = [bool(results[s]["units"][arm]["diverged"]) for s in result.seeds]
    summary = {
        "experiment": "mechanism",
        "claim": CLAIM,
        "seeds": list(result.seeds),
        "seconds": float(sum(float(r["seconds"]) for r in results.values())),
        "dataset": config.dataset,
        "lrs": dict(result.lrs),
        "layers": result.layers,
        "etas": list(config.etas),
        "shift_lr": config.shift_lr,
        "probe_steps": [int(s) for s in result.probe_steps],
        "arms": arms,
        "claims": claims,
        "figure_notes": dict(FIGURE_NOTES),
    }
    summary["report"] = _report(config, summary)
    return summary


_ROWS = (
    ("final test accuracy", "test_accuracy", 4),
    ("best smoothed val. accuracy", "best_val_accuracy", 4),
    ("relative shift, common step", "relative_shift", 4),
    ("relative shift, own lr", "relative_shift_own", 4),
    ("1 - cos, common step", "one_minus_cos", 4),
    ("shift |G - G'|, common step", "shift_l2", 4),
    ("loss range along gradient", "loss_range", 4),
    ("largest gradient change", "max_grad_change", 4),
    ("effective beta-smoothness", "beta", 4),
    ("gradient norm |g|", "grad_norm", 4),
)


def _cell(entry: Mapping[str, Any], digits: int) -> str:
    if entry["mean"] is None:
        return "-"
    return f"{entry['mean']:.{digits}g} ± {entry['std']:.2g}"


def _report(config: MechanismConfig, s: Mapping[str, Any]) -> list[str]:
    n = len(s["seeds"])
    lines = [
        f"mechanism on {config.dataset}: {config.depth}x{config.hidden} {config.activation} MLP "
        f"({config.init or 'torch default'} init), {config.steps} SGD steps per arm (batch "
        f"{config.batch_size}), {n} seed{'s' if n != 1 else ''}; mean ± std over seeds of each "
        f"seed's median over the {len(s['probe_steps'])} measurements (steps 0, "
        f"{config.measure_every}, ...) on a fixed probe batch",
        "learning rates (tuned per arm on the validation split): "
        + ", ".join(f"{arm} {s['lrs'][arm]:g}" for arm in ARMS),
        f"covariate-shift step of the earlier layers: {s['shift_lr']:g} for every arm (and, as "
        f"'own lr', each arm's learning rate); landscape steps along the gradient: "
        f"{', '.join(f'{e:g}' for e in s['etas'])}; noisy BN strength {config.strength:g}; "
        "shift numbers are means over the layers that have earlier layers "
        f"({', '.join(s['layers'][1:])})",
        "",
    ]
    width = max(len(label) for label, _, _ in _ROWS) + 2
    lines.append(f"{'':<{width}}" + "".join(f"{arm:>22}" for arm in ARMS))
    for label, key, digits in _ROWS:
        lines.append(
            f"{label:<{width}}"
            + "".join(f"{_cell(s['arms'][arm][key], digits):>22}" for arm in ARMS)
        )
    lines.append("")
    for arm in ARMS:
        per_layer = s["arms"][arm]["per_layer"]["relative_shift"]
        shown = ", ".join(
            f"{layer} {'-' if v is None else format(v, '.3g')}"
            for layer, v in zip(s["layers"], per_layer, strict=True)
        )
        lines.append(f"relative shift by layer, {arm}: {shown}")
    for arm in ARMS:
        if any(s["arms"][arm]["diverged"]):
            lines.append(
                f"{arm} diverged in {sum(s['arms'][arm]['diverged'])} of {n} seeds (its numbers "
                "cover the steps before)."
            )
    lines.append("")
    lines += [verdict_line(claim) for claim in s["claims"]]
    failed = [c["key"] for c in s["claims"] if c["verdict"] == "not held"]
    open_ = [c["key"] for c in s["claims"] if c["verdict"] == "inconclusive"]
    lines.append("")
    lines.append(
        "Claims that did not hold: " + (", ".join(failed) if failed else "none") + ". "
        "Inconclusive: " + (", ".join(open_) if open_ else "none") + "."
    )
    return lines
