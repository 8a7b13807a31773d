"""Decoded RGB frames through the engine: relevance, classes and pictures per frame.

The reusable part of the video path: ``video`` and ``run`` feed it decoded video frames (``serve``
and ``live`` explain one picture at a time through ``serve.engine``). Resizing and normalisation are
``run``'s, so a frame is explained exactly as the same picture saved as a photo would be; its overlay
is the plain blend of the map (no dot-grid taps or smoothing, which ``run``'s pictures add), cheap
enough to keep pace with the engine.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

import numpy as np
import torch
from PIL import Image

from .config import Config
from .data import prepare
from .lrp import Explainer
from .models import LoadedModel
from .pipeline import HalvingExplainer
from .render import colorize, normalise, overlay_image


@dataclass
class FrameResult:
    """The engine's answer for one frame."""

    relevance: np.ndarray  # (H, W) float32 at the model's input size: the sum over colour channels
    class_index: int  # the explained class (the predicted one for a start over all classes)
    label: str | None
    probability: float  # softmax probability of class_index
    predicted_index: int
    target: int | str  # the explained class, or "softmax"

    @property
    def relevance_sum(self) -> float:
        return float(self.relevance.sum(dtype=np.float64))


class FrameExplainer:
    """Decoded RGB frames (uint8 H x W x 3, any size) to explanations and pictures, with the run's engine and
    config (composite, top-k, target, resolution, resize, device, precision, colours)."""

    def __init__(
        self,
        config: Config,
        loaded: LoadedModel,
        explainer: Explainer,
        device: torch.device,
        err: TextIO | None = None,
    ) -> None:
        self.config, self.loaded, self.device = config, loaded, device
        self.engine = HalvingExplainer(explainer, config, device, err or sys.stderr)
        self.signed = explainer.composite.signed
        self.mean = torch.tensor(loaded.mean, dtype=torch.float32).reshape(3, 1, 1)
        self.std = torch.tensor(loaded.std, dtype=torch.float32).reshape(3, 1, 1)

    def resized(self, frame: np.ndarray) -> np.ndarray:
        """One frame at the model's input size (uint8 R x R x 3), resized as ``run`` resizes photos."""
        config = self.config
        image = prepare(
            Image.fromarray(frame), config.resolution, config.resize, self.loaded.interpolation or "bicubic"
        )
        return np.asarray(image, dtype=np.uint8)

    def pixels(self, resized: np.ndarray) -> torch.Tensor:
        """A stack of :meth:`resized` frames (N x R x R x 3) as the model's normalised (N, 3, R, R) input,
        by ``run``'s arithmetic. Called on the engine's thread: torch on another thread starts a second
        OpenMP team whose spinning threads take cores from the engine's."""
        tensor = torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 255.0
        return (tensor - self.mean) / self.std

    def explain(self, resized: np.ndarray) -> list[FrameResult]:
        """Explain a batch of :meth:`resized` frames (N x R x R x 3)."""
        relevance, logits, targets = self.engine(self.pixels(resized).to(self.device, non_blocking=True))
        probabilities = logits.softmax(dim=1).cpu()
        top = probabilities.argmax(dim=1)
        maps = relevance.sum(axis=1)
        results = []
        for row in range(len(resized)):
            explained = int(targets[row])
            shown = explained if explained >= 0 else int(top[row])
            label = self.loaded.label(shown)
            probability = float(probabilities[row, shown])
            target = explained if explained >= 0 else "softmax"
            results.append(FrameResult(maps[row], shown, label, probability, int(top[row]), target))
        return results

    def overlay(self, frame: np.ndarray, result: FrameResult) -> np.ndarray:
        """The heatmap blended onto the frame at the frame's size (as ``run``'s ``NAME.overlay.jpg``)."""
        config = self.config
        heat = normalise(result.relevance, self.signed)
        picture = overlay_image(
            frame, heat, self.signed, config.resize, config.overlay_alpha, config.colormap
        )
        return np.asarray(picture)

    def heatmap(self, result: FrameResult, size: tuple[int, int] | None = None) -> np.ndarray:
        """The colour-mapped heatmap, at the model's input size or scaled to ``size`` (width, height)."""
        colours = colorize(normalise(result.relevance, self.signed), self.signed, self.config.colormap)
        if size is None or size == colours.shape[1::-1]:
            return colours
        return np.asarray(Image.fromarray(colours, "RGB").resize(size, Image.Resampling.BILINEAR))
