"""Capture a model's forward pass as a torch.fx graph that the engine can explain.

The tracer enters every module and function it can, so the graph holds the few primitive operations
the engine has rules for; where a module or function cannot be traced into (data-dependent Python
control flow) it stays one node, and the engine names it if it needs a rule. Fused composites that hide
an attention's inner products (``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``,
torchvision's Swin window attention) are replaced while tracing by their primitive steps, so attention
rules apply to them (see :mod:`.decompositions`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx._symbolic_trace import _orig_module_call

from .decompositions import FUNCTION_DECOMPOSITIONS, MODULE_DECOMPOSITIONS
from .ops import UnsupportedOperationError
from .optable import (
    GROUP_NORM_FUNCTIONS,
    LAYER_NORM_FUNCTIONS,
    LEAF_MODULES,
    RMS_NORM_2D_FUNCTIONS,
    RMS_NORM_FUNCTIONS,
    TIMM_ACTIVATION_FUNCTIONS,
)

# plain Python functions the engine has a rule for: kept as single nodes instead of traced into
KNOWN_FUNCTIONS = tuple(
    f
    for f in (
        *LAYER_NORM_FUNCTIONS,
        *GROUP_NORM_FUNCTIONS,
        *RMS_NORM_FUNCTIONS,
        *RMS_NORM_2D_FUNCTIONS,
        *TIMM_ACTIVATION_FUNCTIONS,
    )
    if not getattr(f, "__module__", "").startswith("torch")
)


def _timm_notrace() -> tuple[tuple[type[nn.Module], ...], tuple[Callable[..., Any], ...]]:
    """timm's own lists of modules and functions that its feature extraction does not trace into."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is optional for the engine
        return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


class _Tracer(fx.Tracer):
    """Enters modules and timm's no-trace functions where it can; keeps a node opaque where it cannot."""

    def __init__(self) -> None:
        modules, functions = _timm_notrace()
        super().__init__(autowrap_functions=(*functions, *KNOWN_FUNCTIONS))
        self.fallback_leaves: tuple[type[nn.Module], ...] = modules
        self.fallback_functions = set(functions)
        self.opaque: set[str] = set()  # module paths kept as one node because tracing into them failed

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in MODULE_DECOMPOSITIONS:
            return False
        if isinstance(m, LEAF_MODULES) or module_qualified_name in self.opaque:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """No proxy cache: a failed attempt erases its nodes, and a cached proxy could name one of them.
        While :class:`ShapedTracer` computes a value, attributes are the real ones."""
        if getattr(self, "_disable_module_getattr", False):
            return attr_val
        return super().getattr(attr, attr_val, {})

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        # fx hands us ``Module.__call__``, which would trace the user's forward hooks of a container
        # module into the graph; its own ``forward`` is the computation to explain
        forward = m.forward
        decomposition = MODULE_DECOMPOSITIONS.get(type(m))
        if decomposition is not None:
            return decomposition(self, m, self.path_of_module(m), *args, **kwargs)
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path) or not isinstance(m, self.fallback_leaves):
            return super().call_module(m, forward, args, kwargs)
        return self._attempt(
            lambda: super(_Tracer, self).call_module(m, forward, args, kwargs),
            lambda: self._as_leaf(m, path, forward, args, kwargs),
        )

    def _as_leaf(self, m: nn.Module, path: str, forward: Callable, args: tuple, kwargs: dict) -> Any:
        self.opaque.add(path)
        return super().call_module(m, forward, args, kwargs)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if kind == "call_function":
            decomposition = FUNCTION_DECOMPOSITIONS.get(target)
            if decomposition is not None:
                return decomposition(*args, **kwargs)
            if target in self.fallback_functions:
                return self._attempt(
                    lambda: target(*args, **kwargs),
                    lambda: super(_Tracer, self).create_proxy(kind, target, args, kwargs, name, type_expr),
                )
        return super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)

    def _attempt(self, inside: Callable[[], Any], opaque: Callable[[], Any]) -> Any:
        """Trace ``inside``; if it fails, remove the nodes it added and record one opaque node instead."""
        last = self.graph._root.prev  # the graph's current last node
        stack = dict(self.module_stack)  # fx does not unwind it when tracing a module raises
        try:
            return inside()
        except Exception:  # fx raises many types for untraceable code
            while self.graph._root.prev is not last:
                self.graph.erase_node(self.graph._root.prev)
            self.module_stack.clear()
            self.module_stack.update(stack)
            return opaque()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode for the duration and restore every module's own flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextmanager
