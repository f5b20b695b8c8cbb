r"""Fold evaluation-mode BatchNorm layers into the Conv or Linear layer that feeds them.

In evaluation mode a BatchNorm layer is a fixed per-channel affine map of its input, and a
convolution or a linear layer is linear in its weight per output channel, so the two collapse
into one layer with a rescaled weight and a new bias: one pass over the activations less at
inference, and the same outputs up to rounding.

How the pairs are found: the model is traced with :mod:`torch.fx` only to *analyse* which layer's
output feeds which BatchNorm; the changes are made on the model's own module tree, so the result
is the user's class, not a ``GraphModule``. A pair is folded only when the analysis proves the
result exact; a model that does not trace (data-dependent control flow, for example) gives no
such proof, so nothing in it is folded, and every pair left unfolded is named in a warning.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
from torch.nn.modules.batchnorm import _BatchNorm

from ..activated import BatchNormActBase
from ..activations import activation_module
from ..frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from ._activated import activated_family
from ._fold_pairs import Verdict, find_producers, select_pairs

__all__ = ["check_fold", "fold"]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- public API


def fold(model: torch.nn.Module, *, inplace: bool = False) -> torch.nn.Module:
    r"""Fold every eval-mode BatchNorm that directly follows a Conv/ConvTranspose/Linear into it.

    In evaluation mode a BatchNorm layer computes, per channel :math:`c`,

    .. math::
        \mathrm{BN}(y)_c = (y_c - \mu_c)\, s_c + \beta_c, \qquad
        s_c = \frac{\gamma_c}{\sqrt{\sigma^2_c + \epsilon}},

    with :math:`\mu, \sigma^2` = ``running_mean``, ``running_var``, :math:`\gamma, \beta` =
    ``weight``, ``bias`` (1 and 0 when the layer has none). When
    :math:`y = W \ast x + b` comes from a layer whose output channel :math:`c` depends only on
    the weight slice :math:`W_c`, the pair is one layer with

    .. math::
        W'_c = s_c\, W_c, \qquad b'_c = (b_c - \mu_c)\, s_c + \beta_c,

    (:math:`b = 0` for a layer built with ``bias=False``). The layer's ``weight`` is overwritten
    in place (the same Parameter object), its ``bias`` too, or created as a new Parameter when it
    was None, and the BatchNorm is replaced by ``torch.nn.Identity()`` on its parent module:
    "removed" means that the model's forward code still runs and calls an identity there.

    Which layers: ``torch.nn.Conv1d/2d/3d`` (any groups, dilation, stride, padding and
    padding mode, since folding only rescales output channels), ``torch.nn.ConvTranspose1d/2d/3d``
    (weight ``(in, out/groups, *k)``: the output channel of ``weight[i, j]`` is
    ``(i // (in/groups)) * (out/groups) + j``) and ``torch.nn.Linear``, or subclasses of them
    that keep the stock ``forward``. ``Linear`` followed by ``BatchNorm1d`` is folded on the
    assumption that the Linear's output features are the BatchNorm's channel axis, i.e. a 2-D
    ``(N, features)`` input; with a 3-D ``(N, L, features)`` input BatchNorm1d normalises axis
    ``L`` and folding would be wrong when ``L`` happens to equal the feature count.

    Which norms: any ``torch.nn.modules.batchnorm._BatchNorm`` (``torch.nn.BatchNorm1d/2d/3d``,
    ``batchnorm.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm``, ``batchnorm.SyncBatchNorm``)
    with the stock forward and running statistics, ``batchnorm.frozen.FrozenBatchNorm1d/2d/3d``,
    and the activated layers (``batchnorm.BatchNormAct1d/2d/3d`` and the family table's other
    activated classes, with running statistics): their BatchNorm folds into the layer, and
    their place is taken by the activation module (``torch.nn.LeakyReLU(0.2)`` for
    ``activation="leaky_relu", activation_param=0.2``) instead of an Identity, so the folded
    model still applies the activation.

    A pair is folded only when the analysis proves the folded model exact; every other pair is
    left as it is, with a warning:

    - The model must trace with :mod:`torch.fx` (the layers and norms above and torch.nn's own
      modules stay single calls). Then every call of the BatchNorm takes the output of a call
      of the same layer, both are called equally often (a block applied twice still folds),
      and each of those layer outputs has no other use: the graph shows every call a traced
      forward makes, so neither module is used for anything else. Parameters that ``forward``
      reads directly (``self.conv.weight``) block folding, and so does a module inside one that
      fx calls as a whole (``MultiheadAttention.out_proj``): that forward's uses are not seen.
    - A model that does not trace is not folded at all. Without a graph nothing shows how
      ``forward`` uses a module: it may call ``self.block[0]`` on its own, run
      ``self.block[1:]`` or read ``self.block[0].weight`` although every module is registered
      once, and a fold of ``block`` would then be wrong. Each adjacent ``(layer, norm)`` pair of
      a ``torch.nn.Sequential`` gets a warning with the trace error. When you know that
      ``forward`` uses such a Sequential only by calling it, fold that Sequential on its own,
      ``fold(model.get_submodule(path), inplace=True)``: its trace proves the fold exact for
      its calls, and your knowledge of ``forward`` covers the rest.
    - Always: channel counts match; neither module is reachable under two names, has a hook
      or is an uninitialised lazy module; the layer is not parametrised and shares no parameter
      with another module; no global module hook is registered.

    Hooks: forward pre-hooks, forward hooks (with kwargs or ``always_call`` too), backward
    pre-hooks and backward hooks (full, and the legacy ``register_backward_hook``) on either
    module block folding: afterwards the layer's would run on the folded values and the
    BatchNorm's not at all. A pre-hook on the layer sees the same input, but it receives the
    module and may read its weight, so it blocks too. The global hooks of
    ``torch.nn.modules.module`` (``register_module_forward_pre_hook``,
    ``register_module_forward_hook``, ``register_module_full_backward_pre_hook``,
    ``register_module_full_backward_hook``, ``register_module_backward_hook``) run on every
    module call, so any of them, registered when ``fold`` runs, blocks every pair. Hooks that
    do not touch the forward computation do not block: ``state_dict`` and ``load_state_dict``
    hooks, hooks on parameter tensors, and module/parameter/buffer registration hooks (which
    see the ``Identity`` and any new ``bias`` being assigned). Saving, loading and parameter
    gradients change with folding by design: the BatchNorm's parameters and keys are gone.

    Not visible even in a trace, and so assumed absent: code that fx does not trace into
    (functions marked ``torch.fx.wrap``; the forwards of the modules it calls as a whole, which
    are assumed to use only their own submodules) reaching the layer or the BatchNorm through
    references of its own; ``forward`` reading an attribute of a BatchNorm other than calling
    it (``self.bn.num_features``, which breaks once the layer is an Identity) or testing
    ``self.conv.bias is None``; and uses outside ``model`` (another model sharing the layer).

    Dtype: the new weight and bias are computed in float64 from the layer's and the norm's
    tensors, then rounded once to the layer's dtype, on the layer's device.

    Args:
        model: The model, in evaluation mode (``model.eval()``), itself and every BatchNorm in
            it.
        inplace: Fold into ``model`` itself and return it (a layer that another model shares
            changes there too). By default a ``copy.deepcopy`` is folded and returned, and
            ``model`` is never changed.

    Returns:
        The folded model (``model`` itself when ``inplace``), of the same class, in evaluation
        mode (``eval()`` is applied to the whole tree).

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``, or ``inplace`` not a bool.
        ValueError: ``model`` or a BatchNorm layer in it is in training mode. The check runs
            before anything else: nothing is copied or changed, even with ``inplace=True``.

    Warns:
        UserWarning: One per BatchNorm that takes a layer's output but is left unfolded,
            naming both paths and why. One more when nothing was folded and no such warning
            was given: the model has no BatchNorm layer, or none of them follows a layer (the
            message says which and why). The BatchNorms that follow no layer are otherwise
            reported in INFO log records only.

    Example:
        >>> import torch
        >>> from batchnorm.tools.fold import check_fold, fold
        >>> net = torch.nn.Sequential(
        ...     torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU()
        ... ).eval()
        >>> folded = fold(net)
        >>> folded
        Sequential(
          (0): Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))
          (1): Identity()
          (2): ReLU()
        )
        >>> check_fold(net, folded, torch.randn(2, 3, 8, 8)) < 1e-5
        True
    """
    _check_fold_args(model, inplace)
    target = model if inplace else copy.deepcopy(model)
    producer, method = find_producers(target)
    pairs, left = select_pairs(target, producer)
    for layer_path, norm_path in pairs:
        _fold_pair(target, layer_path, norm_path)
        logger.debug("fold(): folded %r into %r", norm_path, layer_path)
    target.eval()
    _report(target, pairs, left, method)
    return target


def check_fold(
    original: torch.nn.Module, folded: torch.nn.Module, *inputs: Any, **kwargs: Any
) -> float:
    """Largest absolute difference between the outputs of two models on the same inputs.

    Both models run in evaluation mode under ``torch.no_grad()``; each module's training flag is
    restored afterwards. Differences are taken in float64. Typical values for a folded model:
    rounding only, about 1e-6 relative to the output's magnitude in float32 and 1e-15 in
    float64; a wrong fold shows up as differences of the order of the activations. Fold in place
    only after keeping a copy: comparing a model with itself always gives 0.

    Args:
        original: The model before folding (or any reference model).
        folded: The model to compare with it.
        *inputs: Positional arguments of both forwards.
        **kwargs: Keyword arguments of both forwards.

    Returns:
        ``max |original(*inputs) - folded(*inputs)|`` over every element of every output tensor
        (outputs may be tensors or nested tuples, lists and dicts of tensors); NaN if a
        difference is NaN, 0.0 for empty outputs.

    Raises:
        TypeError: A model is not a ``torch.nn.Module``, or an output is of another type.
        ValueError: The two outputs differ in structure or shape.

    Example:
        >>> import torch
        >>> from batchnorm.tools.fold import check_fold
        >>> a = torch.nn.Linear(2, 2)
        >>> b = torch.nn.Linear(2, 2)
        >>> _ = b.load_state_dict(a.state_dict())
        >>> check_fold(a, b, torch.ones(1, 2))
        0.0
    """
    for name, m in (("original", original), ("folded", folded)):
        if not isinstance(m, torch.nn.Module):
            raise TypeError(
                f"check_fold(): expected {name} to be a torch.nn.Module, got {type(m).__name__}."
            )
    modes = [(m, m.training) for model in (original, folded) for m in model.modules()]
    try:
        original.eval()
        folded.eval()
        with torch.no_grad():
            want = original(*inputs, **kwargs)
            got = folded(*inputs, **kwargs)
    finally:
        for m, training in modes:
            m.training = training
    return _max_abs_diff(want, got, "output")


# --------------------------------------------------------------------------- checks


def _check_fold_args(model, inplace) -> None:
    """Reject a non-module, a non-bool ``inplace`` and a model (or BatchNorm) in training mode."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fold(): expected a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(inplace, bool):
        raise TypeError(f"fold(): expected inplace to be True or False, got {inplace!r}.")
    # Name a BatchNorm layer when one is training: that is the layer whose statistics matter.
    training = [
        repr(path)
        for path, m in model.named_modules()
        if m.training and isinstance(m, _BatchNorm) and path
    ]
    if not training and model.training:
        training = ["the model"]
    if training:
        more = f" (and {len(training) - 1} more)" if len(training) > 1 else ""
        raise ValueError(
            "fold(): expected a model in evaluation mode, got "
            f"{training[0]}{more} in training mode; call model.eval() first."
        )


