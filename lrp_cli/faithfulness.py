"""Region perturbation (Samek et al. 2016): does removing what a heatmap calls relevant hurt the model?

The conventions and names are Quantus 0.6's ``RegionPerturbation``, so results can be compared with it:
the map is summed over non-overlapping ``patch_size`` x ``patch_size`` patches (the image padded with
zeros of relevance where its size is not a multiple of the patch), patches are ranked by
``numpy.argsort`` of that sum, most relevant first (``morf``) or least relevant first (``lerf``), and
patch after patch, cumulatively, is replaced by the ``baseline`` (``"black"``: the smallest value of the
model input, over all channels). The curve at step k is the drop of the softmax probability of the
explained class, ``p(x) - p(x_k)`` for k = 1 .. ``regions``. Scores: AOPC (Samek et al.'s area over the
perturbation curve, the mean drop over steps 0 .. K with the drop at step 0 being 0) per order, and
ABPC = AOPC(MoRF) - AOPC(LeRF), the area between the two curves: higher is more faithful.

Unlike Quantus, which runs one forward pass per step for the batch, every perturbed image of every map
and order is generated on the device from a patch-rank map and scored in large batches; an image that
several maps or orders reach with the same set of removed patches is scored once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

ORDERS = ("morf", "lerf")
BASELINES = ("black", "white", "mean")


@dataclass(frozen=True)
class RegionPerturbation:
    """Settings, with Quantus 0.6's defaults: ``patch_size=8``, ``regions_evaluation=100``,
    ``perturb_baseline="black"`` and softmax probabilities."""

    patch_size: int = 8
    regions: int = 100
    baseline: str | float = "black"
    softmax: bool = True

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.regions < 1:
            raise ValueError("patch_size and regions must be at least 1")
        if isinstance(self.baseline, str) and self.baseline not in BASELINES:
            raise ValueError(
                f"baseline {self.baseline!r}: expected a number or one of {', '.join(BASELINES)}"
            )


@dataclass
class Curves:
    """``original``: (N,) score of the explained class on the unperturbed images; ``drops``: order to
    (S, N, K) score drop after k = 1 .. K patches, for S maps per image; ``forwards``: images scored."""

    original: np.ndarray
    drops: dict[str, np.ndarray]
    forwards: int

    def aopc(self, order: str) -> np.ndarray:
        """(S, N) area over the perturbation curve: the mean drop over steps 0 .. K."""
        drops = self.drops[order]
        return drops.sum(axis=-1) / (drops.shape[-1] + 1)

    def abpc(self) -> np.ndarray:
        """(S, N) area between the LeRF and MoRF curves (higher: the map ranks regions more faithfully)."""
        return self.aopc("morf") - self.aopc("lerf")


def padding(size: int, patch: int) -> tuple[int, int]:
    """Padding before and after one side so that patches tile it (Quantus' ``get_padding_size``)."""
    extra = (patch - size % patch) % patch
    return extra // 2, extra - extra // 2


def patch_sums(maps: np.ndarray, patch: int) -> np.ndarray:
    """(..., H, W) maps to (..., P) relevance per patch, patches numbered row by row on the padded grid."""
    (top, bottom), (left, right) = padding(maps.shape[-2], patch), padding(maps.shape[-1], patch)
    pad = [(0, 0)] * (maps.ndim - 2) + [(top, bottom), (left, right)]
    padded = np.pad(np.asarray(maps, dtype=np.float64), pad)
    rows, cols = padded.shape[-2] // patch, padded.shape[-1] // patch
    blocks = padded.reshape(*padded.shape[:-2], rows, patch, cols, patch)
    return blocks.sum(axis=(-3, -1)).reshape(*padded.shape[:-2], rows * cols)


def patch_order(maps: np.ndarray, patch: int, order: str) -> np.ndarray:
    """(..., P) patch indices in the order they are removed (ties broken as ``numpy.argsort`` does)."""
    sums = patch_sums(maps, patch)
    if order == "morf":
        return np.argsort(-sums, axis=-1)
    if order == "lerf":
        return np.argsort(sums, axis=-1)
    raise ValueError(f"order {order!r}: expected one of {', '.join(ORDERS)}")


def baseline_values(x: torch.Tensor, baseline: str | float) -> torch.Tensor:
    """(N,) replacement value per image: Quantus' "black" is the image's minimum over all channels."""
    flat = x.flatten(1)
    if baseline == "black":
        return flat.amin(dim=1)
    if baseline == "white":
        return flat.amax(dim=1)
    if baseline == "mean":
        return flat.mean(dim=1)
    return torch.full((len(x),), float(baseline), dtype=x.dtype, device=x.device)


class _Scorer:
    """Scores perturbed images in batches: the explained class' probability (or logit)."""

    def __init__(self, model: nn.Module, softmax: bool, batch_size: int, channels_last: bool) -> None:
        self.model, self.softmax, self.batch_size = model, softmax, batch_size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        scores = self.model(images.contiguous(memory_format=self.memory_format)).float()
        if self.softmax:
            scores = scores.softmax(dim=1)
        return scores.gather(1, targets[:, None])[:, 0]


def region_perturbation(
    model: nn.Module,
    x: torch.Tensor,
    maps: np.ndarray,
    targets: Sequence[int] | torch.Tensor,
    settings: RegionPerturbation = RegionPerturbation(),
    orders: Sequence[str] = ORDERS,
    batch_size: int = 256,
    channels_last: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Curves:
    """Region-perturbation curves of ``maps`` (S, N, H, W) or (N, H, W) for images ``x`` (N, C, H, W)
    and the explained class per image ``targets``, scoring ``batch_size`` perturbed images per forward.
    ``model`` is used as it is (in eval mode) on ``x``'s device; ``progress(done, total)`` is called
    after each batch of perturbed images."""
    maps = np.asarray(maps)
    if maps.ndim == 3:
        maps = maps[None]
    count, height, width = x.shape[0], x.shape[-2], x.shape[-1]
    if maps.shape[1:] != (count, height, width):
        raise ValueError(f"maps of shape {maps.shape} do not fit images of shape {tuple(x.shape)}")
    device = x.device
    targets = torch.as_tensor(targets, dtype=torch.long, device=device)
    patch = settings.patch_size
    (top, _), (left, _) = padding(height, patch), padding(width, patch)
    rows, cols = math.ceil(height / patch), math.ceil(width / patch)
    steps = min(settings.regions, rows * cols)
    orderings = np.stack([patch_order(maps, patch, order) for order in orders])  # (O, S, N, P)
    jobs, lookup = _unique_jobs(orderings, steps)
    ranks = np.empty_like(orderings)
    np.put_along_axis(ranks, orderings, np.arange(rows * cols), axis=-1)
    ranks_t = torch.as_tensor(ranks.reshape(-1, rows * cols), device=device)
    base = baseline_values(x, settings.baseline)
    score = _Scorer(model, settings.softmax, batch_size, channels_last)
    scores = torch.empty(len(jobs), device=device)
    job_rows = torch.as_tensor(jobs[:, 1], device=device)
    job_steps = torch.as_tensor(jobs[:, 2], device=device)
    images_of = torch.as_tensor(jobs[:, 0], device=device)
    with torch.inference_mode():
        original = torch.cat([score(x[i : i + batch_size], targets[i : i + batch_size]) for i in
                              range(0, count, batch_size)])  # fmt: skip
        for start in range(0, len(jobs), batch_size):
            part = slice(start, start + batch_size)
            removed = ranks_t[job_rows[part]] < job_steps[part, None]  # (B, P) patches replaced so far
            mask = removed.view(-1, rows, cols).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
            mask = mask[:, top : top + height, left : left + width]
            index = images_of[part]
            images = torch.where(mask[:, None], base[index, None, None, None], x[index])
            scores[part] = score(images, targets[index])
            if progress is not None:
                progress(min(start + batch_size, len(jobs)), len(jobs))
    original_np = original.cpu().numpy().astype(np.float64)
    per_job = scores.cpu().numpy().astype(np.float64)
    reached = per_job[lookup]  # (O, S, N, K)
    drops = {order: original_np[None, :, None] - reached[o] for o, order in enumerate(orders)}
    return Curves(original_np, drops, len(jobs) + count)


def _unique_jobs(orderings: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct perturbed images as rows (image, ordering row, steps removed), and for every
    (order, map, image, step) the row that produces it. Two orderings reach the same image when the
    sets of patches removed so far are equal: told apart by a 128-bit XOR hash of the set (Zobrist)."""
    orders, maps, count, patches = orderings.shape
    generator = np.random.default_rng(0)
    codes = generator.integers(0, 2**63, size=(2, patches), dtype=np.int64)
    prefix = np.bitwise_xor.accumulate(codes[:, orderings[..., :steps]], axis=-1)  # (2, O, S, N, K)
    image = np.broadcast_to(np.arange(count)[None, None, :, None], (orders, maps, count, steps))
    keys = np.stack([image.ravel(), prefix[0].ravel(), prefix[1].ravel()], axis=1)
    unique, first, lookup = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    row = np.arange(orders * maps * count).reshape(orders, maps, count, 1)
    row = np.broadcast_to(row, (orders, maps, count, steps)).ravel()
    step = np.broadcast_to(np.arange(1, steps + 1), (orders, maps, count, steps)).ravel()
    jobs = np.stack([unique[:, 0], row[first], step[first]], axis=1)
    return jobs, lookup.reshape(orders, maps, count, steps)
