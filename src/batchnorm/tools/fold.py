r"""Fold evaluation-mode BatchNorm layers into the Conv or Linear layer that feeds them.

In evaluation mode a BatchNorm layer is a fixed per-channel affine map of its input, and a
convolution or a linear layer is linear in its weight per output channel, so the two collapse
into one layer with a rescaled weight and a new bias: one pass over the activations less at
inference, and the same outputs up to rounding.

How the pairs are found: the model is traced with :mod:`torch.fx` only to *analyse* which layer's
output feeds which BatchNorm; the changes are made on the model's own module tree, so the result
is the user's class, not a ``GraphModule``. Models that do not trace (data-dependent control
flow, for example) fall back to adjacent children of ``torch.nn.Sequential`` containers.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from itertools import pairwise

import torch
import torch.fx
from torch.nn.modules.batchnorm import _BatchNorm

from ..families import families, stock_forwards

__all__ = ["check_fold", "fold"]

logger = logging.getLogger(__name__)

#: The layers folded into, each with the forward it must not have overridden. A subclass that
#: overrides forward may use its weight in another way (timm's StdConv2d standardises it, which
#: would undo the folded scale), so only the stock forward is trusted.
_LAYERS: tuple[type[torch.nn.Module], ...] = (
    torch.nn.Conv1d,
    torch.nn.Conv2d,
    torch.nn.Conv3d,
    torch.nn.ConvTranspose1d,
    torch.nn.ConvTranspose2d,
    torch.nn.ConvTranspose3d,
    torch.nn.Linear,
)

#: BatchNorm-like layers. The frozen ones are not _BatchNorm subclasses and have no mode: they
#: always compute the affine map from their stored statistics. (The family table is complete:
#: batchnorm.tools imports every layer module first.)
_FROZEN = tuple(family.frozen for family in families() if family.frozen is not None)
_NORMS = (_BatchNorm, *_FROZEN)

#: Forwards of norm classes known to compute the eval-mode affine map and nothing else. A
#: subclass with its own forward may do more (timm's BatchNormAct2d applies an activation).
_NORM_FORWARDS = stock_forwards()

Producer = Callable[[str], "tuple[str | None, str | None]"]


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
    with the stock forward and running statistics, and
    ``batchnorm.frozen.FrozenBatchNorm1d/2d/3d``.

    When a pair is folded (everything else is left as it is and reported):

    - Traced (the model traces with :mod:`torch.fx`): every call of the BatchNorm takes the
      output of a call of the same layer, both are called equally often (a block applied twice
      still folds), and each of those layer outputs has no other use. Parameters that
      ``forward`` reads directly (``self.conv.weight``) block folding.
    - Not traceable: adjacent children ``(layer, norm)`` of a ``torch.nn.Sequential`` (or a
      subclass that keeps its forward); this assumes the children are only called through the
      Sequential. An INFO log record says the fallback was used and why.
    - Always: channel counts match; neither module is reachable under two names, has forward
      hooks or is an uninitialised lazy module; the layer is not parametrised and shares no
      parameter with another module.

    Forward code that reads an attribute of a BatchNorm other than calling it (for example
    ``self.bn.num_features``) is not visible to the analysis and breaks once the layer is an
    Identity.

    Dtype: the new weight and bias are computed in float64 from the layer's and the norm's
    tensors, then rounded once to the layer's dtype, on the layer's device.

    Args:
        model: The model, in evaluation mode (``model.eval()``), itself and every BatchNorm in
            it.
        inplace: Fold into ``model`` itself and return it. By default a ``copy.deepcopy`` is
            folded and returned, and ``model`` is never changed.

    Returns:
        The folded model (``model`` itself when ``inplace``), of the same class, in evaluation
        mode (``eval()`` is applied to the whole tree).

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``, or ``inplace`` not a bool.
        ValueError: ``model`` or a BatchNorm layer in it is in training mode. The check runs
            before anything else: nothing is copied or changed, even with ``inplace=True``.

    Warns:
        UserWarning: Nothing was folded: the model has no BatchNorm layer, or none of its
            BatchNorm layers could be folded (the message says which and why).

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
    producer, method = _find_producers(target)
    pairs, left = _select_pairs(target, producer)
    for layer_path, norm_path in pairs:
        _fold_pair(target, layer_path, norm_path)
        logger.debug("fold(): folded %r into %r", norm_path, layer_path)
    target.eval()
    _report(target, pairs, left, method)
    return target


def check_fold(original: torch.nn.Module, folded: torch.nn.Module, *inputs, **kwargs) -> float:
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


def _is_foldable_norm(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm-like layer this tool knows how to fold (by type only)."""
    return isinstance(module, _NORMS)