# --------------------------------------------------------------------------- folding


def _norm_affine(
    norm: _BatchNorm | FrozenBatchNorm1d | FrozenBatchNorm2d | FrozenBatchNorm3d,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` in float64 with ``norm(y) = y * scale + shift`` in eval."""
    running_mean, running_var = norm.running_mean, norm.running_var
    assert running_mean is not None and running_var is not None  # pairs have statistics
    mean = running_mean.detach().double()
    invstd = torch.rsqrt(running_var.detach().double() + norm.eps)
    scale = invstd if norm.weight is None else norm.weight.detach().double() * invstd
    shift = -mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach().double()
    return scale, shift


def _scale_output_channels(
    layer: torch.nn.Linear | torch.nn.modules.conv._ConvNd, scale: torch.Tensor
) -> torch.Tensor:
    """``layer.weight`` in float64 with output channel ``c`` multiplied by ``scale[c]``."""
    weight = layer.weight.detach().double()
    trailing = (1,) * (weight.dim() - 2)
    if isinstance(layer, torch.nn.modules.conv._ConvTransposeNd):
        # (in, out/groups, *k): group g owns input rows g*(in/g):(g+1)*(in/g) and output
        # channels g*(out/g) + j, j indexing axis 1, so split axis 0 by group.
        groups = layer.groups
        grouped = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
        return (grouped * scale.reshape(groups, 1, -1, *trailing)).reshape(weight.shape)
    return weight * scale.reshape(-1, 1, *trailing)


def _fold_pair(model: torch.nn.Module, layer_path: str, norm_path: str) -> None:
    """Rewrite the layer's weight and bias, then put an Identity in the norm's place."""
    layer = model.get_submodule(layer_path)
    norm = model.get_submodule(norm_path)
    # What _fold_pairs pairs: a Conv/ConvTranspose/Linear, then a BatchNorm or frozen layer.
    assert isinstance(layer, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))
    assert isinstance(norm, (_BatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d))
    dtype, device = layer.weight.dtype, layer.weight.device
    scale, shift = (t.to(device) for t in _norm_affine(norm))
    weight = _scale_output_channels(layer, scale)
    old_bias = torch.zeros_like(scale) if layer.bias is None else layer.bias.detach().double()
    # b' = (b - mean) * scale + bias, written as b * scale + shift.
    bias = (old_bias * scale + shift).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(weight.to(dtype))
        if layer.bias is None:
            layer.bias = torch.nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
        else:
            layer.bias.copy_(bias)
    # An activated layer leaves its activation behind, applied to the folded layer's output.
    replacement: torch.nn.Module = torch.nn.Identity()
    if activated_family(norm) is not None:
        assert isinstance(norm, BatchNormActBase)
        replacement = activation_module(norm.activation, norm.activation_param)
    parent_path, _, name = norm_path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, replacement)


def _report(
    model: torch.nn.Module,
    pairs: list[tuple[str, str]],
    left: dict[str, Verdict],
    method: str,
) -> None:
    """Warn once per pair left unfolded; log the rest; warn when nothing was folded or said."""
    for norm_path, (layer_path, reason, fix) in left.items():
        if layer_path is not None:
            warnings.warn(
                "fold(): expected a BatchNorm that folds exactly into the layer before it, got "
                f"{norm_path!r} after {layer_path!r}, left unfolded: {reason}.{fix}",
                UserWarning,
                stacklevel=3,
            )
    unpaired = {path: v.reason for path, v in left.items() if v.layer_path is None}
    if pairs:
        logger.info(
            "fold(): folded %d BatchNorm layer(s) of %s (%s).",
            len(pairs),
            type(model).__name__,
            method,
        )
    if pairs or len(unpaired) < len(left):
        # Something was folded or warned about: the BatchNorms that follow no layer (after a
        # ReLU, say) are not folding candidates, so a log record is enough for them.
        for norm_path, reason in unpaired.items():
            logger.info("fold(): left %r: %s.", norm_path, reason)
        return
    if not left:
        warnings.warn(
            f"fold(): expected a model with BatchNorm layers, got {type(model).__name__} with "
            "none; nothing to fold, the model is returned unchanged.",
            UserWarning,
            stacklevel=3,
        )
        return
    details = "; ".join(f"{path!r}: {reason}" for path, reason in unpaired.items())
    warnings.warn(
        f"fold(): expected at least one BatchNorm that can be folded, got {len(left)} that "
        f"cannot ({method}): {details}.",
        UserWarning,
        stacklevel=3,
    )


# --------------------------------------------------------------------------- check_fold helpers


def _max_abs_diff(want, got, where: str) -> float:
    """Largest ``|want - got|`` over matching tensors of two output structures."""
    if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor):
        if want.shape != got.shape:
            raise ValueError(
                f"check_fold(): expected {where} of the same shape from both models, got "
                f"{tuple(want.shape)} and {tuple(got.shape)}."
            )
        if want.numel() == 0:
            return 0.0
        return float((want.detach().double() - got.detach().double()).abs().max())
    if isinstance(want, (tuple, list)) and isinstance(got, (tuple, list)):
        if len(want) != len(got):
            raise ValueError(
                f"check_fold(): expected {where} of the same length from both models, got "
                f"{len(want)} and {len(got)}."
            )
        diffs = [
            _max_abs_diff(a, b, f"{where}[{i}]")
            for i, (a, b) in enumerate(zip(want, got, strict=True))
        ]
        return _nan_max(diffs)
    if isinstance(want, Mapping) and isinstance(got, Mapping):
        if set(want) != set(got):
            raise ValueError(
                f"check_fold(): expected {where} with the same keys from both models, got "
                f"{sorted(map(repr, want))} and {sorted(map(repr, got))}."
            )
        return _nan_max([_max_abs_diff(want[k], got[k], f"{where}[{k!r}]") for k in want])
    raise TypeError(
        f"check_fold(): expected {where} to be a tensor or a tuple, list or dict of tensors "
        f"from both models, got {type(want).__name__} and {type(got).__name__}."
    )


def _nan_max(values: list[float]) -> float:
    """``max`` that returns NaN if any value is NaN (the builtin depends on the order)."""
    if any(v != v for v in values):
        return float("nan")
    return max(values, default=0.0)
