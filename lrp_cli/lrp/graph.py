"""Capture a model's whole forward pass with torch.fx and turn it into steps the engine can invert.

The user's model is never changed: tracing switches it to eval mode and restores every module's flag,
batch norms are folded into copies of the preceding layer's parameters, and in-place operations are
replayed out of place.
"""

from __future__ import annotations

import copy
import operator
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .layers import WeightedLayer
from .ops import (
    Arithmetic,
    Concat,
    GetItem,
    Op,
    Passthrough,
    Pool,
    Reshape,
    Route,
    UnsupportedOperationError,
    Weighted,
    pool_average_of,
)

# --- what the engine knows -------------------------------------------------------------------------

NONNEGATIVE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.Sigmoid,
    nn.Hardsigmoid,
    nn.Softplus,
)
GATE_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid)
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    *NONNEGATIVE_ACTIVATIONS,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Mish,
    nn.Tanh,
    nn.Hardtanh,
    nn.PReLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
)


def _stochastic_depth() -> set[Callable[..., Any]]:
    """torchvision wraps stochastic depth for fx; in eval mode it is the identity."""
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:
        return set()
    return {stochastic_depth}


NONNEGATIVE_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    torch.sigmoid,
    F.hardsigmoid,
    F.softplus,
    "relu",
    "sigmoid",
}
GATE_FUNCTIONS = {torch.sigmoid, F.hardsigmoid, "sigmoid"}
ELEMENTWISE_FUNCTIONS = {
    *NONNEGATIVE_FUNCTIONS,
    F.hardtanh,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.gelu,
    F.silu,
    F.hardswish,
    F.mish,
    torch.tanh,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    *_stochastic_depth(),
    "tanh",
    "contiguous",
    "clone",
    "float",
    "to",
    "type_as",
    "detach",
}
RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as"}
CONCAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
ROUTE_FUNCTIONS = {
    torch.permute,
    torch.transpose,
    F.pad,
    torch.split,
    torch.chunk,
    torch.stack,
    torch.flip,
    torch.roll,
    torch.unbind,
    torch.narrow,
}
ROUTE_METHODS = {
    "permute",
    "transpose",
    "split",
    "chunk",
    "expand",
    "expand_as",
    "flip",
    "roll",
    "narrow",
    "unbind",
    "repeat",
}
ARITHMETIC = {
    operator.add: "add",
    torch.add: "add",
    "add": "add",
    operator.sub: "sub",
    torch.sub: "sub",
    "sub": "sub",
    operator.mul: "mul",
    torch.mul: "mul",
    "mul": "mul",
    operator.truediv: "div",
    torch.div: "div",
    "div": "div",
}
IN_PLACE_FUNCTIONS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}
AVERAGING_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_avg_pool1d, F.avg_pool2d, torch.mean, "mean", "sum"}
MAX_POOL_FUNCTIONS = {F.max_pool2d, F.adaptive_max_pool2d}
METADATA_METHODS = {"size", "dim", "numel"}


def _timm_registries() -> tuple[tuple[type[nn.Module], ...], tuple[Callable[..., Any], ...]]:
    """timm's own lists of modules and functions that symbolic tracing must not enter (if installed)."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is optional for the engine
        return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


def _timm_class(name: str) -> type | None:
    try:
        import timm.layers as layers
    except ImportError:
        return None
    return getattr(layers, name, None)


# --- tracing ---------------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """fx tracer that stops at timm's no-trace modules as well as torch.nn's own modules."""

    def __init__(self, leaves: tuple[type[nn.Module], ...], functions: tuple[Callable[..., Any], ...]):
        super().__init__(autowrap_functions=functions)
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)


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


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace the whole forward pass (in eval mode) into a GraphModule sharing the modules."""
    leaves, functions = _timm_registries()
    tracer = _Tracer(leaves, functions)
    with eval_mode(model):
        try:
            graph = tracer.trace(model)
        except Exception as error:  # fx raises many types; the message is what helps
            raise UnsupportedOperationError(
                f"torch.fx could not trace {type(model).__name__}: {error}. The model's forward must be "
                "symbolically traceable (no data-dependent Python control flow)."
            ) from error
    return fx.GraphModule(tracer.root, graph)


