r"""What the learning-rate and initialization experiments share: their two networks, one unit of
training with the hidden layers' weight norms recorded, and the scale-invariance arithmetic.

The networks (:data:`NETS`): ``relu6``, 6 hidden layers of ``hidden`` ReLU units with He's
initialisation, a deep net whose plain version is sensitive to the step size; ``sigmoid3``, the
paper's 3 hidden layers of sigmoid units (Ioffe & Szegedy 2015, Sec. 4.1) with Glorot's
initialisation, the standard scale for sigmoid. Each is trained without normalisation
(``"none"``) and with BatchNorm between each affine map and its activation (``"bn"``); the two
start from the same ``nn.Linear`` weights when drawn from generators in the same state
(:func:`batchnorm.lab.models.make_mlp`).

Scale invariance. A hidden layer ``fc<l>`` of a ``"bn"`` net has no bias and is followed by
BatchNorm, which normalises each unit over the batch, so for any :math:`c > 0`

.. math:: \mathrm{BN}(c W x) = \mathrm{BN}(W x) \quad (\epsilon = 0), \qquad
    \nabla_{cW} L = \tfrac{1}{c} \nabla_W L, \qquad \langle \nabla_W L, W \rangle = 0 .

One SGD step of rate :math:`\eta` therefore moves :math:`W` by a *relative* amount
:math:`\eta \lVert \nabla_W L \rVert / \lVert W \rVert`, which for the same function scales as
:math:`\eta / \lVert W \rVert^2`: the *effective learning rate* of Arora et al. (2019, "Theoretical
analysis of auto rate-tuning by batch normalization"). Since the gradient is orthogonal to
:math:`W`, plain SGD (no weight decay) can only grow the norm,
:math:`\lVert W_{t+1} \rVert^2 = \lVert W_t \rVert^2 + \eta^2 \lVert \nabla_W L \rVert^2`, so the
effective rate falls by itself during training, the more so the larger :math:`\eta`. With
:math:`\epsilon > 0` the invariance holds exactly when :math:`\epsilon` is scaled by :math:`c^2`
too; with the fixed :math:`\epsilon = 10^{-5}` it holds as long as each unit's batch variance is
well above :math:`\epsilon`. :func:`effective_rates` uses the Frobenius norm of the whole layer:
the rate the layer would have if its weight were rescaled to unit norm (BatchNorm normalises
each unit, so each row is scale-invariant on its own as well).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ... import NonFiniteStatisticsWarning
from .. import _checks as check
from .._classify import check_curve, diverged, finite_or_none, train_classifier
from .._units import Unit
from ..models import make_mlp

__all__ = [
    "NETS",
    "NET_LABELS",
    "NORMS",
    "accuracy_or_chance",
    "arm_name",
    "check_run",
    "unit_checker",
    "effective_rates",
    "hidden_gradients",
    "hidden_weights",
    "make_net",
    "measured_steps",
    "relative_steps",
    "train_unit",
    "weight_norms",
]

# name -> (hidden layers, activation, initialisation).
NETS: dict[str, tuple[int, str, str]] = {
    "relu6": (6, "relu", "he"),
    "sigmoid3": (3, "sigmoid", "glorot"),
}
NET_LABELS = {
    "relu6": "6-layer ReLU MLP (He init)",
    "sigmoid3": "3-layer sigmoid MLP (Glorot init)",
}
# The normalisation of an arm: none, or BatchNorm (this library's BatchNorm1d).
NORMS = ("none", "bn")
_MODEL_NORM = {"none": "none", "bn": "batchnorm"}


def arm_name(net: str, norm: str) -> str:
    """An arm's name: ``"relu6/bn"``."""
    return f"{net}/{norm}"


def make_net(
    net: str,
    norm: str,
    *,
    n_in: int,
    n_out: int,
    hidden: int,
    generator: torch.Generator,
    weight_scale: float = 1.0,
) -> nn.Sequential:
    """One of :data:`NETS` without (``norm="none"``) or with BatchNorm (``"bn"``), every weight
    multiplied by ``weight_scale`` after it is drawn, biases zero.

    Raises:
        ValueError: If ``net`` or ``norm`` is unknown.
    """
    if net not in NETS:
        raise ValueError(f"make_net(): expected net in {list(NETS)!r}, got {net!r}.")
    if norm not in NORMS:
        raise ValueError(f"make_net(): expected norm in {list(NORMS)!r}, got {norm!r}.")
    depth, activation, init = NETS[net]
    return make_mlp(
        n_in,
        n_out,
        hidden=hidden,
        depth=depth,
        activation=activation,
        norm=_MODEL_NORM[norm],
        init=init,
        generator=generator,
        weight_scale=weight_scale,
    )


