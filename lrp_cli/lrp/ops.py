"""How each kind of graph node runs forward and hands relevance back to its tensor inputs.

The engine stores, per node, only what the node's ``propagate`` needs: the input values (``keeps``
``"inputs"``), the output value (``"output"``) or merely the input shapes (``"shapes"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .rules import stabilize

Relevances = list[torch.Tensor | None]


class UnsupportedOperationError(NotImplementedError):
    """Raised for a graph node that has no relevance propagation, so no heatmap is silently wrong."""


def vjp(fn: Callable[..., Any], inputs: Sequence[Any], cotangent: Any) -> Relevances:
    """Vector-Jacobian product of ``fn`` at ``inputs``, one entry per input (None for non-tensors).

    Shape-only inputs (:class:`ShapeOf`) stand for tensors whose values do not matter (routing ops).
    """
    with torch.enable_grad():
        call_args = [
            (v.zeros() if isinstance(v, ShapeOf) else v.detach()).requires_grad_()
            if isinstance(v, torch.Tensor | ShapeOf)
            else v
            for v in inputs
        ]
        leaves = [a for a in call_args if isinstance(a, torch.Tensor)]
        outs, cots = _align_outputs(fn(*call_args), cotangent)
        grads = iter(torch.autograd.grad(outs, leaves, cots, allow_unused=True))
    return [next(grads) if isinstance(a, torch.Tensor) else None for a in call_args]


def _align_outputs(out: Any, cotangent: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return [out], [cotangent]
    pairs = [(o, c) for o, c in zip(out, cotangent) if c is not None and o.requires_grad]
    return [o for o, _ in pairs], [c for _, c in pairs]


class ShapeOf:
    """What a routing op keeps of an input: its shape, dtype and device, not its values."""

    __slots__ = ("device", "dtype", "shape")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


class Op:
    """A node's behaviour. ``forward`` computes its value; ``propagate`` splits relevance over its inputs."""

    keeps: str = "nothing"  # "nothing" | "inputs" | "output" | "shapes" | "inputs+output"
    filtered: bool = False  # the relevance filter acts on relevance entering this op
    description: str = ""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def propagate(self, relevance: Any, inputs: list[Any], output: Any, ctx: Any) -> Relevances:
        raise NotImplementedError


class Passthrough(Op):
    """Element-wise maps (activations, dropout, scaling by a constant): relevance is unchanged."""

    def propagate(self, relevance, inputs, output, ctx):
        return [relevance if i == 0 else None for i, _ in enumerate(inputs)]


class Reshape(Op):
    """View-like ops: relevance takes back the input's shape."""

    keeps = "shapes"

    def propagate(self, relevance, inputs, output, ctx):
        return [relevance.reshape(inputs[0].shape)]


class Concat(Op):
    """torch.cat: each input gets back its own slice."""

    keeps = "shapes"

    def __init__(self, fn: Callable[..., Any], dim: int) -> None:
        super().__init__(fn)
        self.dim = dim

    def propagate(self, relevance, inputs, output, ctx):
        sizes = [shape.shape[self.dim] for shape in inputs]
        return list(relevance.split(sizes, dim=self.dim))


class Route(Op):
    """Ops that only move, copy or select values (permute, pad, slicing, split...): their gradient
    routes relevance exactly, so it is computed by a vector-Jacobian product on zero inputs."""

    keeps = "shapes"

    def __init__(self, fn: Callable[..., Any], template: Callable[[list[Any]], Callable[..., Any]]) -> None:
        super().__init__(fn)
        self.template = template  # builds fn(*tensor_inputs) with the node's constant arguments bound

    def propagate(self, relevance, inputs, output, ctx):
        return vjp(self.template(inputs), inputs, relevance)