# --- the program ---------------------------------------------------------------------------------


@dataclass
class Step:
    """One graph node: its op, the node's arguments (with Node placeholders) and where it came from."""

    node: fx.Node
    op: Op
    path: str  # module path, or the enclosing module's path plus the function name
    nonnegative: bool = False
    gate: bool = False
    constant: bool = False  # a stored tensor (get_attr), not an activation


@dataclass
class Program:
    """The traced model as steps in execution order, plus what the rules need to know about it."""

    steps: list[Step]
    input_node: fx.Node
    output_node: fx.Node
    graph_module: fx.GraphModule
    weighted: list[Weighted] = field(default_factory=list)


def _module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    owner = re.sub(r"@\d+$", "", next(reversed(stack))) if stack else ""
    name = getattr(node.target, "__name__", str(node.target))
    return f"{owner}:{name}" if owner else name


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


def _weighted_from_module(module: nn.Module) -> tuple[WeightedLayer, str] | None:
    conv_same = _timm_class("Conv2dSame")
    if isinstance(module, nn.Conv2d):
        same = conv_same is not None and isinstance(module, conv_same)
        if isinstance(module.padding, str):
            if module.padding == "valid":
                padding, mode = (0, 0), "zeros"
            else:
                padding, mode = (0, 0), "same"
        else:
            padding, mode = _pair(module.padding), module.padding_mode
        layer = WeightedLayer(
            "conv",
            module.weight.detach(),
            None if module.bias is None else module.bias.detach(),
            _pair(module.stride),
            padding,
            _pair(module.dilation),
            module.groups,
            "same" if same else mode,
        )
        return layer, "conv"
    if isinstance(module, nn.Linear):
        bias = None if module.bias is None else module.bias.detach()
        return WeightedLayer("linear", module.weight.detach(), bias), "linear"
    return None


def _batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch norm as y = x * scale + shift."""
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedOperationError(
            f"batch norm {type(bn).__name__} keeps no running statistics; LRP needs eval-mode batch norm"
        )
    scale = torch.rsqrt(bn.running_var.detach() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach()
    shift = -bn.running_mean.detach() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach()
    return scale, shift


def _out_of_place(module: nn.Module) -> Callable[..., Any]:
    """Call a module's forward without hooks, and on a copy with ``inplace`` off where it has that flag."""
    if getattr(module, "inplace", False):
        module = copy.copy(module)
        module.inplace = False
    return module.forward


def _bound(node: fx.Node, fn: Callable[..., Any]) -> Callable[[list[Any]], Callable[..., Any]]:
    """For Route ops: rebuild ``fn(*tensors)`` with the node's non-tensor arguments, at propagation time."""

    def template(inputs: list[Any]) -> Callable[..., Any]:
        def call(*leaves: Any) -> Any:
            it = iter(leaves)
            args = fx.node.map_aggregate(node.args, lambda a: next(it) if isinstance(a, fx.Node) else a)
            return fn(*args, **node.kwargs)

        return call

    return template


