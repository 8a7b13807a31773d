"""Fischer's relevance filter: only the largest fraction of relevance per sample travels on.

One function, two ways to the same exact per-sample threshold, chosen by device:

- **batched** (GPUs and other accelerators): one top-k selection over all samples at once, one
  comparison and one masked fill. The number of kernels per layer does not depend on the batch size,
  and no value is ever read back to the host, so the filter never makes the host wait for the device.
- **sampled** (CPU): a strided sample of every row bounds its k-th largest value from below, one read
  of the row settles it (the few entries above the bound are gathered and selected among, or, when
  the bound is a value most of the row shares, such as the zeros after ReLUs, they may only be
  counted), and ``torch.threshold_`` zeroes the rest, skipping stretches of the row that are all
  zeros. The selection runs on numpy views: on the CPU numpy's compare, compress, count and
  introselect are several times faster than torch's nonzero/index, bool reductions and topk on rows
  like these, and reading a number back costs nothing. The zeroing is torch's: one vectorised pass
  on all of torch's threads, where numpy would take two.

The sampled path also takes and gives each sample's :data:`Support`, so the engine can skip samples
the filter provably cannot change. ``benchmarks/bench_filter.py`` measures what the filter costs
inside the engine.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

SAMPLE_SIZE = 16384  # entries per sample used to bound the threshold
MIN_STRIDE = 61  # sample at most every 61st entry: the sample touches a quarter of the row's cache lines
EXACT_BELOW = 16384  # shorter rows are sorted whole: cheap, and robust to ties
BLOCK = 1 << 17  # entries per block of a pass: a block and its mask stay in a core's L2 cache


def kept_count(numel: int, fraction: float) -> int:
    """How many entries a sample keeps; at least one so a small layer never goes dark."""
    return max(1, int(fraction * numel))


Support = tuple[int | None, ...]
"""Per sample, what is known of a relevance map: no entry is negative and at most this many are
nonzero (None: not known). A sample with at most k such entries is one the filter cannot change."""


def measured_support(relevance: torch.Tensor) -> Support:
    """Each sample's :data:`Support`, counted (a read of the tensor: for small ones, such as a start)."""
    rows = sample_rows(relevance)
    negative = (rows < 0).any(dim=1).tolist()
    return tuple(None if neg else count for neg, count in zip(negative, rows.count_nonzero(dim=1).tolist()))


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
    return filter_with_support(relevance, fraction, renormalize, in_place, batched=batched)[0]


