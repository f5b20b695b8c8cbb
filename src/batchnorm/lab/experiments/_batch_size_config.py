"""Settings of the batch-size experiment: the arms, :class:`BatchSizeConfig` and its
:data:`PRESETS`, and what the runner asks of the settings before any seed runs (:func:`prepare`
loads the dataset with its validation split, :func:`steps_per_seed` sizes the progress bar).

The design is explained in :mod:`batchnorm.lab.experiments.batch_size`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import data as lab_data
from ..protocol import tuned_value

__all__ = [
    "ARMS",
    "ARM_LABELS",
    "CLAIM",
    "DEFAULT_LR",
    "PRESETS",
    "RENORM_BATCH",
    "SMALL_BATCH",
    "BatchSizeConfig",
    "prepare",
    "steps_per_seed",
]

CLAIM = (
    "BatchNorm's error rises at small batches while GroupNorm's stays flat, and batch renorm "
    "recovers part of the loss"
)
# The arms, in the order tables and legends list them (make_cnn1d's norm names).
ARMS = ("none", "batchnorm", "groupnorm", "renorm", "ghost")
ARM_LABELS = {
    "none": "no normalization",
    "batchnorm": "BatchNorm",
    "groupnorm": "GroupNorm",
    "renorm": "batch renorm",
    "ghost": "ghost BN",
}
# The batch sizes the rules compare: Wu & He's smallest (2 per GPU) and Ioffe's microbatch (4).
SMALL_BATCH = 2
RENORM_BATCH = 4
# The reference learning rate of an arm `batchnorm lab tune batch-size` has not tuned: the
# middle of the tuning grid, neither its smallest nor its largest step.
DEFAULT_LR = 0.03
# Training examples of each dataset before the validation split, as batchnorm.lab.data states
# them. The number of SGD steps must follow from the config alone, because the runner checks a
# checkpoint's step against it; prepare() refuses data of another size.
_TRAIN_EXAMPLES = {"mnist1d": 4_000, "mnist1d-large": 60_000, "digits": 1_438}
# Classes of each dataset: a network whose loss became non-finite is counted at chance level.
_CLASSES = {"mnist1d": 10, "mnist1d-large": 10, "digits": 10}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class BatchSizeConfig:
    """Settings of the batch-size experiment.

    One 1-D CNN (:func:`batchnorm.lab.models.make_cnn1d`) is trained per seed, arm and batch
    size; every batch size sees the same number of training examples, so a small batch takes
    more steps, and its learning rate is the arm's reference rate scaled linearly.

    Args:
        dataset: ``"mnist1d"``, ``"mnist1d-large"`` or ``"digits"``.
        n_val: Training examples held out as the validation split (tuning reads it).
        seeds: Number of seeds; seeds ``0 .. seeds - 1`` are run.
        epochs: Training examples seen per network, in passes over the training set: a batch
            size ``b`` trains ``round(epochs * n_train / b)`` steps.
        batch_sizes: The training batch sizes, ascending; they must include 2 (the rules'
            smallest batch) and ``reference_batch``.
        reference_batch: The batch size the learning rates are tuned at, and the rules'
            large batch.
        channels: Channels of the CNN's blocks.
        lr: The reference learning rate of every arm, or ``None``: each arm takes the value
            ``batchnorm lab tune batch-size`` chose for it (else :data:`DEFAULT_LR`). At batch
            size ``b`` the rate is ``lr * b / reference_batch`` (Goyal et al. 2017).
        momentum: SGD's momentum (heavy ball, torch's form), every arm. The learning rate
            decays from its peak (``lr_for``) to 0 along a cosine over each network's steps.
        bn_momentum: The running averages' momentum of every batch-normalising layer, torch's
            meaning (``running = (1 - momentum) * running + momentum * batch``; the opposite of
            flax's decay).
        virtual_batch_size: Examples per ghost batch of the ``ghost`` arm; at a batch of at
            most ``virtual_batch_size + 1`` examples ghost BN is BatchNorm.
        groups: GroupNorm's groups (a divisor of every channel count).
        renorm_warmup: Share of each network's steps over which batch renorm's limits
            ``rmax``/``dmax`` ramp up from BatchNorm's (1, 0) to (3, 5).
        evals: Validation measurements per network (besides step 0).

    Raises:
        ValueError: If a field is outside its range; the message names the field.
    """

    dataset: str = "mnist1d"
    n_val: int = 500
    seeds: int = 5
    epochs: float = 2.5
    batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    reference_batch: int = 32
    channels: tuple[int, ...] = (16, 16, 16)
    lr: float | None = None
    momentum: float = 0.9
    bn_momentum: float = 0.1
    virtual_batch_size: int = 8
    groups: int = 4
    renorm_warmup: float = 0.25
    evals: int = 10

    def __post_init__(self) -> None:
        # JSON gives lists back; the config is hashable and compares as it was written.
        for name in ("batch_sizes", "channels"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        sizes, channels = self.batch_sizes, self.channels
        sizes_ok = (
            isinstance(sizes, tuple)
            and len(sizes) >= 2
            and all(_is_int(b) and b >= 2 for b in sizes)
            and list(sizes) == sorted(set(sizes))
        )
        channels_ok = (
            isinstance(channels, tuple)
            and len(channels) >= 1
            and all(_is_int(c) and c >= 1 for c in channels)
        )
        groups_ok = (
            _is_int(self.groups)
            and self.groups >= 1
            and channels_ok
            and all(c % self.groups == 0 for c in channels)
        )
        real_ok = {
            name: _is_real(getattr(self, name)) for name in ("epochs", "momentum", "bn_momentum")
        }
        checks = [
            ("dataset", self.dataset in _TRAIN_EXAMPLES, f"one of {list(_TRAIN_EXAMPLES)}"),
            ("n_val", _is_int(self.n_val) and self.n_val >= 1, "an int >= 1"),
            ("seeds", _is_int(self.seeds) and self.seeds >= 1, "an int >= 1"),
            ("epochs", real_ok["epochs"] and self.epochs > 0, "a number > 0"),
            ("batch_sizes", sizes_ok, "at least 2 distinct ints >= 2, ascending"),
            ("batch_sizes", SMALL_BATCH in sizes, f"to include {SMALL_BATCH}"),
            ("reference_batch", self.reference_batch in sizes, "one of batch_sizes"),
            ("reference_batch", self.reference_batch > SMALL_BATCH, f"> {SMALL_BATCH}"),
            ("channels", channels_ok, "a non-empty tuple of ints >= 1"),
            ("lr", self.lr is None or (_is_real(self.lr) and self.lr > 0), "a number > 0 or None"),
            ("momentum", real_ok["momentum"] and 0 <= self.momentum < 1, "in [0, 1)"),
            ("bn_momentum", real_ok["bn_momentum"] and 0 < self.bn_momentum <= 1, "in (0, 1]"),
            (
                "virtual_batch_size",
                _is_int(self.virtual_batch_size) and self.virtual_batch_size >= 2,
                "an int >= 2",
            ),
            ("groups", groups_ok, "an int >= 1 dividing every channel count"),
            (
                "renorm_warmup",
                _is_real(self.renorm_warmup) and 0 <= self.renorm_warmup <= 1,
                "in [0, 1]",
            ),
            ("evals", _is_int(self.evals) and self.evals >= 1, "an int >= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(
                    f"BatchSizeConfig(): expected {name} {expected}, got {getattr(self, name)!r}."
                )
        if self.n_train < max(sizes):
            raise ValueError(
                f"BatchSizeConfig(): expected every batch size <= {self.n_train} (the "
                f"{self.dataset} training set less n_val={self.n_val}), got {max(sizes)}."
            )
        shortest = min(self.steps_for(b) for b in sizes)
        if shortest < 1:
            raise ValueError(
                f"BatchSizeConfig(): expected epochs long enough for 1 step at every batch size, "
                f"got 0 steps at batch size {max(sizes)} with epochs={self.epochs!r}."
            )

    @property
    def n_train(self) -> int:
        """Training examples left after the validation split."""
        return _TRAIN_EXAMPLES[self.dataset] - self.n_val

    @property
    def chance_error(self) -> float:
        """Test error (%) of guessing: what a network whose loss became non-finite counts as."""
        return 100.0 * (1.0 - 1.0 / _CLASSES[self.dataset])

    def steps_for(self, batch_size: int) -> int:
        """SGD steps of a network trained with ``batch_size``: ``epochs * n_train`` examples,
        rounded to whole steps (the same examples seen at every batch size)."""
        return round(self.epochs * self.n_train / batch_size)

    def eval_every(self, batch_size: int) -> int:
        """Steps between validation measurements of that network (``evals`` in all)."""
        return max(1, self.steps_for(batch_size) // self.evals)

    def measured(self, batch_size: int) -> int:
        """Validation measurements of that network, step 0 and the last step included."""
        steps, every = self.steps_for(batch_size), self.eval_every(batch_size)
        return len(range(0, steps + 1, every)) + (1 if steps % every else 0)

    def lr_for(self, arm: str, batch_size: int) -> float:
        """The learning rate of ``arm`` at ``batch_size``: its reference rate (``lr``, else
        the tuned value, else :data:`DEFAULT_LR`) times ``batch_size / reference_batch``."""
        return self.reference_lr(arm) * batch_size / self.reference_batch

    def reference_lr(self, arm: str) -> float:
        """The learning rate of ``arm`` at the reference batch size (see ``lr``)."""
        if self.lr is not None:
            return float(self.lr)
        return tuned_value("batch_size", arm, "lr", DEFAULT_LR)

    def is_batchnorm(self, arm: str, batch_size: int) -> bool:
        """Whether ``arm`` at ``batch_size`` computes exactly what BatchNorm computes: ghost BN
        on a batch of at most ``virtual_batch_size + 1`` examples (one ghost batch)."""
        return arm == "ghost" and batch_size <= self.virtual_batch_size + 1

    def norm_options(self, arm: str, steps: int) -> dict[str, Any] | None:
        """The keyword arguments of ``arm``'s normalisation layers in a network of ``steps``
        steps (:func:`batchnorm.lab.models.make_norm`)."""
        if arm == "batchnorm":
            return {"momentum": self.bn_momentum}
        if arm == "ghost":
            return {"momentum": self.bn_momentum, "virtual_batch_size": self.virtual_batch_size}
        if arm == "renorm":
            return {"momentum": self.bn_momentum, "warmup": round(self.renorm_warmup * steps)}
        if arm == "groupnorm":
            return {"groups": self.groups}
        return None


PRESETS: dict[str, BatchSizeConfig] = {
    # Seconds, for tests and CI: scikit-learn's digits, a twentieth of an epoch per network
    # (31, 15 and 4 steps), a small CNN and a fixed learning rate. Not meant to show anything.
    "tiny": BatchSizeConfig(
        dataset="digits",
        n_val=200,
        seeds=2,
        epochs=0.05,
        batch_sizes=(2, 4, 16),
        reference_batch=16,
        channels=(8, 8, 8),
        lr=0.05,
        evals=2,
    ),
    # MNIST-1D, 5 seeds, 0.7 epoch per network (1,225 steps at batch 2, 77 at batch 32): the
    # CPU budget of a quick run (<= 25 CPU-s per seed). Measured on the tuning seed with the
    # tuned learning rates, one thread, the machine shared: 21.8 CPU-s (renorm 7.5, BN 5.2,
    # none 4.4, GN 3.7, ghost 1.0).
    "quick": BatchSizeConfig(epochs=0.7),
    # 2.5 epochs per network (4,375 steps at batch 2, 273 at batch 32), the preset of record
    # and the one the learning rates are tuned with (<= 80 CPU-s per seed). Measured likewise:
    # 61.1 CPU-s (renorm 20.6, BN 14.9, none 11.9, GN 11.2, ghost 2.4).
    "full": BatchSizeConfig(),
}


def prepare(config: BatchSizeConfig) -> lab_data.Dataset:
    """Load the configured dataset with its validation split (once per run; every seed, arm
    and batch size shares it).

    Raises:
        ValueError: If the dataset's training set is not the size the config assumes.
    """
    dataset = lab_data.load_dataset(config.dataset)
    expected = _TRAIN_EXAMPLES[config.dataset]
    if len(dataset.y_train) != expected:
        raise ValueError(
            f"batch_size prepare(): expected {expected} training examples in "
            f"{config.dataset!r} (the number of SGD steps is computed from it), got "
            f"{len(dataset.y_train)}."
        )
    return dataset.with_validation(config.n_val)


def steps_per_seed(config: BatchSizeConfig) -> int:
    """SGD steps per seed over every network trained (ghost BN's networks that are BatchNorm's
    are not trained again), for the progress bar."""
    return sum(
        config.steps_for(b)
        for b in config.batch_sizes
        for arm in ARMS
        if not config.is_batchnorm(arm, b)
    )
