r"""Frozen BatchNorm: the fixed affine map a BatchNorm layer computes in evaluation mode.

A frozen layer always normalizes with its stored statistics, in training mode as in evaluation
mode, and never updates them:

.. math::
    y = \frac{x - \mathrm{running\_mean}}{\sqrt{\mathrm{running\_var} + \epsilon}}
        \cdot \mathrm{weight} + \mathrm{bias}
      = x \cdot \mathrm{scale} + \mathrm{shift},
    \qquad
    \mathrm{scale} = \frac{\mathrm{weight}}{\sqrt{\mathrm{running\_var} + \epsilon}},
    \quad
    \mathrm{shift} = \mathrm{bias} - \mathrm{running\_mean} \cdot \mathrm{scale}

(Ioffe & Szegedy 2015, Alg. 2, step 11), per channel (axis 1). Gradients flow to the input
(:math:`\partial y / \partial x = \mathrm{scale}`) and, when they are parameters, to ``weight``
and ``bias``; never to the statistics, which are constants here.

Which tool for which job:

* :func:`batchnorm.tools.freeze.freeze` (``trainable_affine=False``, the default) turns every
  BatchNorm layer of a model into a fixed per-channel affine map with no parameters. This is
  the usual choice for fine-tuning with small batches, where batch statistics are too noisy to
  normalize with or to average, and for pretrained detection and segmentation backbones.
* ``trainable_affine=True`` keeps the statistics fixed but trains ``weight`` (:math:`\gamma`)
  and ``bias`` (:math:`\beta`). The common recipe for this, calling ``bn.eval()`` on the
  BatchNorm layers and leaving their parameters trainable, is undone by the next
  ``model.train()``, which sets every sub-module back to training mode so that the layers
  normalize with batch statistics and overwrite the running ones again (pytorch#66073,
  pytorch#86590). A frozen layer has no mode-dependent behaviour at all, so nothing a parent
  does with ``.train()`` can change its statistics.

State: the buffers ``running_mean``, ``running_var`` and ``num_batches_tracked`` and the tensors
``weight`` and ``bias`` carry BatchNorm's names, shapes and ``state_dict`` keys (and its
``_version``), so a checkpoint moves in either direction between a frozen layer and
``torch.nn.BatchNorm{1,2,3}d`` or ``batchnorm.BatchNorm{1,2,3}d`` with ``strict=True``.
``num_batches_tracked`` is never used or changed; it is kept so that the keys match exactly.
``weight`` and ``bias`` are buffers with ``trainable_affine=False`` and
:class:`torch.nn.Parameter` with ``trainable_affine=True``; with ``affine=False`` there are
none. The frozen classes are plain :class:`torch.nn.Module` subclasses, not BatchNorm
subclasses: code that finds BatchNorm layers with ``isinstance`` (weight-decay filters,
:func:`batchnorm.convert`, ``freeze`` itself) leaves them alone.

Example:
    Statistics fixed, ``weight`` and ``bias`` trained, whatever ``.train()`` is called:

    >>> import torch
    >>> from batchnorm.tools.freeze import freeze
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    >>> net = freeze(net, trainable_affine=True)
    >>> before = net[1].running_mean.clone()
    >>> _ = net.train()
    >>> net(torch.randn(8, 4)).sum().backward()
    >>> torch.equal(net[1].running_mean, before), net[1].weight.grad is not None
    (True, True)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from ._interop import traced_call, twin_of
from ._validate import check_constructor_args, check_layer_input, layer_name
from .families import add_twin
from .functional import normalize
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "FrozenOrigin"]


class FrozenOrigin(NamedTuple):
    """What :func:`batchnorm.unfreeze` turns a frozen layer back into.

    Attributes:
        cls: The BatchNorm class the layer was frozen from (for a variant, the class with its
            extra arguments bound, a :func:`functools.partial`).
        momentum: Its ``momentum``.
        nonfinite: Its non-finite policy (``None`` for torch.nn's classes, which have none).
    """

    cls: Callable[..., torch.nn.Module]
    momentum: float | None
    nonfinite: str | None


class _FrozenBatchNormBase(torch.nn.Module):
    """State, ``state_dict`` migration and forward shared by the three ranks.

    A subclass of :class:`torch.nn.Module` only, on purpose: see the module docstring.
    """

    # BatchNorm's state_dict version (2 = num_batches_tracked present), so that checkpoints
    # written by a frozen layer carry the metadata a BatchNorm layer expects, and vice versa.
    _version = 2

    # A frozen layer accepts exactly the inputs of the BatchNorm it stands for: each rank's
    # class takes that class's input_ranks and input_shape, not a second copy of them.
    input_ranks: tuple[int, ...]
    input_shape: str

    # The constructor's state (parameters and buffers are registered on the module).
    num_features: int
    eps: float
    affine: bool
    trainable_affine: bool
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor | None

    # What tools.freeze.unfreeze turns the layer back into, set by freeze(); None for a layer
    # built directly (unfreeze then picks this package's BatchNorm of the same rank). Not in
    # the state_dict: a checkpoint holds tensors, not classes.
    frozen_from: FrozenOrigin | None = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        trainable_affine: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        name = type(self).__name__
        check_constructor_args(name, num_features, eps, None)
        if trainable_affine and not affine:
            raise ValueError(
                f"{name}(): expected affine=True with trainable_affine=True (there is no weight "
                "or bias to train otherwise), got affine=False."
            )
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.trainable_affine = trainable_affine
        if affine:
            self._register_affine("weight", torch.ones(num_features, **factory))
            self._register_affine("bias", torch.zeros(num_features, **factory) if bias else None)
        else:
            self.register_buffer("weight", None)
            self.register_buffer("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )

    def _register_affine(self, name: str, value: torch.Tensor | None) -> None:
        """Register ``weight`` or ``bias`` as a Parameter if trained, else as a buffer.

        A persistent buffer has the same ``state_dict`` key as a parameter of the same name,
        which is what keeps checkpoints interchangeable with BatchNorm's.
        """
        if self.trainable_affine:
            param = None if value is None else torch.nn.Parameter(value)
            self.register_parameter(name, param)
        else:
            self.register_buffer(name, value)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, affine={self.affine}, "
            f"bias={self.bias is not None}, trainable_affine={self.trainable_affine}"
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):  # symbolic tracing: one node, as torch.nn's
            return traced_call(self, input, _ScriptableFrozen.forward)
        where = functools.partial(layer_name, self)
        # The statistics always exist here (weight and bias may not): they set the dtype.
        check_layer_input(where, self, input, self.running_mean.dtype)
        # Always the evaluation transform, whatever self.training says: that independence from
        # the mode is the whole point of the class. Nothing is updated.
        return normalize(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.eps,
            where=where,
        )

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """What ``torch.jit.script`` compiles instead: the same map in torch ops, same tensors."""
        return twin_of(self, _ScriptableFrozen)

    def _load_from_state_dict(
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ) -> None:
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and key not in state_dict:
            # at version 2: added num_batches_tracked, default: the layer's current count (0
            # for a new layer), which is what torch.nn.BatchNorm does with the same checkpoint.
            # load_state_dict hands each module a copy of the caller's dict, so this edits only
            # the copy. A layer built on the meta device has no count to keep.
            current = self.num_batches_tracked
            state_dict[key] = (
                torch.zeros((), dtype=torch.long) if current is None or current.is_meta else current
            )
        super()._load_from_state_dict(
            state_dict,
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )


class _ScriptableFrozen(torch.nn.Module):
    """A frozen layer as TorchScript sees it (built only by ``__prepare_scriptable__``): the
    same map in torch ops. Its ``forward`` also traces a frozen layer that is fx's root."""

    if TYPE_CHECKING:  # the frozen layer's state; left out at run time, where TorchScript reads
        # class annotations (it types the attributes from the instance itself).
        eps: float
        weight: torch.Tensor | None
        bias: torch.Tensor | None
        running_mean: torch.Tensor
        running_var: torch.Tensor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (input.dim() - 2)
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return input * scale.reshape(shape) + shift.reshape(shape)


_CLASS_DOC = r"""Frozen BatchNorm over {what}: a fixed per-channel affine map of the input.

    .. math::
        y = \frac{{x - \mathrm{{running\_mean}}}}{{\sqrt{{\mathrm{{running\_var}} + \epsilon}}}}
            \cdot \mathrm{{weight}} + \mathrm{{bias}}
          = x \cdot \mathrm{{scale}} + \mathrm{{shift}}

    with :math:`\mathrm{{scale}} = \mathrm{{weight}} / \sqrt{{\mathrm{{running\_var}} +
    \epsilon}}` and :math:`\mathrm{{shift}} = \mathrm{{bias}} - \mathrm{{running\_mean}} \cdot
    \mathrm{{scale}}`, per channel (axis 1). This is :class:`torch.nn.{bn}`'s evaluation-mode
    output, computed in training mode too: batch statistics are never used, so any batch size
    works (one sample included), and nothing is ever mutated (``running_mean``,
    ``running_var`` and ``num_batches_tracked`` keep their values through any number of
    forward calls in either mode).

    Gradients flow to the input (:math:`\partial y/\partial x = \mathrm{{scale}}`) and, with
    ``trainable_affine=True``, to ``weight`` and ``bias``; the statistics are constants.

    State: buffers ``running_mean`` (zeros), ``running_var`` (ones) and
    ``num_batches_tracked`` (0, kept only so that the ``state_dict`` keys are exactly
    BatchNorm's); ``weight`` (ones) and ``bias`` (zeros) are buffers, or Parameters with
    ``trainable_affine=True``, or absent with ``affine=False``. A ``state_dict`` of
    ``torch.nn.{bn}`` or ``batchnorm.{bn}`` with the same ``affine``/``bias`` loads with
    ``strict=True``, and the other way round; one without ``num_batches_tracked`` (torch's
    ``_version`` 1) loads too. Usually built by :func:`batchnorm.tools.freeze.freeze` from a
    trained layer rather than directly.

    Dtypes: CPU float32/float64 inputs run on the Numba kernels with float64 arithmetic,
    rounded once to the input dtype; other devices and dtypes fall back to torch's native op
    (see :func:`batchnorm.backend_for`).

    Args:
        num_features: :math:`C`, the number of channels.
        eps: Added to ``running_var`` before the square root; must be ``>= 0``.
        affine: Have a per-channel ``weight`` and ``bias``.
        trainable_affine: Make ``weight`` and ``bias`` Parameters (statistics fixed, affine
            trained); needs ``affine=True``.
        bias: With ``affine``, also have ``bias`` (torch 2.13's BatchNorm keyword).
        device: Device of the buffers and parameters.
        dtype: Dtype of the buffers and parameters (``num_batches_tracked`` is always long).

    Raises:
        TypeError: ``num_features`` not an int, ``eps`` not a number.
        ValueError: ``num_features < 1``, ``eps < 0``, or ``trainable_affine`` without
            ``affine``.

    Shape:
        - Input: {shape}; the forward raises ValueError for another rank or channel count.
        - Output: the shape, dtype and memory format of the input.

    Example:
        >>> import torch
        >>> from batchnorm.frozen import {name}
        >>> layer = {name}(2, eps=0.0)
        >>> _ = layer.running_mean.copy_(torch.tensor([1.0, -1.0]))
        >>> _ = layer.running_var.copy_(torch.tensor([4.0, 0.25]))
        >>> x = {example}
        >>> y = layer.train()(x)  # (x - [1, -1]) / sqrt([4, 0.25]), also in training mode
        >>> y{index}
        tensor([1., 2.])
        >>> list(layer.parameters())
        []
"""


class FrozenBatchNorm1d(_FrozenBatchNormBase):
    input_ranks = BatchNorm1d.input_ranks
    input_shape = BatchNorm1d.input_shape
    __doc__ = _CLASS_DOC.format(
        name="FrozenBatchNorm1d",
        bn="BatchNorm1d",
        what="a 2-D ``(N, C)`` or 3-D ``(N, C, L)`` input",
        shape=":math:`(N, C)` or :math:`(N, C, L)`",
        example="torch.tensor([[3.0, 0.0]])",
        index="[0]",
    )


class FrozenBatchNorm2d(_FrozenBatchNormBase):
    input_ranks = BatchNorm2d.input_ranks
    input_shape = BatchNorm2d.input_shape
    __doc__ = _CLASS_DOC.format(
        name="FrozenBatchNorm2d",
        bn="BatchNorm2d",
        what="a 4-D ``(N, C, H, W)`` input",
        shape=":math:`(N, C, H, W)`, contiguous or channels_last",
        example="torch.tensor([3.0, 0.0]).reshape(1, 2, 1, 1)",
        index="[0, :, 0, 0]",
    )


class FrozenBatchNorm3d(_FrozenBatchNormBase):
    input_ranks = BatchNorm3d.input_ranks
    input_shape = BatchNorm3d.input_shape
    __doc__ = _CLASS_DOC.format(
        name="FrozenBatchNorm3d",
        bn="BatchNorm3d",
        what="a 5-D ``(N, C, D, H, W)`` input",
        shape=":math:`(N, C, D, H, W)`, contiguous or channels_last_3d",
        example="torch.tensor([3.0, 0.0]).reshape(1, 2, 1, 1, 1)",
        index="[0, :, 0, 0, 0]",
    )


# The frozen twins of the fixed-rank families (batchnorm.families).
for _frozen in (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d):
    add_twin(_frozen.__name__.removeprefix("Frozen"), frozen=_frozen)
