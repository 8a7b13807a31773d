"""Pools, means and other fixed linear maps of one activation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..filter import sample_rows
from ..rules import stabilize
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
        window: Callable[[torch.Size], int] | None = None,
    ) -> None:
        super().__init__(fn)
        self.source = source  # which argument is the activation
        self.window = window  # an average pool's largest window, for an input of a given shape
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

    def _mode(self, ctx: Any) -> str:
        """The mode in force: a max pool with a window is explained as its average where ctx asks."""
        if self.mode != "proportional" and ctx.maxpool == "average" and self.average is not None:
            return "average"
        return self.mode

    def spread(self, ctx, nonnegative, inputs):
        """A 2-d max pool's gradient hands each output's relevance to one entry of its window; an
        average (or a max pool explained as one), to the window's entries, by shares that are >= 0
        when the activation is and the stabiliser keeps every denominator positive."""
        mode = self._mode(ctx)
        if mode == "winner":
            return 1 if isinstance(self.average, WindowAverage) else None
        if not (nonnegative[self.source] and ctx.stabilizer > 0):
            return None
        if mode == "average":
            return self.average.kernel[0] * self.average.kernel[1]
        return None if self.window is None else self.window(inputs[self.source].shape)

    def propagate(self, relevance, inputs, output, ctx):
        a = inputs[self.source]
        before, after = [None] * self.source, [None] * (len(inputs) - self.source - 1)
        mode = self._mode(ctx)
        if mode == "winner":
            return before + vjp(self.fn, [a], relevance.to(a.dtype)) + after
        if mode == "average" and isinstance(self.average, WindowAverage) and self.average.tiles(a):
            return [*before, self.average.share(a, relevance, ctx.stabilizer), *after]
        fn = (self.linear or self.fn) if mode == "proportional" else self.average
        z = output if mode == "proportional" else fn(a)
        return before + share_by_contribution(fn, [a], z, relevance, ctx.stabilizer) + after


@dataclass(frozen=True)
class WindowAverage:
    """Average pooling over a max pool's windows, for the seed's 'max as average' option."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    ceil_mode: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(
            x, self.kernel, self.stride, self.padding, self.ceil_mode, count_include_pad=False
        )

    def tiles(self, x: Any) -> bool:
        """Whether the windows tile ``x`` exactly: no overlap, no padding, no rows or columns left out."""
        return (
            self.kernel == self.stride
            and self.padding == (0, 0)
            and len(x.shape) == 4
            and x.shape[-2] % self.kernel[0] == 0
            and x.shape[-1] % self.kernel[1] == 0
        )

    def share(self, a: torch.Tensor, relevance: torch.Tensor, eps: float) -> torch.Tensor:
        """The epsilon rule through the average of windows that tile the map, in one pass over ``a``:
        each input gets ``a * s / window`` of its window's ``s = R / stabilise(mean)``, which is what
        the gradient route computes with a zero-filled scatter and a second product."""
        dtype = relevance.dtype
        n, c, h, w = a.shape
        kh, kw = self.kernel
        # window sums, so that s / window = R / (sum + window * eps) for non-negative maps (after ReLUs)
        total = F.avg_pool2d(a, self.kernel, self.stride, divisor_override=1).to(dtype)
        if bool(sample_rows(total).min() >= 0):
            s = torch.div(relevance, total.add_(kh * kw * eps), out=total)
        else:
            s = relevance / stabilize(total / (kh * kw), eps) / (kh * kw)
        # s is first spread along the rows' inner axes (a materialised 1/kh of the map), so the product
        # broadcasts only over whole rows: long contiguous inner loops instead of one per window
        if not a.is_contiguous() and a.is_contiguous(memory_format=torch.channels_last):
            s = s.permute(0, 2, 3, 1)[:, :, :, None].expand(n, h // kh, w // kw, kw, c)
            rows = s.reshape(n, h // kh, 1, w * c)
            share = a.permute(0, 2, 3, 1).reshape(n, h // kh, kh, w * c).to(dtype) * rows
            return share.view(n, h, w, c).permute(0, 3, 1, 2)
        rows = s[..., None].expand(n, c, h // kh, w // kw, kw).reshape(n, c, h // kh, 1, w)
        return (a.contiguous().view(n, c, h // kh, kh, w).to(dtype) * rows).view(n, c, h, w)


def pool_average_of(module_or_kwargs: dict[str, Any]) -> WindowAverage:
    """Average pooling over the same windows as a max pool, for the seed's 'max as average' option."""
    kwargs = dict(module_or_kwargs)
    kernel = kwargs["kernel_size"]
    return WindowAverage(
        _pair(kernel),
        _pair(kwargs.get("stride") or kernel),
        _pair(kwargs.get("padding", 0)),
        bool(kwargs.get("ceil_mode", False)),
    )


def average_window(module: torch.nn.Module) -> Callable[[torch.Size], int]:
    """The largest window of an (adaptive) average pool module, for an input of a given shape."""
    if isinstance(module, torch.nn.AvgPool1d | torch.nn.AvgPool2d):
        kernel = module.kernel_size
        sizes = (
            (kernel,) * (1 if isinstance(module, torch.nn.AvgPool1d) else 2)
            if isinstance(kernel, int)
            else kernel
        )
        return lambda shape: math.prod(sizes)
    dims = 1 if isinstance(module, torch.nn.AdaptiveAvgPool1d) else 2
    wanted = module.output_size if isinstance(module.output_size, tuple) else (module.output_size,) * dims
    return lambda shape: math.prod(
        _adaptive_window(size, size if out is None else out) for size, out in zip(shape[-dims:], wanted)
    )


def _adaptive_window(size: int, out: int) -> int:
    """Adaptive pooling's largest window along one dim: output i averages [floor(i*size/out), ceil)."""
    return max(-((-(i + 1) * size) // out) - (i * size) // out for i in range(out))


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
