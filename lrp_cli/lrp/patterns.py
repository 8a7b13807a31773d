"""PatternNet and PatternAttribution (Kindermans et al., ICLR 2018): signal estimators fitted on data,
and the rules that propagate with them.

For a layer ``y = w^T x + b`` (per output neuron; for a convolution ``x`` is the patch one output
sees), the *linear* estimator is the pattern ``a = cov(x, y) / (w^T cov(x, y))``, which is
``cov(x, y) / var(y)``: the direction in which the input moves with the output, where the weight also
cancels the distractors. The *positive* (two-component) estimator takes the statistics of ``x`` over
the outputs that a ReLU lets through, ``y > 0``:
``a+ = (E+[x y] - E+[x] E[y]) / w^T (E+[x y] - E+[x] E[y])``. Both are normalised so that ``w^T a = 1``.

PatternNet projects the signal back: at every conv and linear layer ``r_in = a^T r_out``, gated by the
ReLU behind the layer's input as a gradient would be; PatternAttribution does the same with ``w * a``
in place of ``w`` (the root point of a deep Taylor decomposition that removes the distractor). Both are
rules of the general form in :mod:`.rules`: one group that is not normalised, one term whose input is
the ReLU gate (``active``) and whose weight is the pattern.

The statistics are sums in float64 over batches (never stored activations), gathered on the engine's
own traced program, so any model it explains can be fitted and the patterns belong to its folded
layers (a conv with its batch norm).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .composites import Composite
from .ops import Weighted
from .rules import Group, Rule, Term

ESTIMATORS = ("positive", "linear")
FORMAT = "lrp-heatmap patterns"
VERSION = 1


def weights_hash(module: nn.Module) -> str:
    """SHA-256 over the parameters and buffers in order (the first 16 hex digits): the exact weights a
    patterns file was fitted for. The same digest as the command line's model registry."""
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class Patterns:
    """Fitted patterns per layer path (as the engine names layers, ``features.0+features.1`` for a conv
    with its folded batch norm), each of the layer weight's shape and dtype, on the CPU.

    ``kinds``: ``conv`` or ``linear`` per layer; ``weights_hash``: :func:`weights_hash` of the model they
    were fitted on; ``model``: its name; ``images``: how many inputs the statistics cover.
    """

    linear: dict[str, torch.Tensor]
    positive: dict[str, torch.Tensor]
    kinds: dict[str, str]
    weights_hash: str
    model: str = ""
    images: int = 0

    def table(self, estimator: str) -> dict[str, torch.Tensor]:
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown pattern estimator {estimator!r}; use positive or linear")
        return self.positive if estimator == "positive" else self.linear

    def state(self) -> dict[str, Any]:
        """A plain dict of strings, numbers and tensors (``torch.save`` it; it loads with weights_only)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "weights_sha256": self.weights_hash,
            "images": self.images,
            "layers": dict(self.kinds),
            "linear": dict(self.linear),
            "positive": dict(self.positive),
        }

    @classmethod
    def from_state(cls, state: Any) -> Patterns:
        """The inverse of :meth:`state`; ``ValueError`` saying what is wrong for anything else."""
        if not isinstance(state, Mapping) or state.get("format") != FORMAT:
            raise ValueError("not a patterns file (it has no 'format: lrp-heatmap patterns' entry)")
        if state.get("version") != VERSION:
            raise ValueError(
                f"patterns format version {state.get('version')!r}; this version reads {VERSION}"
            )
        layers = state.get("layers")
        tables = [state.get("linear"), state.get("positive")]
        if not isinstance(layers, Mapping) or not all(
            isinstance(t, Mapping)
            and set(t) == set(layers)
            and all(isinstance(v, torch.Tensor) for v in t.values())
            for t in tables
        ):
            raise ValueError("a patterns file needs 'layers', 'linear' and 'positive' for the same layers")
        if not isinstance(state.get("weights_sha256"), str):
            raise ValueError("a patterns file needs the 'weights_sha256' of its model")
        return cls(
            linear=dict(tables[0]),
            positive=dict(tables[1]),
            kinds=dict(layers),
            weights_hash=state["weights_sha256"],
            model=str(state.get("model", "")),
            images=int(state.get("images", 0)),
        )

    @classmethod
    def load(cls, path: Any) -> Patterns:
        return cls.from_state(torch.load(path, map_location="cpu", weights_only=True))

    def save(self, path: Any) -> None:
        torch.save(self.state(), path)


# --- rules --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PatternWeight:
    """A weight modifier: the layer's weight replaced by its pattern (PatternNet) or by pattern * weight
    (PatternAttribution). Hashed by identity, so the engine caches one modified weight per layer."""

    pattern: torch.Tensor
    attribution: bool
    kind: ClassVar[str] = "pattern"  # as a ParamMod has, for code that reads a term's kinds

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        pattern = self.pattern.to(device=weight.device, dtype=weight.dtype)
        return pattern * weight if self.attribution else pattern


@dataclass(frozen=True, eq=False)
class PatternNetRule(Rule):
    """PatternNet at one layer: the signal goes back through the pattern, ``r_in = a^T r_out``, zero where
    the ReLU behind the input was off; no division, no multiplication by the input."""

    name: ClassVar[str] = "patternnet"
    pattern: torch.Tensor
    _attribution: ClassVar[bool] = False

    def __post_init__(self) -> None:
        weight = PatternWeight(self.pattern, self._attribution)
        object.__setattr__(self, "_groups", (Group((Term("active", weight),), normalized=False),))  # type: ignore[arg-type]

    def groups(self) -> tuple[Group, ...]:
        return self._groups  # type: ignore[attr-defined]

    @property
    def signed(self) -> bool:
        return True


@dataclass(frozen=True, eq=False)
class PatternAttributionRule(PatternNetRule):
    """PatternAttribution at one layer: as PatternNet with ``w * a`` in place of ``a``."""

    name: ClassVar[str] = "patternattribution"
    _attribution: ClassVar[bool] = True


Method = Literal["patternnet", "patternattribution"]
METHODS: dict[str, type[PatternNetRule]] = {
    "patternnet": PatternNetRule,
    "patternattribution": PatternAttributionRule,
}


@dataclass(frozen=True)
class PatternComposite(Composite):
    """Every conv and linear layer by its pattern rule (``method``) with the ``estimator``'s patterns
    (``positive``, the paper's choice, or ``linear``); stand-alone batch norms pass the signal on.
    Rule overrides (``rules:``) still win over the patterns. Needs ``patterns`` (see
    :func:`bind_patterns`); the signal starts as one at the explained class."""

    method: Method = "patternnet"
    estimator: Literal["positive", "linear"] = "positive"
    patterns: Patterns | None = None

    def rule_for(self, path: str, layer_type: str, first: bool) -> Rule:
        try:
            return super().rule_for(path, layer_type, first)  # overrides, and stand-alone batch norms
        except KeyError:
            pass
        if self.patterns is None:
            raise ValueError(f"composite {self.name!r} needs patterns fitted on the model's data")
        table = self.patterns.table(self.estimator)
        if path not in table:
            raise ValueError(
                f"the patterns (fitted for {self.patterns.model or 'a model'}) have no pattern for layer "
                f"{path!r}; fit them again on this model"
            )
        return METHODS[self.method](table[path])

    @property
    def signed(self) -> bool:
        return True


def pattern_composite(
    patterns: Patterns, method: Method = "patternnet", estimator: Literal["positive", "linear"] = "positive"
) -> PatternComposite:
    """A composite for ``patterns``: ``Explainer(model, pattern_composite(p, "patternattribution"))``."""
    if method not in METHODS:
        raise ValueError(f"unknown pattern method {method!r}; use patternnet or patternattribution")
    patterns.table(estimator)  # names a wrong estimator now rather than at the first layer
    return PatternComposite(name=method, method=method, estimator=estimator, patterns=patterns)


def bind_patterns(composite: Composite, patterns: Patterns | None, model: nn.Module) -> Composite:
    """``composite`` with ``patterns`` in place, refused unless they were fitted on ``model``'s weights."""
    if not isinstance(composite, PatternComposite):
        if patterns is not None:
            raise ValueError(
                f"patterns are used by the patternnet and patternattribution composites only, not {composite.name!r}"
            )
        return composite
    if patterns is not None:
        composite = replace(composite, patterns=patterns)
    if composite.patterns is None:
        raise ValueError(
            f"composite {composite.name!r} needs patterns fitted on this model: pass patterns= "
            "(lrp_cli.lrp.patterns.fit_patterns, or `lrp-heatmap patterns fit`)"
        )
    current = weights_hash(model)
    if composite.patterns.weights_hash != current:
        raise ValueError(
            f"the patterns were fitted for weights {composite.patterns.weights_hash}, but the model's weights "
            f"are {current}; fit them again for these weights"
        )
    return composite


# --- fitting ------------------------------------------------------------------------------------------


def _maps(layer: Any, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The layer's output without bias for ``x`` (float64), and ``correlate(g)``: the sum over samples
    and positions of ``g`` times the input patch each output saw, in the weight's shape (``g`` may have
    one output channel where the layer is not grouped). That is the weight gradient of the layer's own
    map (any stride, padding, dilation), so patches are never stored, except for grouped convolutions,
    which have no fast float64 kernel on the CPU."""
    weight = layer.weight.to(torch.float64)
    if layer.kind == "linear":
        rows = x.reshape(-1, x.shape[-1])
        return F.linear(x, weight), lambda g: g.reshape(-1, g.shape[-1]).T @ rows
    padding, stride, dilation, groups = layer.padding, layer.stride, layer.dilation, layer.groups
    pads = layer.explicit_pads(x.shape[-2], x.shape[-1])
    if pads is not None:  # TF "same" or a padding mode: pad as the layer does, then work unpadded
        x = F.pad(x, pads, mode="constant" if layer.pad_mode == "same" else layer.pad_mode)
        padding = (0, 0)
    if groups == 1:
        y = F.conv2d(x, weight, None, stride, padding, dilation)
        return y, lambda g: torch.nn.grad.conv2d_weight(
            x, (g.shape[1], *weight.shape[1:]), g, stride, padding, dilation
        )
    kernel = weight.shape[-2:]
    size = [
        (x.shape[i - 2] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in (0, 1)
    ]
    cols = F.unfold(x, kernel, dilation, padding, stride)
    cols = cols.view(x.shape[0], groups, -1, cols.shape[-1])  # (N, groups, patch, positions)
    per_group = weight.view(groups, -1, cols.shape[2])
    y = torch.einsum("god,ngdl->ngol", per_group, cols).reshape(x.shape[0], -1, *size)
    return y, lambda g: torch.einsum("ngol,ngdl->god", g.reshape(*cols.shape[:2], -1, cols.shape[-1]), cols)


def _layer_sums(op: Weighted, x: torch.Tensor) -> list[torch.Tensor]:
    """One batch's float64 sums for one layer: outputs per channel, then the sums of x (one row, or
    one per output channel of a grouped convolution), y and x*y (per output channel, in the weight's
    shape), and over the outputs y > 0 their count, x and x*y."""
    layer = op.layer
    y, correlate = _maps(layer, x.to(torch.float64))  # no bias: it cancels in every covariance
    channel = 1 if layer.kind == "conv" else y.dim() - 1
    dims = [d for d in range(y.dim()) if d != channel]
    bias: Any = 0.0
    if layer.bias is not None:
        shape = [1] * y.dim()
        shape[channel] = -1
        bias = layer.bias.to(torch.float64).reshape(shape)
    active = (y + bias > 0).to(torch.float64)
    count = torch.full(
        (y.shape[channel],), y.numel() / y.shape[channel], dtype=torch.float64, device=y.device
    )
    shape = (-1, *layer.weight.shape[1:])
    # the plain sum of the patches is one row for all outputs, unless the layer is grouped
    ones = torch.ones_like(y if layer.kind == "conv" and layer.groups > 1 else y.narrow(channel, 0, 1))
    return [
        count,
        correlate(ones).reshape(shape),
        y.sum(dims),
        correlate(y).reshape(shape),
        active.sum(dims),
        correlate(active).reshape(shape),
        correlate(active * y).reshape(shape),
    ]


def _normalised(cov: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``cov / (w^T cov)`` per output neuron; zero for a neuron whose output never varied (or never fired)."""
    scale = (weight * cov).flatten(1).sum(1).reshape((-1,) + (1,) * (cov.dim() - 1))
    return torch.where(scale == 0, 0.0, cov / torch.where(scale == 0, 1.0, scale))


