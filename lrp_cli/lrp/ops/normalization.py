"""Layer, group and RMS normalisation, and softmax: AttnLRP's rules for the non-linear normalisers.

A normaliser divides by a statistic of its own input (a standard deviation, a root mean square). Holding
that statistic constant (AttnLRP's identity rule for normalisation) leaves a map that is linear in the
input: centring, a fixed per-element scale, the affine weight and bias. That map is explained by the
epsilon rule, so relevance is conserved except for the share the affine bias absorbs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .base import Op, share_by_contribution


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

    def _scaled(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The normaliser with its statistic computed from ``x`` and then held fixed, without bias."""
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        weight = None if self.weight is None else self.weight.to(x.dtype)
        if self.groups is not None:
            n, c = x.shape[:2]
            grouped = x.reshape(n, self.groups, -1)
            scale = torch.rsqrt(grouped.var(dim=-1, unbiased=False, keepdim=True) + eps)
            channel_weight = None if weight is None else weight.reshape((1, c) + (1,) * (x.dim() - 2))

            def group_linear(v: torch.Tensor) -> torch.Tensor:
                g = v.reshape(n, self.groups, -1)
                out = ((g - g.mean(dim=-1, keepdim=True)) * scale).reshape(v.shape)
                return out if channel_weight is None else out * channel_weight

            return group_linear
        dims = self.dims
        if self.centre:
            scale = torch.rsqrt(x.var(dim=dims, unbiased=False, keepdim=True) + eps)
        else:
            scale = torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)

        def linear(v: torch.Tensor) -> torch.Tensor:
            out = (v - v.mean(dim=dims, keepdim=True)) * scale if self.centre else v * scale
            return out if weight is None else out * weight

        return linear

    def propagate(self, relevance, inputs, output, ctx):
        x = inputs[0].to(relevance.dtype)
        (share,) = share_by_contribution(self._scaled(x), [x], output, relevance, ctx.stabilizer)
        return [share] + [None] * (len(inputs) - 1)


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
