"""Pools, means and other fixed linear maps of one activation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .base import Op, share_by_contribution, vjp


class Pool(Op):
    """Pooling and means. ``mode``: "proportional" (avg pool, mean, interpolation: a linear map, shares
    by contribution), "winner" (max pool: all to the arg-max) or "average" (max pool explained as the
    average pool of the same window, like the seed implementation)."""

    filtered = True

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        mode: str,
        average: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        filtered: bool = True,
        linear: Callable[[torch.Tensor], torch.Tensor] | None = None,
        source: int = 0,
    ) -> None:
        super().__init__(fn)
        self.source = source  # which argument is the activation
        self.linear = linear  # fn without its constant term, where it has one (an affine map)
        self.mode = mode
        self.average = average
        self.filtered = filtered
        self.keeps = "inputs+output" if mode == "proportional" else "inputs"
        self.rule_name = "epsilon (by contribution)" if mode == "proportional" else "winner takes all"

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Window sizes, dims and constants are bound into ``fn`` already; only the activation is passed."""
        return self.fn(args[self.source])

    def receives(self, index, attention):
        return index == self.source

    def propagate(self, relevance, inputs, output, ctx):
        a = inputs[self.source]
        before, after = [None] * self.source, [None] * (len(inputs) - self.source - 1)
        mode = self.mode
        if mode != "proportional" and ctx.maxpool == "average" and self.average is not None:
            mode = "average"
        if mode == "winner":
            return before + vjp(self.fn, [a], relevance.to(a.dtype)) + after
        fn = (self.linear or self.fn) if mode == "proportional" else self.average
        z = output if mode == "proportional" else fn(a)
        return before + share_by_contribution(fn, [a], z, relevance, ctx.stabilizer) + after


def pool_average_of(module_or_kwargs: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Average pooling over the same windows as a max pool, for the seed's 'max as average' option."""
    kwargs = dict(module_or_kwargs)
    return lambda x: F.avg_pool2d(
        x,
        kwargs["kernel_size"],
        kwargs.get("stride") or kwargs["kernel_size"],
        kwargs.get("padding", 0),
        kwargs.get("ceil_mode", False),
        count_include_pad=False,
    )