def hidden_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights of the hidden affine maps ``fc1, fc2, ...`` in order (not the output's)."""
    weights = []
    for i in itertools.count(1):
        layer = getattr(model, f"fc{i}", None)
        if layer is None:
            break
        weights.append(layer.weight)
    return weights


def weight_norms(model: nn.Module) -> list[float]:
    """The Frobenius norm of each hidden layer's weight, ``[||W_1||, ||W_2||, ...]``."""
    with torch.no_grad():
        return [float(torch.linalg.vector_norm(w.double())) for w in hidden_weights(model)]


def _finite_norms(model: nn.Module) -> list[float | None]:
    # A step that overflows the weights is followed by a non-finite loss, which ends the run;
    # a measurement at that step keeps None for JSON's sake.
    return [finite_or_none(n) for n in weight_norms(model)]


def effective_rates(lr: float, norms: Sequence[float]) -> list[float]:
    r"""Arora et al.'s effective learning rate of each layer, :math:`\eta / \lVert W_l \rVert^2`."""
    return [lr / n**2 for n in norms]


def hidden_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The gradients of the mean cross-entropy on ``(x, y)`` with respect to each hidden
    layer's weight (one training-mode forward: BN layers use the batch's statistics and update
    their running buffers). Earlier gradients are cleared."""
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    grads = []
    for w in hidden_weights(model):
        assert w.grad is not None, "the backward pass reaches every hidden weight"
        grads.append(w.grad.detach().clone())
    return grads


def relative_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> list[float]:
    r"""How far one SGD step of rate ``lr`` on ``(x, y)`` would move each hidden layer's weight,
    relative to its size: :math:`\eta \lVert \nabla_{W_l} L \rVert / \lVert W_l \rVert`
    (the weights are not changed)."""
    grads = hidden_gradients(model, x, y)
    with torch.no_grad():
        return [
            float(lr * torch.linalg.vector_norm(g.double()) / torch.linalg.vector_norm(w.double()))
            for g, w in zip(grads, hidden_weights(model), strict=True)
        ]


def measured_steps(steps: int, eval_every: int) -> list[int]:
    """The steps :func:`batchnorm.lab._classify.train_classifier` measures at: 0, every
    ``eval_every`` and the last."""
    out = list(range(0, steps + 1, eval_every))
    if out[-1] != steps:
        out.append(steps)
    return out


def accuracy_or_chance(run: Mapping[str, Any], key: str, chance: float) -> float:
    """A run's final accuracy (``key``: ``"val_accuracy"``, the last measurement, or
    ``"test_accuracy"``), or ``chance`` if the run diverged in the sense of
    :func:`batchnorm.lab._classify.diverged` (non-finite or not-decreasing loss)."""
    if diverged(run):
        return chance
    value = run["curve"]["val_accuracy"][-1] if key == "val_accuracy" else run[key]
    return chance if value is None else float(value)


def train_unit(
    model: nn.Module,
    data: Any,
    *,
    lr: float,
    steps: int,
    batch_size: int,
    seed: int,
    eval_every: int,
    advance: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` with plain SGD (:func:`~batchnorm.lab._classify.train_classifier`) and
    record its hidden layers' weight norms at every measurement.

    Returns:
        ``train_classifier``'s result plus ``"weight_norms"``: one list of per-layer Frobenius
        norms (:func:`weight_norms`; ``None`` where not finite) per measured step, aligned
        with ``curve["steps"]`` (a run whose loss became non-finite stops there).
    """
    norms = [_finite_norms(model)]

    def record(step: int, net: nn.Module) -> None:
        # train_classifier measures after this call at exactly these steps.
        if step % eval_every == 0 or step == steps:
            norms.append(_finite_norms(net))

    with warnings.catch_warnings():
        # Sweeping into divergence is the point here: BatchNorm's warning that a batch's
        # variance overflowed its running statistics is expected at the largest rates, and
        # the run's divergence is recorded instead.
        warnings.simplefilter("ignore", NonFiniteStatisticsWarning)
        run = train_classifier(
            model,
            data,
            lr=lr,
            steps=steps,
            batch_size=batch_size,
            seed=seed,
            eval_every=eval_every,
            advance=advance,
            after_step=record,
        )
    run["weight_norms"] = norms
    return run


def check_run(run: Any, where: str, *, steps: int, eval_every: int, depth: int) -> None:
    """Raise ``ValueError`` unless ``run`` is a complete :func:`train_unit` result."""
    n_measured = len(measured_steps(steps, eval_every))
    check_curve(run, where, n_measured)
    measured = len(run["curve"]["steps"])
    norms = check.item(run, "weight_norms", where)
    expected = f"a list of {measured} lists of {depth} norms (finite numbers >= 0 or None)"
    rows_ok = isinstance(norms, list) and len(norms) == measured
    rows_ok = rows_ok and all(isinstance(r, list) and len(r) == depth for r in norms)
    if not rows_ok or not all(
        v is None or (_is_number(v) and math.isfinite(v) and v >= 0) for r in norms for v in r
    ):
        raise ValueError(
            f"expected {check.at(where, 'weight_norms')} to be {expected}, got "
            f"{check.describe(norms)}."
        )
    if not run["diverged"]:
        accuracy = run["test_accuracy"]
        if not (_is_number(accuracy) and 0.0 <= accuracy <= 1.0):
            raise ValueError(
                f"expected {check.at(where, 'test_accuracy')} to be a number in [0, 1] (the run "
                f"did not diverge), got {check.describe(accuracy)}."
            )
    if run["first_loss"] is not None:
        check.number(run["first_loss"], check.at(where, "first_loss"), low=0.0)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def unit_checker(config: Any) -> Callable[[Unit, Any, str], None]:
    """The check of one unit's result for a sweep over these nets (learning-rate and
    initialization): a :func:`train_unit` result of ``config.steps`` steps measured every
    ``config.eval_every``, for the unit's net."""

    def check_unit(unit: Unit, value: Any, where: str) -> None:
        depth = NETS[unit.params["net"]][0]
        check_run(value, where, steps=config.steps, eval_every=config.eval_every, depth=depth)

    return check_unit
