"""`lrp-heatmap doctor`: what the engine does with a model, and whether relevance is accounted for."""

from __future__ import annotations

import torch

from .config import Config
from .lrp import audit, format_audit
from .models import load_model
from .pipeline import input_resolution


def doctor(settings: Config, *, json_output: bool, sample_seed: int = 0) -> tuple[int, str]:
    """Audit the configured model on one random image; (exit code, report). Exit 1 when an operation
    has no rule or relevance changes somewhere for no known reason."""
    loaded = load_model(settings.model, settings.weights, settings.mean, settings.std)
    from .patterns import load_patterns

    options = {
        "rules": settings.rules,
        "patterns": load_patterns(settings, loaded),  # patternnet/patternattribution only
        "precision": settings.precision,
        "winograd": settings.winograd,
        "mean": loaded.mean,
        "std": loaded.std,
    }
    size = input_resolution(settings, loaded)
    generator = torch.Generator().manual_seed(sample_seed)
    sample = torch.randn(1, 3, size, size, generator=generator)
    report = audit(loaded.module, sample, composite=settings.composite, target=settings.target, **options)
    report.model = loaded.name
    return (0 if report.ok else 1), (report.to_json() if json_output else format_audit(report))
