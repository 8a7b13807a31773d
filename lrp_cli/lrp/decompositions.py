"""Fused attention written out as the primitive steps its LRP rules need, for use while tracing.

Each function here receives fx proxies and emits ordinary graph nodes (linear maps, matrix products,
softmax, reshapes), so the engine explains the inner products of an attention like any others.
Shape-dependent decisions (padding, window shifts) become small helper nodes evaluated on every forward
pass, so the graph stays valid for any input size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .ops import UnsupportedOperationError


def _label(proxy: fx.Proxy, path: str) -> fx.Proxy:
    """Name the layer a functional linear map stands for (used in rules by name, traces and `doctor`)."""
    proxy.node.meta["lrp_path"] = path
    return proxy


def apply_attention_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA's mask convention: a boolean mask keeps True positions, a float mask is added."""
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask


def apply_causal_mask(scores: torch.Tensor) -> torch.Tensor:
    """Hide keys after each query (``is_causal``), aligned to the top left as SDPA does."""
    rows, cols = scores.shape[-2:]
    keep = torch.ones(rows, cols, dtype=torch.bool, device=scores.device).tril()
    return scores.masked_fill(~keep, float("-inf"))


MASKS: tuple[Callable[..., Any], ...] = (apply_attention_mask, apply_causal_mask)


