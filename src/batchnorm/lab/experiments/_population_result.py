"""All seeds of a population run as arrays: :class:`PopulationResult`, built from the
per-seed results (or their JSON), is what the summary, the rules and the figures read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ._population_config import PopulationConfig
from ._population_spec import PHASES, SPLITS

__all__ = ["PopulationResult"]


@dataclass(frozen=True)
class PopulationResult:
    """All seeds of a run as arrays (``S`` seeds, ``B`` batch sizes).

    Attributes:
        config: The run's settings.
        seeds: The seeds, in order.
        batch_sizes: The batch sizes, in the config's order.
        momenta: The momenta whose running averages were followed.
        methods: The sources of inference statistics, in report order.
        steps: Phase (``"early"``/``"end"``) -> int64 ``(B,)``, the step of each network's
            measurement.
        lr: float64 ``(B,)``, each batch size's learning rate.
        loss: Split (``"val"``/``"test"``) -> phase -> method -> float64 ``(S, B)``.
        accuracy: Likewise, the fraction classified correctly.
        train_loss: Phase -> float64 ``(S, B)``, the training set's loss with the exact
            statistics.
        n_val: Validation examples.
        n_test: Test examples.
        summary: The dict ``summarize`` returns, if known.
    """

    config: PopulationConfig
    seeds: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    momenta: tuple[float, ...]
    methods: tuple[str, ...]
    steps: dict[str, np.ndarray]
    lr: np.ndarray
    loss: dict[str, dict[str, dict[str, np.ndarray]]]
    accuracy: dict[str, dict[str, dict[str, np.ndarray]]]
    train_loss: dict[str, np.ndarray]
    n_val: int
    n_test: int
    summary: dict = field(default_factory=dict)

    @classmethod
    def from_seed_results(
        cls, config: PopulationConfig, results: Mapping[int, dict], summary: dict | None = None
    ) -> PopulationResult:
        """Build from a dict seed -> ``run_seed`` result (e.g. read back from JSON).

        Raises:
            ValueError: If ``results`` is empty or its seeds disagree on the batch sizes,
                momenta, sources of statistics, steps or learning rates.
        """
        where = "PopulationResult.from_seed_results()"
        if not results:
            raise ValueError(f"{where}: expected results, got none.")
        seeds = tuple(sorted(results))
        rows = [results[s] for s in seeds]
        first = rows[0]
        shared = ("batch_sizes", "momenta", "methods", "lr", "steps", "n_val", "n_test")
        for r in rows[1:]:
            differ = [key for key in shared if r[key] != first[key]]
            if differ:
                raise ValueError(
                    f"{where}: expected every seed to share {list(shared)}, got seed {r['seed']} "
                    f"differing from seed {first['seed']} in {differ}."
                )
        sizes = [str(b) for b in first["batch_sizes"]]
        method_names = tuple(first["methods"])

        def stack(split: str, key: str, phase: str, method: str) -> np.ndarray:
            return np.array(
                [[r["measurements"][b][phase][split][key][method] for b in sizes] for r in rows],
                dtype=np.float64,
            )

        loss = {
            s: {p: {m: stack(s, "loss", p, m) for m in method_names} for p in PHASES}
            for s in SPLITS
        }
        accuracy = {
            s: {p: {m: stack(s, "accuracy", p, m) for m in method_names} for p in PHASES}
            for s in SPLITS
        }
        train_loss = {
            p: np.array(
                [[r["measurements"][b][p]["train_loss"] for b in sizes] for r in rows],
                dtype=np.float64,
            )
            for p in PHASES
        }
        steps = {
            p: np.array([first["measurements"][b][p]["step"] for b in sizes], dtype=np.int64)
            for p in PHASES
        }
        return cls(
            config=config,
            seeds=seeds,
            batch_sizes=tuple(int(b) for b in first["batch_sizes"]),
            momenta=tuple(float(m) for m in first["momenta"]),
            methods=method_names,
            steps=steps,
            lr=np.array([first["lr"][b] for b in sizes], dtype=np.float64),
            loss=loss,
            accuracy=accuracy,
            train_loss=train_loss,
            n_val=int(first["n_val"]),
            n_test=int(first["n_test"]),
            summary=dict(summary or {}),
        )

    def column(self, batch_size: int) -> int:
        """The index of ``batch_size`` in the ``B`` axis.

        Raises:
            ValueError: If the run did not train that batch size.
        """
        if batch_size not in self.batch_sizes:
            raise ValueError(
                f"PopulationResult.column(): expected a batch size among "
                f"{list(self.batch_sizes)}, got {batch_size!r}."
            )
        return self.batch_sizes.index(batch_size)
