"""Fischer's relevance filter: only the largest fraction of relevance per sample travels on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SAMPLE_SIZE = 16384  # entries per sample used to guess a safe lower bound for the threshold
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
    sample = flat[:, :: numel // SAMPLE_SIZE]
    size = sample.shape[1]
    rank = min(size, int(2.0 * k / numel * size) + 64)  # generous: aim at about twice k candidates
    bound = sample.kthvalue(size - rank + 1, dim=1, keepdim=True).values
    values = []
    for row in range(rows):
        pool = flat[row][flat[row] > bound[row]]
        if pool.numel() >= k:  # the k-th largest is strictly above the bound: select among those
            values.append(pool.kthvalue(pool.numel() - k + 1).values)
        elif int(torch.count_nonzero(flat[row] >= bound[row])) >= k:  # fewer above, enough at it: ties
            values.append(bound[row, 0])
        else:  # the sample overshot: exact selection over the whole row
            values.append(flat[row].kthvalue(numel - k + 1).values)
    return torch.stack(values).reshape(rows, 1)


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