def _caches_kept(model: nn.Module) -> Iterator[None]:
    """Tracing runs ``forward`` on proxies; modules that memoise in a dict (timm's attention-bias
    caches) would keep a proxy and hand it to later real calls. Every module's dicts are restored."""
    saved = [
        (value, dict(value))
        for module in model.modules()
        for value in vars(module).values()
        if type(value) is dict
    ]
    try:
        yield
    finally:
        for value, content in saved:
            value.clear()
            value.update(content)


def _optional_arguments(model: nn.Module) -> dict[str, Any] | None:
    """The forward's arguments after the image that have defaults (masks, flags), fixed to them."""
    parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    fixed = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    return fixed or None


def _drop_fixed_arguments(graph: fx.Graph) -> None:
    """Remove the placeholders of arguments fixed to their defaults, and fx's checks on them."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    fixed = set(placeholders[1:])
    for node in graph.nodes:
        if node.op != "placeholder" and any(source in fixed for source in node.all_input_nodes):
            fixed.add(node)
    for node in reversed(list(graph.nodes)):
        if node in fixed and not node.users and node.op != "output":
            graph.erase_node(node)


def trace(model: nn.Module, example: torch.Tensor | None = None) -> fx.GraphModule:
    """Trace the whole forward pass (in eval mode) into a GraphModule sharing the modules.

    Without ``example`` the graph holds for any input size. With it, sizes are taken from the example
    (:class:`ShapedTracer`), so Python code that branches on shapes runs; the graph then holds for that
    input shape only.
    """
    tracer = _Tracer() if example is None else ShapedTracer(example)
    with eval_mode(model), _caches_kept(model):
        try:
            graph = tracer.trace(model, concrete_args=_optional_arguments(model))
        except UnsupportedOperationError:
            raise
        except Exception as error:  # fx raises many types; the message is what helps
            raise UnsupportedOperationError(
                f"torch.fx could not trace {type(model).__name__}: {error}. The model's forward must be "
                "symbolically traceable (no Python control flow on tensor values)."
            ) from error
    _drop_fixed_arguments(graph)
    for node in graph.nodes:
        # fx marks the result of a wrapped function so generated code re-wraps it; a decomposition's
        # last node would then register e.g. torch.cat as wrapped process-wide
        node.meta.pop("is_wrapped", None)
    module = fx.GraphModule(tracer.root, graph)
    module._lrp_opaque = tracer.opaque  # paths kept as one node because tracing into them failed
    return module


def _value(argument: Any) -> Any:
    return fx.node.map_aggregate(argument, lambda a: a.value if isinstance(a, ShapedProxy) else a)


class ShapedProxy(fx.Proxy):
    """A proxy that also holds the value computed on the example, so sizes are plain numbers."""

    value: Any = None

    @property
    def shape(self) -> torch.Size:  # type: ignore[override]
        return self.value.shape

    @property
    def ndim(self) -> int:  # type: ignore[override]
        return self.value.dim()

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self.value.dtype

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self.value.device

    def size(self, dim: int | None = None) -> Any:
        return self.value.size() if dim is None else self.value.size(dim)

    def dim(self) -> int:
        return self.value.dim()

    def numel(self) -> int:
        return self.value.numel()

    def __len__(self) -> int:
        return len(self.value)

    def __iter__(self) -> Iterator[Any]:
        return iter([self[i] for i in range(len(self.value))])


class ShapedTracer(_Tracer):
    """Runs the example through the module while tracing it, one operation at a time."""

    def __init__(self, example: torch.Tensor) -> None:
        super().__init__()
        self.example = example

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ShapedProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if not isinstance(proxy, ShapedProxy) or proxy.value is not None:
            return proxy  # a decomposition's result, already computed step by step
        self._disable_module_getattr = True  # attribute reads inside return real values
        try:
            with torch.no_grad():
                proxy.value = self._compute(kind, target, _value(args), _value(kwargs))
        finally:
            self._disable_module_getattr = False
        return proxy

    def _compute(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        if kind == "placeholder":
            return self.example
        if kind == "get_attr":
            value: Any = self.root
            for part in str(target).split("."):
                value = getattr(value, part)
            return value
        if kind == "call_module":  # unpatched: the patched call would trace the module again
            return _orig_module_call(self.root.get_submodule(str(target)), *args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], str(target))(*args[1:], **kwargs)
        return target(*args, **kwargs)
