"""One measurement of the population experiment: a trained network tested on the validation and
test sets with every source of inference statistics.

:func:`measure` is what :func:`~batchnorm.lab.experiments.population.run_seed` calls at each
network's early and end step. Every source is tested on a deep copy of the network, so
measuring never touches the network that goes on training: the running averages of each
momentum (:class:`~._population_ema.RunningAverages`), the exact population statistics
(:func:`~batchnorm.tools.population.recompute_statistics`, ``method="sequential"``), the two
one-pass estimators (``"pooled"``, ``"paper"``) and the control, which normalises the examples
with their own mini-batch statistics.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ...tools.population import recompute_statistics
from .. import data as lab_data
from ._population_ema import RunningAverages, bn_layers
from ._population_spec import CONTROL, EXACT, EXTRA, SPLITS, ema_method, methods

__all__ = [
    "EXACT_PASS_BATCH",
    "batch_own_metrics",
    "batch_slices",
    "evaluate",
    "exact_statistics",
    "measure",
    "statistics_batches",
]

# Examples per batch of the exact (sequential) pass. Its statistics do not depend on how the
# training set is cut: the first layer's input involves no normalisation, and each later layer
# is recomputed with the layers before it in eval mode. Large batches only make it faster.
EXACT_PASS_BATCH = 1_000


def batch_slices(n: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Indices ``0 .. n - 1`` in one seeded order, cut into batches of ``batch_size``.

    Every index is used once. The last batch is smaller when ``batch_size`` does not divide
    ``n``; if it would hold a single example, that example joins the batch before it instead,
    because BatchNorm cannot normalise one value per channel.

    Args:
        n: Number of examples, ``>= 2``.
        batch_size: Examples per batch, ``>= 2``.
        seed: Seeds the order (a generator of its own; global RNGs are untouched).

    Raises:
        ValueError: If ``batch_size < 2`` or ``n < 2``.
    """
    if batch_size < 2 or n < 2:
        raise ValueError(
            f"batch_slices(): expected batch_size >= 2 and at least 2 examples, got "
            f"batch_size={batch_size!r} and {n} examples."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def statistics_batches(x: torch.Tensor, batch_size: int, seed: int) -> list[torch.Tensor]:
    """The rows of ``x`` in the batches of :func:`batch_slices` (for the one-pass estimators)."""
    return [x[idx] for idx in batch_slices(len(x), batch_size, seed)]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy (nats) and the fraction classified correctly, in one forward.

    The mean is taken in float64, so that differences of a thousandth of a nat between
    sources of statistics are not float32 rounding of a sum over thousands of examples.
    """
    with torch.no_grad():
        logits = model(x).double()
        loss = nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).double().mean().item()
    return loss, accuracy


def batch_own_metrics(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int
) -> tuple[float, float]:
    """The control: loss and accuracy when every BN layer normalises each mini-batch of the
    examples with that batch's own statistics (training-mode BN), as :func:`evaluate` returns.

    Works on a deep copy: ``model``'s buffers and modes are left as they were. The batches are
    :func:`batch_slices` of the examples.
    """
    probe = copy.deepcopy(model)
    for _, layer in bn_layers(probe):
        layer.train()
    logits, labels = [], []
    with torch.no_grad():
        for idx in batch_slices(len(y), batch_size, seed):
            logits.append(probe(x[idx]).double())
            labels.append(y[idx])
    logits_all, labels_all = torch.cat(logits), torch.cat(labels)
    loss = nn.functional.cross_entropy(logits_all, labels_all).item()
    accuracy = (logits_all.argmax(dim=1) == labels_all).double().mean().item()
    return loss, accuracy


def exact_statistics(probe: nn.Module, x_train: torch.Tensor) -> None:
    """Write the exact population statistics of ``probe``'s inference network over ``x_train``
    into its BN buffers (``recompute_statistics(method="sequential")``)."""
    batches = [x_train[a : a + EXACT_PASS_BATCH] for a in range(0, len(x_train), EXACT_PASS_BATCH)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    recompute_statistics(probe, batches, method=EXACT, progress=False)


def measure(
    model: nn.Module,
    averages: RunningAverages,
    data: lab_data.Dataset,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    """Test a network with every source of inference statistics on the validation and test sets.

    Args:
        model: The network being trained (left exactly as it was).
        averages: The running averages followed on it.
        data: The dataset, with a validation split.
        batch_size: The training batch size: the batches of the one-pass estimators and of
            the control.
        seed: Seeds the order of those batches.

    Returns:
        ``{"train_loss": float, "val": {...}, "test": {...}}``; each split holds ``"loss"``
        and ``"accuracy"``, each a dict over :func:`~._population_spec.methods`. ``train_loss``
        is the mean loss over the whole training set with the exact statistics in eval mode,
        comparable with the validation loss of the same statistics.
    """
    splits = {"val": data.validation(), "test": (data.x_test, data.y_test)}
    found: dict[str, Any] = {s: {"loss": {}, "accuracy": {}} for s in SPLITS}
    probe = copy.deepcopy(model).eval()

    def record(method: str) -> None:
        for split, (x, y) in splits.items():
            found[split]["loss"][method], found[split]["accuracy"][method] = evaluate(probe, x, y)

    for m in averages.momenta:
        averages.load_into(probe, m)
        record(ema_method(m))
    # Each call overwrites every BN buffer and none reads what the one before wrote: pooled and
    # paper normalise with batch statistics only, and sequential's first pass does too.
    for method in EXTRA:
        batches = statistics_batches(data.x_train, batch_size, seed)
        recompute_statistics(probe, batches, method=method, progress=False)
        record(method)
    exact_statistics(probe, data.x_train)
    record(EXACT)
    train_loss = evaluate(probe, data.x_train, data.y_train)[0]
    for split, (x, y) in splits.items():
        loss, accuracy = batch_own_metrics(probe, x, y, batch_size, seed)
        found[split]["loss"][CONTROL], found[split]["accuracy"][CONTROL] = loss, accuracy
    # In report order (methods()), whatever order they were measured in.
    order = methods(averages.momenta)
    for split in SPLITS:
        for key in ("loss", "accuracy"):
            found[split][key] = {m: found[split][key][m] for m in order}
    return {"train_loss": train_loss, **found}
