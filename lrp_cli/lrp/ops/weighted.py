"""Conv, linear and stand-alone batch norm: the composite's rule decides the split."""

from __future__ import annotations

from typing import Any

from .base import Op


class Weighted(Op):
    """A layer with weights (a module, or a functional conv/linear whose weight is a parameter or is
    computed from parameters alone, e.g. weight-standardised convolutions)."""

    filtered = True

    def __init__(self, layer: Any, path: str, layer_type: str, after: Any = None) -> None:
        super().__init__(layer.apply)
        self.after = after  # an element-wise activation fused into the layer (timm's BatchNormAct2d)
        self.layer = layer
        self.path = path
        self.layer_type = layer_type  # "conv" | "linear" | "batchnorm"
        self.keeps = "inputs"
        self.rule: Any = None
        self.first = False  # consumes the model input directly
        self.folded = False  # a batch norm has been folded into its parameters
        self.reuses_output = False  # the rule's denominator is the forward output, kept (engine)
        self.joint_term: Any = None  # the rule's one term the forward computes alongside (engine)
        self.fused_relu = False  # the layer applies the ReLU that consumes its output (engine)

    @property
    def rule_name(self) -> str:  # type: ignore[override]
        return "unassigned" if self.rule is None else self.rule.name

    def propagate(self, relevance, inputs, output, ctx):
        return [ctx.apply_rule(self, inputs[0], relevance, output)] + [None] * (len(inputs) - 1)
