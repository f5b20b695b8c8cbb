"""torch's model tooling and this package's layers: fx, TorchScript, quantization fusion.

Each tool recognises torch.nn's BatchNorm by where its class lives or by its exact class, so a
subclass from another package needs a word with it:

* ``torch.fx.symbolic_trace`` treats modules of ``torch.nn`` as leaves (one ``call_module``
  node) and traces into the others. Our layers record themselves as that same one node when
  they see a Proxy (:func:`traced_call`), so a traced model calls them at run time as it
  calls torch.nn's, with the mode they have then.
* ``torch.jit.script`` cannot compile a forward that calls NumPy and Numba; it asks a module
  for a scriptable stand-in through ``__prepare_scriptable__``. Ours answer with their torch.nn
  twin, sharing the same parameter and buffer tensors (:func:`twin_of`): the scripted model
  computes with torch's op.
* ``torch.ao.quantization.fuse_modules`` looks fusion methods up by the exact classes of the
  modules. :func:`register_fusers` adds our classes next to torch.nn's, fusing through the
  twin, so (Conv, our BatchNorm[, ReLU]) fuse as they do with torch.nn's.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["register_fusers", "traced_call", "twin_of"]

logger = logging.getLogger(__name__)


def twin_of(module: torch.nn.Module, cls: type[torch.nn.Module]) -> torch.nn.Module:
    """A module of class ``cls`` holding the very same parameter and buffer tensors.

    Its dicts of parameters, buffers, submodules and hooks are copies, so registering or
    replacing a tensor on one does not change the other; the tensors themselves are shared, so
    an optimizer step or a running-statistics update on one is seen by the other.
    """
    twin = cls.__new__(cls)
    twin.__dict__.update(module.__dict__)
    for name, value in module.__dict__.items():
        if isinstance(value, dict):  # _parameters, _buffers, _modules and the hook dicts
            twin.__dict__[name] = type(value)(value)
    return twin


def traced_call(layer: torch.nn.Module, proxy, root_forward) -> object:
    """The layer as one node of a ``torch.fx`` trace, as torch.nn's layers are.

    Args:
        layer: The layer fx is tracing into.
        proxy: Its input, an ``fx.Proxy``.
        root_forward: A forward in torch ops, ``root_forward(layer, proxy)``, for a layer traced
            as the root of the trace.

    Returns:
        A ``call_module`` node for a submodule (the traced model calls the layer at run time,
        in the mode it has then). A root has no path to call; it is traced through
        ``root_forward``, as tracing torch.nn's layer as the root traces through its forward
        (its mode is then fixed in the graph in both cases).
    """
    tracer = proxy.tracer
    path = tracer.path_of_module(layer)
    if path:
        return tracer.create_proxy("call_module", path, (proxy,), {})
    return root_forward(layer, proxy)


def register_fusers(pairs: dict[type, type]) -> None:
    """Let ``torch.ao.quantization.fuse_modules`` fuse our layers as their torch.nn twins.

    Args:
        pairs: ``{our class: torch.nn class}``. Every fusion method torch has for a pattern
            holding the torch.nn class gets the same pattern with ours, and is called with the
            twin (:func:`twin_of`) of our layer.
    """
    try:
        from torch.ao.quantization import fuser_method_mappings
    except ImportError:  # a torch build without quantization: nothing to register with
        return
    table = getattr(fuser_method_mappings, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    if not isinstance(table, dict):
        logger.debug("torch's fuser table not found; fuse_modules will not know our layers")
        return
    ours_for = {theirs: ours for ours, theirs in pairs.items()}
    for pattern, method in list(table.items()):
        if not any(cls in ours_for for cls in pattern):
            continue
        ours_pattern = tuple(ours_for.get(cls, cls) for cls in pattern)
        table.setdefault(ours_pattern, _through_twins(method, pairs))


def _through_twins(method, pairs: dict[type, type]):
    def fuse(is_qat, *modules):
        twins = [twin_of(m, pairs[type(m)]) if type(m) in pairs else m for m in modules]
        return method(is_qat, *twins)

    return fuse
