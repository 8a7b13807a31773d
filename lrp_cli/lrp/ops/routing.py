"""Ops that only move, copy or select values: relevance follows the values back exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import Op, vjp


class Reshape(Op):
    """View-like ops: relevance takes back the input's shape."""

    keeps = "shapes"
    rule_name = "reshape"

    def propagate(self, relevance, inputs, output, ctx):
        return [relevance.reshape(inputs[0].shape)] + [None] * (len(inputs) - 1)


class Concat(Op):
    """torch.cat: each input gets back its own slice (a constant's slice, e.g. a class token, is absorbed)."""

    keeps = "shapes"
    rule_name = "split back"

    def __init__(self, fn: Callable[..., Any], dim: int) -> None:
        super().__init__(fn)
        self.dim = dim

    def propagate(self, relevance, inputs, output, ctx):
        sizes = [shape.shape[self.dim] for shape in inputs]
        return list(relevance.split(sizes, dim=self.dim))


class Route(Op):
    """Ops that only move, copy or select values (permute, pad, roll, slicing, split, masked fill...):
    their gradient routes relevance exactly, so it is computed by a vector-Jacobian product on zeros."""

    keeps = "shapes"
    rule_name = "route"

    def __init__(self, fn: Callable[..., Any], template: Callable[[list[Any]], Callable[..., Any]]) -> None:
        super().__init__(fn)
        self.template = template  # builds fn(*node_inputs) with the node's constant arguments bound

    def propagate(self, relevance, inputs, output, ctx):
        return vjp(self.template(inputs), inputs, relevance)


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
        if isinstance(source, tuple | list):
            routed = tuple(relevance if i == self.index else None for i in range(len(source)))
            return [routed] + [None] * (len(inputs) - 1)
        return super().propagate(relevance, inputs, output, ctx)