def filter_with_support(
    relevance: torch.Tensor,
    fraction: float,
    renormalize: bool = False,
    in_place: bool = False,
    *,
    batched: bool | None = None,
    support: Support | None = None,
) -> tuple[torch.Tensor, Support | None]:
    """:func:`relevance_filter`, told and telling each sample's :data:`Support`.

    Samples whose ``support`` is at most k are left as they are without being read: the filter would
    change nothing in them. The result's support comes back (None where not known) so the engine can
    carry it through ops that move relevance without spreading it far (a ReLU, a max pool): in VGG16
    nearly half the entries to filter lie in maps that a pool has just filled from a filtered map a
    quarter their size. The batched path reads nothing back, so it neither uses nor reports support.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"topk fraction must be in (0, 1], got {fraction}")
    if fraction >= 1.0:
        return relevance, support
    numel = relevance[0].numel()
    k = kept_count(numel, fraction)
    if k >= numel:
        return relevance, support
    sampled = not (batched if batched is not None else relevance.device.type != "cpu")
    if sampled and support is not None and all(s is not None and s <= k for s in support):
        return relevance, support
    if not in_place:
        relevance = relevance.clone(memory_format=torch.preserve_format)
    flat = sample_rows(relevance)
    before = flat.sum(dim=1, keepdim=True) if renormalize else None
    result: Support | None = None
    if sampled:
        result = _filter_sampled(flat, k, support)
    else:
        _filter_batched(flat, k)
    if before is not None:
        after = flat.sum(dim=1, keepdim=True)
        flat.mul_(torch.where(after != 0, before / torch.where(after != 0, after, 1.0), 0.0))
        if result is not None:  # a negative total turns the kept entries negative
            result = tuple(s if total >= 0 else None for s, total in zip(result, before.flatten().tolist()))
    return (relevance if flat.data_ptr() == relevance.data_ptr() else flat.reshape(relevance.shape)), result


def _filter_batched(flat: torch.Tensor, k: int) -> None:
    """Every row at once, in a fixed number of kernels and without reading anything back."""
    numel = flat.shape[1]
    if 2 * k <= numel:
        threshold = flat.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    else:  # the k-th largest is the largest of the numel - k + 1 smallest: the smaller selection
        smallest = flat.topk(numel - k + 1, dim=1, largest=False, sorted=False).values
        threshold = smallest.amax(dim=1, keepdim=True)
    flat.masked_fill_(flat < threshold, 0)


def _filter_sampled(flat: torch.Tensor, k: int, support: Support | None) -> Support:
    """Thresholds selected on numpy views of the rows (low precision in a float32 copy: every value
    converts back unchanged), then zeroed below in the rows' own dtype. Rows whose support is at
    most k are not touched."""
    rows = flat.detach()
    known = support if support is not None else (None,) * len(rows)
    todo = [i for i, s in enumerate(known) if s is None or s > k]  # not empty: see filter_with_support
    exact = rows.dtype in (torch.float32, torch.float64)
    if exact:
        values = rows.numpy()
        row_values = [values[i] for i in todo]
    else:
        row_values = [rows[i].float().numpy() for i in todo]
    numel = rows.shape[1]
    if numel <= EXACT_BELOW:  # sorting, unlike introselect, is not slowed down by ties
        stacked = np.stack(row_values)
        stacked.sort(axis=1)
        found = [_kth_of_partitioned(row, k) for row in stacked]
    else:
        # one strided copy of all rows: torch's, which reads the rows on all of its threads
        strided = rows[:, :: _prime_at_least(max(MIN_STRIDE, numel // SAMPLE_SIZE))]
        sample = strided.contiguous() if len(todo) == len(rows) else strided[todo]
        found = _select(row_values, k, (sample if exact else sample.float()).numpy())
    _zero_below(rows, dict(zip(todo, found)))
    result = list(known)
    for i, row_found in zip(todo, found):
        result[i] = row_found.nonzeros
    return tuple(result)


class Found(NamedTuple):
    """What the selection found in one row."""

    kth: np.floating | None  # the k-th largest value; None when no entry lies below it
    nonzeros: int | None  # the row's support once filtered
    spans: list[tuple[int, int]] | None = None  # where entries below kth may lie (None: anywhere)


def _select(rows: list[np.ndarray], k: int, sample: np.ndarray) -> list[Found]:
    """Every row's k-th largest value, from bounds that the rows' ``sample`` (one row each) gives.

    One thread: numpy releases the interpreter lock while it works, but a second thread taking rows
    gains nothing here, as each waits for the lock between the many short calls per block.
    """
    numel = rows[0].size
    sample = np.sort(sample, axis=1)
    size = sample.shape[1]
    expected = k / numel * size  # the k-th largest's rank in the sample, give or take sqrt(expected)
    rank = min(size, int(expected + 4.0 * math.sqrt(expected)) + 16)
    bounds = sample[:, size - rank]  # each sample's rank-th largest
    tied = np.count_nonzero(sample == bounds[:, None], axis=1) > 1
    # above a tied bound, are there likely k entries to gather, or likely fewer, so it is the answer?
    gather = np.count_nonzero(sample > bounds[:, None], axis=1) >= expected
    return [
        _kth_largest(row, k, bound, bool(repeats), bool(keep))
        for row, bound, repeats, keep in zip(rows, bounds, tied, gather)
    ]


def _kth_largest(row: np.ndarray, k: int, bound: np.floating, tied: bool, gather: bool) -> Found:
    """The k-th largest entry of a row, exactly, the row's support once filtered, and where in the
    row entries below it may lie.

    ``bound`` lies four standard deviations below the k-th largest value's expected place in the
    row's sample. If at least k entries reach it, the k-th largest is among those few (a few % more
    than k), gathered in one read of the row, and one selection over them is exact; otherwise the
    sample overshot and the whole row is sorted. A bound that repeats in the sample (``tied``) may be
    a value most of the row shares (the zeros after ReLUs and earlier filtering): the entries above it
    are counted (and gathered too where the sample says there are likely k of them) and those below
    it counted, and if fewer than k lie above it but at least k reach it, it is the answer.
    """
    numel = row.size
    compare = np.greater if tied else np.greater_equal
    values, passing, below, spans = _scan(row, bound, compare, gather=gather or not tied, count_below=tied)
    if tied and passing < k <= numel - below:
        nonzeros = (numel - below if bound > 0 else passing) if bound >= 0 else None
        return Found(bound if below else None, nonzeros, spans)
    if passing < k:
        return _kth_of_partitioned(np.sort(row), k, spans)
    if values is None:  # the sample was wrong: a second read
        values = _scan(row, bound, compare, gather=True)[0]
    values.partition(values.size - k)  # in place: the gathered entries are a copy already
    return _kth_of_partitioned(values, k, spans)


def _kth_of_partitioned(values: np.ndarray, k: int, spans: list[tuple[int, int]] | None = None) -> Found:
    """The k-th largest of ``values``, partitioned there (as a sorted row is), and how many entries
    stay nonzero once everything below it is zeroed (None when kept entries may be negative): the k
    above the cut, and those below it tied with it; at a k-th largest of 0, the positive ones."""
    cut = values.size - k
    kth = values[cut]
    if not kth >= 0:
        nonzeros = None
    elif kth == 0:
        nonzeros = int(np.count_nonzero(values[cut:] > 0))
    else:
        nonzeros = k + int(np.count_nonzero(values[:cut] == kth))
    return Found(kth, nonzeros, spans)


def _scan(
    row: np.ndarray, bound: np.floating, compare: np.ufunc, *, gather: bool, count_below: bool = False
) -> tuple[np.ndarray | None, int, int, list[tuple[int, int]]]:
    """One read of the row, block by block while each block is in the core's cache: (if ``gather``)
    the entries for which ``compare(entry, bound)`` holds, how many do, (if asked) how many lie below
    ``bound``, and the spans of blocks that are not all zeros (only those can hold entries to zero:
    relevance is often confined to the object, and whole stretches of a map are zeros).

    numpy's compress costs per entry it keeps, wherever they lie: the entries are first taken in
    groups of eight neighbours (one uint64 of the mask) with at least one among them, then sifted.
    Below a tied bound mostly nothing lies: a block is counted only where its minimum does."""
    parts = []
    passing = below = 0
    spans: list[tuple[int, int]] = []
    mask = np.empty(min(BLOCK, row.size), dtype=bool)
    grouped = row.flags.c_contiguous  # a strided row cannot be viewed as groups
    bits, zero = f"u{row.itemsize}", row.dtype.type(0)
    probe = False  # after a block without hits, likely another (a stretch of background)
    for start in range(0, row.size, BLOCK):
        block = row[start : start + BLOCK]
        hits = mask[: block.size]
        # a probed block that is all zeros (one reduction over its bits) needs nothing more
        nonzero = bool(np.bitwise_or.reduce(block.view(bits))) if probe and not compare(zero, bound) else None
        if nonzero is False:
            if count_below and zero < bound:
                below += block.size
            continue
        if not gather:
            compare(block, bound, out=hits)
            count = int(np.count_nonzero(hits))
        elif grouped and block.size % 8 == 0:
            compare(block, bound, out=hits)
            groups = np.compress(hits.view(np.uint64) != 0, block.view(f"V{8 * block.itemsize}"))
            candidates = groups.view(block.dtype)
            parts.append(np.compress(compare(candidates, bound), candidates))
            count = parts[-1].size
        else:
            parts.append(np.compress(compare(block, bound, out=hits), block))
            count = parts[-1].size
        passing += count
        if count_below and block.min() < bound:
            below += int(np.count_nonzero(np.less(block, bound, out=hits)))
        # not all zeros (a -0.0 or a NaN counts as not): entries to zero may lie here
        if count or (nonzero if nonzero is not None else np.bitwise_or.reduce(block.view(bits))):
            if spans and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], start + block.size)
            else:
                spans.append((start, start + block.size))
        probe = not count
    return (np.concatenate(parts) if gather else None), passing, below, spans


def _zero_below(rows: torch.Tensor, found: dict[int, Found]) -> None:
    """Zero the entries below each listed row's k-th largest value, in place and in the rows' own
    dtype, within the spans where they may lie. ``threshold_`` zeroes what is at most its threshold
    (as +0.0, whatever it was): given the largest value of the dtype below the k-th largest, that is
    exactly what lies below it. A k-th largest of -inf has nothing below it."""
    todo = [i for i, row in found.items() if row.kth is not None and row.kth > -math.inf]
    if not todo:
        return
    if rows.dtype in (torch.float32, torch.float64):  # the k-th largest values are of the rows' dtype
        below = np.nextafter(np.array([found[i].kth for i in todo]), -np.inf).tolist()
    else:  # selected in float32, stepped down in the rows' dtype (numpy has no bfloat16)
        kth_t = torch.tensor([float(found[i].kth) for i in todo], dtype=rows.dtype)
        below = torch.nextafter(kth_t, torch.full_like(kth_t, -math.inf)).tolist()
    for i, threshold in zip(todo, below):
        spans = found[i].spans
        for start, stop in [(0, rows.shape[1])] if spans is None else spans:
            torch.threshold_(rows[i, start:stop], threshold, 0.0)


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
