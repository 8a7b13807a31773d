"""The LRP engine: model-agnostic Layer-wise Relevance Propagation over a torch.fx graph.

Importable without the command line: ``from lrp_cli.lrp import explain``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .audit import Audit, audit, format_audit, summarize
from .composites import COMPOSITES, Composite, get_composite, register_composite, rule_from_spec
from .engine import Explainer, Explanation, Precision, Target
from .filter import relevance_filter
from .memory import release_freed_memory, retain_freed_memory
from .ops import UnsupportedOperationError
from .patterns import Patterns, fit_patterns, pattern_composite
from .rules import RULES, AlphaBeta, Epsilon, Flat, Gamma, Pass, Rule, WSquare, ZBox, ZPlus, make_rule

__all__ = [
    "COMPOSITES",
    "RULES",
    "AlphaBeta",
    "Audit",
    "Composite",
    "Epsilon",
    "Explainer",
    "Explanation",
    "Flat",
    "Gamma",
    "Pass",
    "Patterns",
    "Precision",
    "Rule",
    "Target",
    "UnsupportedOperationError",
    "WSquare",
    "ZBox",
    "ZPlus",
    "attribute",
    "audit",
    "explain",
    "fit_patterns",
    "format_audit",
    "get_composite",
    "make_rule",
    "pattern_composite",
    "register_composite",
    "release_freed_memory",
    "relevance_filter",
    "retain_freed_memory",
    "rule_from_spec",
    "summarize",
]


def attribute(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    composite: str | Composite = "auto",
    topk: float = 1.0,
    target: Target = None,
    **options: Any,
) -> Explanation:
    """Like :func:`explain`, returning the full :class:`Explanation` (logits, targets, start, trace)."""
    return Explainer(model, composite, topk, **options)(inputs, target)


def explain(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    composite: str | Composite = "auto",
    topk: float = 1.0,
    target: Target = None,
    **options: Any,
) -> torch.Tensor:
    """Input relevance (N, C, H, W) of ``model`` for ``inputs``, on the inputs' device.

    ``composite``: preset name (see ``COMPOSITES``), ``"auto"`` (the default: ``attnlrp`` for models
    with attention, ``epsilon-plus-flat`` otherwise) or a :class:`Composite`. ``topk``: relevance-filter
    fraction, 1.0 = off. ``target``: None (the composite's start: the predicted class, or the softmax
    over all classes for ``seed``), a class index, one index per sample, ``"predicted"``,
    ``"softmax"``, or a float tensor of start relevance shaped like the logits. ``options`` go to
    :class:`Explainer` (``precision``, ``renormalize``, ``trace``, ``mean``/``std``, ``channels_last``,
    ``winograd``).
    """
    return attribute(model, inputs, composite=composite, topk=topk, target=target, **options).relevance
