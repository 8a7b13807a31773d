"""Turn a traced model into steps the engine can invert: one op per graph node.

Every node is first classified by what its value depends on:

- ``static``: parameters and what is computed from them alone (a class token, a relative-position
  bias, a standardised weight). Evaluated once here and kept as a constant; relevance reaching it is
  absorbed.
- ``shape``: sizes, shape arithmetic, masks from comparisons, index tensors. Computed on every forward
  pass, never explained.
- ``activation``: depends on the image's values. These need a rule from :mod:`.optable`; a node without
  one becomes :class:`Unsupported`, which the engine reports only if relevance can reach it.

The user's model is never changed: batch norms are folded into copies of the preceding layer's
parameters, and in-place operations are replayed out of place.
"""

from __future__ import annotations

import copy
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from . import optable as table
from .layers import WeightedLayer
from .ops import (
    Arithmetic,
    Concat,
    Constant,
    GetItem,
    NoRelevance,
    Normalization,
    Op,
    Passthrough,
    Pool,
    Product,
    Reshape,
    Route,
    Softmax,
    Subprogram,
    UnsupportedOperationError,
    Weighted,
    average_window,
    pool_average_of,
)
from .tracing import eval_mode, trace

__all__ = ["Program", "Step", "Unsupported", "build_program", "eval_mode", "trace"]


class Unsupported(Op):
    """A node the engine has no rule for. It still computes its value; explaining through it raises."""

    rule_name = "NO RULE"

    def propagate(self, relevance, inputs, output, ctx):
        raise UnsupportedOperationError(f"no LRP propagation for {self.description}")


@dataclass
class Step:
    """One graph node: its op, where it came from and what is known about its value."""

    node: fx.Node
    op: Op
    path: str  # module path, or the enclosing module's path plus the function name
    kind: str = "activation"  # "activation" | "static" | "shape"
    nonnegative: bool = False
    gate: bool = False  # a sigmoid-like gate
    attention: bool = False  # softmax attention weights
    operation: str = ""  # module class or function name, as `doctor` lists it

    @property
    def constant(self) -> bool:
        return self.kind == "static"


@dataclass
class Program:
    """The traced model as steps in execution order, plus what the rules need to know about it."""

    steps: list[Step]
    input_node: fx.Node
    output_node: fx.Node
    graph_module: fx.GraphModule
    weighted: list[Weighted] = field(default_factory=list)

    @property
    def unsupported(self) -> list[Step]:
        return [s for s in self.steps if isinstance(s.op, Unsupported)]


def _module_path(node: fx.Node) -> str:
    if "lrp_path" in node.meta:
        return str(node.meta["lrp_path"])
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    owner = re.sub(r"@\d+$", "", next(reversed(stack))) if stack else ""
    name = getattr(node.target, "__name__", str(node.target))
    return f"{owner}:{name}" if owner else name


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


def _conv_layer(weight, bias, stride, padding, dilation, groups, same: bool, padding_mode="zeros"):
    if isinstance(padding, str):
        pads, mode = (0, 0), ("zeros" if padding == "valid" else "same")
    else:
        pads, mode = _pair(padding), padding_mode
    return WeightedLayer(
        "conv", weight, bias, _pair(stride), pads, _pair(dilation), groups, "same" if same else mode
    )


def _weighted_from_module(module: nn.Module) -> tuple[WeightedLayer, str] | None:
    conv_same = tuple(table._optional("timm.layers", "Conv2dSame"))
    # torch.nn's own subclasses only: another library's subclass may transform its weight in forward
    own = type(module).__module__.startswith("torch.nn") or isinstance(module, conv_same)
    if own and isinstance(module, nn.Conv2d):
        bias = None if module.bias is None else module.bias.detach()
        layer = _conv_layer(
            module.weight.detach(),
            bias,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            isinstance(module, conv_same),
            module.padding_mode,
        )
        return layer, "conv"
    if own and isinstance(module, nn.Linear):
        bias = None if module.bias is None else module.bias.detach()
        return WeightedLayer("linear", module.weight.detach(), bias), "linear"
    return None


