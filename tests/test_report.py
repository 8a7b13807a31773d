"""report.html (lrp_cli.report): built from manifest records, self-contained, and working in a real
browser (headless Chromium, the ``chrome`` fixture): it renders, filters, sorts, adds cards as one
scrolls, lists failed inputs, and logs nothing to the console.

Records and pictures are generated here, so the expected counts and orders are computed in the test.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.by import By
from typer.testing import CliRunner

from lrp_cli import interrupt
from lrp_cli.cli import app
from lrp_cli.report import REPORT, read_records, report_html, write_report

interrupt.disarm()

LABELS = ["tabby", "espresso", "rocket", "Egyptian cat"]
COUNT = 150
FAILED = {7, 50, 99, 120, 149}
ODD_NAMES = {3: "sub dir/a <b> & 'c'", 4: "café/ünï", 5: "x</script><b>y"}


def _records(out: Path) -> list[dict]:
    """COUNT manifest-like records with panels on disk: labels cycling, probabilities spread over [0, 1],
    a few failures, and names that need escaping."""
    records = []
    rng = np.random.default_rng(0)
    for index in range(COUNT):
        name = ODD_NAMES.get(index, f"img{index:03d}")
        record = {"path": f"/photos/{name}.jpg", "name": name, "error": None, "outputs": {}}
        if index in FAILED:
            records.append(record | {"error": f"cannot identify image file </script> #{index}"})
            continue
        panel = out / f"{name}.panel.jpg"
        panel.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 60, 3), dtype=np.uint8)).save(panel)
        label = LABELS[index % len(LABELS)]
        probability = round((index * 37 % COUNT) / COUNT, 6)
        records.append(
            record
            | {
                "outputs": {"panel": str(panel), "heatmap": str(out / f"{name}.heatmap.png")},
                "label": label, "class_index": index % len(LABELS), "probability": probability,
                "predicted_label": label, "target": index % len(LABELS), "composite": "seed",
            }
        )  # fmt: skip
    return records


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    records = _records(out)
    return write_report(out, records), records


def test_page_is_self_contained_and_escaped(gallery):
    path, records = gallery
    page = path.read_text(encoding="utf-8")
    assert path.name == REPORT and path.stat().st_mode & 0o777 == 0o644
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page)  # nothing fetched from anywhere
    assert page.count("</script>") == 2  # the two script elements' own ends: the data cannot close one
    data = json.loads(re.search(r'type="application/json">(.*?)</script>', page, re.S).group(1))
    assert [d["name"] for d in data] == [r["name"] for r in records]
    links = {d["name"]: d["picture"] for d in data}
    assert links["sub dir/a <b> & 'c'"] == "sub%20dir/a%20%3Cb%3E%20%26%20%27c%27.panel.jpg"
    assert links["img007"] is None and links["img000"] == "img000.panel.jpg"


def test_read_records_keeps_the_last_record_per_input(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    lines = [
        json.dumps({"path": "/a.png", "error": "broken"}),
        "not json",
        "123",
        json.dumps({"path": "/b.png", "error": None}),
        json.dumps({"path": "/a.png", "error": None}),
    ]
    manifest.write_text("\n".join(lines) + "\n")
    assert read_records(manifest) == [{"path": "/b.png", "error": None}, {"path": "/a.png", "error": None}]
    assert read_records(tmp_path / "missing.jsonl") == []
    assert "other/x.png" not in report_html(
        tmp_path, [{"path": "/x", "outputs": {"panel": "/elsewhere/x.png"}}]
    )


def _wait(condition, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def _cards(chrome) -> list:
    return chrome.find_elements(By.CSS_SELECTOR, "#gallery .card")


def _set(chrome, element_id: str, value: str) -> None:
    chrome.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input'));",
        element_id,
        value,
    )


def test_report_in_a_browser(chrome, gallery):
    path, records = gallery
    chrome.get(path.as_uri())
    count = chrome.find_element(By.ID, "count")
    assert _wait(lambda: count.text == f"{COUNT} of {COUNT} images"), count.text
    cards = _cards(chrome)
    assert 0 < len(cards) < COUNT  # cards come in pages as one scrolls, not all 150 at once
    images = chrome.find_elements(By.CSS_SELECTOR, "#gallery img")
    assert all(image.get_attribute("loading") == "lazy" for image in images)
    first = images[0]
    assert _wait(lambda: chrome.execute_script("return arguments[0].naturalWidth", first) == 60)
    assert chrome.execute_script("return document.querySelectorAll('#gallery b').length") == 0

    def scrolled() -> int:  # to the end of the page: the next page of cards comes
        chrome.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        return len(_cards(chrome)) == COUNT

    assert _wait(scrolled), len(_cards(chrome))
    names = [card.find_element(By.CLASS_NAME, "name").text for card in _cards(chrome)]
    assert names == sorted(r["name"] for r in records)
    assert "sub dir/a <b> & 'c'" in names and "x</script><b>y" in names  # shown as text, not markup
    assert chrome.execute_script("return document.querySelectorAll('#gallery b').length") == 0

    _set(chrome, "class", "cat")  # a substring of class names: "Egyptian cat"
    expected = [r for r in records if r["error"] is None and "cat" in r["label"].lower()]
    assert _wait(lambda: count.text == f"{len(expected)} of {COUNT} images"), count.text
    labels = [card.find_element(By.CLASS_NAME, "label").text for card in _cards(chrome)]
    assert labels and all(label.startswith("Egyptian cat") for label in labels)

    _set(chrome, "class", "")
    _set(chrome, "pmin", "0.5")
    _set(chrome, "pmax", "0.75")
    expected = [r for r in records if r["error"] is not None or 0.5 <= r["probability"] <= 0.75]
    assert _wait(lambda: count.text == f"{len(expected)} of {COUNT} images"), count.text

    _set(chrome, "status", "ok")
    _set(chrome, "sort", "p-desc")
    expected = sorted(
        (r for r in records if r["error"] is None and 0.5 <= r["probability"] <= 0.75),
        key=lambda r: -r["probability"],
    )
    assert _wait(lambda: count.text == f"{len(expected)} of {COUNT} images"), count.text
    first_names = [card.find_element(By.CLASS_NAME, "name").text for card in _cards(chrome)[:3]]
    assert first_names == [r["name"] for r in expected[:3]]

    _set(chrome, "pmin", "0")
    _set(chrome, "pmax", "1")
    _set(chrome, "status", "failed")
    assert _wait(lambda: count.text == f"{len(FAILED)} of {COUNT} images"), count.text
    assert all("failed" in card.get_attribute("class") for card in _cards(chrome))
    rows = chrome.find_elements(By.CSS_SELECTOR, "#failures tbody tr")
    assert [row.find_elements(By.TAG_NAME, "td")[0].text for row in rows] == [
        records[i]["path"] for i in sorted(FAILED)
    ]
    assert chrome.get_log("browser") == []  # no errors, warnings or messages on the console


NET = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))
"""


