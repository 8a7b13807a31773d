"""A module that symbolic tracing cannot enter because its Python code branches on shapes."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Op


class Subprogram(Op):
    """Runs the module as it is; to explain it, the engine traces it again with the sizes of the input
    it actually received (:class:`~lrp_cli.lrp.tracing.ShapedTracer`), once per input shape, and
    propagates through that graph with the same composite."""

    keeps = "inputs"
    rule_name = "traced per input shape"

    def __init__(self, module: nn.Module, forward: Any, path: str) -> None:
        super().__init__(forward)
        self.module = module
        self.path = path
        self.programs: dict[tuple, Any] = {}  # (shape, dtype) -> the engine's explainer for that shape

    def propagate(self, relevance, inputs, output, ctx):
        return [ctx.explain_block(self, inputs[0], relevance)] + [None] * (len(inputs) - 1)
