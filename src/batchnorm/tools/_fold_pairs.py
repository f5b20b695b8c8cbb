"""Which (layer, BatchNorm) pairs of a model fold exactly, and why the others do not.

The analysis behind :func:`batchnorm.fold`: the model is traced with :mod:`torch.fx` only to see
which layer's output feeds which BatchNorm; a pair is folded only when that proves the result
exact (one layer feeding one BatchNorm and nothing else, each called once per forward, stock
forwards, no hooks). Every other pair gets a :class:`Verdict` with the reason, for the warning
:func:`batchnorm.fold` gives.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from itertools import pairwise
from typing import NamedTuple, TypeGuard

import torch
import torch.fx
from torch.nn.modules.batchnorm import _BatchNorm

from ..families import families, stock_forwards
from ._activated import activated_family

__all__ = ["Producer", "Verdict", "find_producers", "select_pairs"]

# The messages of the analysis belong to fold()'s logger, where users look for them.
logger = logging.getLogger("batchnorm.tools.fold")

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
_FROZEN: tuple[type[torch.nn.Module], ...] = tuple(
    family.frozen for family in families() if family.frozen is not None
)
_NORMS: tuple[type[torch.nn.Module], ...] = (_BatchNorm, *_FROZEN)

#: Forwards of norm classes known to compute the eval-mode affine map and nothing else. A
#: subclass with its own forward may do more (timm's BatchNormAct2d applies an activation).
_NORM_FORWARDS = stock_forwards()

#: Per-module hook dicts, and how a warning names them. ``_forward_hooks`` also holds the
#: hooks registered ``with_kwargs`` or ``always_call``; ``_backward_hooks`` both the full ones
#: and the legacy ``register_backward_hook`` ones.
_HOOKS = (
    ("_forward_pre_hooks", "forward pre-hooks"),
    ("_forward_hooks", "forward hooks"),
    ("_backward_pre_hooks", "backward pre-hooks"),
    ("_backward_hooks", "backward hooks"),
)

#: The same four kinds registered for every module at once (torch.nn.modules.module's
#: register_module_forward_pre_hook, ..._forward_hook, ..._full_backward_pre_hook,
#: ..._full_backward_hook and the legacy ..._backward_hook), as module-level dicts.
_GLOBAL_HOOKS = (
    ("_global_forward_pre_hooks", "forward pre-hooks"),
    ("_global_forward_hooks", "forward hooks"),
    ("_global_backward_pre_hooks", "backward pre-hooks"),
    ("_global_backward_hooks", "backward hooks"),
)


class Verdict(NamedTuple):
    """What the analysis says about one BatchNorm."""

    layer_path: str | None  # the one layer whose output it takes, when there is one
    reason: str | None  # why it cannot be folded into that layer; None when it can
    fix: str = ""  # a sentence for the warning, with a leading space, or ""


Producer = Callable[[str], Verdict]


def _is_foldable_norm(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm-like layer this tool knows how to fold (by type only).

    Activated layers (the family table's: BatchNorm then an activation) are: the BatchNorm
    folds, and the activation takes the layer's place.
    """
    return isinstance(module, _NORMS) or activated_family(module) is not None


def _is_layer(module: torch.nn.Module | None) -> bool:
    return isinstance(module, _LAYERS)


def _has_stock_forward(module: torch.nn.Module) -> bool:
    """True when ``module`` runs a forward whose arithmetic ``fold`` knows."""
    if activated_family(module) is not None:
        return True  # the table's promise: its family's BatchNorm, then its activation
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
    hooks = [name for attr, name in _HOOKS if getattr(module, attr, None)]
    if hooks:
        # After folding, the layer's hooks would see the folded output (and its gradient) and
        # the norm's would never run; a pre-hook on the layer sees the same input but receives
        # the module, whose weight it may read. So every kind blocks, on either module.
        return f"{kind} has {' and '.join(hooks)}, which would run on other values or not at all"
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
    running_mean = norm.running_mean
    assert isinstance(running_mean, torch.Tensor)  # _norm_problem found statistics first
    if channels != running_mean.numel():
        return (
            f"its input layer {layer_path!r} has {channels} output channels, the BatchNorm "
            f"{running_mean.numel()}"
        )
    return None


