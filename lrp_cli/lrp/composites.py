"""Composites: which rule explains which layer, as named presets plus per-type and per-name maps."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .rules import AlphaBeta, Epsilon, Flat, Gamma, Pass, Rule, ZBox, ZPlus, make_rule

LAYER_TYPES = ("conv", "depthwise", "linear", "batchnorm")


@dataclass(frozen=True)
class Composite:
    """A complete assignment of rules.

    Lookup order for a weighted layer: the first ``name_map`` pattern (``fnmatch`` on the module path,
    e.g. ``"features.*"``) that matches, then ``first`` for layers fed by the model input, then
    ``layer_map`` by type (``depthwise`` falls back to ``conv``). ``start`` is the relevance the
    explanation starts from when no target is given: ``"predicted"`` (one-hot on the top class) or
    ``"softmax"`` (the seed's unsupervised start over all classes). ``maxpool`` is ``"winner"``
    (winner-take-all) or ``"average"`` (as the average pool of the same window, like the seed).
    ``attention``: ``"attnlrp"`` explains softmax and products of two activations by AttnLRP's rules;
    ``"cp"`` holds attention weights constant (CP-LRP), so relevance reaches only the values.
    ``stabilizer`` is the epsilon of pools, additions, normalisers and products.
    """

    name: str = "custom"
    layer_map: Mapping[str, Rule] = field(default_factory=dict)
    first: Rule | None = None
    name_map: tuple[tuple[str, Rule], ...] = ()
    maxpool: Literal["winner", "average"] = "winner"
    start: Literal["predicted", "softmax"] = "predicted"
    stabilizer: float = 1e-6
    attention: Literal["attnlrp", "cp"] = "attnlrp"

    def rule_for(self, path: str, layer_type: str, first: bool) -> Rule:
        """The rule for one layer (``path`` may join a conv and its folded batch norm with '+')."""
        names = path.split("+")
        for pattern, rule in self.name_map:
            if any(fnmatch.fnmatchcase(name, pattern) for name in names):
                return rule
        if first and self.first is not None and layer_type != "batchnorm":
            return self.first
        if layer_type == "depthwise" and "depthwise" not in self.layer_map:
            layer_type = "conv"
        if layer_type in self.layer_map:
            return self.layer_map[layer_type]
        if layer_type == "batchnorm":
            return Pass()
        raise KeyError(f"composite {self.name!r} has no rule for {layer_type} layer {path!r}")

    @property
    def signed(self) -> bool:
        """Whether heatmaps can hold negative relevance (then they are drawn centred on zero)."""
        rules = [*self.layer_map.values(), *(r for _, r in self.name_map)]
        rules += [self.first] if self.first is not None else []
        return any(rule.signed for rule in rules)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Composite:
        """A copy with rules replaced: keys are layer types, ``first`` or module-name patterns; values a
        rule name or a mapping ``{rule: NAME, PARAM: VALUE...}``; plus ``maxpool``/``start``/``stabilizer``/
        ``attention``."""
        layer_map = dict(self.layer_map)
        name_map = list(self.name_map)
        first = self.first
        settings: dict[str, Any] = {}
        for key, value in overrides.items():
            if key in ("maxpool", "start", "stabilizer", "attention"):
                settings[key] = value
                continue
            rule = rule_from_spec(value, where=key)
            if key in LAYER_TYPES:
                layer_map[key] = rule
            elif key == "first":
                first = rule
            else:
                name_map.insert(0, (key, rule))
        return replace(self, layer_map=layer_map, name_map=tuple(name_map), first=first, **settings)


def rule_from_spec(spec: Any, where: str = "rule") -> Rule:
    """``"epsilon"`` or ``{"rule": "epsilon", "epsilon": 0.25}`` (or a Rule) to a Rule."""
    if isinstance(spec, Rule):
        return spec
    if isinstance(spec, str):
        return make_rule(spec)
    if isinstance(spec, Mapping) and isinstance(spec.get("rule"), str):
        params = {k: v for k, v in spec.items() if k != "rule"}
        return make_rule(spec["rule"], **params)
    raise ValueError(f"{where}: expected a rule name or a mapping with a 'rule' key, got {spec!r}")


COMPOSITES: dict[str, Callable[[], Composite]] = {}
"""Named presets; call the factory for a fresh composite."""


def register_composite(name: str) -> Callable[[Callable[[], Composite]], Callable[[], Composite]]:
    def register(factory: Callable[[], Composite]) -> Callable[[], Composite]:
        COMPOSITES[name] = factory
        return factory

    return register


AUTO = "auto"
"""Not a preset: ``attnlrp`` for models with attention (a softmax or a product of two activations),
``epsilon-plus-flat`` for the rest."""


def get_composite(composite: str | Composite) -> Composite:
    if isinstance(composite, Composite):
        return composite
    if composite not in COMPOSITES:
        known = ", ".join([AUTO, *sorted(COMPOSITES)])
        raise ValueError(f"unknown composite {composite!r}; presets: {known}")
    return COMPOSITES[composite]()


def resolve_composite(composite: str | Composite, program: Any) -> str | Composite:
    """Replace ``"auto"`` by the preset that fits the traced ``program``."""
    if composite != AUTO:
        return composite
    return "attnlrp" if has_attention(program) else "epsilon-plus-flat"


def has_attention(program: Any) -> bool:
    from .ops import Product, Softmax

    return any(
        isinstance(s.op, Softmax)
        or (isinstance(s.op, Product) and sum(r in ("value", "attention") for r in s.op.roles) == 2)
        for s in program.steps
    )


@register_composite("seed")
def seed() -> Composite:
    """The seed implementation: z+ everywhere without bias, ones as the first layer's input, max pools
    explained as average pools, relevance starting from the softmax over all classes, and one
    stabiliser (1e-5) for convolutions and pools alike."""
    zplus = ZPlus(epsilon=1e-5, zero_bias=True)
    return Composite(
        name="seed",
        layer_map={"conv": zplus, "linear": zplus},
        first=ZPlus(epsilon=1e-5, zero_bias=True, ones_input=True),
        maxpool="average",
        start="softmax",
        stabilizer=1e-5,
    )


@register_composite("epsilon-plus-flat")
def epsilon_plus_flat() -> Composite:
    """z+ in convolutions, epsilon in dense layers, flat at the input (Zennit's EpsilonPlusFlat)."""
    return Composite(name="epsilon-plus-flat", layer_map={"conv": ZPlus(), "linear": Epsilon()}, first=Flat())


@register_composite("epsilon-gamma-box")
def epsilon_gamma_box() -> Composite:
    """gamma in convolutions, epsilon in dense layers, z^B at the input (bounds from the normalisation)."""
    return Composite(name="epsilon-gamma-box", layer_map={"conv": Gamma(), "linear": Epsilon()}, first=ZBox())


@register_composite("epsilon-alpha2-beta1-flat")
def epsilon_alpha2_beta1_flat() -> Composite:
    """alpha2-beta1 in convolutions, epsilon in dense layers, flat at the input."""
    return Composite(
        name="epsilon-alpha2-beta1-flat",
        layer_map={"conv": AlphaBeta(2.0, 1.0), "linear": Epsilon()},
        first=Flat(),
    )


@register_composite("attnlrp")
def attnlrp() -> Composite:
    """AttnLRP (Achtibat et al., 2024): epsilon in dense and conv layers; softmax by its Taylor rule,
    products of two activations in halves, normalisers with their scale held constant."""
    return Composite(name="attnlrp", layer_map={"conv": Epsilon(), "linear": Epsilon()}, attention="attnlrp")


@register_composite("patternnet")
def patternnet() -> Composite:
    """PatternNet (Kindermans et al., 2018): the signal projected back through fitted patterns; needs the
    patterns (``Explainer(..., patterns=...)``, see :mod:`.patterns`)."""
    from .patterns import PatternComposite  # patterns builds on this module

    return PatternComposite(name="patternnet", method="patternnet")


@register_composite("patternattribution")
def patternattribution() -> Composite:
    """PatternAttribution (Kindermans et al., 2018): as PatternNet with pattern * weight; needs patterns."""
    from .patterns import PatternComposite

    return PatternComposite(name="patternattribution", method="patternattribution")


@register_composite("cp-lrp")
def cp_lrp() -> Composite:
    """CP-LRP (Ali et al., 2022): as ``attnlrp``, but attention weights are held constant, so relevance
    flows only through the values, never into queries and keys."""
    return Composite(name="cp-lrp", layer_map={"conv": Epsilon(), "linear": Epsilon()}, attention="cp")


def _uniform(name: str, rule: Rule) -> None:
    register_composite(name)(lambda: Composite(name=name, layer_map={"conv": rule, "linear": rule}))


_uniform("epsilon", Epsilon())
_uniform("zplus", ZPlus())
_uniform("alpha1-beta0", AlphaBeta(1.0, 0.0))
_uniform("alpha2-beta1", AlphaBeta(2.0, 1.0))
