r"""Running averages of several BN momenta on one training trajectory: :class:`RunningAverages`.

A BatchNorm layer in training mode normalises with the batch's own statistics; its momentum
only decides how those statistics are folded into the running buffers, which no training-mode
forward reads. So the trajectory of the weights does not depend on the momentum, and the
running averages of any number of momenta can be followed on one network: a forward hook on
each BN layer takes the batch statistics of the layer's input and applies torch's update for
every momentum,

.. math::
    \hat\mu \leftarrow (1 - m)\,\hat\mu + m\,\mu_B, \qquad
    \hat\sigma^2 \leftarrow (1 - m)\,\hat\sigma^2 + m\,\frac{n}{n - 1}\,\sigma_B^2,

with :math:`\sigma_B^2` the biased batch variance over the :math:`n` values per channel (torch
keeps the unbiased one in ``running_var``), starting from torch's initial values (mean 0,
variance 1). Computed in float64; torch updates its float32 buffers in float32, so the two
agree to float32 rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

__all__ = ["RunningAverages", "bn_layers"]


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """Every BatchNorm layer of ``model`` (torch's and ours) with its name, in module order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


class RunningAverages:
    """Per BN layer and momentum, torch's running mean and unbiased variance, kept outside the
    layers and updated by forward hooks while :meth:`attached`.

    Args:
        layers: ``(name, layer)`` pairs, e.g. :func:`bn_layers` of the model.
        momenta: The momenta to follow, torch's meaning (the weight of the newest batch).

    Raises:
        ValueError: If ``layers`` is empty or a momentum is outside ``(0, 1]``.
    """

    def __init__(
        self, layers: Sequence[tuple[str, nn.modules.batchnorm._BatchNorm]], momenta: Sequence
    ) -> None:
        if not layers:
            raise ValueError("RunningAverages(): expected at least one BN layer, got none.")
        bad = [m for m in momenta if not 0 < m <= 1]
        if bad or not momenta:
            raise ValueError(
                f"RunningAverages(): expected momenta in (0, 1], got {list(momenta)!r}."
            )
        self.layers = list(layers)
        self.momenta = tuple(float(m) for m in momenta)
        # One (M, C) tensor per layer and statistic, row k for momenta[k]: every momentum is
        # updated by two in-place operations per step instead of two per momentum.
        self._weight = torch.tensor(self.momenta, dtype=torch.float64).unsqueeze(1)
        self._keep = 1.0 - self._weight
        shape = {name: (len(self.momenta), layer.num_features) for name, layer in self.layers}
        self._mean = {name: torch.zeros(shape[name], dtype=torch.float64) for name in shape}
        self._var = {name: torch.ones(shape[name], dtype=torch.float64) for name in shape}

    def mean(self, name: str, momentum: float) -> torch.Tensor:
        """Layer ``name``'s running mean for ``momentum``: float64 ``(C,)``, a view."""
        return self._mean[name][self._row(momentum)]

    def var(self, name: str, momentum: float) -> torch.Tensor:
        """Layer ``name``'s running unbiased variance for ``momentum``: float64 ``(C,)``, a view."""
        return self._var[name][self._row(momentum)]

    def _row(self, momentum: float) -> int:
        if momentum not in self.momenta:
            raise ValueError(
                f"RunningAverages: expected a momentum among {list(self.momenta)}, got "
                f"{momentum!r}."
            )
        return self.momenta.index(momentum)

    def update(self, name: str, x: torch.Tensor) -> None:
        """Fold one batch of layer ``name``'s input ``(N, C, *)`` into every momentum's
        averages, as a training-mode forward of a layer with that momentum would."""
        x = x.detach().to(torch.float64)
        if x.dim() > 2:
            x = x.transpose(0, 1).reshape(x.shape[1], -1).T  # (n, C): every value of a channel
        var_unbiased, mean = torch.var_mean(x, dim=0, correction=1)
        self._mean[name].mul_(self._keep).addcmul_(self._weight, mean)
        self._var[name].mul_(self._keep).addcmul_(self._weight, var_unbiased)

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """Follow the layers' training-mode forwards inside the block (hooks removed after).

        Eval-mode forwards are ignored, as torch's own buffers ignore them.
        """
        handles = []
        for name, layer in self.layers:

            def hook(
                module: nn.Module, args: tuple, output: object, name: str = name, layer=layer
            ) -> None:
                # A deep copy of the model (a measurement's probe) carries this hook along;
                # only the tracked layer itself, in training mode, counts.
                if module is layer and module.training:
                    self.update(name, args[0])

            handles.append(layer.register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def load_into(self, model: nn.Module, momentum: float) -> None:
        """Write ``momentum``'s averages into the running buffers of ``model``'s BN layers
        (a copy of the tracked model: the layers are matched by name).

        Raises:
            ValueError: If ``momentum`` is not followed or a layer is missing from ``model``.
        """
        row = self._row(momentum)
        found = dict(bn_layers(model))
        missing = [name for name, _ in self.layers if name not in found]
        if missing:
            raise ValueError(
                f"RunningAverages.load_into(): expected BN layers {[n for n, _ in self.layers]}, "
                f"got a model without {missing}."
            )
        with torch.no_grad():
            for name, _ in self.layers:
                running_mean, running_var = found[name].running_mean, found[name].running_var
                assert running_mean is not None and running_var is not None, "tracks running stats"
                running_mean.copy_(self._mean[name][row])
                running_var.copy_(self._var[name][row])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the averages: ``"<layer>.mean"`` and ``"<layer>.var"``, float64
        ``(M, C)`` with row ``k`` for ``momenta[k]``."""
        state = {}
        for name, _ in self.layers:
            state[f"{name}.mean"] = self._mean[name].clone()
            state[f"{name}.var"] = self._var[name].clone()
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (checked by the caller)."""
        for name, _ in self.layers:
            self._mean[name] = state[f"{name}.mean"].clone()
            self._var[name] = state[f"{name}.var"].clone()