def _out_channels(layer: torch.nn.Module) -> int:
    if isinstance(layer, torch.nn.Linear):
        return layer.out_features
    assert isinstance(layer, torch.nn.modules.conv._ConvNd)  # the other _LAYERS
    return layer.out_channels


def _global_hook_problem() -> str | None:
    """Why no pair can be folded while global module hooks are registered, or None."""
    registry = torch.nn.modules.module
    hooks = [name for attr, name in _GLOBAL_HOOKS if getattr(registry, attr, None)]
    if not hooks:
        return None
    # A global hook runs on every module call: after folding it would meet an Identity and the
    # folded layer's output where it met the BatchNorm and the layer's output.
    return (
        f"global module {' and '.join(hooks)} are registered "
        "(torch.nn.modules.module.register_module_*_hook); they run on every module call and "
        "would meet other modules and values after folding"
    )


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


def find_producers(model: torch.nn.Module) -> tuple[Producer, str]:
    """A function giving each norm's verdict, and the name of the analysis behind it.

    ``producer(norm_path)`` is a :class:`Verdict`: the layer the norm follows (or None) and
    why the pair cannot be folded (or None).
    """
    try:
        graph = _LeafTracer().trace(model)
    except Exception as err:  # noqa: BLE001 - fx raises many types; any of them means "untraceable"
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        logger.info(
            "fold(): torch.fx could not trace %s (%s); without a trace no fold is proven "
            "exact, so nothing is folded.",
            type(model).__name__,
            reason,
        )
        return _untraced_producer(model, reason), "no analysis: the model does not trace"
    return _graph_producer(model, graph), "torch.fx analysis"


