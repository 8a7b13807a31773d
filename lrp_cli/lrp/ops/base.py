"""What every op shares: the op protocol, exact vector-Jacobian products and shape-only placeholders.

The engine stores, per node, only what the node's ``propagate`` needs: the input values (``keeps``
``"inputs"``), the output value (``"output"``) or merely the input shapes (``"shapes"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..rules import stabilize

Relevances = list[Any]


class UnsupportedOperationError(NotImplementedError):
    """Raised for a graph node that has no relevance propagation, so no heatmap is silently wrong."""


class ShapeOf:
    """What a routing op keeps of an input: its shape, dtype and device, not its values."""

    __slots__ = ("device", "dtype", "shape")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


def _differentiable(value: Any) -> bool:
    return (isinstance(value, torch.Tensor) and value.is_floating_point()) or (
        isinstance(value, ShapeOf) and value.dtype.is_floating_point
    )


def vjp(fn: Callable[..., Any], inputs: Sequence[Any], cotangent: Any) -> Relevances:
    """Vector-Jacobian product of ``fn`` at ``inputs``, one entry per input (None for non-float inputs).

    Shape-only inputs (:class:`ShapeOf`) stand for tensors whose values do not matter (routing ops);
    integer and boolean tensors (indices, masks) are passed through and get no entry.
    """
    with torch.enable_grad():
        call_args = [
            (v.zeros() if isinstance(v, ShapeOf) else v.detach()).requires_grad_()
            if _differentiable(v)
            else v.zeros()
            if isinstance(v, ShapeOf)
            else v
            for v in inputs
        ]
        leaves = [a for a in call_args if isinstance(a, torch.Tensor) and a.requires_grad]
        outs, cots = _align_outputs(fn(*call_args), cotangent)
        if not outs:
            return [None] * len(call_args)
        grads = iter(torch.autograd.grad(outs, leaves, cots, allow_unused=True))
    return [next(grads) if isinstance(a, torch.Tensor) and a.requires_grad else None for a in call_args]


def _align_outputs(out: Any, cotangent: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return ([out], [cotangent.to(out.dtype)]) if out.requires_grad else ([], [])
    pairs = [(o, c.to(o.dtype)) for o, c in zip(out, cotangent) if c is not None and o.requires_grad]
    return [o for o, _ in pairs], [c for _, c in pairs]


def share_by_contribution(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[Any],
    output: torch.Tensor,
    relevance: torch.Tensor,
    eps: float,
) -> Relevances:
    """The epsilon rule on a map that is linear in each tensor input: input i receives
    ``x_i * d<s, fn(x)>/dx_i`` with ``s = R / stabilise(fn(x))``. For a map linear in all its inputs
    together (a sum, a pool, a normaliser with fixed scale) the shares add up to the relevance, less
    what a constant term absorbs."""
    dtype = relevance.dtype
    s = relevance / stabilize(output.to(dtype), eps)
    grads = vjp(fn, inputs, s)
    return [None if g is None else (x.to(dtype) * g.to(dtype)) for x, g in zip(inputs, grads)]


class Op:
    """A node's behaviour. ``forward`` computes its value; ``propagate`` splits relevance over its inputs."""

    keeps: str = "nothing"  # "nothing" | "inputs" | "output" | "shapes" | "inputs+output"
    filtered: bool = False  # the relevance filter acts on relevance entering this op
    rule_name: str = ""  # how the op hands relevance back, as `doctor` shows it
    description: str = ""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def receives(self, index: int, attention: str) -> bool:
        """Whether input ``index`` can get relevance under the attention mode (``attnlrp`` or ``cp``)."""
        return True

    def propagate(self, relevance: Any, inputs: list[Any], output: Any, ctx: Any) -> Relevances:
        raise NotImplementedError

    def spread(self, ctx: Any, nonnegative: Sequence[bool], inputs: list[Any]) -> int | None:
        """At most how many input entries one output entry's relevance reaches, for an op that hands
        non-negative relevance back non-negative (None: not so, or not known). ``nonnegative`` says
        which inputs are known to be >= 0; ``inputs`` are what the op kept. It lets the engine carry
        the filter's support (see :data:`..filter.Support`) past the op, to skip a filter that would
        change nothing."""
        return None


class Passthrough(Op):
    """Element-wise maps (activations, dropout, scaling by a constant): the identity rule, relevance is
    unchanged."""

    rule_name = "identity"

    def propagate(self, relevance, inputs, output, ctx):
        return [relevance if i == 0 else None for i, _ in enumerate(inputs)]

    def spread(self, ctx, nonnegative, inputs):
        return 1


class Constant(Op):
    """A value that does not depend on the image (parameters and what is computed from them alone),
    evaluated once when the model is traced. Relevance that reaches it is absorbed."""

    rule_name = "constant (absorbs)"

    def __init__(self, value: Any) -> None:
        super().__init__(lambda *_, **__: value)
        self.value = value

    def receives(self, index, attention):
        return False

    def propagate(self, relevance, inputs, output, ctx):
        return [None] * len(inputs)


class NoRelevance(Op):
    """Values that carry no relevance: sizes and shape arithmetic, masks from comparisons, assertions,
    index tensors. They are computed on every forward pass but never explained."""

    rule_name = "none (shape, mask or index)"

    def receives(self, index, attention):
        return False

    def propagate(self, relevance, inputs, output, ctx):
        return [None] * len(inputs)