def _is_layer(module: torch.nn.Module | None) -> bool:
    return isinstance(module, _LAYERS)


def _has_stock_forward(module: torch.nn.Module) -> bool:
    """True when ``module`` runs a forward whose arithmetic ``fold`` knows."""
    if isinstance(module, _NORMS):
        return type(module).forward in _NORM_FORWARDS
    base = next(cls for cls in _LAYERS if isinstance(module, cls))
    return type(module).forward is base.forward and (
        getattr(type(module), "_conv_forward", None) is getattr(base, "_conv_forward", None)
    )


def _module_problem(module: torch.nn.Module, names: int, kind: str) -> str | None:
    """Why a norm or layer cannot take part in folding whatever it is paired with, or None."""
    if names > 1:
        return f"{kind} is reachable under {names} names (a shared module)"
    if not _has_stock_forward(module):
        return f"{kind} is a {type(module).__name__} that overrides forward()"
    if module._forward_hooks or module._forward_pre_hooks:
        return f"{kind} has forward hooks, which folding would bypass"
    if any(torch.nn.parameter.is_lazy(t) for t in (*module.parameters(), *module.buffers())):
        return f"{kind} is an uninitialised lazy module"
    return None


def _norm_problem(norm: torch.nn.Module, names: int) -> str | None:
    if norm.running_mean is None or norm.running_var is None:
        return "it has no running statistics (track_running_stats=False): it uses batch statistics"
    return _module_problem(norm, names, "it")


def _layer_problem(
    layer: torch.nn.Module, layer_path: str, norm: torch.nn.Module, names: int, shared: bool
) -> str | None:
    problem = _module_problem(layer, names, f"its input layer {layer_path!r}")
    if problem is not None:
        return problem
    if torch.nn.utils.parametrize.is_parametrized(layer):
        return f"its input layer {layer_path!r} is parametrised"
    if shared:
        return f"its input layer {layer_path!r} shares a parameter with another module"
    channels = _out_channels(layer)
    if channels != norm.running_mean.numel():
        return (
            f"its input layer {layer_path!r} has {channels} output channels, the BatchNorm "
            f"{norm.running_mean.numel()}"
        )
    return None


def _out_channels(layer: torch.nn.Module) -> int:
    return layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels


# --------------------------------------------------------------------------- finding pairs


class _LeafTracer(torch.fx.Tracer):
    """Keeps BatchNorm-like and folded-into layers as single ``call_module`` nodes.

    fx only treats modules defined in ``torch.nn`` as leaves; ours live in ``batchnorm`` and
    would be traced into (their input checks cannot run on a Proxy).
    """

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return (
            _is_foldable_norm(m) or _is_layer(m) or super().is_leaf_module(m, module_qualified_name)
        )


def _find_producers(model: torch.nn.Module) -> tuple[Producer, str]:
    """A function mapping a norm's path to the path of the layer it can be folded into.

    Returns ``(producer, method)``; ``producer(norm_path)`` is ``(layer_path, None)`` or
    ``(None, reason)``, and ``method`` names the analysis for the log.
    """
    try:
        graph = _LeafTracer().trace(model)
    except Exception as err:  # noqa: BLE001 - fx raises many types; any of them means "untraceable"
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        logger.info(
            "fold(): torch.fx could not trace %s (%s); folding adjacent children of "
            "torch.nn.Sequential containers only.",
            type(model).__name__,
            reason,
        )
        return _sequential_producer(model), "torch.nn.Sequential fallback"
    return _graph_producer(model, graph), "torch.fx"


def _describe(node: torch.fx.Node, modules: Mapping[str, torch.nn.Module]) -> str:
    """A node as the user wrote it, for "follows ..." reasons."""
    if node.op == "call_module":
        return f"a {type(modules[node.target]).__name__} ({node.target!r})"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)}()"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "placeholder":
        return f"the model's input {node.target!r}"
    return f"{node.op} {node.target!r}"


