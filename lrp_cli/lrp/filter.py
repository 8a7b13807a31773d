"""Fischer's relevance filter: only the largest fraction of relevance per sample travels on.

One function, two ways to the same exact per-sample threshold, chosen by device:

- **batched** (GPUs and other accelerators): one top-k selection over all samples at once, one
  comparison and one masked fill. The number of kernels per layer does not depend on the batch size,
  and no value is ever read back to the host, so the filter never makes the host wait for the device.
- **sampled** (CPU): per sample, a strided sample bounds the k-th largest value from below, one read
  of the row gathers the few entries above the bound to select among, and one branch-free pass zeroes
  the rest; the samples are shared out over as many threads as torch uses. It runs on numpy views of
  the tensor: on the CPU numpy's compress, count and introselect are several times faster than torch's
  nonzero/index, bool reductions and topk on rows like these (torch's per-sample calls also pay a
  thread-pool barrier each), and reading a number back costs nothing. ``benchmarks/bench_filter.py``
  measures what the filter costs inside the engine.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

SAMPLE_SIZE = 16384  # entries per sample used to bound the threshold
MIN_STRIDE = 61  # sample at most every 61st entry: the sample touches a quarter of the row's cache lines
EXACT_BELOW = 16384  # shorter rows are sorted whole: cheap, and robust to ties
PARALLEL_FROM = 1 << 20  # smaller batches run on one thread: starting another costs more than it saves
BLOCK = 1 << 16  # entries per block of a pass: a block and its mask stay in a core's L2 cache
SHARED_DTYPES = (torch.float32, torch.float64)  # numpy views them in place; others are selected in float32


def kept_count(numel: int, fraction: float) -> int:
    """How many entries a sample keeps; at least one so a small layer never goes dark."""
    return max(1, int(fraction * numel))


def relevance_filter(
    relevance: torch.Tensor,
    fraction: float,
    renormalize: bool = False,
    in_place: bool = False,
    *,
    batched: bool | None = None,
) -> torch.Tensor:
    """Zero all but the top ``fraction`` of each sample's relevance values.

    Entries tied with the k-th largest value are all kept, so the result does not depend on how a sort
    orders ties. With ``renormalize`` the kept relevance is rescaled so each sample's total is what it
    was before filtering (conservation across the filter). ``in_place`` overwrites the input.
    ``batched`` forces the algorithm (default: batched off the CPU, sampled on it); both give the same
    result, which is how the accelerator path is tested on a CPU.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"topk fraction must be in (0, 1], got {fraction}")
    if fraction >= 1.0:
        return relevance
    if not in_place:
        relevance = relevance.clone(memory_format=torch.preserve_format)
    flat = _rows(relevance)
    k = kept_count(flat.shape[1], fraction)
    if k >= flat.shape[1]:
        return relevance
    before = flat.sum(dim=1, keepdim=True) if renormalize else None
    if batched if batched is not None else flat.device.type != "cpu":
        _filter_batched(flat, k)
    else:
        _filter_sampled(flat, k)
    if before is not None:
        after = flat.sum(dim=1, keepdim=True)
        flat.mul_(torch.where(after != 0, before / torch.where(after != 0, after, 1.0), 0.0))
    return relevance if flat.data_ptr() == relevance.data_ptr() else flat.reshape(relevance.shape)


def _filter_batched(flat: torch.Tensor, k: int) -> None:
    """Every row at once, in a fixed number of kernels and without reading anything back."""
    numel = flat.shape[1]
    if 2 * k <= numel:
        threshold = flat.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    else:  # the k-th largest is the largest of the numel - k + 1 smallest: the smaller selection
        smallest = flat.topk(numel - k + 1, dim=1, largest=False, sorted=False).values
        threshold = smallest.amax(dim=1, keepdim=True)
    flat.masked_fill_(flat < threshold, 0)