def _batchnorm_affine(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    where: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch norm as y = x * scale + shift."""
    if running_mean is None or running_var is None:
        raise UnsupportedOperationError(
            f"batch norm at {where!r} keeps no running statistics; LRP needs eval-mode batch norm"
        )
    scale = torch.rsqrt(running_var.detach() + eps)
    if weight is not None:
        scale = scale * weight.detach()
    shift = -running_mean.detach() * scale
    if bias is not None:
        shift = shift + bias.detach()
    return scale, shift


def _out_of_place(module: nn.Module) -> Callable[..., Any]:
    """Call a module's forward without hooks, and on a copy with ``inplace`` off where it has that flag."""
    if getattr(module, "inplace", False):
        module = copy.copy(module)
        module.inplace = False
    return module.forward


def _flat_nodes(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def _bound(node: fx.Node, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as a function of the node's input nodes only, in order, its other arguments bound."""

    def call(*leaves: Any) -> Any:
        it = iter(leaves)
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda _: next(it))
        return fn(*args, **kwargs)

    return call


def _arguments(node: fx.Node, names: Sequence[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments by parameter name (for builtins whose signature Python cannot inspect)."""
    given = dict(zip(names, node.args))
    given.update(node.kwargs)
    return {**defaults, **given}


FUNCTION_SIGNATURES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "linear": (("input", "weight", "bias"), {"bias": None}),
    "conv2d": (
        ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
        {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
    ),
    "batch_norm": (
        ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
        {"weight": None, "bias": None, "training": False, "eps": 1e-5},
    ),
    "layer_norm": (
        ("input", "normalized_shape", "weight", "bias", "eps"),
        {"weight": None, "bias": None, "eps": 1e-5},
    ),
    "group_norm": (
        ("input", "num_groups", "weight", "bias", "eps"),
        {"weight": None, "bias": None, "eps": 1e-5},
    ),
    "rms_norm": (("input", "normalized_shape", "weight", "eps"), {"weight": None, "eps": None}),
    "softmax": (("input", "dim"), {"dim": None}),
}


class ProgramBuilder:
    """Walks the fx graph once, classifying nodes, choosing an op per node and folding batch norms."""

    def __init__(self, gm: fx.GraphModule, opaque: set[str] | None = None) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.opaque = opaque or set()
        self.steps: dict[fx.Node, Step] = {}
        self.kinds: dict[fx.Node, str] = {}
        self.values: dict[fx.Node, Any] = {}  # static values

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
        self.kinds[placeholders[0]] = "activation"
        with torch.no_grad():
            for node in self.gm.graph.nodes:
                if node.op in ("placeholder", "output"):
                    continue
                self.steps[node] = self._step(node)
        program = Program(list(self.steps.values()), placeholders[0], output, self.gm)
        program.weighted = [s.op for s in program.steps if isinstance(s.op, Weighted)]
        # "first" layers see the image itself, possibly through shape or element-wise ops before them
        raw = {placeholders[0]}
        for step in program.steps:
            if step.kind == "activation" and any(source in raw for source in step.node.all_input_nodes):
                if isinstance(step.op, Weighted):
                    step.op.first = True
                else:
                    raw.add(step.node)
        return program

    # --- classification ---------------------------------------------------------------------------

    @staticmethod
    def _key(node: fx.Node) -> Any:
        if node.op == "call_method":
            name = str(node.target)
            return name[:-1] if name.endswith("_") and not name.endswith("__") else name
        return table.IN_PLACE_FUNCTIONS.get(node.target, node.target)

    def _kind(self, node: fx.Node) -> str:
        if node.op == "get_attr":
            return "static"
        kinds = [self.kinds[n] for n in node.all_input_nodes]
        if all(k == "static" for k in kinds):
            return "static"
        key = self._key(node)
        metadata = (node.op == "call_method" and key in table.METADATA_METHODS) or (
            key is getattr and node.args[1] in table.METADATA_ATTRIBUTES
        )
        if metadata or (node.op != "call_module" and key in table.NO_RELEVANCE):
            return "shape"
        if all(k in ("static", "shape") for k in kinds):
            return "shape"
        return "activation"

    def _callable(self, node: fx.Node) -> Callable[..., Any]:
        """What the node computes, as a plain function of its (evaluated) arguments."""
        if node.op == "call_module":
            return _out_of_place(self.modules[str(node.target)])
        if node.op == "call_method":

            def method(obj: Any, *args: Any, _name: str = self._key(node), **kwargs: Any) -> Any:
                return getattr(obj, _name)(*args, **kwargs)

            return method
        fn = self._key(node)
        if node.kwargs.get("inplace"):
            base = fn

            def fn(*args: Any, _f: Callable[..., Any] = base, **kwargs: Any) -> Any:
                return _f(*args, **{**kwargs, "inplace": False})

        return fn

    def _static_value(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            value: Any = self.gm
            for part in str(node.target).split("."):
                value = getattr(value, part)
            return value.detach() if isinstance(value, torch.Tensor) else value
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.values.__getitem__)
        return self._callable(node)(*args, **kwargs)

    def _static(self, arg: Any, what: str, node: fx.Node) -> Any:
        """The build-time value of an argument that must not depend on the image (e.g. a weight)."""
        if not isinstance(arg, fx.Node):
            return arg
        while self.kinds[arg] == "shape" and self._key(arg) in table.CASTS and arg.args:
            arg = arg.args[0]  # a parameter cast to the input's dtype: the engine casts it itself
        if self.kinds[arg] != "static":
            raise UnsupportedOperationError(
                f"the {what} of {node.name!r} at {_module_path(node)!r} depends on the input; weights "
                "computed from activations (dynamic convolutions) have no LRP rule here"
            )
        return self.values[arg]

    # --- steps -----------------------------------------------------------------------------------

    def _step(self, node: fx.Node) -> Step:
        kind = self._kind(node)
        self.kinds[node] = kind
        path = _module_path(node)
        if kind == "static":
            self.values[node] = self._static_value(node)
            step = Step(node, Constant(self.values[node]), path, kind="static")
        elif kind == "shape":
            step = Step(node, NoRelevance(self._callable(node)), path, kind="shape")
        elif node.op == "call_module":
            step = self._module_step(node, self.modules[str(node.target)], path)
        else:
            step = self._function_step(node, path)
        module = self.modules.get(str(node.target)) if node.op == "call_module" else None
        key = self._key(node)
        step.operation = type(module).__name__ if module is not None else str(getattr(key, "__name__", key))
        if not step.op.description:
            what = f"module {step.operation}" if module is not None else step.operation
            step.op.description = f"operation {what!r} at {path!r} (node {node.name!r})"
        return step

    def _inherits(self, node: fx.Node, attr: str) -> bool:
        sources = [n for n in node.all_input_nodes if self.kinds.get(n) == "activation" and n in self.steps]
        return bool(sources) and all(getattr(self.steps[n], attr) for n in sources)

    def _inheriting(self, step: Step) -> Step:
        for attr in ("nonnegative", "gate", "attention"):
            setattr(step, attr, self._inherits(step.node, attr))
        return step

    def _role(self, node: fx.Node) -> str:
        kind = self.kinds.get(node, "activation")
        if kind == "static":
            return "constant"
        if kind == "shape":
            return "shape"
        step = self.steps.get(node)
        if step is None:
            return "value"
        return "gate" if step.gate else "attention" if step.attention else "value"

    def _function_step(self, node: fx.Node, path: str) -> Step:
        key = self._key(node)
        fn = self._callable(node)
        flat = _flat_nodes(node)
        roles = tuple(self._role(n) for n in flat)
        if key in table.ARITHMETIC:
            kind = table.ARITHMETIC[key]
            step = Step(node, Arithmetic(fn, kind, roles, _bound(node, fn)), path)
            values = [a for a in node.args if not (isinstance(a, fx.Node) and self.kinds[a] == "static")]
            step.nonnegative = kind in ("add", "mul", "div") and all(
                (a in self.steps and self.steps[a].nonnegative)
                if isinstance(a, fx.Node)
                else isinstance(a, int | float) and a >= 0
                for a in values
            )
            if kind in ("mul", "div") and sum(r == "gate" for r in roles) and "value" not in roles:
                step.gate = True
            return step
        if key in table.PRODUCTS:
            return Step(node, Product(fn, roles, _bound(node, fn)), path)
        if key in table.ELEMENTWISE_FUNCTIONS:
            step = Step(node, Passthrough(fn), path)
            step.nonnegative = key in table.NONNEGATIVE_FUNCTIONS or self._inherits(node, "nonnegative")
            step.gate = key in table.GATE_FUNCTIONS or (
                key not in table.NONNEGATIVE_FUNCTIONS and self._inherits(node, "gate")
            )
            step.attention = self._inherits(node, "attention")
            return step
        if key in table.SOFTMAX:
            args = _arguments(node, *FUNCTION_SIGNATURES["softmax"])
            step = Step(node, Softmax(fn, args["dim"]), path, nonnegative=True)
            step.attention = True
            return step
        if key in table.RESHAPE_FUNCTIONS or key in table.RESHAPE_METHODS:
            return self._inheriting(Step(node, Reshape(fn), path))
        if key in table.CONCAT_FUNCTIONS:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            return self._inheriting(Step(node, Concat(fn, dim), path))
        if key is operator.getitem:
            return self._inheriting(Step(node, GetItem(fn, lambda _: _bound(node, fn), node.args[1]), path))
        if (
            key in table.ROUTE_FUNCTIONS
            or key in table.ROUTE_METHODS
            or (key is getattr and node.args[1] in table.TRANSPOSE_ATTRIBUTES)
        ):
            return self._inheriting(Step(node, Route(fn, lambda _: _bound(node, fn)), path))
        if key in table.AVERAGING_FUNCTIONS or key in table.INTERPOLATION_FUNCTIONS:
            rest, kwargs = node.args[1:], node.kwargs
            filtered = key in table.AVERAGING_FUNCTIONS
            op = Pool(lambda x: fn(x, *rest, **kwargs), "proportional", filtered=filtered)
            return self._inheriting(Step(node, op, path))
        if key in table.MAX_POOL_FUNCTIONS:
            rest = node.args[1:]
            average = None
            if key is torch.nn.functional.max_pool2d:
                names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
                average = pool_average_of({**dict(zip(names, rest)), **node.kwargs})
            op = Pool(lambda x: fn(x, *rest, **node.kwargs), "winner", average)
            return self._inheriting(Step(node, op, path))
        if (
            key in table.ADDCMUL
            and len(node.args) >= 3
            and [self.kinds.get(a) for a in node.args[:2]] == ["static", "static"]
        ):
            # bias + weight * x (timm's global response norm): the epsilon rule, the bias absorbs its share
            bias, weight = (self.values[a] for a in node.args[:2])
            value = node.kwargs.get("value", 1)
            op = Pool(
                lambda x: torch.addcmul(bias, weight, x, value=value),
                "proportional",
                filtered=False,
                linear=lambda x: weight * x * value,
                source=2,
            )
            return Step(node, op, path)
        if key in table.LINEAR_FUNCTIONS or key in table.CONV_FUNCTIONS:
            return self._functional_weighted(node, key, path)
        if key in table.BATCH_NORM_FUNCTIONS:
            args = _arguments(node, *FUNCTION_SIGNATURES["batch_norm"])
            value = [
                self._static(args[k], k, node) for k in ("running_mean", "running_var", "weight", "bias")
            ]
            return self._batchnorm(node, path, *value, float(args["eps"]), None)
        normalization = self._functional_normalization(node, key, fn, path)
        if normalization is not None:
            return normalization
        return Step(node, Unsupported(fn), path)

    def _functional_weighted(self, node: fx.Node, key: Any, path: str) -> Step:
        kind = "linear" if key in table.LINEAR_FUNCTIONS else "conv"
        args = _arguments(node, *FUNCTION_SIGNATURES["linear" if kind == "linear" else "conv2d"])
        weight = self._static(args["weight"], "weight", node)
        bias = self._static(args["bias"], "bias", node)
        if "lrp_path" not in node.meta and isinstance(args["weight"], fx.Node):
            path = _parameter_owner(args["weight"]) or path
        if kind == "linear":
            layer = WeightedLayer("linear", weight, bias)
        else:
            layer = _conv_layer(
                weight, bias, args["stride"], args["padding"], args["dilation"], args["groups"], False
            )
        return Step(node, Weighted(layer, path, kind), path)

    def _functional_normalization(
        self, node: fx.Node, key: Any, fn: Callable[..., Any], path: str
    ) -> Step | None:
        if (
            key in table.LAYER_NORM_FUNCTIONS
            or key in table.RMS_NORM_FUNCTIONS
            or key in table.RMS_NORM_2D_FUNCTIONS
        ):
            rms = key not in table.LAYER_NORM_FUNCTIONS
            args = _arguments(node, *FUNCTION_SIGNATURES["rms_norm" if rms else "layer_norm"])
            shape = args["normalized_shape"]
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            weight = self._static(args["weight"], "weight", node)
            eps = args["eps"]
            dims = (1,) if key in table.RMS_NORM_2D_FUNCTIONS else tuple(range(-len(shape), 0))
            if weight is not None and key in table.RMS_NORM_2D_FUNCTIONS:
                weight = weight.reshape(-1, 1, 1)
            op = Normalization(
                _bound_first(node, fn),
                centre=not rms,
                dims=dims,
                weight=weight,
                eps=float(eps) if eps is not None else None,
            )
            return Step(node, op, path)
        if key in table.GROUP_NORM_FUNCTIONS:
            args = _arguments(node, *FUNCTION_SIGNATURES["group_norm"])
            weight = self._static(args["weight"], "weight", node)
            op = Normalization(
                _bound_first(node, fn),
                centre=True,
                groups=int(args["num_groups"]),
                weight=weight,
                eps=float(args["eps"]),
            )
            return Step(node, op, path)
        return None

    def _module_step(self, node: fx.Node, module: nn.Module, path: str) -> Step:
        weighted = _weighted_from_module(module)
        bn_act = tuple(table._optional("timm.layers", "BatchNormAct2d", "FrozenBatchNormAct2d"))
        step: Step
        if weighted is not None:
            return Step(node, Weighted(weighted[0], path, weighted[1]), path)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            act = (
                [_out_of_place(module.act), _out_of_place(module.drop)]
                if isinstance(module, bn_act)
                else None
            )
            step = self._batchnorm(
                node,
                path,
                module.running_mean,
                module.running_var,
                module.weight,
                module.bias,
                module.eps,
                act,
            )
            if act is not None:
                step.nonnegative = isinstance(module.act, table.NONNEGATIVE_ACTIVATIONS)
            return step
        if isinstance(module, table.ELEMENTWISE_MODULES):
            if isinstance(module, table.IDENTITY_MODULES):
                return self._inheriting(Step(node, Passthrough(lambda x, *_, **__: x), path))
            step = Step(node, Passthrough(_out_of_place(module)), path)
            step.nonnegative = isinstance(module, table.NONNEGATIVE_ACTIVATIONS)
            step.gate = isinstance(module, table.GATE_ACTIVATIONS)
            return step
        if isinstance(module, nn.Flatten | nn.Unflatten):
            return self._inheriting(Step(node, Reshape(module.forward), path))
        if isinstance(module, nn.Softmax):
            step = Step(node, Softmax(module.forward, module.dim if module.dim is not None else -1), path)
            step.attention = step.nonnegative = True
            return step
        if isinstance(module, nn.AvgPool1d | nn.AvgPool2d | nn.AdaptiveAvgPool1d | nn.AdaptiveAvgPool2d):
            op = Pool(module.forward, "proportional", window=average_window(module))
            return self._inheriting(Step(node, op, path))
        if isinstance(module, nn.Upsample):
            return self._inheriting(Step(node, Pool(module.forward, "proportional", filtered=False), path))
        if isinstance(module, nn.MaxPool2d):
            names = ("kernel_size", "stride", "padding", "ceil_mode")
            average = pool_average_of({name: getattr(module, name) for name in names})
            return self._inheriting(Step(node, Pool(module.forward, "winner", average), path))
        if isinstance(module, nn.AdaptiveMaxPool2d | nn.MaxPool1d | nn.AdaptiveMaxPool1d):
            return self._inheriting(Step(node, Pool(module.forward, "winner"), path))
        rms = tuple(table._optional("torch.nn", "RMSNorm"))
        if isinstance(module, (nn.LayerNorm, *rms)):
            trailing = tuple(range(-len(tuple(module.normalized_shape)), 0))
            centre = isinstance(module, nn.LayerNorm)
            op = Normalization(
                module.forward, centre=centre, dims=trailing, weight=module.weight, eps=module.eps
            )
            return Step(node, op, path)
        if isinstance(module, nn.GroupNorm):
            op = Normalization(
                module.forward, centre=True, groups=module.num_groups, weight=module.weight, eps=module.eps
            )
            return Step(node, op, path)
        tensor_inputs = [n for n in _flat_nodes(node) if self.kinds.get(n) == "activation"]
        if path in self.opaque and len(tensor_inputs) == 1 and node.args and node.args[0] is tensor_inputs[0]:
            return Step(node, Subprogram(module, _out_of_place(module), path), path)
        unsupported = Step(node, Unsupported(_out_of_place(module)), path)
        reason = " (it could not be traced into)" if path in self.opaque else ""
        unsupported.op.description = (
            f"module {type(module).__name__} at {path!r} (node {node.name!r}){reason}"
        )
        return unsupported

    def _batchnorm(
        self,
        node: fx.Node,
        path: str,
        running_mean: Any,
        running_var: Any,
        weight: Any,
        bias: Any,
        eps: float,
        act: list[Callable[..., Any]] | None,
    ) -> Step:
        """Fold into the producing conv/linear when it feeds only this batch norm; else a diagonal layer."""
        scale, shift = _batchnorm_affine(running_mean, running_var, weight, bias, eps, path)
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
            layer_bias = layer.bias if layer.bias is not None else torch.zeros_like(shift)
            layer.bias = layer_bias * scale + shift
            producer.op.folded = True
            producer.op.path = f"{producer.op.path}+{path}"

            def activation(x: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
                for fn in act or ():
                    x = fn(x)
                return x

            return Step(node, Passthrough(activation), path)

        after = None
        if act is not None:

            def after(x: torch.Tensor) -> torch.Tensor:
                for fn in act:
                    x = fn(x)
                return x

        return Step(node, Weighted(WeightedLayer("diag", scale, shift), path, "batchnorm", after), path)


def _bound_first(node: fx.Node, fn: Callable[..., Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` of the node's first argument, with the rest taken from the node (constants bound later)."""
    return lambda x, *args, **kwargs: fn(x, *args, **kwargs)


def _parameter_owner(node: fx.Node) -> str | None:
    """The module path of the parameter a (possibly transformed) weight comes from."""
    while node.op != "get_attr":
        sources = node.all_input_nodes
        if not sources:
            return None
        node = sources[0]
    target = str(node.target)
    return target.rsplit(".", 1)[0] if "." in target else target


def build_program(model: nn.Module, example: torch.Tensor | None = None) -> Program:
    """Trace ``model`` and build its LRP program (the model itself stays untouched); with ``example``,
    a program for inputs of that shape only (see :func:`.tracing.trace`)."""
    gm = trace(model, example)
    return ProgramBuilder(gm, getattr(gm, "_lrp_opaque", set())).build()
