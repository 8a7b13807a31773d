"""Declarative LRP rules for weighted layers (conv, linear, stand-alone batch norm).

Every rule is written in one general form, so the engine needs a single implementation:

    z_g   = sum_k sign_k * layer(input_k(a); weight_k, bias_k)          for each group g
    s_g   = R / stabilise(z_g)                    (optionally only where the layer output has a sign)
    R_in  = sum_g scale_g * sum_k sign_k * input_k(a) * layer^T(s_g; weight_k)

A group that is not ``normalized`` skips the division (s_g = R): a signal projected back through
modified weights, as PatternNet and PatternAttribution do (``patterns.py``).
A rule is therefore a tuple of groups of terms, each term naming how the input and the parameters are
modified. The modifiers are small hashable values so the engine can cache modified weights per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

InputMod = Literal["identity", "positive", "negative", "ones", "low", "high", "active"]
"""``active``: 1 where a non-negative (ReLU-fed) input is positive, else 1 everywhere: the ReLU gate of a
gradient-like pass (PatternNet, PatternAttribution)."""


@dataclass(frozen=True)
class ParamMod:
    """How a rule changes a layer's weight or bias: ``kind`` picks the transform, ``gamma`` its strength."""

    kind: Literal["keep", "positive", "negative", "ones", "square", "gamma+", "gamma-", "zero"]
    gamma: float = 0.0

    def __call__(self, param: torch.Tensor) -> torch.Tensor:
        if self.kind == "keep":
            return param
        if self.kind == "positive":
            return param.clamp(min=0)
        if self.kind == "negative":
            return param.clamp(max=0)
        if self.kind == "ones":
            return torch.ones_like(param)
        if self.kind == "square":
            return param * param
        if self.kind == "gamma+":
            return param + self.gamma * param.clamp(min=0)
        if self.kind == "gamma-":
            return param + self.gamma * param.clamp(max=0)
        return torch.zeros_like(param)


KEEP = ParamMod("keep")
POSITIVE = ParamMod("positive")
NEGATIVE = ParamMod("negative")
ZERO = ParamMod("zero")


@dataclass(frozen=True)
class Term:
    """One modified copy of the layer: which input it sees, which weight and bias it uses, its sign."""

    input: InputMod
    weight: ParamMod
    bias: ParamMod = ZERO
    sign: float = 1.0


@dataclass(frozen=True)
class Group:
    """Terms normalised by one shared denominator, scaled by ``scale`` (alpha, -beta)."""

    terms: tuple[Term, ...]
    scale: float = 1.0
    output_sign: int = 0  # +1/-1: only where the unmodified layer output is positive/negative
    normalized: bool = True  # False: s = R itself, not R / z (a signal projected back, as PatternNet does)


def stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Push the denominator away from zero by ``epsilon`` in the direction of its sign (zero counts +)."""
    return z + torch.where(z >= 0, epsilon, -epsilon).to(z.dtype)


class Rule:
    """Base of all rules; subclasses are frozen dataclasses whose fields are the rule's parameters."""

    name: ClassVar[str]

    def groups(self) -> tuple[Group, ...]:
        raise NotImplementedError

    @property
    def stabilizer(self) -> float:
        return self.epsilon if hasattr(self, "epsilon") else 1e-6

    @property
    def signed(self) -> bool:
        """Whether the rule can turn positive relevance into negative relevance."""
        return any(g.scale < 0 or t.sign < 0 for g in self.groups() for t in g.terms) or isinstance(
            self, Epsilon | Gamma | ZBox
        )

    @property
    def needs_input(self) -> bool:
        """False when the rule never looks at the activations (flat, w², ones-input z+)."""
        inputs = ("identity", "positive", "negative", "active")
        return any(t.input in inputs for g in self.groups() for t in g.terms)

    @property
    def needs_output(self) -> bool:
        return any(g.output_sign for g in self.groups())


def _bias(zero_bias: bool, mod: ParamMod) -> ParamMod:
    return ZERO if zero_bias else mod


@dataclass(frozen=True)
class Pass(Rule):
    """Relevance goes through unchanged (shape-preserving layers only, e.g. stand-alone batch norm)."""

    name: ClassVar[str] = "pass"

    def groups(self) -> tuple[Group, ...]:
        return ()


@dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-epsilon: proportional to each input's contribution z_ij = a_i w_ij, denominator +-epsilon."""

    name: ClassVar[str] = "epsilon"
    epsilon: float = 1e-6
    zero_bias: bool = False

    def groups(self) -> tuple[Group, ...]:
        return (Group((Term("identity", KEEP, _bias(self.zero_bias, KEEP)),)),)


@dataclass(frozen=True)
class ZPlus(Rule):
    """LRP-z+: only positive contributions (a+ w+ and a- w-) count.

    ``ones_input`` replaces the activations by ones, as the seed implementation does at the first layer;
    ``zero_bias`` (the seed's choice) drops the bias, otherwise the positive part of the bias takes a share.
    """

    name: ClassVar[str] = "zplus"
    epsilon: float = 1e-6
    zero_bias: bool = False
    ones_input: bool = False

    def groups(self) -> tuple[Group, ...]:
        if self.ones_input:
            return (Group((Term("ones", POSITIVE, _bias(self.zero_bias, POSITIVE)),)),)
        return (
            Group(
                (
                    Term("positive", POSITIVE, _bias(self.zero_bias, POSITIVE)),
                    Term("negative", NEGATIVE),
                )
            ),
        )


@dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-alpha-beta: alpha times the positive share minus beta times the negative share (alpha - beta = 1)."""

    name: ClassVar[str] = "alpha-beta"
    alpha: float = 2.0
    beta: float = 1.0
    epsilon: float = 1e-6
    zero_bias: bool = False

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0 or abs(self.alpha - self.beta - 1.0) > 1e-9:
            raise ValueError(
                f"alpha-beta needs alpha >= 0, beta >= 0 and alpha - beta = 1; got alpha={self.alpha}, "
                f"beta={self.beta}"
            )

    def groups(self) -> tuple[Group, ...]:
        positive = Group(
            (Term("positive", POSITIVE, _bias(self.zero_bias, POSITIVE)), Term("negative", NEGATIVE)),
            scale=self.alpha,
        )
        negative = Group(
            (Term("positive", NEGATIVE, _bias(self.zero_bias, NEGATIVE)), Term("negative", POSITIVE)),
            scale=-self.beta,
        )
        # the negative group is kept at beta = 0 too: a neuron whose contributions are all negative is
        # then explained by them alone (see Explainer._group_scales), where alpha1-beta0 would lose it
        return (positive, negative)


@dataclass(frozen=True)
class Gamma(Rule):
    """Generalised LRP-gamma: favours positive contributions by adding gamma times the positive weights.

    Outputs that are positive are explained by their positive contributions, negative outputs by their
    negative ones, so the rule is also defined for inputs of either sign.
    """

    name: ClassVar[str] = "gamma"
    gamma: float = 0.25
    epsilon: float = 1e-6
    zero_bias: bool = False

    def groups(self) -> tuple[Group, ...]:
        up = ParamMod("gamma+", self.gamma)
        down = ParamMod("gamma-", self.gamma)
        return (
            Group(
                (Term("positive", up, _bias(self.zero_bias, up)), Term("negative", down)),
                output_sign=1,
            ),
            Group(
                (Term("positive", down, _bias(self.zero_bias, down)), Term("negative", up)),
                output_sign=-1,
            ),
        )


@dataclass(frozen=True)
class Flat(Rule):
    """Flat rule: every input in the receptive field gets an equal share, whatever the weights."""

    name: ClassVar[str] = "flat"
    epsilon: float = 1e-6

    def groups(self) -> tuple[Group, ...]:
        return (Group((Term("ones", ParamMod("ones")),)),)


@dataclass(frozen=True)
class WSquare(Rule):
    """w² rule: shares proportional to the squared weights, independent of the activations."""

    name: ClassVar[str] = "wsquare"
    epsilon: float = 1e-6
    zero_bias: bool = True

    def groups(self) -> tuple[Group, ...]:
        return (Group((Term("ones", ParamMod("square"), _bias(self.zero_bias, ParamMod("square"))),)),)


@dataclass(frozen=True)
class ZBox(Rule):
    """z^B rule for the input layer: the input lives in a box [low, high], from the model's normalisation."""

    name: ClassVar[str] = "zbox"
    epsilon: float = 1e-6
    zero_bias: bool = False
    low: tuple[float, ...] | None = field(default=None)
    high: tuple[float, ...] | None = field(default=None)

    def groups(self) -> tuple[Group, ...]:
        return (
            Group(
                (
                    Term("identity", KEEP, _bias(self.zero_bias, KEEP)),
                    Term("low", POSITIVE, sign=-1.0),
                    Term("high", NEGATIVE, sign=-1.0),
                )
            ),
        )


RULES: dict[str, type[Rule]] = {
    cls.name: cls for cls in (Pass, Epsilon, ZPlus, AlphaBeta, Gamma, Flat, WSquare, ZBox)
}
"""Rules by the name used in configs and composites."""

RULE_ALIASES: dict[str, tuple[str, dict[str, float]]] = {
    "alpha1-beta0": ("alpha-beta", {"alpha": 1.0, "beta": 0.0}),
    "alpha2-beta1": ("alpha-beta", {"alpha": 2.0, "beta": 1.0}),
    "z-plus": ("zplus", {}),
    "w2": ("wsquare", {}),
    "zb": ("zbox", {}),
}


def make_rule(name: str, **params: object) -> Rule:
    """Build a rule from its registry name and parameters, with a clear error for either being wrong."""
    base, defaults = RULE_ALIASES.get(name, (name, {}))
    if base not in RULES:
        known = ", ".join(sorted([*RULES, *RULE_ALIASES]))
        raise ValueError(f"unknown rule {name!r}; known rules: {known}")
    cls = RULES[base]
    allowed = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(
            f"rule {name!r} has no parameter(s) {', '.join(sorted(unknown))}; "
            f"it takes: {', '.join(sorted(allowed)) or 'no parameters'}"
        )
    return cls(**{**defaults, **params})  # type: ignore[arg-type]
