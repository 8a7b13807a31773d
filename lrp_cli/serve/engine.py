"""The engine behind the page and the live stream: one model, one warm explainer per setting.

Requests arrive on the event loop; :meth:`Engine.explain` is blocking and thread-safe (one explanation
at a time, since torch already spreads one over the cores), so the app calls it in a worker thread.
"""

from __future__ import annotations

import io
import math
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ..config import Config, ConfigError
from ..data import _to_rgb, prepare
from ..errors import RunError
from ..lrp import COMPOSITES, Explainer
from ..models import LoadedModel, load_model
from ..patterns import PATTERN_COMPOSITES
from ..pipeline import prepare_engine, resolve_device
from ..render import pictures

WARM_EXPLAINERS = 8
"""Explainers kept built (traced, rule weights cached), least recently used dropped first."""
TOP_CLASSES = 5


class RequestError(ValueError):
    """A request the engine refuses; ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Explained:
    """One image explained: the map at the model's input size and what the model said."""

    relevance: np.ndarray  # (C, H, W) float32 input relevance at the model's input size
    relevance_sum: float
    top: list[dict[str, Any]]  # the TOP_CLASSES most probable classes, most probable first
    class_index: int  # the explained class (the top class for a start over all classes)
    probability: float
    composite: str
    topk: float
    signed: bool
    ms: float


def decode_bytes(data: bytes, max_pixels: int, what: str = "image") -> Image.Image:
    """An uploaded file as upright 8-bit RGB (as ``data.decode`` reads files); RequestError otherwise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise RequestError(
                        f"{what}: {width}x{height} pixels is over the limit of {max_pixels}", status=413
                    )
                image.seek(0)
                image.load()
                return _to_rgb(ImageOps.exif_transpose(image))
        except (Image.UnidentifiedImageError, Image.DecompressionBombError):
            raise RequestError(f"{what}: not an image file PIL can read", status=415) from None
        except (OSError, SyntaxError, ValueError) as error:
            raise RequestError(f"{what}: corrupt or truncated image ({error})", status=415) from None


def check_setting(composite: Any, topk: Any) -> tuple[str, float]:
    """Validate a (composite, topk) pair from a request; RequestError names the bad value."""
    known = ["auto", *sorted(COMPOSITES)]
    if not isinstance(composite, str) or composite not in known:
        raise RequestError(f"composite: unknown preset {composite!r}; one of {', '.join(known)}")
    if isinstance(topk, bool) or not isinstance(topk, int | float) or not math.isfinite(topk):
        raise RequestError(f"topk: expected a number in (0, 1], got {topk!r}")
    if not 0.0 < topk <= 1.0:
        raise RequestError(f"topk: {topk} is outside (0, 1]")
    return composite, float(topk)


class Engine:
    """The configured model on its device, with explainers built on first use and kept warm."""

    def __init__(self, config: Config, loaded: LoadedModel | None = None) -> None:
        resolve_device(config.device)  # a missing GPU is reported before the model loads
        self.loaded = loaded or load_model(config.model, config.weights, config.mean, config.std)
        requested = config.composite
        self.device, explainer = prepare_engine(config, self.loaded)  # resolves resolution and "auto"
        self.config = config
        self.resolution: int = config.resolution  # type: ignore[assignment]
        self.default = (requested, config.topk)
        self._explainers: OrderedDict[tuple[str, float], Explainer] = OrderedDict({self.default: explainer})
        self._lock = threading.Lock()
        self._mean = torch.tensor(self.loaded.mean, dtype=torch.float32).reshape(3, 1, 1)
        self._std = torch.tensor(self.loaded.std, dtype=torch.float32).reshape(3, 1, 1)

    def label(self, index: int) -> str:
        return self.loaded.label(index) or f"class {index}"

    def _explainer(self, composite: str, topk: float) -> Explainer:
        key = (composite, topk)
        if key in self._explainers:
            self._explainers.move_to_end(key)
            return self._explainers[key]
        changes: dict[str, Any] = {"composite": composite, "topk": topk}
        if composite not in PATTERN_COMPOSITES:  # a patterns file serves only the pattern composites
            changes["patterns"] = None
        try:  # built and tried on a blank image exactly as a run builds its engine
            explainer = prepare_engine(replace(self.config, **changes), self.loaded)[1]
        except (ConfigError, RunError) as error:
            raise RequestError(f"composite {composite!r}, topk {topk}: {error}") from None
        self._explainers[key] = explainer
        while len(self._explainers) > WARM_EXPLAINERS:
            self._explainers.popitem(last=False)
        return explainer

    def pixels(self, photo: Image.Image) -> torch.Tensor:
        """The model input for a photo, exactly as ``lrp-heatmap run`` prepares it: (1, 3, R, R)."""
        image = prepare(photo, self.resolution, self.config.resize, self.loaded.interpolation or "bicubic")
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return ((pixels - self._mean) / self._std).unsqueeze(0)

    def explain(
        self, photo: Image.Image, composite: str, topk: float, target: int | None = None
    ) -> Explained:
        """Explain one photo with the (composite, topk) setting; blocking, safe from any thread."""
        pixels = self.pixels(photo).to(self.device)
        with self._lock:
            started = time.perf_counter()
            explainer = self._explainer(composite, topk)
            try:
                result = explainer(pixels, self.config.target if target is None else target)
            except ValueError as error:  # a target class the model does not have
                raise RequestError(f"target: {error}") from None
            ms = (time.perf_counter() - started) * 1000.0
        relevance = result.relevance[0].float().cpu().numpy()
        probabilities = result.logits[0].float().softmax(dim=0).cpu()
        values, indices = probabilities.topk(min(TOP_CLASSES, len(probabilities)))
        top = [
            {"index": int(i), "label": self.label(int(i)), "probability": float(p)}
            for p, i in zip(values, indices)
        ]
        explained = int(result.targets[0])
        shown = explained if explained >= 0 else int(indices[0])
        signed = explainer.composite.signed
        return Explained(
            relevance=relevance,
            relevance_sum=float(relevance.sum(dtype=np.float64)),
            top=top,
            class_index=shown,
            probability=float(probabilities[shown]),
            composite=explainer.composite.name,
            topk=topk,
            signed=signed,
            ms=ms,
        )

    def pictures(self, photo: Image.Image, explained: Explained) -> tuple[Image.Image, Image.Image]:
        """(heatmap, overlay on the photo at its own size), drawn as ``lrp-heatmap run`` draws them."""
        config = self.config
        drawn = pictures(
            explained.relevance,
            np.asarray(photo),
            explained.signed,
            config.resize,
            config.overlay_alpha,
            config.colormap,
            getattr(config, "overlay_mode", "blend"),
        )
        return drawn.heatmap, drawn.overlay
