"""Fischer's relevance filter: only the largest fraction of relevance per sample travels on.

One function, two ways to the same exact per-sample threshold, chosen by device:

- **batched** (GPUs and other accelerators): one top-k selection over all samples at once, one
  comparison and one masked fill. The number of kernels per layer does not depend on the batch size,
  and no value is ever read back to the host, so the filter never makes the host wait for the device.
- **sampled** (CPU): a strided sample of every row bounds its k-th largest value from below, one read
  of the row settles it (the few entries above the bound are gathered and selected among, or, when
  the bound is a value most of the row shares, such as the zeros after ReLUs, they are only counted),
  and one ``torch.threshold_`` per row zeroes the rest. The selection runs on numpy views: on the CPU
  numpy's compare, compress, count and introselect are several times faster than torch's
  nonzero/index, bool reductions and topk on rows like these, and reading a number back costs
  nothing. The zeroing is torch's: one vectorised pass on all of torch's threads, where numpy would
  take two. ``benchmarks/bench_filter.py`` measures what the filter costs inside the engine.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

SAMPLE_SIZE = 16384  # entries per sample used to bound the threshold
MIN_STRIDE = 61  # sample at most every 61st entry: the sample touches a quarter of the row's cache lines
EXACT_BELOW = 16384  # shorter rows are sorted whole: cheap, and robust to ties
PARALLEL_FROM = 1 << 22  # smaller layers are selected on one thread: a second one costs more than it saves
BLOCK = 1 << 17  # entries per block of a pass: a block and its mask stay in a core's L2 cache


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
    flat = sample_rows(relevance)
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
    """Thresholds selected on numpy views of the rows (low precision in a float32 copy: every value
    converts back unchanged), then zeroed below in the rows' own dtype."""
    rows = flat.detach()
    values = rows.numpy() if rows.dtype in (torch.float32, torch.float64) else rows.float().numpy()
    numel = values.shape[1]
    if numel <= EXACT_BELOW:  # sorting, unlike introselect, is not slowed down by ties
        kths: list[np.floating | None] = list(np.sort(values, axis=1)[:, numel - k])
    else:
        kths = _select(values, k)
    _zero_below(rows, kths)