def scaled_dot_product_attention(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Any:
    """softmax(q k^T * scale + mask) v, step by step (dropout is off in eval mode)."""
    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    tracer = query.tracer
    scores = query @ key.transpose(-2, -1)
    scores = scores * (query.size(-1) ** -0.5 if scale is None else scale)
    if is_causal:
        scores = tracer.create_proxy("call_function", apply_causal_mask, (scores,), {})
    if attn_mask is not None:
        scores = tracer.create_proxy("call_function", apply_attention_mask, (scores, attn_mask), {})
    return scores.softmax(dim=-1) @ value


def multi_head_mask(attn_mask: Any, key_padding_mask: Any, heads: int) -> torch.Tensor | None:
    """nn.MultiheadAttention's masks (True = masked) as one additive float mask for (N, heads, L, S)."""
    total = None
    for mask in (attn_mask, key_padding_mask):
        if mask is None:
            continue
        additive = (
            torch.zeros(mask.shape, device=mask.device).masked_fill(mask, float("-inf"))
            if mask.dtype == torch.bool
            else mask.float()
        )
        if mask is key_padding_mask:
            additive = additive[:, None, None, :]
        elif additive.dim() == 3:
            additive = additive.unflatten(0, (-1, heads))
        total = additive if total is None else total + additive
    return total


def multihead_attention(
    tracer: fx.Tracer,
    module: nn.MultiheadAttention,
    path: str,
    query: Any,
    key: Any,
    value: Any,
    key_padding_mask: Any = None,
    need_weights: bool = True,
    attn_mask: Any = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Any, Any]:
    """nn.MultiheadAttention in eval mode as projections, per-head attention and an output projection."""
    if module.bias_k is not None or module.add_zero_attn:
        raise UnsupportedOperationError(
            f"nn.MultiheadAttention at {path!r} uses add_bias_kv/add_zero_attn, which have no LRP rule here"
        )

    def param(name: str) -> Any:
        return tracer.create_proxy("get_attr", f"{path}.{name}" if path else name, (), {})

    embed, heads = module.embed_dim, module.num_heads
    same = query is key and key is value
    if not module.batch_first:
        query = query.transpose(0, 1)
        key = query if same else key.transpose(0, 1)
        value = query if same else value.transpose(0, 1)
    if module._qkv_same_embed_dim:
        weight = param("in_proj_weight")
        weights = [weight[i * embed : (i + 1) * embed] for i in range(3)]
    else:
        weights = [param(f"{name}_proj_weight") for name in ("q", "k", "v")]
    biases: list[Any] = [None] * 3
    if module.in_proj_bias is not None:
        bias = param("in_proj_bias")
        biases = [bias[i * embed : (i + 1) * embed] for i in range(3)]
    q, k, v = (
        _label(F.linear(x, w, b), f"{path}.{name}")
        for x, w, b, name in zip((query, key, value), weights, biases, ("q", "k", "v"))
    )
    q, k, v = (t.unflatten(-1, (heads, embed // heads)).transpose(1, 2) for t in (q, k, v))
    mask = None
    if attn_mask is not None or key_padding_mask is not None:
        mask = tracer.create_proxy("call_function", multi_head_mask, (attn_mask, key_padding_mask, heads), {})
    scores = (q @ k.transpose(-2, -1)) * (embed // heads) ** -0.5
    if is_causal and attn_mask is None:
        scores = tracer.create_proxy("call_function", apply_causal_mask, (scores,), {})
    if mask is not None:
        scores = tracer.create_proxy("call_function", apply_attention_mask, (scores, mask), {})
    attention = scores.softmax(dim=-1)
    out = (attention @ v).transpose(1, 2).flatten(-2)
    out = _label(F.linear(out, param("out_proj.weight"), param("out_proj.bias")), f"{path}.out_proj")
    if not module.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, attention.mean(dim=1) if average_attn_weights else attention


# --- torchvision's Swin Transformer ---------------------------------------------------------------


def window_plan(height: int, width: int, window: list[int], shift: list[int]) -> tuple[int, int, int, int]:
    """Padding to whole windows (bottom, right) and the cyclic shift actually used (none where one
    window covers the padded map), as torchvision's Swin decides it."""
    pad_bottom = (window[0] - height % window[0]) % window[0]
    pad_right = (window[1] - width % window[1]) % window[1]
    shift_h = 0 if window[0] >= height + pad_bottom else shift[0]
    shift_w = 0 if window[1] >= width + pad_right else shift[1]
    return pad_bottom, pad_right, shift_h, shift_w


def shift_mask(
    height: int, width: int, window: list[int], shift_h: int, shift_w: int, device: torch.device
) -> torch.Tensor:
    """Swin's additive mask (0 or -100) keeping shifted windows from attending across the wrap-around,
    shaped (1, windows, 1, tokens, tokens); all zeros without a shift."""
    mask = torch.zeros((height, width), device=device)
    if shift_h or shift_w:
        spans_h = ((0, -window[0]), (-window[0], -shift_h), (-shift_h, None)) if shift_h else ((0, None),)
        spans_w = ((0, -window[1]), (-window[1], -shift_w), (-shift_w, None)) if shift_w else ((0, None),)
        for region, (h, w) in enumerate((h, w) for h in spans_h for w in spans_w):
            mask[h[0] : h[1], w[0] : w[1]] = region
    tokens = window[0] * window[1]
    mask = mask.view(height // window[0], window[0], width // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(-1, tokens)
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    mask = torch.zeros_like(mask).masked_fill(mask != 0, -100.0)
    return mask[None, :, None]


def without_key_bias(qkv_bias: torch.Tensor) -> torch.Tensor:
    """Swin V2 has no bias on the keys: the middle third of the fused q/k/v bias is zero."""
    length = qkv_bias.numel() // 3
    return torch.cat(
        [qkv_bias[:length], torch.zeros_like(qkv_bias[length : 2 * length]), qkv_bias[2 * length :]]
    )


def swin_window_attention(
    input: Any,
    qkv_weight: Any,
    proj_weight: Any,
    relative_position_bias: Any,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: Any = None,
    proj_bias: Any = None,
    logit_scale: Any = None,
    training: bool = True,
) -> Any:
    """torchvision's ``shifted_window_attention`` (Swin V1 and V2) with its shape decisions as nodes."""
    tracer = input.tracer
    call = tracer.create_proxy
    batch, height, width, channels = (input.size(i) for i in range(4))
    plan = call("call_function", window_plan, (height, width, list(window_size), list(shift_size)), {})
    pad_bottom, pad_right, shift_h, shift_w = (plan[i] for i in range(4))
    x = F.pad(input, (0, 0, 0, pad_right, 0, pad_bottom))
    padded_h, padded_w = height + pad_bottom, width + pad_right
    x = torch.roll(x, shifts=(-shift_h, -shift_w), dims=(1, 2))
    rows, cols = padded_h // window_size[0], padded_w // window_size[1]
    tokens = window_size[0] * window_size[1]
    x = x.view(batch, rows, window_size[0], cols, window_size[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, tokens, channels)
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = call("call_function", without_key_bias, (qkv_bias,), {})
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), tokens, 3, num_heads, channels // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        scores = scores * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        scores = (q * (channels // num_heads) ** -0.5) @ k.transpose(-2, -1)
    scores = scores + relative_position_bias
    mask = call(
        "call_function",
        shift_mask,
        (padded_h, padded_w, list(window_size), shift_h, shift_w, input.device),
        {},
    )
    scores = scores.view(batch, rows * cols, num_heads, tokens, tokens) + mask
    scores = scores.view(-1, num_heads, tokens, tokens)
    x = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(-1, tokens, channels)
    x = F.linear(x, proj_weight, proj_bias)
    x = x.view(batch, rows, cols, window_size[0], window_size[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, channels)
    x = torch.roll(x, shifts=(shift_h, shift_w), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


def swin_patch_merging_pad(x: Any) -> Any:
    """torchvision's ``_patch_merging_pad``: pad to even height and width, gather the four 2x2 phases."""
    height, width = x.size(-3), x.size(-2)
    x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
    parts = [x[..., i::2, j::2, :] for i, j in ((0, 0), (1, 0), (0, 1), (1, 1))]
    return torch.cat(parts, -1)


def _torchvision_swin() -> dict[Callable[..., Any], Callable[..., Any]]:
    try:
        from torchvision.models import swin_transformer as swin
    except ImportError:
        return {}
    return {
        swin.shifted_window_attention: swin_window_attention,
        swin._patch_merging_pad: swin_patch_merging_pad,
    }


FUNCTION_DECOMPOSITIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    F.scaled_dot_product_attention: scaled_dot_product_attention,
    **_torchvision_swin(),
}
"""Functions replaced by their primitive steps while tracing."""

MODULE_DECOMPOSITIONS: dict[type[nn.Module], Callable[..., Any]] = {
    nn.MultiheadAttention: multihead_attention,
}
"""Modules replaced by their primitive steps while tracing (receive tracer, module, path, args)."""