def _filter_sampled(flat: torch.Tensor, k: int) -> None:
    """Row by row on numpy views, the rows shared out over as many threads as torch uses (numpy
    releases the interpreter lock while it works)."""
    rows = list(flat.detach())
    workers = min(len(rows), torch.get_num_threads(), 1 + flat.numel() // PARALLEL_FROM)
    if workers == 1:
        _filter_rows(rows, k)
        return
    with ThreadPoolExecutor(workers - 1) as pool:
        others = [pool.submit(_filter_rows, rows[i::workers], k) for i in range(1, workers)]
        _filter_rows(rows[::workers], k)
        for other in others:
            other.result()


def _filter_rows(rows: list[torch.Tensor], k: int) -> None:
    """Low-precision rows are selected among in float32 (exactly: every value converts back
    unchanged) and zeroed in their own dtype."""
    for row in rows:
        shared = row.dtype in SHARED_DTYPES
        values = row.numpy() if shared else row.float().numpy()
        kth = _kth_largest(values, k)
        if kth is None:
            continue
        if shared:
            _zero_below(values, kth)
        else:
            row.masked_fill_(row < float(kth), 0)


def _kth_largest(row: np.ndarray, k: int) -> np.floating | None:
    """The k-th largest entry of a row, exactly; None when no entry lies below it (nothing to zero).

    A strided sample gives a bound, four standard deviations below the k-th largest value's expected
    place in it. If at least k entries reach the bound, the k-th largest is among those few (a few %
    more than k) and one selection over them is exact; otherwise the sample overshot and the whole row
    is selected over. A bound that repeats in the sample may be a value shared by most of the row
    (the zeros after ReLUs and earlier filtering): then only the entries above it are gathered and
    those equal to it counted; if fewer than k lie above but at least k reach it, it is the answer.
    """
    numel = row.size
    if numel <= EXACT_BELOW:
        return np.sort(row)[numel - k]  # sorting, unlike introselect, is not slowed down by ties
    sample = np.sort(row[:: _prime_at_least(max(MIN_STRIDE, numel // SAMPLE_SIZE))])
    size = sample.size
    expected = k / numel * size  # the k-th largest's rank in the sample, give or take sqrt(expected)
    rank = min(size, int(expected + 4.0 * math.sqrt(expected)) + 16)
    bound = sample[size - rank]  # the sample's rank-th largest
    tied = np.count_nonzero(sample == bound) > 1
    above, ties = _gather(row, bound, tied)
    if above.size >= k:
        return np.partition(above, above.size - k)[above.size - k]
    if above.size + ties >= k:
        return bound if above.size + ties < numel else None
    return np.sort(row)[numel - k]


def _gather(row: np.ndarray, bound: np.floating, tied: bool) -> tuple[np.ndarray, int]:
    """The entries that reach ``bound`` and 0, or with ``tied`` those above it and how many equal it.
    The row is read from memory once: block by block, each block compared again while it is still in
    the core's cache."""
    parts = []
    ties = 0
    mask = np.empty(min(BLOCK, row.size), dtype=bool)
    compare = np.greater if tied else np.greater_equal
    for start in range(0, row.size, BLOCK):
        block = row[start : start + BLOCK]
        hits = mask[: block.size]
        compare(block, bound, out=hits)
        parts.append(np.compress(hits, block))
        if tied:
            ties += int(np.count_nonzero(np.equal(block, bound, out=hits)))
    return np.concatenate(parts), ties


def _zero_below(row: np.ndarray, kth: np.floating) -> None:
    """Zero the entries below ``kth``, block by block and without branches: the bit patterns are
    multiplied by 0 or 1, so what goes becomes +0.0 exactly, whatever it was."""
    keep = np.empty(min(BLOCK, row.size), dtype=bool)
    bits = row.view(np.int32 if row.itemsize == 4 else np.int64)
    for start in range(0, row.size, BLOCK):
        block = bits[start : start + BLOCK]
        np.greater_equal(row[start : start + BLOCK], kth, out=keep[: block.size])
        np.multiply(block, keep[: block.size], out=block)


def _prime_at_least(n: int) -> int:
    """A prime sampling stride: a stride sharing a factor with the channel count (rows are often
    channels-last) would only ever sample some channels, and a biased bound means a slow fallback."""
    candidate = max(n, 2)
    while any(candidate % d == 0 for d in range(2, math.isqrt(candidate) + 1)):
        candidate += 1
    return candidate


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """One row per sample, as a view whenever the memory layout allows (channels-last included): the
    filter does not care about the order of entries within a sample."""
    if tensor.is_contiguous():
        return tensor.view(tensor.shape[0], -1)
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return tensor.permute(0, 2, 3, 1).reshape(tensor.shape[0], -1)
    return tensor.reshape(tensor.shape[0], -1)
