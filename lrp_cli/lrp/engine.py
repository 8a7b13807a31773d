"""Run a traced model forward, then hand relevance back node by node from the output to the input."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn

from .composites import Composite, get_composite, resolve_composite
from .filter import Support, filter_with_support, measured_support
from .graph import Program, Step, build_program
from .ops import Constant, Passthrough, ShapeOf, Subprogram, UnsupportedOperationError, Weighted
from .patterns import Patterns, bind_patterns
from .rules import KEEP, AlphaBeta, Rule, Term, ZBox, stabilize

Precision = Literal["fp32", "bf16", "fp16"]
Target = int | Sequence[int] | torch.Tensor | str | None
LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Explanation:
    """Everything one batch produced.

    ``relevance``: input relevance (N, C, H, W) on the inputs' device; ``logits``: the model's output;
    ``targets``: the explained class per sample (-1 where the start spans all classes, e.g. softmax);
    ``start``: the relevance put on the output; ``trace``: per-layer input relevance by module path
    (only when tracing was asked for).
    """

    relevance: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    start: torch.Tensor
    trace: dict[str, torch.Tensor] = field(default_factory=dict)


def _flat_nodes(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def _trace_keys(steps: Sequence[Step]) -> dict[fx.Node, str]:
    """Trace keys in call order: the module path (or path plus function name), and ``#2``, ``#3``...
    for the later calls of a module or function that runs more than once (a shared ReLU, torch.relu
    twice), so no two layers' relevance is ever summed under one key."""
    calls: dict[str, int] = {}
    keys: dict[fx.Node, str] = {}
    for step in steps:
        calls[step.path] = calls.get(step.path, 0) + 1
        keys[step.node] = step.path if calls[step.path] == 1 else f"{step.path}#{calls[step.path]}"
    return keys


def _add(a: Any, b: Any) -> Any:
    """Sum relevance arriving at one node from several users (tuples for tuple-valued nodes)."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, tuple):
        return tuple(_add(x, y) for x, y in zip(a, b))
    return a + b


def _per_sample(part: Any, support: Support) -> bool:
    """Whether a support can describe ``part``: a tensor with one sample per known support."""
    return isinstance(part, torch.Tensor) and part.dim() > 0 and len(part) == len(support)


def _add_supports(a: Support, b: Support) -> Support:
    """Relevance arriving from several users adds up; non-negative maps' nonzero counts at most do."""
    return tuple(None if x is None or y is None else x + y for x, y in zip(a, b))


def _is_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, tuple | list) and bool(value) and all(isinstance(v, torch.Tensor) for v in value)


