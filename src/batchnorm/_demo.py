"""The end-to-end check behind ``batchnorm demo``: train one MLP twice and compare.

The same multilayer perceptron, 64-128-BN-ReLU-128-BN-ReLU-10, is trained on scikit-learn's
bundled 8x8 digits (offline) once with :class:`torch.nn.BatchNorm1d` and once with
:class:`batchnorm.BatchNorm1d`. Both copies start from one ``state_dict``, see the same
mini-batches in the same order and take the same SGD steps, so any difference in their final
logits comes from the normalisation layers alone: the forward pass, the backward pass and the
running-statistics update in training, and the inference path at the end.

This module is a library function; :mod:`batchnorm.cli` only parses arguments and prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["DemoConfig", "DemoResult", "run_demo"]

# The agreement criterion of the demo. float32 training runs through two implementations whose
# reductions round differently (ours accumulates in float64, torch in float32), so the logits
# drift apart by a few float32 ulps per step; 1e-3 absolute leaves room for that over a few
# epochs while any real defect (a wrong variance estimator, a missing gradient term) shows up
# orders of magnitude larger.
LOGITS_ATOL = 1e-3
# Share of the 1797 digits held out for testing (359 images), split by a seeded permutation.
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run.

    Args:
        epochs: Passes over the training set; at least 1.
        seed: Seeds the initial weights, the train/test split and the batch order; at least 0.
        batch_size: Images per SGD step; at least 2 (batch statistics need two values per
            channel). The last incomplete batch of an epoch is dropped, so that no step sees a
            batch of one.
        lr: SGD learning rate; positive.
        momentum: SGD momentum (the optimiser's, not batch norm's), in ``[0, 1)``.
        hidden: Width of the two hidden layers; at least 1.

    Raises:
        ValueError: If a field is outside the range given above.
    """

    epochs: int = 3
    seed: int = 0
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    hidden: int = 128

    def __post_init__(self) -> None:
        checks = [
            ("epochs", self.epochs >= 1, "an int >= 1"),
            ("seed", self.seed >= 0, "an int >= 0"),
            ("batch_size", self.batch_size >= 2, "an int >= 2"),
            ("lr", self.lr > 0, "a float > 0"),
            ("momentum", 0 <= self.momentum < 1, "a float in [0, 1)"),
            ("hidden", self.hidden >= 1, "an int >= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                value = getattr(self, name)
                raise ValueError(f"DemoConfig(): expected {name} to be {expected}, got {value!r}.")


@dataclass(frozen=True)
class DemoResult:
    """What one demo run measured.

    Attributes:
        config: The settings of the run.
        n_train: Number of training images.
        n_test: Number of test images.
        accuracy_torch: Test accuracy of the model with :class:`torch.nn.BatchNorm1d`.
        accuracy_ours: Test accuracy of the model with :class:`batchnorm.BatchNorm1d`.
        max_logit_diff: Largest absolute difference between the two models' test logits, both
            in eval mode (so computed with each model's running statistics).
        prediction_mismatches: Test images whose argmax predictions differ.
        seconds: Wall-clock time of the run, Numba compilation or cache loading included.
    """

    config: DemoConfig
    n_train: int
    n_test: int
    accuracy_torch: float
    accuracy_ours: float
    max_logit_diff: float
    prediction_mismatches: int
    seconds: float

    @property
    def agree(self) -> bool:
        """Whether the two models agree: logits within ``LOGITS_ATOL`` and equal predictions."""
        return self.max_logit_diff < LOGITS_ATOL and self.prediction_mismatches == 0


def _load_digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(x_train, y_train, x_test, y_test)``: float32 images in ``[0, 1]``, long labels."""
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "run_demo(): expected scikit-learn to be installed, got no module 'sklearn'. "
            'Install the lab extra: pip install "batchnorm[lab]".'
        ) from err
    digits = load_digits()
    # Pixel intensities are integers 0..16; scaling to [0, 1] keeps the first layer's
    # pre-activations O(1) without peeking at the test set's statistics.
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = round(TEST_FRACTION * len(y))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _make_mlp(n_in: int, hidden: int, n_out: int, norm: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, hidden),
        norm(hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        norm(hidden),
        nn.ReLU(),
        nn.Linear(hidden, n_out),
    )


def run_demo(
    config: DemoConfig | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> DemoResult:
    """Train the digits MLP with torch.nn's and with our BatchNorm1d from one start; compare.

    Both models are float32 on the CPU, so ours runs on the Numba kernels. Every step feeds
    the same batch to both and steps both optimisers; at the end both are put in eval mode and
    evaluated on the held-out images. Global RNG state is left as it was (the initial weights
    are drawn inside :func:`torch.random.fork_rng`).

    Args:
        config: Settings; ``None`` means ``DemoConfig()``.
        on_step: Called as ``on_step(step, total_steps)`` after each training step (1-based),
            e.g. to advance a progress bar.

    Returns:
        The accuracies, the largest logit difference and the number of differing predictions.

    Raises:
        ValueError: If ``config.batch_size`` exceeds the number of training images.
        ModuleNotFoundError: If scikit-learn (the ``lab`` extra) is not installed.
    """
    from .modules import BatchNorm1d

    config = DemoConfig() if config is None else config
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = _load_digits(config.seed)
    n_train = len(y_train)
    if config.batch_size > n_train:
        raise ValueError(
            f"run_demo(): expected batch_size <= {n_train} (the training images), "
            f"got {config.batch_size}."
        )

    n_classes = int(y_train.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        reference = _make_mlp(x_train.shape[1], config.hidden, n_classes, nn.BatchNorm1d)
        ours = _make_mlp(x_train.shape[1], config.hidden, n_classes, BatchNorm1d)
    # Loading torch's state_dict into ours also checks the drop-in claim: same keys, same shapes.
    ours.load_state_dict(reference.state_dict())

    models = (reference, ours)
    optimizers = [
        torch.optim.SGD(m.parameters(), lr=config.lr, momentum=config.momentum) for m in models
    ]
    loss_fn = nn.CrossEntropyLoss()
    batch_order = torch.Generator().manual_seed(config.seed + 1)
    steps_per_epoch = n_train // config.batch_size
    total_steps = config.epochs * steps_per_epoch

    step = 0
    for model in models:
        model.train()
    for _ in range(config.epochs):
        perm = torch.randperm(n_train, generator=batch_order)
        for b in range(steps_per_epoch):
            idx = perm[b * config.batch_size : (b + 1) * config.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            for model, opt in zip(models, optimizers, strict=True):
                opt.zero_grad(set_to_none=True)
                loss_fn(model(xb), yb).backward()
                opt.step()
            step += 1
            if on_step is not None:
                on_step(step, total_steps)

    with torch.no_grad():
        logits = []
        for model in models:
            model.eval()
            logits.append(model(x_test))
    pred_torch, pred_ours = (lg.argmax(dim=1) for lg in logits)
    return DemoResult(
        config=config,
        n_train=n_train,
        n_test=len(y_test),
        accuracy_torch=(pred_torch == y_test).double().mean().item(),
        accuracy_ours=(pred_ours == y_test).double().mean().item(),
        max_logit_diff=(logits[0] - logits[1]).abs().max().item(),
        prediction_mismatches=int((pred_torch != pred_ours).sum()),
        seconds=time.perf_counter() - start,
    )
