"""What the engine will do with a model, and where relevance is absorbed or created on a sample input.

``audit(model, x)`` traces the model, lists every kind of operation with the rule it gets, names every
operation it cannot explain (all of them, not just the first), and follows one explanation step by step:
for each step, the relevance that enters and the relevance it hands on. A difference is expected where
a rule absorbs by design (a bias, a parameter added to an activation, a class token's slice, a
non-conservative softmax rule, a z+ rule on inputs of either sign); anywhere else it is reported as
unexplained, so the audit can gate a CI job.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .composites import Composite
from .engine import Explainer, Target
from .graph import Program, Step, Unsupported, build_program
from .ops import (
    Arithmetic,
    Concat,
    Constant,
    NoRelevance,
    Normalization,
    Product,
    Softmax,
    UnsupportedOperationError,
    Weighted,
)
from .rules import AlphaBeta, ZPlus

TOLERANCE = 1e-4
"""A step whose relevance changes by more than this fraction of the explained total is listed."""


@dataclass
class OpSummary:
    """One kind of operation in the model and the rule that explains it."""

    operation: str
    rule: str
    count: int


@dataclass
class LayerAudit:
    """Relevance entering one step and leaving it; ``absorbed`` > 0 is lost, < 0 created."""

    path: str
    operation: str
    rule: str
    relevance_in: float
    relevance_out: float
    absorbed: float
    cause: str  # why the difference is expected, or "unexplained"


@dataclass
class Audit:
    """The result of :func:`audit`; ``ok`` is False when an operation has no rule or a layer loses or
    creates relevance for no known reason."""

    model: str
    composite: str
    operations: list[OpSummary]
    unsupported: list[str]
    layers: list[LayerAudit] = field(default_factory=list)
    relevance_start: float = 0.0
    relevance_input: float = 0.0

    @property
    def unexplained(self) -> list[LayerAudit]:
        return [layer for layer in self.layers if layer.cause == "unexplained"]

    @property
    def ok(self) -> bool:
        return not self.unsupported and not self.unexplained

    def to_json(self) -> str:
        data = asdict(self)
        data["ok"] = self.ok
        return json.dumps(data, indent=2)


def _operation(step: Step) -> str:
    if isinstance(step.op, Weighted):
        return f"{step.operation} ({step.op.layer_type})"
    return step.operation


def _cause(step: Step, explainer: Explainer) -> str:
    """Why relevance may legitimately change at this step."""
    op = step.op
    if isinstance(op, Weighted):
        rule = op.rule
        if isinstance(rule, ZPlus | AlphaBeta) and not explainer.nonnegative_input(op):
            return "z+/alpha-beta on a signed input (cannot conserve)"
        if op.layer.bias is not None and bool(op.layer.bias.any()) and not getattr(rule, "zero_bias", False):
            return "bias"
        return "stabiliser, dead neurons"
    if isinstance(op, Arithmetic) and "constant" in op.roles:
        return "parameter operand"
    if isinstance(op, Concat) and any(
        explainer.program_kind(n) != "activation" for n in step.node.all_input_nodes
    ):
        return "constant slice (e.g. class token)"
    if isinstance(op, Constant | NoRelevance):
        return "constant operand (e.g. class token)"
    if isinstance(op, Normalization):
        return "affine bias, stabiliser"
    if isinstance(op, Softmax):
        return "softmax rule (not conservative)"
    if isinstance(op, Product) and "constant" in op.roles:
        return "constant operand"
    if isinstance(op, Product | Arithmetic):
        return "stabiliser"
    return "unexplained"


def _total(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.double().sum())
    if isinstance(value, tuple | list):
        return sum(_total(v) for v in value if v is not None)
    return 0.0


def summarize(model: nn.Module, composite: str | Composite = "auto", **options: Any) -> Audit:
    """The operation table and the unsupported operations, without running the model."""
    try:
        return _summary(type(model).__name__, Explainer(model, composite, **options), composite)
    except UnsupportedOperationError:
        return _summary(type(model).__name__, build_program(model), composite)


def _summary(model_name: str, source: Explainer | Program, composite: str | Composite) -> Audit:
    """The operation table of an explainer's program, or of a program no explainer could be made for
    (then every operation without a rule counts as reached)."""
    explainer = source if isinstance(source, Explainer) else None
    program = explainer.program if explainer is not None else source
    counts: Counter[tuple[str, str]] = Counter()
    for step in program.steps:
        if step.kind == "activation":
            counts[(_operation(step), step.op.rule_name)] += 1
    reached = explainer.reachable() if explainer is not None else None
    unsupported = [
        s.op.description
        for s in program.steps
        if isinstance(s.op, Unsupported) and (reached is None or s.node in reached)
    ]
    name = explainer.composite.name if explainer is not None else str(composite)
    operations = [OpSummary(op, rule, n) for (op, rule), n in sorted(counts.items())]
    return Audit(model_name, name, operations, unsupported)


def audit(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    composite: str | Composite = "auto",
    target: Target = None,
    **options: Any,
) -> Audit:
    """Trace ``model``, list its operations and rules, and follow one explanation of ``inputs`` layer by
    layer (``options`` go to :class:`Explainer`)."""
    try:
        explainer = Explainer(model, composite, **options)
    except UnsupportedOperationError:
        return _summary(type(model).__name__, build_program(model), composite)
    report = _summary(type(model).__name__, explainer, composite)
    layers: list[LayerAudit] = []

    def observe(step: Step, incoming: Any, outgoing: list[Any]) -> None:
        entered, left = _total(incoming), _total(outgoing)
        layers.append(
            LayerAudit(
                step.path,
                _operation(step),
                step.op.rule_name,
                entered,
                left,
                entered - left,
                _cause(step, explainer),
            )
        )

    explainer.observer = observe
    result = explainer(inputs, target)
    start = float(result.start.double().sum())
    scale = max(abs(start), 1e-12)
    report.layers = [
        layer for layer in layers if abs(layer.absorbed) > TOLERANCE * scale or layer.cause != "unexplained"
    ]
    for layer in report.layers:
        if layer.cause == "unexplained" and abs(layer.absorbed) <= TOLERANCE * scale:
            layer.cause = "none"
    report.relevance_start = start
    report.relevance_input = float(result.relevance.double().sum())
    return report


def format_audit(report: Audit, limit: int = 40) -> str:
    """The audit as plain-text tables for a terminal."""
    lines = [f"model {report.model}, composite {report.composite}", "", "operations:"]
    width = max((len(o.operation) for o in report.operations), default=10)
    for o in report.operations:
        lines.append(f"  {o.operation:<{width}}  x{o.count:<4} {o.rule}")
    if report.unsupported:
        lines += ["", f"no rule for {len(report.unsupported)} operation(s):"]
        lines += [f"  {d}" for d in report.unsupported]
    if report.layers:
        lines += ["", "relevance absorbed (+) or created (-), as a fraction of the start:"]
        scale = max(abs(report.relevance_start), 1e-12)
        ranked = sorted(report.layers, key=lambda layer: -abs(layer.absorbed))
        for layer in ranked[:limit]:
            if abs(layer.absorbed) <= TOLERANCE * scale:
                continue
            lines.append(
                f"  {layer.absorbed / scale:+.2e}  {layer.path}  [{layer.operation}, {layer.rule}]  {layer.cause}"
            )
        lines += [
            "",
            f"start {report.relevance_start:.4g}, input {report.relevance_input:.4g} "
            f"({report.relevance_input / scale:.1%} kept)",
        ]
    lines.append("")
    lines.append(
        "OK"
        if report.ok
        else "NOT OK: "
        + ("unsupported operations" if report.unsupported else "unexplained changes of relevance")
    )
    return "\n".join(lines)