def _select(values: np.ndarray, k: int) -> list[np.floating | None]:
    """Every row's k-th largest value, from bounds that one sample of all rows gives at once. Rows are
    handed out one at a time to as many threads as torch uses (numpy releases the interpreter lock
    while it works), so a thread that starts late takes fewer."""
    numel = values.shape[1]
    stride = _prime_at_least(max(MIN_STRIDE, numel // SAMPLE_SIZE))
    sample = np.sort(torch.from_numpy(values[:, ::stride]).contiguous().numpy(), axis=1)
    size = sample.shape[1]
    expected = k / numel * size  # the k-th largest's rank in the sample, give or take sqrt(expected)
    rank = min(size, int(expected + 4.0 * math.sqrt(expected)) + 16)
    bounds = sample[:, size - rank]  # each sample's rank-th largest
    tied = np.count_nonzero(sample == bounds[:, None], axis=1) > 1
    kths: list[np.floating | None] = [None] * len(values)
    order = iter(range(len(values)))

    def work() -> None:
        for i in order:
            kths[i] = _kth_largest(values[i], k, bounds[i], bool(tied[i]))

    workers = min(len(values), torch.get_num_threads()) if values.size >= PARALLEL_FROM else 1
    if workers == 1:
        work()
        return kths
    with ThreadPoolExecutor(workers - 1) as pool:
        others = [pool.submit(work) for _ in range(workers - 1)]
        work()
        for other in others:
            other.result()
    return kths


def _kth_largest(row: np.ndarray, k: int, bound: np.floating, tied: bool) -> np.floating | None:
    """The k-th largest entry of a row, exactly; None when no entry lies below it (nothing to zero).

    ``bound`` lies four standard deviations below the k-th largest value's expected place in the
    row's sample. If at least k entries reach it, the k-th largest is among those few (a few % more
    than k) and one selection over them is exact; otherwise the sample overshot and the whole row is
    sorted. A bound that repeats in the sample (``tied``) may be a value most of the row shares (the
    zeros after ReLUs and earlier filtering): the row is first only counted, and if fewer than k
    entries lie above the bound but at least k reach it, it is the answer, with nothing gathered.
    """
    numel = row.size
    if tied:
        above, below = _count(row, bound)
        if above < k:
            if numel - below >= k:
                return bound if below else None
            return np.sort(row)[numel - k]
        values = _gather(row, bound, np.greater)
    else:
        values = _gather(row, bound, np.greater_equal)
        if values.size < k:
            return np.sort(row)[numel - k]
    return np.partition(values, values.size - k)[values.size - k]


def _count(row: np.ndarray, bound: np.floating) -> tuple[int, int]:
    """How many entries lie above ``bound`` and how many below it, in one read of the row: block by
    block, each block compared again while it is still in the core's cache (and only counted below
    when its minimum is: mostly nothing lies below a tied bound)."""
    above = below = 0
    mask = np.empty(min(BLOCK, row.size), dtype=bool)
    for start in range(0, row.size, BLOCK):
        block = row[start : start + BLOCK]
        hits = mask[: block.size]
        above += int(np.count_nonzero(np.greater(block, bound, out=hits)))
        if block.min() < bound:
            below += int(np.count_nonzero(np.less(block, bound, out=hits)))
    return above, below


def _gather(row: np.ndarray, bound: np.floating, compare: np.ufunc) -> np.ndarray:
    """The entries for which ``compare(entry, bound)`` holds, in one read of the row, block by block.
    numpy's compress costs per entry it keeps, wherever they lie: the entries are first taken in
    groups of eight neighbours (one uint64 of the mask) with at least one among them, then sifted."""
    parts = []
    mask = np.empty(min(BLOCK, row.size), dtype=bool)
    grouped = row.flags.c_contiguous  # a strided row cannot be viewed as groups
    for start in range(0, row.size, BLOCK):
        block = row[start : start + BLOCK]
        hits = mask[: block.size]
        compare(block, bound, out=hits)
        if grouped and block.size % 8 == 0:
            groups = np.compress(hits.view(np.uint64) != 0, block.view(f"V{8 * block.itemsize}"))
            candidates = groups.view(block.dtype)
            parts.append(np.compress(compare(candidates, bound), candidates))
        else:
            parts.append(np.compress(hits, block))
    return np.concatenate(parts)


def _zero_below(rows: torch.Tensor, kths: list[np.floating | None]) -> None:
    """Zero the entries below each row's k-th largest value, in place and in the rows' own dtype.
    ``threshold_`` zeroes what is at most its threshold (as +0.0, whatever it was): given the largest
    value of the dtype below the k-th largest, that is exactly what lies below it. A k-th largest of
    -inf has nothing below it."""
    todo = [i for i, kth in enumerate(kths) if kth is not None and kth > -math.inf]
    if not todo:
        return
    if rows.dtype in (torch.float32, torch.float64):  # the k-th largest values are of the rows' dtype
        below = np.nextafter(np.array([kths[i] for i in todo]), -np.inf).tolist()
    else:  # selected in float32, stepped down in the rows' dtype (numpy has no bfloat16)
        kth_t = torch.tensor([float(kths[i]) for i in todo], dtype=rows.dtype)
        below = torch.nextafter(kth_t, torch.full_like(kth_t, -math.inf)).tolist()
    for i, threshold in zip(todo, below):
        torch.threshold_(rows[i], threshold, 0.0)


def _prime_at_least(n: int) -> int:
    """A prime sampling stride: a stride sharing a factor with the channel count (rows are often
    channels-last) would only ever sample some channels, and a biased bound means a slow fallback."""
    candidate = max(n, 2)
    while any(candidate % d == 0 for d in range(2, math.isqrt(candidate) + 1)):
        candidate += 1
    return candidate


def sample_rows(tensor: torch.Tensor) -> torch.Tensor:
    """One row per sample, as a view whenever the memory layout allows (channels-last included), for
    work that does not care about the order of entries within a sample (the filter, reductions: over
    a channels-last tensor's logical order they are many times slower than over its memory)."""
    if tensor.is_contiguous():
        return tensor.view(tensor.shape[0], -1)
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return tensor.permute(0, 2, 3, 1).reshape(tensor.shape[0], -1)
    return tensor.reshape(tensor.shape[0], -1)
