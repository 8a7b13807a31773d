"""Weighted layers as plain tensors: the forward map and its transpose, without autograd."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from . import winograd


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) for one spatial dimension."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


@dataclass
class WeightedLayer:
    """A conv, linear or per-channel affine map with its (possibly batch-norm-folded) parameters.

    ``pad_mode`` is ``"zeros"`` for ordinary convolutions; ``"same"`` reproduces timm's dynamic TF padding
    and any other value is a ``padding_mode`` of :class:`torch.nn.Conv2d` (reflect, replicate, circular).
    In those two cases the input is padded explicitly and the convolution runs without padding.
    """

    kind: Literal["conv", "linear", "diag"]
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    pad_mode: str = "zeros"
    _cache: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict, repr=False)
    _winograd_cache: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def explicit_pads(self, height: int, width: int) -> tuple[int, int, int, int] | None:
        """Pads (left, right, top, bottom) applied before the convolution, or None for built-in padding."""
        if self.kind != "conv" or self.pad_mode == "zeros":
            return None
        if self.pad_mode == "same":
            kh, kw = self.weight.shape[-2:]
            top, bottom = same_padding(height, kh, self.stride[0], self.dilation[0])
            left, right = same_padding(width, kw, self.stride[1], self.dilation[1])
            return left, right, top, bottom
        ph, pw = self.padding
        return pw, pw, ph, ph

    def apply(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        filters: torch.Tensor | None = None,
        *,
        relu: bool = False,
    ) -> torch.Tensor:
        """The layer's forward map with the given (modified) parameters; by Winograd when ``filters``
        (from :meth:`winograd_filters`) are given; rectified when ``relu``."""
        if filters is not None:
            return winograd.conv3x3(x, filters, bias, relu=relu)
        if relu and self.kind == "conv" and self.pad_mode == "zeros" and _fused_conv_relu(x, weight):
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, bias, self.padding, self.stride, self.dilation, self.groups, "relu", [None], ""
            )
        out = self._apply(x, weight, bias)
        return out.relu_() if relu else out  # a fresh tensor: rectified in place

    def _apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "linear":
            if x.dim() != 2:
                return F.linear(x, weight, bias)
            # weight @ x^T: BLAS packs the small operand, not the weight (VGG16's first dense layer at
            # batch 8 runs 1.3x faster); the result is a transposed view, which later ops accept
            if bias is None:
                return torch.mm(weight, x.T).T
            return torch.addmm(bias[:, None], weight, x.T).T
        if self.kind == "diag":
            shape = (1, -1) + (1,) * (x.dim() - 2)
            out = x * weight.reshape(shape)
            return out if bias is None else out + bias.reshape(shape)
        pads = self.explicit_pads(x.shape[-2], x.shape[-1])
        if pads is None:
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        mode = "constant" if self.pad_mode == "same" else self.pad_mode
        return F.conv2d(F.pad(x, pads, mode=mode), weight, bias, self.stride, 0, self.dilation, self.groups)

    def apply_joint(
        self, x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None, *, relu: bool = False
    ) -> list[torch.Tensor]:
        """Several maps of ``x`` at once from :meth:`joint_winograd_filters` (one input transform);
        ``relu`` rectifies the first."""
        out_channels = self.weight.shape[0]
        splits = (out_channels,) * (filters.shape[2] // out_channels)
        return winograd.conv3x3(x, filters, bias, splits=splits, relu=relu)

    def transpose(
        self,
        s: torch.Tensor,
        weight: torch.Tensor,
        input_shape: torch.Size,
        filters: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The adjoint of :meth:`apply` (without bias) applied to ``s``: a gradient without autograd.
        By Winograd when ``filters`` (from :meth:`winograd_filters` with ``transposed``) are given."""
        if filters is not None:
            return winograd.conv3x3(s, filters)
        if self.kind == "linear":
            return s @ weight
        if self.kind == "diag":
            return s * weight.reshape((1, -1) + (1,) * (s.dim() - 2))
        height, width = input_shape[-2:]
        pads = self.explicit_pads(height, width)
        padding = self.padding if pads is None else (0, 0)
        if pads is not None:
            height, width = height + pads[2] + pads[3], width + pads[0] + pads[1]
        kh, kw = weight.shape[-2:]
        out_pad = tuple(
            size - ((out - 1) * st - 2 * pad + dil * (k - 1) + 1)
            for size, out, st, pad, dil, k in zip(
                (height, width), s.shape[-2:], self.stride, padding, self.dilation, (kh, kw)
            )
        )
        grad = F.conv_transpose2d(s, weight, None, self.stride, padding, out_pad, self.groups, self.dilation)
        if pads is None:
            return grad
        if self.pad_mode == "same":
            left, right, top, bottom = pads
            return grad[..., top : grad.shape[-2] - bottom, left : grad.shape[-1] - right]
        return _pad_adjoint(grad, input_shape, pads, self.pad_mode)

    def params(
        self,
        weight_mod: Callable[[torch.Tensor], torch.Tensor],
        bias_mod: Callable[[torch.Tensor], torch.Tensor],
        dtype: torch.dtype,
        memory_format: torch.memory_format,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Modified (weight, bias) in the compute dtype, cached: weights do not change between batches."""
        key = (weight_mod, bias_mod, dtype, memory_format)
        if key not in self._cache:
            weight = weight_mod(self.weight).to(dtype)
            if self.kind == "conv":
                weight = weight.contiguous(memory_format=memory_format)
            bias = None if self.bias is None else bias_mod(self.bias).to(dtype)
            if bias is not None and not bias.any():
                bias = None
            self._cache[key] = (weight, bias)
        return self._cache[key]

    def winograd_eligible(self, size: tuple[int, int], maps: int = 1) -> bool:
        """A zero-padded 3x3, stride-1, ungrouped convolution wide enough for Winograd to pay off on
        maps of ``size`` (height, width), computing ``maps`` outputs from one input transform."""
        if self.kind != "conv" or self.weight.device.type != "cpu":
            return False
        out_channels, in_channels, kh, kw = self.weight.shape
        padded_by_one = self.pad_mode == "same" or (self.pad_mode == "zeros" and self.padding == (1, 1))
        return (
            (kh, kw) == (3, 3)
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and padded_by_one
            and winograd.worthwhile(in_channels, maps * out_channels, *size)
        )

    def _winograd_applies(self, dtype: torch.dtype, size: tuple[int, int], maps: int = 1) -> bool:
        """Whether Winograd filters are made at all: an eligible layer, computing in float32 or float64
        (lower precisions take the direct convolution)."""
        return dtype in (torch.float32, torch.float64) and self.winograd_eligible(size, maps)

    def winograd_filters(
        self,
        weight_mod: Callable[[torch.Tensor], torch.Tensor],
        dtype: torch.dtype,
        size: tuple[int, int],
        *,
        transposed: bool = False,
    ) -> torch.Tensor | None:
        """Transform-domain filters of the modified weight for :meth:`apply` (or, ``transposed``, for
        :meth:`transpose`) on maps of ``size``, cached; None where layer, size or dtype do not qualify."""
        if not self._winograd_applies(dtype, size):
            return None
        key = (weight_mod, dtype, transposed)
        if key not in self._winograd_cache:
            weight = weight_mod(self.weight).to(dtype)
            self._winograd_cache[key] = winograd.transform_filters(weight, transposed=transposed)
        return self._winograd_cache[key]

    def joint_winograd_filters(
        self,
        weight_mods: tuple[Callable[[torch.Tensor], torch.Tensor], ...],
        dtype: torch.dtype,
        size: tuple[int, int],
    ) -> torch.Tensor | None:
        """Transform-domain filters of several modified weights side by side, for one
        :func:`~.winograd.conv3x3` call with ``splits`` (a forward and a rule's modified forward of the
        same input), cached; None where layer, size or dtype do not qualify."""
        if not self._winograd_applies(dtype, size, maps=len(weight_mods)):
            return None
        key = (weight_mods, dtype, "joint")
        if key not in self._winograd_cache:
            parts = [winograd.transform_filters(mod(self.weight).to(dtype)) for mod in weight_mods]
            self._winograd_cache[key] = torch.cat(parts, dim=2)
        return self._winograd_cache[key]


def _fused_conv_relu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN can run the convolution and its ReLU as one kernel (CPU, float32: every x86 CPU
    oneDNN supports has float32 kernels, not all have bfloat16 ones), which saves a pass over the
    output; elsewhere the output is rectified in place."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == x.dtype
        and x.dim() == 4
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    )


def _pad_adjoint(grad: torch.Tensor, shape: torch.Size, pads: tuple[int, ...], mode: str) -> torch.Tensor:
    """Fold relevance on reflect/replicate/circular padding back onto the pixels it was copied from."""
    with torch.enable_grad():
        leaf = torch.zeros(shape, dtype=grad.dtype, device=grad.device, requires_grad=True)
        (result,) = torch.autograd.grad(F.pad(leaf, pads, mode=mode), leaf, grad)
    return result
