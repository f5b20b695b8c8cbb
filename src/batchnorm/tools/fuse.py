r"""Fuse each BatchNorm layer that feeds only an activation into one ``BatchNormAct`` layer.

A BatchNorm layer followed by a pointwise activation (ReLU, LeakyReLU, ELU, SiLU, exact GELU)
is one :class:`batchnorm.BatchNormAct2d` (``1d``, ``3d``), which computes the same values in
fewer passes over memory (see :mod:`batchnorm.activated`). :func:`fuse_activations` finds such
pairs and fuses those for which the fused model provably computes what the model computed.

How the pairs are found: the model is traced with :mod:`torch.fx` (BatchNorm layers, this
package's included, stay single ``call_module`` nodes, as torch.nn's do), which shows every
use of each BatchNorm's output, whether the activation is a module (``nn.ReLU``) or a call in
``forward`` (``torch.relu``, ``F.relu``, ``x.relu()``, ``F.leaky_relu(x, 0.2)``, ``F.elu``,
``F.silu``, ``F.gelu``). A model that does not trace (data-dependent control flow, say) is
searched for adjacent (BatchNorm, activation module) children of ``torch.nn.Sequential``
containers instead.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
from collections import Counter, defaultdict
from itertools import pairwise

import torch
import torch.fx
import torch.nn.functional as F

from .._interop import twin_of
from ..activated import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from ..activations import activation_from_module
from ..families import Family, family_of, is_batchnorm_like, known_family
from ._activated import activated_family, has_call_hooks, make_activated, replace_modules

__all__ = ["fuse_activations"]

logger = logging.getLogger(__name__)

_WHERE = "fuse_activations()"


# --------------------------------------------------------------------------- public API


def fuse_activations(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    r"""Replace each (BatchNorm, activation) pair of ``model`` by one ``BatchNormAct*d`` layer.

    A pair is a ``torch.nn.BatchNorm1d/2d/3d`` or ``batchnorm.BatchNorm1d/2d/3d`` (exactly
    these classes: no SyncBatchNorm, frozen layer, ghost batches, batch renormalization, lazy
    layer or user subclass) whose output is used by one activation and nothing else:

    ================ ==========================================================================
    ``activation``   the module, or the call in ``forward``
    ================ ==========================================================================
    ``"relu"``       ``nn.ReLU``, ``torch.relu``, ``F.relu``, ``x.relu()`` (in-place forms too)
    ``"leaky_relu"`` ``nn.LeakyReLU(p)``, ``F.leaky_relu(x, p)``: ``activation_param=p``
    ``"elu"``        ``nn.ELU(p)``, ``F.elu(x, p)``: ``activation_param=p``
    ``"silu"``       ``nn.SiLU``, ``F.silu``
    ``"gelu"``       ``nn.GELU()``, ``F.gelu(x)``; not the tanh approximation
    ================ ==========================================================================

    The BatchNorm becomes the ``BatchNormAct`` of its rank (``BatchNormAct2d`` for
    ``BatchNorm2d``) by switching its class, as :func:`batchnorm.convert` does: the same
    Parameter and buffer tensors, ``state_dict`` keys and values, ``eps``, ``momentum``,
    ``affine``, ``track_running_stats``, training flag (and this package's ``nonfinite`` and
    ``single_value`` policies). What moves into the fused layer is the activation: its name and
    parameter become ``activation`` and ``activation_param``, plain attributes, not state (the
    activation modules have none). A torch.nn BatchNorm thereby becomes this package's layer,
    with its differences from torch.nn (README, "Differences from torch.nn").

    A pair is fused only when the result is exact:

    - The BatchNorm's output goes to the activation only (a second use would see the activated
      values), the activation takes it as its input and nothing else, and its other arguments
      are constants.
    - Neither module has forward or backward hooks (pre-hooks included; they would see other
      values or not run), and no global module hook is registered
      (``torch.nn.modules.module.register_module_*_hook``).
    - The BatchNorm is called once per forward, with its input alone (no ``mask=``), and is
      reachable under one name in the model (not shared).

    Each pair that has an activation but is not fused gets a warning naming the BatchNorm and
    why. Not visible to the analysis, and so assumed absent: code that reads attributes of the
    activation modules other than calling them, uses of the modules outside ``model``, and
    Python control flow that torch.fx fixes at tracing time (``if self.training:``, read
    once, while tracing) taking another branch later. The GraphModule below runs the traced
    graph, so such values stay fixed there for good: ``F.dropout(x, training=self.training)``
    keeps the mode the model had when it was fused (use ``nn.Dropout``, a module, instead).

    What you get back, by how the pairs were found:

    - **The model traces with torch.fx, and every fused activation is a module called once
      and reachable under one name**: the model's own class. The modules are replaced in its
      module tree: each BatchNorm by the fused layer, each activation module by
      ``torch.nn.Identity()``, so that ``forward`` runs unchanged, the activation is applied
      once, and the indices of a ``Sequential`` and the ``state_dict`` keys stay as they were.
    - **The model traces, and some activation is a call in forward, or a module used
      elsewhere too** (one ``nn.ReLU`` applied after several layers): the activation must
      leave ``forward``, so the result is a :class:`torch.fx.GraphModule` of the traced graph
      without the fused activation calls. Its class is named like ``model``'s (``class_name``)
      but is a GraphModule subclass; it holds the modules the traced forward uses, at the
      same paths (the containers between them become plain ``torch.nn.Module``\s; a module
      that forward never calls, and a tensor it never reads, is not carried over, as always
      with torch.fx), so the ``state_dict`` keys of those modules are unchanged.
    - **The model does not trace**: adjacent children ``(BatchNorm, activation module)`` of
      each ``torch.nn.Sequential`` (with Sequential's own forward) are fused, the activation
      child replaced by ``torch.nn.Identity()`` (indices and ``state_dict`` keys stay). This
      assumes that ``forward`` uses such a Sequential only by calling it as a whole (not
      ``self.block[0](x)`` alone, nor a slice of it), which is not checked. The model's own
      class is returned.

    Args:
        model: Any module.
        inplace: Change ``model`` itself. Its BatchNorm layers become the fused layers (the
            same module objects, so the same Parameter objects: an optimizer built on
            ``model.parameters()`` keeps training them) and its activation modules become
            Identity. When the result is a GraphModule, ``model``'s own ``forward`` cannot be
            changed, so ``model`` is left computing as before and the result shares its
            modules, except that each fused layer is a new module holding the very same
            Parameter and buffer tensors as ``model``'s BatchNorm. By default a
            ``copy.deepcopy`` of ``model`` is fused, and ``model`` is never changed.

    Returns:
        The fused model (see above); ``model`` itself when ``inplace`` and it keeps its class.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``, or ``inplace`` not a bool.

    Warns:
        UserWarning: One per BatchNorm followed by an activation but not fused, naming it and
            why; one more when no pair was found at all.

    Example:
        >>> import torch
        >>> from batchnorm.tools.fuse import fuse_activations
        >>> net = torch.nn.Sequential(
        ...     torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.LeakyReLU(0.2)
        ... )
        >>> fused = fuse_activations(net)
        >>> type(fused[1]).__name__, fused[1].activation, fused[1].activation_param, fused[2]
        ('BatchNormAct2d', 'leaky_relu', 0.2, Identity())
        >>> x = torch.randn(4, 3, 6, 6)
        >>> torch.allclose(fused.eval()(x), net.eval()(x), atol=1e-6)
        True
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{_WHERE}: expected a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(inplace, bool):
        raise TypeError(f"{_WHERE}: expected inplace to be True or False, got {inplace!r}.")
    target = model if inplace else copy.deepcopy(model)
    try:
        graph = _Tracer().trace(target)
    except Exception as err:  # noqa: BLE001 - fx raises many types; any of them means "untraceable"
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        logger.info(
            "%s torch.fx could not trace %s (%s); fusing adjacent Sequential children.",
            _WHERE,
            type(model).__name__,
            reason,
        )
        pairs, left = _sequential_pairs(target)
        result = _fuse_in_tree(target, pairs)
        method = "adjacent Sequential children: the model does not trace with torch.fx"
    else:
        pairs, left = _graph_pairs(target, graph)
        if all(pair.in_tree for pair in pairs):
            result = _fuse_in_tree(target, pairs)
        else:
            result = _fuse_in_graph(target, graph, pairs)
        method = "torch.fx analysis"
    _report(model, pairs, left, method)
    return result


# --------------------------------------------------------------------------- the pairs


@dataclasses.dataclass(frozen=True)
class _Pair:
    """One BatchNorm to fuse with the activation that takes its output."""

    norm_path: str
    activation: str
    param: float | None
    # The activation's module, when it can be replaced by an Identity in the module tree
    # (a module called once and reachable under one name); None when forward must change.
    module: torch.nn.Module | None
    node: torch.fx.Node | None = None  # the activation's node (fx analysis only)
    norm_node: torch.fx.Node | None = None

    @property
    def in_tree(self) -> bool:
        return self.module is not None


@dataclasses.dataclass(frozen=True)
class _Left:
    """A BatchNorm followed by an activation, not fused, and why."""

    norm_path: str
    what: str  # the activation as the user wrote it
    reason: str


class _Tracer(torch.fx.Tracer):
    """Keeps every BatchNorm-like layer (this package's too) a single ``call_module`` node."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return (
            is_batchnorm_like(m)
            or family_of(type(m)) is not None
            or activated_family(m) is not None
            or super().is_leaf_module(m, module_qualified_name)
        )


def _plain_family(module: torch.nn.Module | None) -> Family | None:
    """The fixed-rank family of ``module`` if it is exactly that family's or torch.nn's class."""
    family = family_of(type(module))
    if family is None or family.ranks is None or type(module) not in (family.ours, family.torch):
        return None
    return family


def _fused_class_of(norm: torch.nn.Module) -> type[torch.nn.Module]:
    """The fused class of a BatchNorm layer of a found pair (a fixed-rank family's)."""
    family = _plain_family(norm)
    assert family is not None  # pairs are found for such layers only
    return _fused_class(family)


def _fused_class(family: Family) -> type[torch.nn.Module]:
    return next(
        cls
        for cls in (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d)
        if known_family(cls).name == family.name
    )


@dataclasses.dataclass(frozen=True)
class _Functional:
    """How a function in ``forward`` computes a table activation: its arguments after the
    input, with defaults, which one is ``activation_param``, and values others must have."""

    activation: str
    params: tuple[str, ...] = ()
    defaults: tuple = ()
    param: str | None = None
    required: tuple[tuple[str, object], ...] = ()

    def match(self, args: tuple, kwargs: dict, source: torch.fx.Node) -> float | None | bool:
        """``activation_param`` (``None`` if it has none) when ``(args, kwargs)`` apply this
        activation to ``source`` with constant other arguments; ``False`` otherwise."""
        names = ("input", *self.params)
        if len(args) > len(names):
            return False
        bound = dict(zip(self.params, self.defaults, strict=True))
        bound.update(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in names or key in names[: len(args)]:
                return False
            bound[key] = value
        if bound.get("input") is not source:
            return False
        others = [value for key, value in bound.items() if key != "input"]
        if any(_holds_node(value) for value in others):
            return False
        if any(bound[key] != value for key, value in self.required):
            return False
        if self.param is None:
            return None
        value = bound[self.param]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return float(value) if math.isfinite(value) else False


def _holds_node(value) -> bool:
    found = []
    torch.fx.node.map_aggregate(value, lambda v: found.append(isinstance(v, torch.fx.Node)))
    return any(found)


_RELU = _Functional("relu")
_INPLACE = ("inplace",)
#: The functions fx records for the table's activations (the F.* Python functions with their
#: arguments as keywords; the built-ins as written).
_FUNCTIONS: dict[object, _Functional] = {
    torch.relu: _RELU,
    torch.relu_: _RELU,
    F.relu: _Functional("relu", _INPLACE, (False,)),
    F.leaky_relu: _Functional(
        "leaky_relu", ("negative_slope", "inplace"), (0.01, False), "negative_slope"
    ),
    F.leaky_relu_: _Functional("leaky_relu", ("negative_slope",), (0.01,), "negative_slope"),
    F.elu: _Functional("elu", ("alpha", "inplace"), (1.0, False), "alpha"),
    # elu_'s scale and input_scale make it another function unless both are 1.
    F.elu_: _Functional(
        "elu",
        ("alpha", "scale", "input_scale"),
        (1.0, 1.0, 1.0),
        "alpha",
        (("scale", 1.0), ("input_scale", 1.0)),
    ),
    F.silu: _Functional("silu", _INPLACE, (False,)),
    F.gelu: _Functional("gelu", ("approximate",), ("none",), None, (("approximate", "none"),)),
}
_METHODS = {"relu": _RELU, "relu_": _RELU}


def _activation_call(
    node: torch.fx.Node, source: torch.fx.Node, modules: dict[str, torch.nn.Module]
) -> tuple[str, float | None, str] | None:
    """``(activation, param, how it is written)`` when ``node`` applies a table activation
    (not identity) to ``source``; else ``None``."""
    if node.op == "call_module":
        module = modules.get(node.target) if isinstance(node.target, str) else None
        found = None if module is None else activation_from_module(module)
        if found is None or found[0] == "identity":
            return None
        if node.args != (source,) or node.kwargs:
            return None
        return found[0], found[1], f"{type(module).__name__} {node.target!r}"
    if node.op == "call_method":
        rule = _METHODS.get(node.target) if isinstance(node.target, str) else None
        what = f".{node.target}()"
    elif node.op == "call_function":
        rule = _FUNCTIONS.get(node.target)
        what = f"{getattr(node.target, '__name__', node.target)}()"
    else:
        return None
    if rule is None:
        return None
    param = rule.match(node.args, node.kwargs, source)
    if param is False:
        return None
    return rule.activation, param, what


def _global_hook_problem() -> str | None:
    registry = torch.nn.modules.module
    kinds = (
        "_global_forward_pre_hooks",
        "_global_forward_hooks",
        "_global_backward_pre_hooks",
        "_global_backward_hooks",
    )
    if any(getattr(registry, name, None) for name in kinds):
        return (
            "global module hooks are registered (torch.nn.modules.module."
            "register_module_*_hook); they run on every module call and would meet other "
            "values after fusing"
        )
    return None


def _hook_problem(module: torch.nn.Module, kind: str) -> str | None:
    if has_call_hooks(module):
        return f"{kind} has forward or backward hooks, which would see other values or not run"
    return None


def _graph_pairs(model: torch.nn.Module, graph: torch.fx.Graph) -> tuple[list[_Pair], list[_Left]]:
    """The pairs the traced graph proves exact, and the candidates left with their reasons."""
    modules = dict(model.named_modules())
    names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    calls: dict[str, int] = defaultdict(int)
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] += 1
    global_hooks = _global_hook_problem()

    def inside_untraced(path: str, kind: str) -> str | None:
        # A module that the graph calls as a whole runs its own forward, which fx does not
        # trace: it may use the BatchNorm or the activation in ways the graph does not show.
        parts = path.split(".")
        owner = next(
            (".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in calls),
            None,
        )
        if owner is None:
            return None
        return (
            f"{kind} is inside {owner!r}, a {type(modules[owner]).__name__} that torch.fx does "
            "not trace into, so its uses there are not visible"
        )

    pairs, left = [], []
    for node in graph.nodes:
        if node.op != "call_module" or _plain_family(modules.get(node.target)) is None:
            continue
        found = [
            (user, spec)
            for user in node.users
            if (spec := _activation_call(user, node, modules)) is not None
        ]
        if not found:
            continue
        path, norm = node.target, modules[node.target]
        user, (activation, param, what) = found[0]
        act_module = modules.get(user.target) if user.op == "call_module" else None
        reason = (
            (len(node.users) > 1 and "its output is also used elsewhere")
            or ((len(node.args) != 1 or node.kwargs) and "it is called with more than its input")
            or (calls[path] > 1 and f"it is called {calls[path]} times")
            or (names[id(norm)] > 1 and f"it is reachable under {names[id(norm)]} names")
            or inside_untraced(path, "it")
            or (act_module is not None and inside_untraced(user.target, "the activation"))
            or _hook_problem(norm, "it")
            or (act_module is not None and _hook_problem(act_module, "the activation"))
            or global_hooks
        )
        if reason:
            left.append(_Left(path, what, reason))
            continue
        in_tree = act_module is not None and calls[user.target] == 1 and names[id(act_module)] == 1
        pairs.append(_Pair(path, activation, param, act_module if in_tree else None, user, node))
    return pairs, left


def _is_plain_sequential(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Sequential) and (
        type(module).forward is torch.nn.Sequential.forward
    )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _sequential_pairs(model: torch.nn.Module) -> tuple[list[_Pair], list[_Left]]:
    """Adjacent (BatchNorm, activation module) children of plain Sequentials."""
    names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    global_hooks = _global_hook_problem()
    pairs, left = [], []
    for path, container in model.named_modules():
        if not _is_plain_sequential(container):
            continue
        # _modules, not named_children(): the latter hides a module listed twice, which would
        # make two non-adjacent children look adjacent.
        children = list(container._modules.items())
        for (name, norm), (_, act) in pairwise(children):
            found = None if act is None else activation_from_module(act)
            if _plain_family(norm) is None or found is None or found[0] == "identity":
                continue
            norm_path = _join(path, name)
            shared = [
                f"{kind} is reachable under {names[id(m)]} names"
                for kind, m in (("it", norm), ("the activation", act))
                if names[id(m)] > 1
            ]
            reason = (
                (shared[0] if shared else None)
                or _hook_problem(norm, "it")
                or _hook_problem(act, "the activation")
                or global_hooks
            )
            what = f"{type(act).__name__} {_join(path, name)!r}"
            if reason:
                left.append(_Left(norm_path, what, reason))
            else:
                pairs.append(_Pair(norm_path, found[0], found[1], act))
    return pairs, left


# --------------------------------------------------------------------------- fusing


def _fuse_in_tree(model: torch.nn.Module, pairs: list[_Pair]) -> torch.nn.Module:
    """Switch each BatchNorm to its fused class in place; put an Identity in each activation's
    slot. The model keeps its class and forward."""
    identities: dict[int, torch.nn.Module] = {}
    for pair in pairs:
        norm = model.get_submodule(pair.norm_path)
        make_activated(norm, _fused_class_of(norm), pair.activation, pair.param)
        identity = torch.nn.Identity()
        assert pair.module is not None  # only pairs in the module tree come here
        identity.training = pair.module.training
        identities[id(pair.module)] = identity
    return replace_modules(model, identities)


def _fuse_in_graph(
    model: torch.nn.Module, graph: torch.fx.Graph, pairs: list[_Pair]
) -> torch.fx.GraphModule:
    """A GraphModule of ``graph`` without the fused activations, its BatchNorms fused layers
    sharing the tensors of ``model``'s (``model`` itself is not changed)."""
    for pair in pairs:
        assert pair.node is not None and pair.norm_node is not None  # set by the fx analysis
        pair.node.replace_all_uses_with(pair.norm_node)
        graph.erase_node(pair.node)
    graph.lint()
    result = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    result.training = model.training
    for pair in pairs:
        norm = model.get_submodule(pair.norm_path)
        fused = twin_of(norm, _fused_class_of(norm))
        make_activated(fused, type(fused), pair.activation, pair.param)
        # GraphModule builds the containers on the way to each module afresh, so this changes
        # the result only.
        parent, _, name = pair.norm_path.rpartition(".")
        setattr(result.get_submodule(parent), name, fused)
    return result


def _report(model, pairs: list[_Pair], left: list[_Left], method: str) -> None:
    for item in left:
        warnings.warn(
            f"{_WHERE}: expected a BatchNorm whose output only its activation uses, got "
            f"{item.norm_path!r} followed by {item.what}, left unfused: {item.reason}.",
            UserWarning,
            stacklevel=3,
        )
    if pairs:
        logger.info(
            "%s fused %d BatchNorm layer(s) of %s (%s).",
            _WHERE,
            len(pairs),
            type(model).__name__,
            method,
        )
    elif not left:
        warnings.warn(
            f"{_WHERE}: expected a model with a BatchNorm followed by an activation, got "
            f"{type(model).__name__} with none ({method}); it is returned unchanged.",
            UserWarning,
            stacklevel=3,
        )
