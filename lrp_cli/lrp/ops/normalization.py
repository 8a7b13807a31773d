"""Layer, group and RMS normalisation, and softmax: AttnLRP's rules for the non-linear normalisers.

A normaliser divides by a statistic of its own input (a standard deviation, a root mean square). Holding
that statistic constant (AttnLRP's identity rule for normalisation) leaves a map that is linear in the
input: centring, a fixed per-element scale, the affine weight and bias. That map is explained by the
epsilon rule, so relevance is conserved except for the share the affine bias absorbs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..rules import stabilize
from .base import Op


class Normalization(Op):
    """Layer norm (``centre`` over ``dims``), RMS norm (scale only, over ``dims``) or group norm (centre
    and scale over ``groups`` channel groups and all positions). ``weight`` is the affine scale, already
    shaped to broadcast against the input; the affine bias only shows in the output."""

    keeps = "inputs+output"
    rule_name = "identity on the scale, epsilon on the rest (AttnLRP)"

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        *,
        centre: bool,
        dims: Sequence[int] = (),
        groups: int | None = None,
        weight: torch.Tensor | None = None,
        eps: float | None = 1e-5,
    ) -> None:
        super().__init__(fn)
        self.centre = centre
        self.dims = tuple(dims)
        self.groups = groups
        self.weight = None if weight is None else weight.detach()
        self.eps = eps

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        """The normaliser's statistic, ``1 / sqrt(var + eps)`` (or of the mean square), held fixed."""
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        if self.groups is not None:
            grouped = x.reshape(x.shape[0], self.groups, -1)
            return torch.rsqrt(grouped.var(dim=-1, unbiased=False, keepdim=True) + eps)
        if self.centre:
            return torch.rsqrt(x.var(dim=self.dims, unbiased=False, keepdim=True) + eps)
        return torch.rsqrt(x.pow(2).mean(dim=self.dims, keepdim=True) + eps)

    def adjoint(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The transpose of the normaliser with its statistic fixed (centring, scale, affine weight), at
        ``s``: the vector-Jacobian product of that linear map, written out instead of taken by autograd."""
        weight = None if self.weight is None else self.weight.to(x.dtype)
        scale = self._scale(x)
        if self.groups is not None:
            if weight is not None:
                s = s * weight.reshape((1, x.shape[1]) + (1,) * (x.dim() - 2))
            c = s.reshape(x.shape[0], self.groups, -1) * scale
            return (c - c.mean(dim=-1, keepdim=True)).reshape(x.shape)
        c = (s if weight is None else s * weight) * scale
        return c - c.mean(dim=self.dims, keepdim=True) if self.centre else c

    def propagate(self, relevance, inputs, output, ctx):
        """The epsilon rule on the linear map: ``x * adjoint(R / stabilise(y))``."""
        x = inputs[0].to(relevance.dtype)
        s = relevance / stabilize(output.to(relevance.dtype), ctx.stabilizer)
        return [x * self.adjoint(x, s)] + [None] * (len(inputs) - 1)


class Softmax(Op):
    """Softmax over ``dim``. AttnLRP (``ctx.attention == "attnlrp"``): ``R_in = x * (R - s * sum(R))``,
    the Taylor expansion of each output at zero with the bias term dropped; CP-LRP: the attention weights
    are held constant, so no relevance flows into the scores."""

    keeps = "inputs+output"
    rule_name = "AttnLRP softmax / CP: none"

    def __init__(self, fn: Callable[..., torch.Tensor], dim: int) -> None:
        super().__init__(fn)
        self.dim = dim

    def receives(self, index, attention):
        return index == 0 and attention != "cp"

    def propagate(self, relevance, inputs, output, ctx):
        rest = [None] * (len(inputs) - 1)
        if ctx.attention == "cp":
            return [None, *rest]
        x = inputs[0].to(relevance.dtype)
        s = output.to(relevance.dtype)
        share = x * (relevance - s * relevance.sum(dim=self.dim, keepdim=True))
        return [share.nan_to_num(0.0, 0.0, 0.0), *rest]