def estimators(weight: torch.Tensor, sums: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear, positive) patterns of one layer from its accumulated sums (see :func:`_layer_sums`)."""
    count, sum_x, sum_y, sum_xy, count_pos, sum_x_pos, sum_xy_pos = sums
    view = (-1,) + (1,) * (weight.dim() - 1)
    mean_y = (sum_y / count).reshape(view)
    cov = sum_xy / count.reshape(view) - sum_x / count.reshape(view) * mean_y
    fired = count_pos.reshape(view)
    safe = torch.where(fired == 0, 1.0, fired)
    cov_pos = (sum_xy_pos - sum_x_pos * mean_y) / safe  # E+[xy] - E+[x] E[y]
    weight = weight.to(torch.float64)
    return _normalised(cov, weight), _normalised(cov_pos, weight)


class PatternFitter:
    """Streaming statistics of every conv and linear layer of ``model`` as the engine traces it: call
    :meth:`update` with each batch of inputs, then :meth:`patterns`. Only sums are kept (float64, a few
    times each layer's weight), so the data can be any size."""

    def __init__(self, model: nn.Module, *, name: str = "") -> None:
        from .engine import Explainer  # the engine imports this module for its rules

        self._explainer = Explainer(model, "epsilon", winograd=False, channels_last=False)
        self._ops = {
            step.node: step.op
            for step in self._explainer.program.steps
            if isinstance(step.op, Weighted) and step.op.layer_type in ("conv", "linear")
        }
        self.name = name
        self.weights_hash = weights_hash(model)
        self.images = 0
        self._sums: dict[str, list[torch.Tensor]] = {}
        self._weights: dict[str, torch.Tensor] = {}
        self._kinds: dict[str, str] = {}

    def update(self, inputs: torch.Tensor) -> None:
        """Add one batch (the model's input, preprocessed as for explaining)."""
        explainer = self._explainer
        explainer._dtype = explainer.model_dtype or inputs.dtype
        explainer._memory_format = torch.contiguous_format
        with torch.no_grad():
            _, kept = explainer._forward(inputs.to(explainer._dtype))
        for node, op in self._ops.items():
            sums = _layer_sums(op, kept.pop(node)[0][0])
            total = self._sums.get(op.path)
            self._sums[op.path] = sums if total is None else [t.add_(s) for t, s in zip(total, sums)]
            self._weights[op.path] = op.layer.weight
            self._kinds[op.path] = op.layer_type
        self.images += len(inputs)

    def patterns(self) -> Patterns:
        if not self._sums:
            raise ValueError("no data seen: call update() with at least one batch first")
        linear, positive = {}, {}
        for path, sums in self._sums.items():
            weight = self._weights[path]  # patterns are kept in the weight's dtype, which they replace
            linear[path], positive[path] = (t.to("cpu", weight.dtype) for t in estimators(weight, sums))
        return Patterns(linear, positive, dict(self._kinds), self.weights_hash, self.name, self.images)


def fit_patterns(model: nn.Module, batches: Iterable[torch.Tensor], *, name: str = "") -> Patterns:
    """Patterns of ``model`` over ``batches`` of inputs (preprocessed as for explaining), batch by batch."""
    fitter = PatternFitter(model, name=name)
    for batch in batches:
        fitter.update(batch)
    return fitter.patterns()