def test_a_run_writes_a_report_with_its_failures(chrome, tmp_path, monkeypatch):
    (tmp_path / "report_net.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(2):
        Image.fromarray(np.full((24, 36, 3), 60 + 90 * index, np.uint8)).save(photos / f"p{index}.png")
    (photos / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    args = ["run", str(photos), "-o", str(out), "--model", "report_net:build", "--resolution", "16"]
    result = CliRunner().invoke(app, [*args, "--workers", "0"])
    sys.modules.pop("report_net", None)
    assert result.exit_code == 1, result.output
    chrome.get((out / REPORT).as_uri())
    count = chrome.find_element(By.ID, "count")
    assert _wait(lambda: count.text == "3 of 3 images"), count.text
    rows = chrome.find_elements(By.CSS_SELECTOR, "#failures tbody tr")
    assert [row.find_elements(By.TAG_NAME, "td")[0].text for row in rows] == [str(photos / "broken.png")]
    loaded = "return [...document.querySelectorAll('#gallery img')].map(i => i.naturalWidth)"
    widths = _wait(lambda: (w := chrome.execute_script(loaded)) and all(w) and w)
    assert len(widths) == 2 and all(width > 3 * 16 for width in widths)  # the panels, from file://
    assert chrome.get_log("browser") == []