class Pool(Op):
    """Pooling and means. ``mode``: "proportional" (avg pool, mean: a linear map, shares by
    contribution), "winner" (max pool: all to the arg-max) or "average" (max pool explained as the
    average pool of the same window, like the seed implementation)."""

    filtered = True

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        mode: str,
        average: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(fn)
        self.mode = mode
        self.average = average
        self.keeps = "inputs+output" if mode == "proportional" else "inputs"

    def forward(self, x: torch.Tensor, *constants: Any, **kwargs: Any) -> torch.Tensor:
        """Window sizes and dims are bound into ``fn`` already; only the tensor is passed on."""
        return self.fn(x)

    def propagate(self, relevance, inputs, output, ctx):
        (a,) = inputs
        mode = self.mode
        if mode != "proportional" and ctx.maxpool == "average" and self.average is not None:
            mode = "average"
        if mode == "winner":
            return vjp(self.fn, [a], relevance.to(a.dtype))
        fn = self.fn if mode == "proportional" else self.average
        z = output if mode == "proportional" else fn(a)
        s = relevance / stabilize(z.float(), ctx.stabilizer)
        (c,) = vjp(fn, [a], s.to(a.dtype))
        return [a.float() * c.float()]


class Arithmetic(Op):
    """Binary + - * /. A tensor combined with a constant (a number or a stored tensor) is element-wise, so
    relevance passes; two activations added share relevance by contribution (stabilised); a product of a
    signal and a gate (sigmoid output, as in squeeze-excitation) gives all relevance to the signal."""

    keeps = "inputs"

    def __init__(self, fn: Callable[..., Any], kind: str, roles: tuple[str, ...]) -> None:
        super().__init__(fn)
        self.kind = kind  # "add" | "sub" | "mul" | "div"
        self.roles = roles  # per argument: "value", "gate" or "constant"

    def propagate(self, relevance, inputs, output, ctx):
        values = [
            i
            for i, v in enumerate(inputs)
            if isinstance(v, torch.Tensor) and (i >= len(self.roles) or self.roles[i] != "constant")
        ]
        result: Relevances = [None] * len(inputs)
        if len(values) == 1:
            result[values[0]] = relevance.sum_to_size(inputs[values[0]].shape)
            return result
        if self.kind in ("add", "sub"):
            signs = (1.0, 1.0 if self.kind == "add" else -1.0)
            parts = [sign * inputs[i].to(relevance.dtype) for sign, i in zip(signs, values)]
            s = relevance / stabilize(parts[0] + parts[1], ctx.stabilizer)
            for i, part in zip(values, parts):
                result[i] = (part * s).sum_to_size(inputs[i].shape)
            return result
        if self.kind == "mul":
            signal = [i for i in values if self.roles[i] != "gate"]
            if len(signal) == 1:
                result[signal[0]] = relevance.sum_to_size(inputs[signal[0]].shape)
                return result
        raise UnsupportedOperationError(
            f"{self.description}: a {self.kind} of two activations has no LRP rule"
            + (" unless exactly one operand is a sigmoid-like gate" if self.kind == "mul" else "")
        )


class GetItem(Route):
    """Indexing: into a tensor it routes like slicing; into a tuple (after split/chunk) it hands the
    relevance to that element of the tuple."""

    def __init__(
        self, fn: Callable[..., Any], template: Callable[[list[Any]], Callable[..., Any]], index: Any
    ):
        super().__init__(fn, template)
        self.index = index

    def propagate(self, relevance, inputs, output, ctx):
        source = inputs[0]
        if isinstance(source, tuple):
            routed = tuple(relevance if i == self.index else None for i in range(len(source)))
            return [routed] + [None] * (len(inputs) - 1)
        return super().propagate(relevance, inputs, output, ctx)


class Weighted(Op):
    """Conv, linear or stand-alone batch norm: the composite's rule decides the split."""

    filtered = True

    def __init__(self, layer: Any, path: str, layer_type: str) -> None:
        super().__init__(layer.apply)
        self.layer = layer
        self.path = path
        self.layer_type = layer_type  # "conv" | "linear" | "batchnorm"
        self.keeps = "inputs"
        self.rule: Any = None
        self.first = False  # consumes the model input directly
        self.folded = False  # a batch norm has been folded into its parameters

    def propagate(self, relevance, inputs, output, ctx):
        return [ctx.apply_rule(self, inputs[0], relevance, output)]


def pool_average_of(module_or_kwargs: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Average pooling over the same windows as a max pool, for the seed's 'max as average' option."""
    kwargs = dict(module_or_kwargs)
    return lambda x: F.avg_pool2d(
        x,
        kwargs["kernel_size"],
        kwargs.get("stride") or kwargs["kernel_size"],
        kwargs.get("padding", 0),
        kwargs.get("ceil_mode", False),
        count_include_pad=False,
    )
