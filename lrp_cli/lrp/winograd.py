"""3x3 stride-1 convolutions by Winograd's minimal filtering F(4x4, 3x3), for the CPU.

A direct 3x3 convolution spends 9 multiply-adds per output and input channel. Winograd's algorithm
(Lavin & Gray, 2016) turns every 6x6 input tile and the 3x3 filter into a 6x6 transform domain, where a
4x4 output tile costs 36 products instead of 144: four times fewer multiply-adds in the channel GEMMs,
which dominate wide layers (256 channels and more), for a few cheap linear maps on the tiles. On two
AVX2 cores this runs a VGG16 conv4 layer 2.6 times faster than oneDNN's direct convolution; the price
is a float32 rounding error of about 1e-5 of the output's range instead of 2e-6.

Everything here is a plain matrix product, so it runs in float32 and float64 alike.
"""

from __future__ import annotations

from functools import lru_cache

import torch

TILE = 4  # outputs per tile side
SPAN = TILE + 2  # inputs per tile side for a 3x3 filter

# input transform B^T, filter transform G and output transform A^T of F(4, 3)
_INPUT = [
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
]
_FILTER = [
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
]
_OUTPUT = [
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 2, -2, 0],
    [0, 1, 1, 4, 4, 0],
    [0, 1, -1, 8, -8, 1],
]

# narrower layers spend more on the tile transforms than the cheaper GEMMs save, and maps smaller than
# two tiles waste most of each padded tile (measured on AVX2)
MIN_CHANNELS = 128
MIN_CHANNEL_PRODUCT = 128 * 256
MIN_SIZE = 2 * TILE


def worthwhile(in_channels: int, out_channels: int, height: int, width: int) -> bool:
    """Whether Winograd beats a direct convolution for these channel counts and this map size
    (``out_channels`` counts every map computed from the one input transform, see :func:`conv3x3`)."""
    return (
        min(in_channels, out_channels) >= MIN_CHANNELS
        and in_channels * out_channels >= MIN_CHANNEL_PRODUCT
        and min(height, width) >= MIN_SIZE
    )


@lru_cache(maxsize=8)
def _matrices(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Both 2-D tile transforms as single matrices acting on flattened tiles (Kronecker products)."""
    b_t = torch.tensor(_INPUT, dtype=torch.float64)
    a_t = torch.tensor(_OUTPUT, dtype=torch.float64)
    return (
        torch.kron(b_t, b_t).to(dtype=dtype, device=device),
        torch.kron(a_t, a_t).to(dtype=dtype, device=device),
    )


def transform_filters(weight: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """(out, in, 3, 3) filters as (36, in, out) transform-domain matrices.

    ``transposed`` gives the filters of the adjoint map (a stride-1, padding-1 transposed convolution
    equals a convolution with the filters' in/out swapped and flipped in space).
    """
    if transposed:
        weight = weight.transpose(0, 1).flip(2, 3)
    out_channels, in_channels = weight.shape[:2]
    g = torch.tensor(_FILTER, dtype=torch.float64, device=weight.device)
    # G w G^T for every filter as one (36 x 9) product, in float64 so only the final rounding remains
    tiles = torch.kron(g, g) @ weight.to(torch.float64).reshape(out_channels * in_channels, 9).T
    matrices = tiles.reshape(SPAN * SPAN, out_channels, in_channels).transpose(1, 2)
    return matrices.to(weight.dtype).contiguous()  # the GEMMs copy every batch of a strided operand


def _padded_channels_last(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``x`` zero-padded by one at the top and left and up to ``height`` x ``width``, as (N, H, W, C):
    channels last, so tiles are strided views. Only the border is zeroed, not the whole buffer first."""
    batch, channels, rows, cols = x.shape
    padded = x.new_empty((batch, height, width, channels))
    padded[:, 0].zero_()
    padded[:, rows + 1 :].zero_()
    padded[:, 1 : rows + 1, 0].zero_()
    padded[:, 1 : rows + 1, cols + 1 :].zero_()
    padded[:, 1 : rows + 1, 1 : cols + 1].copy_(x.permute(0, 2, 3, 1))
    return padded


# A^T's second column is all ones, so a constant at transform-domain position (1, 1) of every tile
# comes out as that constant at each of the tile's outputs: biases are added to one of the 36 slices.
_BIAS_SLOT = 1 * SPAN + 1


def conv3x3(
    x: torch.Tensor,
    filters: torch.Tensor,
    bias: torch.Tensor | None = None,
    splits: tuple[int, ...] | None = None,
    *,
    relu: bool = False,
) -> torch.Tensor | list[torch.Tensor]:
    """``F.conv2d(x, w, bias, padding=1)`` for ``filters = transform_filters(w)``; channels-last output.

    With ``splits`` (output channel counts adding up to the filters'), the output comes back as that
    many separate tensors: maps of one input with several filter sets (a layer's forward and a rule's
    modified forward) share its padding, tiling and input transform, and run as one wider product.
    ``relu`` rectifies the (first) output while it is copied out of the tiles.
    """
    batch, channels, height, width = x.shape
    out_channels = filters.shape[2]
    rows, cols = -(-height // TILE), -(-width // TILE)
    padded = _padded_channels_last(x, rows * TILE + 2, cols * TILE + 2)
    s_batch, s_row, s_col, _ = padded.stride()
    tiles = padded.as_strided(
        (SPAN, SPAN, batch, rows, cols, channels), (s_row, s_col, s_batch, TILE * s_row, TILE * s_col, 1)
    ).reshape(SPAN * SPAN, -1)
    del padded
    input_transform, output_transform = _matrices(x.dtype, x.device)
    transformed = torch.mm(input_transform, tiles).view(SPAN * SPAN, batch * rows * cols, channels)
    del tiles
    products = torch.bmm(transformed, filters)
    del transformed
    if bias is not None:
        products[_BIAS_SLOT].add_(bias)
    out = torch.mm(output_transform, products.view(SPAN * SPAN, -1)).view(TILE, TILE, batch, rows, cols, -1)
    del products
    parts, start = [], 0
    for size in splits or (out_channels,):
        tiled = out[..., start : start + size].permute(2, 3, 0, 4, 1, 5)
        if relu and not parts:
            part = torch.clamp(tiled, min=0, out=tiled.new_empty(tiled.shape))
        else:
            part = tiled.contiguous()
        part = part.view(batch, rows * TILE, cols * TILE, size)
        if rows * TILE != height or cols * TILE != width:
            part = part[:, :height, :width].contiguous()
        parts.append(part.permute(0, 3, 1, 2))
        start += size
    return parts if splits else parts[0]
