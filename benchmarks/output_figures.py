"""The README's figures of what runs write, from the embedded EfficientNet-Lite0 and the photos in input/:

- ``docs/panel.jpg``: the panel of ``cat.png`` with ``--composite seed --topk 0.05``;
- ``docs/overlay-modes.jpg``: overlays before this change and now (blend, mask, contour), for the seed
  setup and for ``epsilon-plus-flat``;
- ``docs/dot-grid.png`` and ``docs/dot-grid.txt``: the dot grid of stride-2 first layers, magnified,
  without and with the grid taps, and how much of it each first-layer rule leaves;
- ``docs/report.png``: report.html of a run over input/ (plus one broken file), in headless Chromium.

    python benchmarks/output_figures.py          # about a minute on 2 cores
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from lrp_cli.data import prepare
from lrp_cli.lrp import Explainer
from lrp_cli.models import load_model
from lrp_cli.panel import font
from lrp_cli.render import colorize, normalise, overlay_image, pictures, relevance_map, smooth

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
NAMES = ["cat.png", "coffee.png", "astronaut.png", "rocket.jpg"]


def explain_samples(composite: str, topk: float, rules: dict | None = None) -> tuple[np.ndarray, list]:
    """(N, 3, 224, 224) relevance of the sample photos and the photos themselves (uint8 arrays)."""
    loaded = load_model("efficientnet-lite0", None, None, None)
    photos = [np.asarray(Image.open(ROOT / "input" / name).convert("RGB")) for name in NAMES]
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    pixels = [np.asarray(prepare(Image.fromarray(p), 224, "squash")).copy() for p in photos]
    x = (torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255 - mean) / std
    explainer = Explainer(
        loaded.module.eval(), composite, topk, rules=rules or {}, mean=loaded.mean, std=loaded.std
    )
    return explainer(x).relevance.numpy(), photos


def labelled_grid(
    rows: list[list[Image.Image]], titles: list[str], notes: list[str], height: int = 220
) -> Image.Image:
    """Tiles of one height in rows, column titles above, a note left of each row."""
    note_width, title_height = 150, 24
    scaled = [[t.resize((round(t.width * height / t.height), height)) for t in row] for row in rows]
    width = note_width + max(sum(t.width + 6 for t in row) for row in scaled)
    figure = Image.new("RGB", (width, title_height + len(rows) * (height + 6)), "white")
    draw = ImageDraw.Draw(figure)
    for r, row in enumerate(scaled):
        x, y = note_width, title_height + r * (height + 6)
        draw.multiline_text((6, y + height // 2), notes[r], fill="black", font=font(13), anchor="lm")
        for c, tile in enumerate(row):
            figure.paste(tile, (x, y))
            if r == 0:
                draw.text((x + tile.width // 2, 4), titles[c], fill="black", font=font(13), anchor="ma")
            x += tile.width + 6
    return figure


def overlay_modes() -> None:
    rows, notes = [], []
    for composite, topk, signed in [("seed", 0.05, False), ("epsilon-plus-flat", 1.0, True)]:
        relevance, photos = explain_samples(composite, topk)
        for index in (0, 1):
            photo = photos[index]
            before = overlay_image(
                photo, normalise(relevance_map(relevance[index]), signed), signed, "squash", 0.6
            )
            now = [
                pictures(relevance[index], photo, signed, "squash", 0.6, mode=m).overlay
                for m in ("blend", "mask", "contour")
            ]
            rows.append([before, *now])
            notes.append(f"{composite}\ntop-k {topk:g}\n{NAMES[index]}")
    titles = ["before: weight alpha * |R|, raw map", "blend (default)", "mask", "contour"]
    labelled_grid(rows, titles, notes).save(DOCS / "overlay-modes.jpg", quality=88)


def _parity(heat: np.ndarray) -> tuple[float, ...]:
    """Mean |R| of the (even, even), (even, odd), (odd, even), (odd, odd) pixels over the largest."""
    means = np.array([np.abs(heat[:, i::2, j::2]).mean() for i in (0, 1) for j in (0, 1)])
    return tuple(means / means.max())


def dot_grid() -> None:
    lines = [
        "The dot grid: mean |R| of the four pixel parities (row, column even/odd), relative to the largest,",
        "over the four sample photos; 1 1 1 1 = no grid. EfficientNet-Lite0's stem is a 3x3 stride-2",
        "convolution (TF 'same' padding: windows start at 0, 2, 4, ...), so a pixel on an even row and column",
        "is covered by 4 windows, one even and one odd by 2, odd ones by 1.",
        "",
        f"{'composite, first-layer rule':44s} {'raw map':>24s}   {'with the grid taps':>24s}",
    ]
    cases = [
        ("epsilon-plus-flat (flat)", "epsilon-plus-flat", 1.0, None),
        ("epsilon-plus-flat, first: zplus", "epsilon-plus-flat", 1.0, {"first": "zplus"}),
        ("epsilon-plus-flat, first: epsilon", "epsilon-plus-flat", 1.0, {"first": "epsilon"}),
        ("seed (z+ with ones input)", "seed", 1.0, None),
        ("seed, top-k 0.05", "seed", 0.05, None),
        ("epsilon (every layer)", "epsilon", 1.0, None),
    ]
    crops = []
    for title, composite, topk, rules in cases:
        relevance, _ = explain_samples(composite, topk, rules)
        heat = relevance.sum(axis=1)
        shown = np.stack([smooth(h) for h in heat])
        raw, after = _parity(heat), _parity(shown)
        lines.append(
            f"{title:44s} {' '.join(f'{v:5.2f}' for v in raw):>24s}   {' '.join(f'{v:5.2f}' for v in after):>24s}"
        )
        if composite in ("epsilon-plus-flat", "seed") and rules is None and topk == 1.0:
            signed = composite != "seed"
            window = (slice(60, 124), slice(40, 104))  # the cat's left eye, magnified 4x
            for map_ in (heat[0], shown[0]):
                colours = colorize(normalise(map_, signed)[window], signed)
                crops.append(Image.fromarray(colours).resize((256, 256), Image.Resampling.NEAREST))
    (DOCS / "dot-grid.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    figure = labelled_grid(
        [crops[0:2], crops[2:4]],
        ["raw relevance (sum over RGB)", "with the grid taps 1/4 1/2 1/4"],
        ["epsilon-plus-flat\n(flat first layer)", "seed\n(z+, ones input)"],
        height=256,
    )
    figure.save(DOCS / "dot-grid.png")


def panel_and_report() -> None:
    work = Path(tempfile.mkdtemp(prefix="lrp-figures-"))
    try:
        photos = work / "photos"
        shutil.copytree(ROOT / "input", photos, ignore=shutil.ignore_patterns("*.md"))
        (photos / "broken.jpg").write_bytes(b"not a JPEG")
        out = work / "out"
        command = [sys.executable, "-m", "lrp_cli", "run", str(photos), "-o", str(out), "--composite", "seed"]
        subprocess.run([*command, "--topk", "0.05", "-q"], cwd=ROOT, check=False)
        shutil.copy(out / "cat.panel.jpg", DOCS / "panel.jpg")
        screenshot(out / "report.html", DOCS / "report.png")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def screenshot(page: Path, target: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(page.as_uri())
        time.sleep(1.5)  # the lazy thumbnails
        driver.save_screenshot(str(target))
    finally:
        driver.quit()


if __name__ == "__main__":
    overlay_modes()
    dot_grid()
    panel_and_report()