def _graph_producer(model: torch.nn.Module, graph: torch.fx.Graph) -> Producer:
    modules = dict(model.named_modules())
    calls: dict[str, list[torch.fx.Node]] = defaultdict(list)
    read_directly = set()
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target].append(node)
        elif node.op == "get_attr":
            read_directly.add(node.target.rpartition(".")[0])

    def producer(norm_path: str) -> tuple[str | None, str | None]:
        norm_calls = calls.get(norm_path, [])
        if not norm_calls:
            return None, "forward() does not call it"
        if norm_path in read_directly:
            return None, "forward() reads its tensors directly"
        sources = []
        for node in norm_calls:
            src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
            if not isinstance(src, torch.fx.Node):
                return None, "it is not called with a single tensor argument"
            if src.op != "call_module" or not _is_layer(modules.get(src.target)):
                return None, f"it follows {_describe(src, modules)}"
            if len(src.users) != 1:
                return None, f"the output of {src.target!r} is also used elsewhere"
            sources.append(src.target)
        layer_path = sources[0]
        if any(s != layer_path for s in sources):
            return None, f"it follows different layers: {sorted(set(sources))}"
        if len(calls[layer_path]) != len(norm_calls):
            return None, (
                f"{layer_path!r} is called {len(calls[layer_path])} times, the BatchNorm "
                f"{len(norm_calls)}"
            )
        if layer_path in read_directly:
            return None, f"forward() reads the tensors of {layer_path!r} directly"
        return layer_path, None

    return producer


def _is_plain_sequential(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Sequential) and (
        type(module).forward is torch.nn.Sequential.forward
    )


def _sequential_producer(model: torch.nn.Module) -> Producer:
    modules = dict(model.named_modules())
    previous: dict[str, str] = {}  # child path -> path of the sibling run just before it
    for path, container in modules.items():
        if not _is_plain_sequential(container):
            continue
        # _modules, not named_children(): the latter hides a module listed twice, which would
        # make two non-adjacent children look adjacent.
        names = [name for name, child in container._modules.items() if child is not None]
        for before, after in pairwise(names):
            previous[_join(path, after)] = _join(path, before)

    def producer(norm_path: str) -> tuple[str | None, str | None]:
        layer_path = previous.get(norm_path)
        if layer_path is None:
            return None, (
                "the model does not trace with torch.fx and it does not follow a layer "
                "inside a torch.nn.Sequential"
            )
        if not _is_layer(modules[layer_path]):
            return None, f"it follows a {type(modules[layer_path]).__name__} ({layer_path!r})"
        return layer_path, None

    return producer


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _select_pairs(
    model: torch.nn.Module, producer: Producer
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """``(layer_path, norm_path)`` pairs to fold, and ``{norm_path: why not}`` for the others."""
    names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    pairs, left = [], {}
    for norm_path, norm in modules.items():
        if not _is_foldable_norm(norm):
            continue
        reason = "it is the model itself" if norm_path == "" else None
        reason = reason or _norm_problem(norm, names[id(norm)])
        layer_path = None
        if reason is None:
            layer_path, reason = producer(norm_path)
        if reason is None:
            layer = modules[layer_path]
            shared = any(owners[id(p)] > 1 for p in layer.parameters())
            reason = _layer_problem(layer, layer_path, norm, names[id(layer)], shared)
        if reason is None:
            pairs.append((layer_path, norm_path))
        else:
            left[norm_path] = reason
    return pairs, left


# --------------------------------------------------------------------------- folding


def _norm_affine(norm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` in float64 with ``norm(y) = y * scale + shift`` in eval."""
    mean = norm.running_mean.detach().double()
    invstd = torch.rsqrt(norm.running_var.detach().double() + norm.eps)
    scale = invstd if norm.weight is None else norm.weight.detach().double() * invstd
    shift = -mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach().double()
    return scale, shift


def _scale_output_channels(layer: torch.nn.Module, scale: torch.Tensor) -> torch.Tensor:
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
    parent_path, _, name = norm_path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, torch.nn.Identity())


def _report(
    model: torch.nn.Module, pairs: list[tuple[str, str]], left: dict[str, str], method: str
) -> None:
    """Log what was folded; warn when nothing was."""
    if pairs:
        logger.info(
            "fold(): folded %d BatchNorm layer(s) of %s (%s analysis).",
            len(pairs),
            type(model).__name__,
            method,
        )
        for norm_path, reason in left.items():
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
    details = "; ".join(f"{path!r}: {reason}" for path, reason in left.items())
    warnings.warn(
        f"fold(): expected at least one BatchNorm that can be folded, got {len(left)} that "
        f"cannot ({method} analysis): {details}.",
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
