"""Fischer's relevance filter: only the largest fraction of relevance per sample travels on."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SAMPLE_SIZE = 65536  # entries per sample used to guess a safe lower bound for the threshold
MIN_STRIDE = 16  # smaller layers sample every 17th entry or so: bound and selection stay cheap
EXACT_BELOW = 65536  # small layers: plain selection is already cheap


def kept_count(numel: int, fraction: float) -> int:
    """How many entries a sample keeps; at least one so a small layer never goes dark."""
    return max(1, int(fraction * numel))


def kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the k-th largest value (shape (rows, 1)), exactly, without sorting whole rows.

    A strided sample gives a bound t. If at least k entries exceed t, the k-th largest is among them and
    one selection over those few candidates is exact; if fewer exceed t but at least k reach it, t itself
    is the answer (ties, e.g. the many zeros after earlier filtering). Otherwise the row falls back to a
    selection over all its entries.
    """
    rows, numel = flat.shape
    if numel <= EXACT_BELOW or 4 * k > numel:
        return flat.kthvalue(numel - k + 1, dim=1, keepdim=True).values
    sample = flat[:, :: _prime_at_least(max(MIN_STRIDE, numel // SAMPLE_SIZE))]
    size = sample.shape[1]
    expected = k / numel * size  # the k-th largest's rank in the sample, give or take sqrt(expected)
    rank = min(size, int(expected + 4.0 * math.sqrt(expected)) + 16)  # four sigmas: a few % over k
    bound = sample.topk(rank, dim=1, sorted=False).values.amin(dim=1, keepdim=True)  # rank-th largest
    values: list[torch.Tensor | None] = [None] * rows
    pools: dict[int, torch.Tensor] = {}
    for index, (row, limit) in enumerate(zip(flat, bound)):
        above = row > limit
        count = int(torch.count_nonzero(above))  # per row: far cheaper than a count along a dimension
        if count >= k:  # the k-th largest is strictly above the bound: select among those
            pools[index] = row[above]
        elif count + int(torch.count_nonzero(row == limit)) >= k:  # ties, e.g. the zeros of earlier filtering
            values[index] = limit[0]
        else:  # the sample overshot: exact selection over the whole row
            values[index] = row.kthvalue(numel - k + 1).values
    if pools:
        for index, value in zip(pools, _kth_largest_of_pools(list(pools.values()), k)):
            values[index] = value
    return torch.stack(values).reshape(rows, 1)  # type: ignore[arg-type]


def _kth_largest_of_pools(pools: list[torch.Tensor], k: int) -> torch.Tensor:
    """The k-th largest of each pool (each has at least k values) in one batched selection.

    Padding the pools to one width with -inf leaves every k-th largest in place and gives all rows the
    same rank, so one call selects for every row, the rows spread over the threads.
    """
    width = max(pool.numel() for pool in pools)
    padded = pools[0].new_full((len(pools), width), -math.inf)
    for row, pool in zip(padded, pools):
        row[: pool.numel()] = pool
    smallest = padded.topk(width - k + 1, dim=1, largest=False, sorted=False).values
    return smallest.amax(dim=1)


def _prime_at_least(n: int) -> int:
    """A prime sampling stride: a stride sharing a factor with the channel count (rows are often
    channels-last) would only ever sample some channels, and a biased bound means a slow fallback."""
    candidate = max(n, 2)
    while any(candidate % d == 0 for d in range(2, math.isqrt(candidate) + 1)):
        candidate += 1
    return candidate


def relevance_filter(
    relevance: torch.Tensor, fraction: float, renormalize: bool = False, in_place: bool = False
) -> torch.Tensor:
    """Zero all but the top ``fraction`` of each sample's relevance values.

    Entries tied with the k-th largest value are all kept, so the result does not depend on how a sort
    orders ties. With ``renormalize`` the kept relevance is rescaled so each sample's total is what it
    was before filtering (conservation across the filter). ``in_place`` overwrites the input.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"topk fraction must be in (0, 1], got {fraction}")
    if fraction >= 1.0:
        return relevance
    if not in_place:
        relevance = relevance.clone(memory_format=torch.preserve_format)
    flat = _rows(relevance)
    numel = flat.shape[1]
    k = kept_count(numel, fraction)
    if k >= numel:
        return relevance
    threshold = kth_largest(flat, k)
    before = flat.sum(dim=1, keepdim=True) if renormalize else None
    # x > nextafter(t, -inf) is x >= t: threshold_ zeroes the rest in one fused in-place pass per row
    below = torch.nextafter(threshold, torch.full_like(threshold, -float("inf"))).tolist()
    for row, (limit,) in enumerate(below):
        F.threshold_(flat[row], limit, 0.0)
    if before is not None:
        after = flat.sum(dim=1, keepdim=True)
        flat.mul_(torch.where(after != 0, before / torch.where(after != 0, after, 1.0), 0.0))
    return relevance if flat.data_ptr() == relevance.data_ptr() else flat.reshape(relevance.shape)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """One row per sample, as a view whenever the memory layout allows (channels-last included): the
    filter does not care about the order of entries within a sample."""
    if tensor.is_contiguous():
        return tensor.view(tensor.shape[0], -1)
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return tensor.permute(0, 2, 3, 1).reshape(tensor.shape[0], -1)
    return tensor.reshape(tensor.shape[0], -1)