class ProgramBuilder:
    """Walks the fx graph once, choosing an op per node, folding batch norms and marking signs."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.steps: dict[fx.Node, Step] = {}

    def build(self) -> Program:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedOperationError(
                f"the model's forward takes {len(placeholders)} inputs; LRP here explains one image tensor"
            )
        output = next(n for n in self.gm.graph.nodes if n.op == "output")
        if not isinstance(output.args[0], fx.Node):
            raise UnsupportedOperationError(
                "the model returns a tuple or dict; LRP needs a single tensor of class scores"
            )
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            self.steps[node] = self._step(node)
        program = Program(list(self.steps.values()), placeholders[0], output, self.gm)
        program.weighted = [s.op for s in program.steps if isinstance(s.op, Weighted)]
        # "first" layers see the image itself, possibly through shape or element-wise ops before them
        raw = {placeholders[0]}
        for step in program.steps:
            if any(source in raw for source in step.node.all_input_nodes):
                if isinstance(step.op, Weighted):
                    step.op.first = True
                else:
                    raw.add(step.node)
        return program

    # sign and gate knowledge flows forward through ops that keep values' signs
    def _inherits(self, node: fx.Node, attr: str) -> bool:
        sources = [n for n in node.all_input_nodes if n in self.steps]
        return bool(sources) and all(getattr(self.steps[n], attr) for n in sources)

    def _step(self, node: fx.Node) -> Step:
        path = _module_path(node)
        if node.op == "get_attr":
            value = self.gm
            for part in str(node.target).split("."):
                value = getattr(value, part)
            return Step(node, Passthrough(lambda v=value: v), path, constant=True)
        if node.op == "call_module":
            return self._module_step(node, self.modules[str(node.target)], path)
        target = node.target
        if node.op == "call_method":
            name = str(target)
            stripped = name[:-1] if name.endswith("_") and not name.endswith("__") else name

            def method(obj: Any, *args: Any, _name: str = stripped, **kwargs: Any) -> Any:
                return getattr(obj, _name)(*args, **kwargs)

            return self._function_step(node, stripped, method, path)
        fn = IN_PLACE_FUNCTIONS.get(target, target)
        if node.kwargs.get("inplace"):
            base_fn = fn

            def fn(*args: Any, _f: Callable[..., Any] = base_fn, **kwargs: Any) -> Any:
                return _f(*args, **{**kwargs, "inplace": False})

        return self._function_step(node, IN_PLACE_FUNCTIONS.get(target, target), fn, path)

    def _function_step(self, node: fx.Node, key: Any, fn: Callable[..., Any], path: str) -> Step:
        description = f"operation {getattr(key, '__name__', key)!r} at {path!r}"
        step: Step
        if key in ARITHMETIC:
            kind = ARITHMETIC[key]
            roles = tuple(self._role(a) for a in node.args)
            step = Step(node, Arithmetic(fn, kind, roles), path)
            if kind in ("add", "mul", "div"):
                step.nonnegative = all(
                    self.steps[a].nonnegative
                    if isinstance(a, fx.Node)
                    else isinstance(a, int | float) and a >= 0
                    for a in node.args
                )
        elif key in ELEMENTWISE_FUNCTIONS:
            step = Step(node, Passthrough(fn), path)
            step.nonnegative = key in NONNEGATIVE_FUNCTIONS or self._inherits(node, "nonnegative")
            step.gate = key in GATE_FUNCTIONS
        elif key in RESHAPE_FUNCTIONS or key in RESHAPE_METHODS:
            step = self._inheriting(Step(node, Reshape(fn), path))
        elif key in CONCAT_FUNCTIONS:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            step = self._inheriting(Step(node, Concat(fn, dim), path))
        elif key is operator.getitem:
            step = self._inheriting(Step(node, GetItem(fn, _bound(node, fn), node.args[1]), path))
        elif key in ROUTE_FUNCTIONS or key in ROUTE_METHODS:
            step = self._inheriting(Step(node, Route(fn, _bound(node, fn)), path))
        elif key in AVERAGING_FUNCTIONS:
            rest = node.args[1:]
            op = Pool(lambda x: fn(x, *rest, **node.kwargs), "proportional")
            step = self._inheriting(Step(node, op, path))
        elif key in MAX_POOL_FUNCTIONS:
            rest = node.args[1:]
            average = None
            if key is F.max_pool2d:
                names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
                average = pool_average_of({**dict(zip(names, rest)), **node.kwargs})
            op = Pool(lambda x: fn(x, *rest, **node.kwargs), "winner", average)
            step = self._inheriting(Step(node, op, path))
        elif key in METADATA_METHODS or key is getattr:
            step = Step(node, Passthrough(fn), path)
        else:
            raise UnsupportedOperationError(
                f"no LRP propagation for {description} (node {node.name!r}); register a rule for it or make "
                "it a leaf module the engine knows"
            )
        step.op.description = description
        return step

    def _role(self, arg: Any) -> str:
        if not isinstance(arg, fx.Node):
            return "constant"
        step = self.steps.get(arg)
        if step is None:
            return "value"
        return "gate" if step.gate else "constant" if step.constant else "value"

    def _inheriting(self, step: Step) -> Step:
        step.nonnegative = self._inherits(step.node, "nonnegative")
        step.gate = self._inherits(step.node, "gate")
        return step

    def _module_step(self, node: fx.Node, module: nn.Module, path: str) -> Step:
        description = f"module {type(module).__name__} at {path!r}"
        weighted = _weighted_from_module(module)
        bn_act = _timm_class("BatchNormAct2d")
        step: Step
        if weighted is not None:
            step = Step(node, Weighted(weighted[0], path, weighted[1]), path)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            step = self._batchnorm_step(node, module, path, bn_act is not None and isinstance(module, bn_act))
        elif isinstance(module, ELEMENTWISE_MODULES):
            step = Step(node, Passthrough(_out_of_place(module)), path)
            step.nonnegative = isinstance(module, NONNEGATIVE_ACTIVATIONS)
            if isinstance(module, nn.Identity | nn.Dropout | nn.Dropout1d | nn.Dropout2d | nn.AlphaDropout):
                step.op = Passthrough(lambda x: x)
                step.nonnegative = self._inherits(node, "nonnegative")
            step.gate = isinstance(module, GATE_ACTIVATIONS)
        elif isinstance(module, nn.Flatten | nn.Unflatten):
            step = self._inheriting(Step(node, Reshape(module.forward), path))
        elif isinstance(module, nn.AvgPool2d | nn.AdaptiveAvgPool2d | nn.AvgPool1d | nn.AdaptiveAvgPool1d):
            step = self._inheriting(Step(node, Pool(module.forward, "proportional"), path))
        elif isinstance(module, nn.MaxPool2d):
            names = ("kernel_size", "stride", "padding", "ceil_mode")
            average = pool_average_of({name: getattr(module, name) for name in names})
            step = self._inheriting(Step(node, Pool(module.forward, "winner", average), path))
        elif isinstance(module, nn.AdaptiveMaxPool2d | nn.MaxPool1d | nn.AdaptiveMaxPool1d):
            step = self._inheriting(Step(node, Pool(module.forward, "winner"), path))
        else:
            raise UnsupportedOperationError(
                f"no LRP propagation for {description} (node {node.name!r}); the engine knows conv, linear, "
                "batch norm, pooling, element-wise activations and shape operations"
            )
        step.op.description = description
        return step

    def _batchnorm_step(self, node: fx.Node, bn: nn.Module, path: str, has_act: bool) -> Step:
        """Fold into the producing conv/linear when it feeds only this batch norm; else a diagonal layer."""
        scale, shift = _batchnorm_affine(bn)
        act = [_out_of_place(bn.act), _out_of_place(bn.drop)] if has_act else []

        def activation(x: torch.Tensor) -> torch.Tensor:
            for fn in act:
                x = fn(x)
            return x

        source = node.args[0]
        producer = self.steps.get(source) if isinstance(source, fx.Node) else None
        if (
            producer is not None
            and isinstance(producer.op, Weighted)
            and producer.op.layer_type in ("conv", "linear")
            and len(source.users) == 1
            and not producer.op.folded
        ):
            layer = producer.op.layer
            shape = (-1,) + (1,) * (layer.weight.dim() - 1)
            layer.weight = layer.weight * scale.reshape(shape)
            bias = layer.bias if layer.bias is not None else torch.zeros_like(shift)
            layer.bias = bias * scale + shift
            producer.op.folded = True
            producer.op.path = f"{producer.op.path}+{path}"
            step = Step(node, Passthrough(activation), path)
        else:
            diag = WeightedLayer("diag", scale, shift)
            op = Weighted(diag, path, "batchnorm")
            if has_act:
                raise UnsupportedOperationError(
                    f"{type(bn).__name__} at {path!r} is not preceded by a conv or linear layer it can be "
                    "folded into; an activation inside the batch norm cannot be explained separately"
                )
            step = Step(node, op, path)
        if has_act:
            step.nonnegative = isinstance(bn.act, NONNEGATIVE_ACTIVATIONS)
        return step


def build_program(model: nn.Module) -> Program:
    """Trace ``model`` and build its LRP program (the model itself stays untouched)."""
    return ProgramBuilder(trace(model)).build()