def _describe(node: torch.fx.Node, modules: Mapping[str, torch.nn.Module]) -> str:
    """A node as the user wrote it, for "follows ..." reasons."""
    if node.op == "call_module":
        return f"a {type(modules[str(node.target)]).__name__} ({node.target!r})"
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

    def is_layer_call(node: object) -> TypeGuard[torch.fx.Node]:
        return (
            isinstance(node, torch.fx.Node)
            and node.op == "call_module"
            and _is_layer(modules.get(node.target))
        )

    def untraced_owner(path: str) -> str | None:
        """The outermost module above ``path`` that the graph calls as a whole, if any."""
        parts = path.split(".")
        return next(
            (".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in calls),
            None,
        )

    def producer(norm_path: str) -> Verdict:
        norm_calls = calls.get(norm_path, [])
        if not norm_calls:
            return Verdict(None, "forward() does not call it")
        sources = [
            node.args[0] if len(node.args) == 1 and not node.kwargs else None for node in norm_calls
        ]
        # (A call_module node's target is the module's path, a str.)
        layer_path = next((str(src.target) for src in sources if is_layer_call(src)), None)
        if layer_path is None:
            if not isinstance(sources[0], torch.fx.Node):
                return Verdict(None, "it is not called with a single tensor argument")
            return Verdict(None, f"it follows {_describe(sources[0], modules)}")
        # From here on the norm takes the output of `layer_path` at least once: a pair that a
        # looser analysis would fold, so every reason below is warned about.
        for src in sources:
            if not isinstance(src, torch.fx.Node):
                return Verdict(
                    layer_path, "one of its calls does not take a single tensor argument"
                )
            if src.op != "call_module" or src.target != layer_path:
                what = _describe(src, modules)
                what = what if src.op == "placeholder" else f"the output of {what}"
                return Verdict(layer_path, f"it is also called on {what}")
            if len(src.users) != 1:
                return Verdict(layer_path, f"the output of {layer_path!r} is also used elsewhere")
        # Each norm call has its own layer call (one user each), so equal counts mean the layer
        # is never called for anything else: the graph shows every call of a traced forward.
        if len(calls[layer_path]) != len(norm_calls):
            return Verdict(
                layer_path,
                f"{layer_path!r} is called {len(calls[layer_path])} times, the BatchNorm "
                f"{len(norm_calls)}",
            )
        if norm_path in read_directly:
            return Verdict(layer_path, "forward() reads its tensors directly")
        if layer_path in read_directly:
            return Verdict(layer_path, f"forward() reads the tensors of {layer_path!r} directly")
        # Except the calls made inside modules the graph keeps whole (torch.nn's own, such as
        # MultiheadAttention, whose forward uses its out_proj Linear without calling it).
        for path in (layer_path, norm_path):
            owner = untraced_owner(path)
            if owner is not None:
                return Verdict(
                    layer_path,
                    f"{path!r} is inside {owner!r}, a {type(modules[owner]).__name__} that "
                    "torch.fx does not trace into, so its uses there are not visible",
                )
        return Verdict(layer_path, None)

    return producer


def _is_plain_sequential(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Sequential) and (
        type(module).forward is torch.nn.Sequential.forward
    )


def _untraced_producer(model: torch.nn.Module, trace_error: str) -> Producer:
    """Verdicts for a model that does not trace: every norm is left, pairs are named.

    Without a graph nothing shows how forward() uses a module: it may call ``self.block[0]``
    on its own, run ``self.block[1:]`` or read ``self.block[0].weight`` although every module
    is registered once, and folding ``block`` would then be wrong. So no pair is proven exact;
    adjacent ``(layer, norm)`` children of a ``torch.nn.Sequential`` are only *named* as pairs,
    so that each gets its own warning.
    """
    modules = dict(model.named_modules())
    names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    previous: dict[str, str] = {}  # child path -> path of the sibling run just before it
    for path, container in modules.items():
        if not _is_plain_sequential(container):
            continue
        # _modules, not named_children(): the latter hides a module listed twice, which would
        # make two non-adjacent children look adjacent.
        children = [name for name, child in container._modules.items() if child is not None]
        for before, after in pairwise(children):
            previous[_join(path, after)] = _join(path, before)
    reason = (
        f"the model does not trace with torch.fx ({trace_error}), and without a trace nothing "
        "shows that forward() uses the two only through their Sequential"
    )

    def producer(norm_path: str) -> Verdict:
        layer_path = previous.get(norm_path)
        if layer_path is None or not _is_layer(modules[layer_path]):
            return Verdict(None, reason)
        parent = norm_path.rpartition(".")[0]
        once = names[id(modules[layer_path])] == 1 and names[id(modules[norm_path])] == 1
        fix = (
            f" If forward() uses {parent!r} only by calling it, fold that Sequential on its "
            f"own: fold(model.get_submodule({parent!r}), inplace=True)."
            if parent and once
            else ""
        )
        return Verdict(layer_path, reason, fix)

    return producer


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def select_pairs(
    model: torch.nn.Module, producer: Producer
) -> tuple[list[tuple[str, str]], dict[str, Verdict]]:
    """``(layer_path, norm_path)`` pairs to fold, and ``{norm_path: verdict}`` for the others."""
    names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    global_hooks = _global_hook_problem()
    pairs, left = [], {}
    for norm_path, norm in modules.items():
        if not _is_foldable_norm(norm):
            continue
        if norm_path == "":
            left[norm_path] = Verdict(None, "it is the model itself")
            continue
        verdict = producer(norm_path)
        if verdict.layer_path is not None and verdict.reason is None:
            layer = modules[verdict.layer_path]
            shared = any(owners[id(p)] > 1 for p in layer.parameters())
            reason = (
                _norm_problem(norm, names[id(norm)])
                or _layer_problem(layer, verdict.layer_path, norm, names[id(layer)], shared)
                or global_hooks
            )
            verdict = verdict._replace(reason=reason)
        if verdict.layer_path is not None and verdict.reason is None:
            pairs.append((verdict.layer_path, norm_path))
        else:
            left[norm_path] = verdict
    return pairs, left
