"""Binary arithmetic (+ - * /) and products of two activations (matmul, bmm, einsum, element-wise).

Roles per argument: ``"value"`` (an activation), ``"gate"`` (a sigmoid-like gate), ``"attention"`` (a
softmax output), ``"constant"`` (a parameter or a tensor computed from parameters only) or ``"shape"``
(a number, a size, a mask).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

from ..rules import stabilize
from .base import Op, Relevances, UnsupportedOperationError, share_by_contribution

SIGNALS = ("value", "attention")


def _signal_indices(roles: tuple[str, ...], inputs: list[Any], kinds: tuple[str, ...]) -> list[int]:
    return [
        i
        for i, value in enumerate(inputs)
        if isinstance(value, torch.Tensor) and i < len(roles) and roles[i] in kinds
    ]


class Arithmetic(Op):
    """``a + b``, ``a - b``, ``a * b``, ``a / b``.

    - With one activation: a number (``x + 1``, ``2.0 * x``, ``x / 6``) or a per-element constant factor
      (layer scale) is element-wise, relevance passes unchanged; a constant tensor *added* (a positional
      embedding, a bias) takes its share by contribution, like a bias in the epsilon rule, and absorbs it.
    - Two activations added or subtracted share by contribution (stabilised).
    - A product of a signal and a gate (sigmoid output, as in squeeze-excitation) gives all relevance to
      the signal; a product of two other activations splits it in halves (AttnLRP's uniform rule).
    - ``a / b`` of two activations treats the denominator as a constant scale, so the numerator gets
      everything (the identity rule of normalisers).
    """

    keeps = "inputs+output"

    def __init__(
        self, fn: Callable[..., Any], kind: str, roles: tuple[str, ...], bound: Callable[..., Any]
    ) -> None:
        super().__init__(fn)
        self.bound = bound  # fn of the node's tensor inputs alone, for vector-Jacobian products
        self.kind = kind  # "add" | "sub" | "mul" | "div"
        self.roles = roles
        self.rule_name = self._rule_name()

    def _rule_name(self) -> str:
        signals = [r for r in self.roles if r in SIGNALS]
        tensors = [r for r in self.roles if r != "shape"]
        if len(signals) == 2:
            return {"add": "epsilon (by contribution)", "sub": "epsilon (by contribution)"}.get(
                self.kind, "uniform (halves)" if self.kind == "mul" else "numerator (denominator fixed)"
            )
        if "gate" in self.roles and self.kind == "mul":
            return "gate: all to the signal"
        if self.kind in ("add", "sub") and len(tensors) == 2:
            return "epsilon, constant absorbs its share"
        return "identity"

    def receives(self, index, attention):
        role = self.roles[index]
        if role in ("constant", "shape"):
            return False
        if self.kind == "div":
            return index == 0
        if self.kind == "mul" and role == "gate":
            return not any(r in SIGNALS for r in self.roles)
        return True

    def propagate(self, relevance, inputs, output, ctx):
        result: Relevances = [None] * len(inputs)
        signals = _signal_indices(self.roles, inputs, SIGNALS)
        gates = _signal_indices(self.roles, inputs, ("gate",))
        constants = _signal_indices(self.roles, inputs, ("constant",))
        if self.kind in ("add", "sub") and (len(signals) == 2 or (len(signals) == 1 and constants)):
            return self._by_contribution(relevance, inputs, output, ctx, signals + constants)
        if self.kind == "mul" and len(signals) == 2:
            return self._halves(relevance, inputs, output, ctx, signals)
        if self.kind == "mul" and not signals and len(gates) == 2:
            return self._halves(relevance, inputs, output, ctx, gates)
        receivers = signals[:1] if signals else gates[:1]
        if not receivers:
            raise UnsupportedOperationError(f"{self.description}: no activation operand to explain")
        if self.kind == "div" and receivers[0] != 0:
            raise UnsupportedOperationError(f"{self.description}: a number divided by an activation")
        index = receivers[0]
        result[index] = relevance.sum_to_size(inputs[index].shape)
        return result

    def _by_contribution(self, relevance, inputs, output, ctx, indices):
        """The epsilon rule on ``a + b`` (``a - b``): each operand gets ``x * R / stabilise(a +- b)``, its
        own shape restored by summing over what it was broadcast along (written out, no autograd)."""
        s = relevance / stabilize(output.to(relevance.dtype), ctx.stabilizer)
        result: Relevances = [None] * len(inputs)
        for index in sorted(indices):
            x = inputs[index]
            if self.roles[index] == "constant":
                continue
            share = x.to(relevance.dtype) * s.sum_to_size(x.shape)
            result[index] = -share if self.kind == "sub" and index == max(indices) else share
        return result

    def _halves(self, relevance, inputs, output, ctx, indices):
        return halves(self.bound, relevance, inputs, output, ctx.stabilizer, indices)


def halves(
    fn: Callable[..., torch.Tensor],
    relevance: torch.Tensor,
    inputs: list[Any],
    output: torch.Tensor,
    epsilon: float,
    indices: list[int],
) -> Relevances:
    """AttnLRP's rule for a product of two activations: the epsilon rule over the sum that forms each
    output (a matrix product) with each factor of a product term taking half of that term's share."""
    shares = share_by_contribution(fn, inputs, output, relevance, epsilon)
    return [share * 0.5 if i in indices and share is not None else None for i, share in enumerate(shares)]


class Product(Op):
    """Matrix products (``@``, matmul, bmm, einsum): of an activation with a constant, the epsilon rule
    of that linear map; of two activations, AttnLRP's uniform rule (halves); of an activation with
    attention weights under CP-LRP (``ctx.attention == "cp"``), the weights are held constant and the
    other factor takes everything."""

    keeps = "inputs+output"

    def __init__(self, fn: Callable[..., Any], roles: tuple[str, ...], bound: Callable[..., Any]) -> None:
        super().__init__(fn)
        self.bound = bound  # fn of the node's tensor inputs alone, for vector-Jacobian products
        self.roles = roles
        signals = [r for r in roles if r in SIGNALS]
        self.rule_name = "uniform (halves) / CP: attention fixed" if len(signals) == 2 else "epsilon"

    def receives(self, index, attention):
        role = self.roles[index]
        if role in ("constant", "shape"):
            return False
        return not (attention == "cp" and role == "attention" and sum(r in SIGNALS for r in self.roles) == 2)

    def propagate(self, relevance, inputs, output, ctx):
        signals = _signal_indices(self.roles, inputs, (*SIGNALS, "gate"))
        if ctx.attention == "cp" and len(signals) == 2:
            signals = [i for i in signals if self.roles[i] != "attention"] or signals
        shares = matmul_shares(self.fn, inputs, output, relevance, ctx.stabilizer, signals)
        if shares is None:
            shares = share_by_contribution(self.bound, inputs, output, relevance, ctx.stabilizer)
        half = 0.5 if len(signals) == 2 else None
        return [
            None if i not in signals or share is None else share if half is None else share * half
            for i, share in enumerate(shares)
        ]


MATMULS = (operator.matmul, torch.matmul, torch.bmm)


def matmul_shares(
    fn: Callable[..., Any],
    inputs: list[Any],
    output: torch.Tensor,
    relevance: torch.Tensor,
    epsilon: float,
    wanted: list[int],
) -> Relevances | None:
    """The epsilon rule's shares of ``a @ b`` (as :func:`share_by_contribution`) with the adjoints
    written out: ``a * (s @ b^T)`` and ``b * (a^T @ s)``, ``s = R / stabilise(a @ b)``, only for the
    ``wanted`` operands (CP-LRP's attention weights are never asked for). None where the operands
    broadcast (the caller falls back on autograd)."""
    if fn not in MATMULS or len(inputs) != 2:
        return None
    a, b = inputs
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() < 2:
        return None
    if a.dim() != b.dim() or a.shape[:-2] != b.shape[:-2]:
        return None
    dtype = relevance.dtype
    s = relevance / stabilize(output.to(dtype), epsilon)
    a, b = a.to(dtype), b.to(dtype)
    return [
        a * (s @ b.transpose(-2, -1)) if 0 in wanted else None,
        b * (a.transpose(-2, -1) @ s) if 1 in wanted else None,
    ]
