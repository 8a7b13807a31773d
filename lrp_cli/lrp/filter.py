"""Fischer's relevance filter: only the largest fraction of relevance per sample travels on."""

from __future__ import annotations

import torch


def kept_count(numel: int, fraction: float) -> int:
    """How many entries a sample keeps; at least one so a small layer never goes dark."""
    return max(1, int(fraction * numel))


def relevance_filter(relevance: torch.Tensor, fraction: float, renormalize: bool = False) -> torch.Tensor:
    """Zero all but the top ``fraction`` of each sample's relevance values.

    Entries tied with the k-th largest value are all kept, so the result does not depend on how a sort
    orders ties. The threshold comes from ``kthvalue`` (a selection, linear time) instead of a full sort
    or ``topk`` + scatter. With ``renormalize`` the kept relevance is rescaled so each sample's total
    is what it was before filtering (conservation across the filter).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"topk fraction must be in (0, 1], got {fraction}")
    if fraction >= 1.0:
        return relevance
    flat = relevance.reshape(relevance.shape[0], -1)
    numel = flat.shape[1]
    k = kept_count(numel, fraction)
    if k >= numel:
        return relevance
    # the k-th largest is the (numel - k + 1)-th smallest
    threshold = flat.kthvalue(numel - k + 1, dim=1, keepdim=True).values
    kept = torch.where(flat >= threshold, flat, torch.zeros((), dtype=flat.dtype, device=flat.device))
    if renormalize:
        before = flat.sum(dim=1, keepdim=True)
        after = kept.sum(dim=1, keepdim=True)
        kept = kept * torch.where(after != 0, before / torch.where(after != 0, after, 1.0), 0.0)
    return kept.reshape(relevance.shape)