class Explainer:
    """A model traced once and explained batch after batch.

    Parameters are read from the model when the explainer is made (batch norms folded, rule weights
    cached); make a new one after changing the weights. The model itself is never modified.

    ``topk``: relevance-filter fraction at every conv/linear/pool layer (1.0 = off); ``renormalize``:
    rescale the kept relevance to the layer's total. ``precision``: ``fp32`` keeps the model's dtype,
    ``bf16``/``fp16`` run the convolutions in that dtype with the divisions in float32.
    ``winograd``: run wide 3x3 convolutions on the CPU in float32/float64 by Winograd's F(4x4, 3x3)
    (about twice as fast; float32 rounding ~1e-5 of a layer's range instead of ~2e-6, so logits match the
    model's to about 1e-5 relative). ``False`` keeps every convolution direct.
    ``mean``/``std``: the model's input normalisation, from which the z^B rule's box is derived.
    ``composite``: a preset name, a :class:`Composite`, or ``"auto"`` (``attnlrp`` for models with
    attention, ``epsilon-plus-flat`` otherwise); ``rules``: overrides on top of it, as in the config.
    ``patterns``: the :class:`~.patterns.Patterns` fitted on this model's weights, for ``patternnet``
    and ``patternattribution``.
    """

    def __init__(
        self,
        model: nn.Module,
        composite: str | Composite = "auto",
        topk: float = 1.0,
        *,
        renormalize: bool = False,
        precision: Precision = "fp32",
        channels_last: bool | None = None,
        winograd: bool = True,
        trace: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        rules: Mapping[str, Any] | None = None,
        patterns: Patterns | None = None,
    ) -> None:
        if not 0.0 < topk <= 1.0:
            raise ValueError(f"topk must be in (0, 1], got {topk}")
        if precision not in ("fp32", *LOW_PRECISION):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.program: Program = build_program(model)
        self._steps_by_node = {step.node: step for step in self.program.steps}
        self.composite = get_composite(resolve_composite(composite, self.program))
        if rules:
            self.composite = self.composite.with_overrides(rules)
        self.composite = bind_patterns(self.composite, patterns, model)
        self.attention = self.composite.attention
        self._check_supported()
        self.topk = topk
        self.renormalize = renormalize
        self.precision = precision
        self.channels_last = channels_last
        self.winograd = winograd
        self.trace_enabled = trace
        self.maxpool = self.composite.maxpool
        self.stabilizer = self.composite.stabilizer
        parameter = next(model.parameters(), None)
        # a model without parameters computes in its input's dtype
        self.model_dtype: torch.dtype | None = parameter.dtype if parameter is not None else None
        self.bounds = self._bounds(mean, std)
        self._arg_nodes = {step.node: _flat_nodes(step.node) for step in self.program.steps}
        self._trace_keys = _trace_keys(self.program.steps)
        self._assign_rules()
        self._fused_relus = self._fuse_relus()
        self._last_use = self._last_forward_use()
        self._constant_terms: dict[tuple, torch.Tensor] = {}
        self._constant_inputs: dict[tuple, torch.Tensor] = {}
        self._derived_biases: dict[tuple, torch.Tensor] = {}  # joint and stabilised
        self.observer: Callable[[Step, Any, list[Any]], None] | None = None  # sees every step's split
        self._block = False  # a module traced per input shape, inside another program

    # --- set-up ---------------------------------------------------------------------------------

    def reachable(self) -> set[fx.Node]:
        """Nodes that relevance can reach from the output under this composite's attention mode."""
        reached = {self.program.output_node.args[0]}
        for step in reversed(self.program.steps):
            if step.node in reached:
                for index, source in enumerate(_flat_nodes(step.node)):
                    if step.op.receives(index, self.attention):
                        reached.add(source)
        return reached

    def nonnegative_input(self, op: Weighted) -> bool:
        """Whether a weighted layer's input is known to be >= 0 (e.g. after a ReLU)."""
        return self._nonnegative_input[id(op)]

    def program_kind(self, node: fx.Node) -> str:
        """``activation``, ``static`` or ``shape`` (see :mod:`.graph`) for a node of the program."""
        step = self._steps_by_node.get(node)
        return "activation" if step is None else step.kind

    def _check_supported(self) -> None:
        """Name every operation relevance would pass through without a rule, all at once."""
        reached = self.reachable()
        missing = [s for s in self.program.unsupported if s.node in reached]
        if missing:
            listed = "; ".join(s.op.description for s in missing)
            raise UnsupportedOperationError(
                f"no LRP propagation for {len(missing)} operation(s): {listed}. Run `lrp-heatmap doctor` "
                "for the full table; register a rule or make the module a leaf the engine knows"
            )

    @staticmethod
    def _bounds(mean: Sequence[float] | None, std: Sequence[float] | None) -> tuple[torch.Tensor, ...] | None:
        if mean is None or std is None:
            return None
        m = torch.tensor(mean, dtype=torch.float64).reshape(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float64).reshape(1, -1, 1, 1)
        return (0.0 - m) / s, (1.0 - m) / s

    def _assign_rules(self) -> None:
        steps = self._steps_by_node
        # per node, which of its inputs are known to be >= 0 (a weighted layer's is its first)
        self._nonnegative_args = {
            node: [src in steps and steps[src].nonnegative for src in sources]
            for node, sources in self._arg_nodes.items()
        }
        self._nonnegative_input = {
            id(step.op): all(self._nonnegative_args[step.node][:1])
            for step in self.program.steps
            if isinstance(step.op, Weighted)
        }
        for op in self.program.weighted:
            layer_type = op.layer_type
            if layer_type == "conv" and op.layer.groups > 1 and op.layer.groups == op.layer.weight.shape[0]:
                layer_type = "depthwise"
            rule = self.composite.rule_for(op.path, layer_type, op.first)
            if isinstance(rule, ZBox) and rule.low is None and self.bounds is None:
                raise ValueError(
                    f"the z^B (zbox) rule at {op.path!r} needs the input box: pass mean= and std= (the "
                    "model's input normalisation) or give the rule low/high values"
                )
            op.rule = rule
            op.reuses_output = op.after is None and _forward_is_denominator(rule)
            op.joint_term = None if op.reuses_output else _joint_term(rule, self._nonnegative_input[id(op)])
            keeps_output = rule.needs_output or op.reuses_output
            op.keeps = ("inputs" if rule.needs_input else "shapes") + ("+output" if keeps_output else "")

    def _fuse_relus(self) -> set[fx.Node]:
        """ReLUs whose input is a weighted layer's output used nowhere else: the layer rectifies its
        output itself (inside the convolution, or while Winograd's output is copied into place), so the
        map is not read and written once more. The ReLU's own relevance rule (identity) is unchanged."""
        fused: set[fx.Node] = set()
        for step in self.program.steps:
            op = step.op
            if not isinstance(op, Weighted):
                continue
            users = [self._steps_by_node.get(user) for user in step.node.users]
            op.fused_relu = (
                op.after is None
                and "output" not in op.keeps
                and len(users) == 1
                and users[0] is not None
                and isinstance(users[0].op, Passthrough)
                and users[0].operation in ("ReLU", "relu")
                and self._arg_nodes[users[0].node] == [step.node]
            )
            if op.fused_relu:
                fused.add(users[0].node)
        return fused

    def _last_forward_use(self) -> dict[fx.Node, int]:
        last: dict[fx.Node, int] = {}
        for index, step in enumerate(self.program.steps):
            for node in self._arg_nodes[step.node]:
                last[node] = index
        return last

    # --- running --------------------------------------------------------------------------------

    def __call__(self, inputs: torch.Tensor, target: Target = None) -> Explanation:
        """Explain one batch; ``target`` as in :func:`lrp_cli.lrp.explain`."""
        model_dtype = self.model_dtype or (inputs.dtype if inputs.is_floating_point() else torch.float32)
        dtype = LOW_PRECISION.get(self.precision, model_dtype)
        self._dtype = dtype
        self._relevance_dtype = torch.float32 if self.precision != "fp32" else model_dtype
        channels_last = inputs.dim() == 4 if self.channels_last is None else self.channels_last
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format
        x = inputs.to(dtype)
        if inputs.dim() == 4:
            x = x.contiguous(memory_format=self._memory_format)
        with torch.no_grad():
            logits, kept = self._forward(x)
            start, targets = self._start(logits.to(self._relevance_dtype), target)
            relevance, trace = self._backward(start, kept)
        if relevance is None:
            relevance = torch.zeros_like(inputs, dtype=self._relevance_dtype)
        return Explanation(
            relevance=relevance.to(self._relevance_dtype).reshape(inputs.shape).contiguous(),
            logits=logits.float() if self.precision != "fp32" else logits,
            targets=targets,
            start=start,
            trace=trace,
        )

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[fx.Node, tuple[list[Any], Any]]]:
        program = self.program
        env: dict[fx.Node, Any] = {program.input_node: x}
        kept: dict[fx.Node, tuple[list[Any], Any]] = {}
        logits_node = program.output_node.args[0]
        for index, step in enumerate(program.steps):
            node, op = step.node, step.op
            if isinstance(op, Constant):
                env[node] = op.value
                continue
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            denominator = None
            if isinstance(op, Weighted):
                value, denominator = self._weighted_forward(op, args[0])
            elif node in self._fused_relus:  # the layer before it has rectified its output already
                value = args[0]
            else:
                value = op.forward(*args, **kwargs)
            env[node] = value
            if _is_tensors(value) and op.keeps != "nothing":
                kept[node] = self._keep(step, env, value)
                if denominator is not None:  # kept in the output's place, which the rule does not need
                    kept[node] = (kept[node][0], denominator)
            for source in self._arg_nodes[node]:
                if self._last_use.get(source) == index and source is not logits_node:
                    env.pop(source, None)
        logits = env[logits_node]
        if self._block:
            return logits, kept
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise UnsupportedOperationError(
                f"the model's output must be class scores of shape (N, classes), got "
                f"{getattr(logits, 'shape', type(logits).__name__)}"
            )
        return logits, kept

    def _weighted_forward(self, op: Weighted, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's output and, where the rule's denominator is a modified copy of the layer on the
        same input and Winograd applies, that denominator too (stabiliser included when it is a plain
        ``+ epsilon``), from one shared input transform; None when the backward pass computes it."""
        layer, size = op.layer, tuple(x.shape[-2:])
        weight, bias = layer.params(KEEP, KEEP, self._dtype, self._memory_format)
        term = op.joint_term
        filters = None
        if self.winograd and term is not None:
            filters = layer.joint_winograd_filters((KEEP, term.weight), self._dtype, size)
        if filters is not None:
            value, denominator = layer.apply_joint(x, filters, self._joint_bias(op), relu=op.fused_relu)
        else:
            filters = layer.winograd_filters(KEEP, self._dtype, size) if self.winograd else None
            value, denominator = layer.apply(x, weight, bias, filters, relu=op.fused_relu), None
        if op.after is not None:
            value = op.after(value)
        return value, denominator

    def _joint_bias(self, op: Weighted) -> torch.Tensor:
        """The layer's bias next to the rule term's (plus the stabiliser where it is a plain ``+ eps``)."""
        key = (id(op), self._dtype, "joint")
        if key not in self._derived_biases:
            term, rule = op.joint_term, op.rule
            _, bias = op.layer.params(KEEP, KEEP, self._dtype, self._memory_format)
            _, term_bias = op.layer.params(term.weight, term.bias, self._dtype, self._memory_format)
            positive = _positive_denominator(rule.groups()[0], self._nonnegative_input[id(op)])
            self._derived_biases[key] = torch.cat(
                [
                    self._bias_plus(op, bias, 0.0),
                    self._bias_plus(op, term_bias, rule.stabilizer if positive else 0.0),
                ]
            )
        return self._derived_biases[key]

    def _stabilized_bias(
        self, op: Weighted, term: Term, bias: torch.Tensor | None, epsilon: float
    ) -> torch.Tensor:
        """A term's bias plus the stabiliser, cached: the denominator comes out of the layer stabilised."""
        key = (id(op), term, self._dtype, "stabilized")
        if key not in self._derived_biases:
            self._derived_biases[key] = self._bias_plus(op, bias, epsilon)
        return self._derived_biases[key]

    def _bias_plus(self, op: Weighted, bias: torch.Tensor | None, epsilon: float) -> torch.Tensor:
        """``bias + epsilon`` per output channel, zeros standing in for a layer without bias."""
        if bias is None:
            return torch.full(
                (op.layer.weight.shape[0],), epsilon, dtype=self._dtype, device=op.layer.weight.device
            )
        return bias + epsilon if epsilon else bias

    def _keep(self, step: Step, env: dict[fx.Node, Any], value: Any) -> tuple[list[Any], Any]:
        """What ``propagate`` will need of this step: input values, input shapes and/or the output."""
        keeps = step.op.keeps
        values = []
        for node in self._arg_nodes[step.node]:
            value_in = env[node]
            if "inputs" not in keeps:
                if isinstance(value_in, torch.Tensor):
                    value_in = ShapeOf(value_in)
                elif _is_tensors(value_in):
                    value_in = tuple(ShapeOf(v) for v in value_in)
            values.append(value_in)
        return values, value if "output" in keeps else None

    def _start(self, logits: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
        """The output relevance and the explained class per sample (-1 for a start over all classes)."""
        n, classes = logits.shape
        if target is None:
            target = self.composite.start
        if isinstance(target, str):
            if target == "softmax":
                return logits.softmax(dim=1), torch.full((n,), -1, dtype=torch.long, device=logits.device)
            if target != "predicted":
                raise ValueError(
                    f"unknown target start {target!r}; use 'predicted', 'softmax' or a class index"
                )
            indices = logits.argmax(dim=1)
        elif isinstance(target, torch.Tensor) and target.is_floating_point():
            if target.shape != logits.shape:
                raise ValueError(f"a start relevance must have the logits' shape {tuple(logits.shape)}")
            return target.to(logits), torch.full((n,), -1, dtype=torch.long, device=logits.device)
        else:
            indices = torch.as_tensor(target, dtype=torch.long, device=logits.device).reshape(-1)
            if indices.numel() == 1:
                indices = indices.expand(n)
            if indices.numel() != n:
                raise ValueError(f"got {indices.numel()} targets for a batch of {n}")
            if (indices < 0).any() or (indices >= classes).any():
                raise ValueError(f"target class out of range 0..{classes - 1}: {indices.tolist()}")
        start = torch.zeros_like(logits)
        start.scatter_(1, indices[:, None], 1.0)
        return start, indices

    def _backward(
        self, start: torch.Tensor, kept: dict[fx.Node, tuple[list[Any], Any]]
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        program = self.program
        # the filter works in place: the start stays as it was for the caller's Explanation
        relevance: dict[fx.Node, Any] = {
            program.output_node.args[0]: start.clone() if self.topk < 1.0 else start
        }
        trace: dict[str, torch.Tensor] = {"output": start} if self.trace_enabled else {}
        support: dict[fx.Node, Support] = {}  # what the filter knows of a node's relevance, where known
        if self.topk < 1.0 and start.device.type == "cpu":  # a one-hot start: one nonzero per sample
            support[program.output_node.args[0]] = measured_support(start)
        for step in reversed(program.steps):
            node = step.node
            incoming = relevance.pop(node, None)
            known = support.pop(node, None)
            inputs, output = kept.pop(node, ([], None))
            if incoming is None:
                continue
            if step.op.filtered and self.topk < 1.0:
                incoming, known = filter_with_support(
                    incoming, self.topk, self.renormalize, in_place=not self.trace_enabled, support=known
                )
            if step.op.keeps == "nothing":
                inputs = [None] * len(self._arg_nodes[node])
            outgoing = step.op.propagate(incoming, inputs, output, self)
            if self.observer is not None:
                self.observer(step, incoming, outgoing)
            passed = self._passed_support(step, known, inputs)
            for index, (source, part) in enumerate(zip(self._arg_nodes[node], outgoing)):
                if part is None:
                    continue
                if self.trace_enabled and isinstance(part, torch.Tensor):
                    key = self._trace_keys[node]
                    trace[key if len(outgoing) == 1 else f"{key}[{index}]"] = part
                first = source not in relevance
                relevance[source] = _add(relevance.get(source), part)
                theirs = None if first else support.pop(source, None)
                if passed is not None and _per_sample(part, passed) and (first or theirs is not None):
                    support[source] = passed if first else _add_supports(passed, theirs)
        return relevance.pop(program.input_node, None), trace

    def _passed_support(self, step: Step, known: Support | None, inputs: list[Any]) -> Support | None:
        """The support of the relevance ``step`` hands back, from its incoming relevance's support."""
        if known is None:
            return None
        spread = step.op.spread(self, self._nonnegative_args[step.node], inputs)
        if spread is None:
            return None
        return tuple(None if s is None else s * spread for s in known)

    def explain_block(self, op: Subprogram, x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        """Input relevance of a module that could only be traced for a given input shape."""
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in op.programs:
            op.programs[key] = self._child(build_program(op.module, x), op.path)
        child = op.programs[key]
        child._dtype, child._relevance_dtype, child._memory_format = (
            self._dtype,
            self._relevance_dtype,
            self._memory_format,
        )
        _, kept = child._forward(x)
        result, _ = child._backward(relevance, kept)
        return torch.zeros_like(relevance.new_empty(x.shape)) if result is None else result

    def _child(self, program: Program, prefix: str) -> Explainer:
        """An explainer for a block's own program, with this one's composite and settings."""
        child = copy.copy(self)
        child.program = program
        child._block = True
        for op in program.weighted:
            op.path, op.first = f"{prefix}.{op.path}", False  # a block never sees the image itself
        for step in program.steps:
            step.path = f"{prefix}.{step.path}"
        child._steps_by_node = {step.node: step for step in program.steps}
        child._arg_nodes = {step.node: _flat_nodes(step.node) for step in program.steps}
        child._assign_rules()
        child._fused_relus = child._fuse_relus()
        child._last_use = child._last_forward_use()
        child._constant_terms, child._constant_inputs, child._derived_biases = {}, {}, {}
        child._check_supported()
        return child

    # --- rules on weighted layers ---------------------------------------------------------------

    def apply_rule(self, op: Weighted, a: Any, relevance: torch.Tensor, output: Any) -> torch.Tensor:
        """Split ``relevance`` over the layer input ``a`` (a tensor, or its shape) with the layer's rule."""
        rule: Rule = op.rule
        layer = op.layer
        groups = rule.groups()
        if not groups:  # Pass
            return relevance
        shape = a.shape
        size = tuple(shape[-2:])
        nonnegative = self._nonnegative_input[id(op)]
        compute = self._dtype
        plans = []
        for group in groups:
            terms = [t for t in group.terms if not (nonnegative and t.input == "negative")]
            modified = [self._modified_input(t.input, a, nonnegative, rule) for t in terms]
            params = [layer.params(t.weight, t.bias, compute, self._memory_format) for t in terms]
            # z's state: "stabilized" (computed with the forward, + epsilon included), "owned" (a fresh
            # tensor, changed in place) or "shared" (a cached constant of one sample, broadcast)
            z, state = None, "owned"
            if op.reuses_output and group.normalized:  # the forward already computed z (epsilon rule)
                z = output.to(relevance.dtype)
                z = z.clone() if z is output and _positive_denominator(group, nonnegative) else z
            elif op.joint_term is not None and output is not None:  # computed with the forward
                z = output.to(relevance.dtype)
                state = "stabilized" if _positive_denominator(group, nonnegative) else "owned"
            # a plain "+ epsilon" goes into the bias of the first term computed here (free in the kernel);
            # not with several groups, whose unstabilised denominators decide the scales (alpha-beta)
            fold, folded = len(groups) == 1 and _positive_denominator(group, nonnegative), False
            for term, inp, (weight, bias) in (
                zip(terms, modified, params) if z is None and group.normalized else ()
            ):
                if fold and not folded and term.sign == 1.0 and term.input not in CONSTANT_INPUTS:
                    bias, folded = self._stabilized_bias(op, term, bias, rule.stabilizer), True
                filters = layer.winograd_filters(term.weight, compute, size) if self.winograd else None
                part, shared = self._term_output(op, term, inp, weight, bias, filters, relevance.dtype)
                if z is None:
                    z, state = part, ("shared" if shared else "owned")
                elif not shared:
                    z, state = part.add_(z), "owned"
                elif state == "owned":
                    z = z.add_(part)
                else:
                    z = z + part  # two one-sample constants: still one sample, kept out of place
            if folded and state == "owned":
                state = "stabilized"
            plans.append((group, terms, modified, params, z, state))
        scales = self._group_scales(rule, [plan[0] for plan in plans], [plan[4] for plan in plans])
        result: torch.Tensor | None = None
        for (group, terms, modified, params, z, state), scale in zip(plans, scales):
            if not group.normalized:  # a signal projected back as it is (PatternNet, PatternAttribution)
                s = relevance
            elif state == "stabilized":
                s = torch.div(relevance, z, out=z)
            elif _positive_denominator(group, nonnegative) and state == "owned":
                s = torch.div(relevance, z.add_(rule.stabilizer), out=z)
            elif _positive_denominator(group, nonnegative):  # a shared one-sample constant: out of place
                s = relevance / (z + rule.stabilizer)
            else:
                s = relevance / stabilize(z, rule.stabilizer)
            if not isinstance(scale, float) or scale != 1.0:
                s = s * scale
            if group.output_sign:
                reference = output.to(relevance.dtype)
                s = s * ((reference > 0) if group.output_sign > 0 else (reference < 0))
            s = s.to(compute)
            if self._memory_format is torch.channels_last and s.dim() == 4:
                s = s.contiguous(memory_format=torch.channels_last)
            for term, inp, (weight, _) in zip(terms, modified, params):
                filters = (
                    layer.winograd_filters(term.weight, compute, size, transposed=True)
                    if self.winograd
                    else None
                )
                contribution = layer.transpose(s, weight, shape, filters).to(relevance.dtype)
                if term.input != "ones":  # the transposed map's output is a fresh tensor
                    contribution = contribution.mul_(inp)
                if term.sign != 1.0:
                    contribution = contribution.mul_(term.sign)
                result = contribution if result is None else result.add_(contribution)
        return result

    def _term_output(
        self,
        op: Weighted,
        term: Any,
        inp: Any,
        weight: torch.Tensor,
        bias: Any,
        filters: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, bool]:
        """One term's modified forward, signed, in the relevance dtype, and whether it is shared. Terms
        whose input does not depend on the image (ones, box bounds) are the same for every sample: they
        are computed for one sample once per input shape and returned as that cached tensor, to be
        broadcast and never changed in place."""
        constant = term.input in CONSTANT_INPUTS
        if not constant:
            part = op.layer.apply(inp, weight, bias, filters).to(dtype)
            return (part if term.sign == 1.0 else part.mul_(term.sign)), False
        key = (id(op), term, tuple(inp.shape[1:]), inp.dtype, inp.device, dtype)
        if key not in self._constant_terms:
            part = op.layer.apply(inp[:1], weight, bias, filters).to(dtype)
            self._constant_terms[key] = part if term.sign == 1.0 else part * term.sign
        return self._constant_terms[key], True

    @staticmethod
    def _group_scales(rule: Rule, groups: list[Any], zs: list[torch.Tensor]) -> list[Any]:
        """Group scales; for alpha-beta, a neuron with contributions of only one sign is explained by
        that side alone (alpha - beta = 1 per neuron), so relevance is conserved exactly."""
        if not isinstance(rule, AlphaBeta) or len(zs) != 2:
            return [group.scale for group in groups]
        positive, negative = zs
        no_negative, no_positive = negative == 0, positive == 0
        alpha, beta = groups[0].scale, groups[1].scale
        scale_positive = torch.where(no_negative, 1.0, torch.where(no_positive, 0.0, alpha)).to(
            positive.dtype
        )
        scale_negative = torch.where(no_negative, 0.0, torch.where(no_positive, 1.0, beta)).to(positive.dtype)
        return [scale_positive, scale_negative]

    def _modified_input(self, kind: str, a: Any, nonnegative: bool, rule: Rule) -> Any:
        if kind == "identity" or (kind == "positive" and nonnegative):
            return a
        if kind == "active":  # a ReLU's gate, read off its (non-negative) output
            return (a > 0).to(a.dtype) if nonnegative else self._modified_input("ones", a, nonnegative, rule)
        if kind == "positive":
            return a.clamp(min=0)
        if kind == "negative":
            return a.clamp(max=0)
        # ones and box bounds do not depend on the image: built once per shape, dtype and layout
        key = (kind, rule, tuple(a.shape), self._dtype, a.device, self._memory_format)
        if key not in self._constant_inputs:
            if kind == "ones":
                constant = torch.ones(a.shape, dtype=self._dtype, device=a.device)
            else:
                low, high = self._box(rule)
                bound = low if kind == "low" else high
                constant = bound.to(device=a.device, dtype=self._dtype).expand(a.shape)
            layout = self._memory_format if len(a.shape) == 4 else torch.contiguous_format
            self._constant_inputs[key] = constant.contiguous(memory_format=layout)
        return self._constant_inputs[key]

    def _box(self, rule: Rule) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(rule, ZBox) and rule.low is not None and rule.high is not None:
            low = torch.tensor(rule.low, dtype=torch.float64).reshape(1, -1, 1, 1)
            high = torch.tensor(rule.high, dtype=torch.float64).reshape(1, -1, 1, 1)
            return low, high
        assert self.bounds is not None
        return self.bounds


def _forward_is_denominator(rule: Rule) -> bool:
    """Whether the rule's one denominator is the layer's own forward output (the epsilon rule with the
    bias kept), so the output kept from the forward pass serves as z instead of being recomputed."""
    groups = rule.groups()
    if len(groups) != 1 or len(groups[0].terms) != 1 or not groups[0].normalized:
        return False
    term = groups[0].terms[0]
    return term.input == "identity" and term.weight == KEEP and term.bias == KEEP and term.sign == 1.0


CONSTANT_INPUTS = ("ones", "low", "high")  # term inputs that do not depend on the image


def _joint_term(rule: Rule, nonnegative_input: bool) -> Term | None:
    """The rule's one denominator term when it is a modified copy of the layer on the layer's own input
    (z+ on ReLU outputs, for one): the forward pass can compute it alongside the layer's output."""
    groups = rule.groups()
    if len(groups) != 1 or not groups[0].normalized or groups[0].output_sign:
        return None
    terms = [t for t in groups[0].terms if not (nonnegative_input and t.input == "negative")]
    if len(terms) != 1 or terms[0].sign != 1.0:
        return None
    same_input = terms[0].input == "identity" or (terms[0].input == "positive" and nonnegative_input)
    return terms[0] if same_input else None


def _positive_denominator(group: Any, nonnegative_input: bool) -> bool:
    """True when every term adds a non-negative amount (e.g. z+ on ReLU outputs): the stabiliser is
    then a plain ``+ epsilon``, done in place."""
    positive_inputs = {"ones"} | ({"identity", "positive"} if nonnegative_input else {"positive"})
    positive_params = {"positive", "ones", "square", "zero"}
    return all(
        t.sign > 0
        and t.input in positive_inputs
        and t.weight.kind in positive_params
        and t.bias.kind in positive_params
        for t in group.terms
        if not (nonnegative_input and t.input == "negative")
    )
