"""``report.html``: a static, self-contained gallery of a run's images, built from manifest records.

One HTML file with its script and style inline and the records as JSON inside it; pictures are linked
relative to the output folder, so it opens from ``file://`` with no server, and the folder can be moved
or zipped as a whole. Cards are added as the reader scrolls and thumbnails load lazily, so a run of
10,000 images stays usable. Any producer of manifest records (``run``, video, multi-process runs) can
call :func:`write_report`.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .render import atomic_write

REPORT = "report.html"
PICTURES = ("panel", "overlay", "heatmap")  # the card's picture: the first of these a record has


def read_records(manifest: Path) -> list[dict[str, Any]]:
    """The manifest's records, the last one per input (a resumed run records an image again); lines that
    are not records are left out, as ``--resume`` leaves them."""
    latest: dict[str, dict[str, Any]] = {}
    try:
        lines = manifest.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("path"), str):
            latest.pop(record["path"], None)
            latest[record["path"]] = record
    return list(latest.values())


def _link(output_dir: Path, file: str | None) -> str | None:
    """A URL relative to the report for an output file, or None when it is not in the output folder."""
    if not file:
        return None
    relative = os.path.relpath(file, output_dir)
    if relative.startswith(".."):
        return None
    return quote(Path(relative).as_posix())


def _entry(output_dir: Path, record: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a record the page shows, with links relative to the report."""
    outputs = record.get("outputs") or {}
    links = {kind: _link(output_dir, outputs.get(kind)) for kind in PICTURES}
    picture = next((links[kind] for kind in PICTURES if links[kind]), None)
    return {
        "name": record.get("name") or record.get("path"),
        "path": record.get("path"),
        "label": record.get("label"),
        "class": record.get("class_index"),
        "p": record.get("probability"),
        "predicted": record.get("predicted_label") or record.get("predicted_index"),
        "target": record.get("target"),
        "composite": record.get("composite"),
        "error": record.get("error"),
        "picture": picture,
        "links": {kind: link for kind, link in links.items() if link},
    }


def report_html(output_dir: Path, records: Iterable[Mapping[str, Any]], title: str = "lrp-heatmap") -> str:
    """The page for ``records`` (manifest records) written into ``output_dir``."""
    entries = [_entry(output_dir, record) for record in records]
    data = json.dumps(entries, ensure_ascii=True, separators=(",", ":")).replace("</", "<\\/")
    return PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data)


def write_report(output_dir: str | Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``output_dir/report.html`` (atomically) for ``records``; returns its path."""
    output_dir = Path(os.path.abspath(output_dir))
    path = output_dir / REPORT
    title = f"lrp-heatmap: {output_dir.name}"
    atomic_write(path, report_html(output_dir, records, title).encode("utf-8"))
    return path


def report_wanted(setting: bool | None, manifest: Path) -> bool:
    """``report: true/false`` as set; ``null`` (the default): when the manifest holds more than one image."""
    if setting is not None:
        return setting
    return len(read_records(manifest)) > 1


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
body { font: 14px/1.4 "DejaVu Sans", system-ui, sans-serif; margin: 0; color: #222; background: #f4f4f4; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ccc; padding: 8px 16px;
  display: flex; flex-wrap: wrap; gap: 12px; align-items: center; z-index: 1; }
header h1 { font-size: 16px; margin: 0 12px 0 0; }
label { white-space: nowrap; }
input[type=number] { width: 5em; }
#count { color: #555; margin-left: auto; }
main { padding: 12px 16px; }
#gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 12px;
  align-items: start; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 4px; overflow: hidden; }
.card img { display: block; width: 100%; height: auto; aspect-ratio: 3 / 1; object-fit: contain;
  background: #eee; }
.card .text { padding: 6px 8px; }
.card .name { font-weight: bold; word-break: break-all; }
.card.failed { border-color: #c33; }
.error { color: #b00; }
.links a { margin-right: 8px; }
#failures table { border-collapse: collapse; background: #fff; }
#failures td, #failures th { border: 1px solid #ddd; padding: 4px 8px; text-align: left; }
#more { height: 1px; }
</style>
</head>
<body>
<header>
  <h1>__TITLE__</h1>
  <label>class <input id="class" type="search" list="classes" placeholder="any"></label>
  <datalist id="classes"></datalist>
  <label>probability from <input id="pmin" type="number" min="0" max="1" step="0.05" value="0">
    to <input id="pmax" type="number" min="0" max="1" step="0.05" value="1"></label>
  <label>show <select id="status">
    <option value="all">all</option><option value="ok">explained</option><option value="failed">failed</option>
  </select></label>
  <label>sort by <select id="sort">
    <option value="name">name</option>
    <option value="p-desc">probability, highest first</option>
    <option value="p-asc">probability, lowest first</option>
    <option value="class">class</option>
    <option value="error">errors first</option>
  </select></label>
  <span id="count"></span>
</header>
<main>
  <section id="failures" hidden><h2>Failed inputs</h2>
    <table><thead><tr><th>input</th><th>error</th></tr></thead><tbody></tbody></table></section>
  <div id="gallery"></div>
  <div id="more"></div>
</main>
<script id="records" type="application/json">__DATA__</script>
<script>
"use strict";
const records = JSON.parse(document.getElementById("records").textContent);
const PAGE = 60;
const $ = (id) => document.getElementById(id);
const gallery = $("gallery");
let shown = [];
let rendered = 0;

function className(r) { return r.label || (r.class === null || r.class === undefined ? "" : "class " + r.class); }

const classes = [...new Set(records.map(className).filter(Boolean))].sort();
for (const name of classes) {
  const option = document.createElement("option");
  option.value = name;
  $("classes").appendChild(option);
}

const failures = records.filter((r) => r.error);
if (failures.length) {
  $("failures").hidden = false;
  const body = $("failures").querySelector("tbody");
  for (const r of failures) {
    const row = body.insertRow();
    row.insertCell().textContent = r.path;
    row.insertCell().textContent = r.error;
  }
}

function compare(key) {
  const byName = (a, b) => String(a.name).localeCompare(String(b.name));
  const p = (r) => (typeof r.p === "number" ? r.p : -1);
  return {
    "name": byName,
    "p-desc": (a, b) => p(b) - p(a) || byName(a, b),
    "p-asc": (a, b) => p(a) - p(b) || byName(a, b),
    "class": (a, b) => className(a).localeCompare(className(b)) || byName(a, b),
    "error": (a, b) => (b.error ? 1 : 0) - (a.error ? 1 : 0) || byName(a, b),
  }[key];
}

function card(r) {
  const element = document.createElement("div");
  element.className = "card" + (r.error ? " failed" : "");
  element.dataset.name = r.name;
  if (r.picture) {
    const link = document.createElement("a");
    link.href = r.picture;
    const image = document.createElement("img");
    image.loading = "lazy";
    image.decoding = "async";
    image.src = r.picture;
    image.alt = r.name;
    link.appendChild(image);
    element.appendChild(link);
  }
  const text = document.createElement("div");
  text.className = "text";
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = r.name;
  text.appendChild(name);
  const line = document.createElement("div");
  if (r.error) {
    line.className = "error";
    line.textContent = r.error;
  } else {
    line.className = "label";
    line.textContent = className(r) + (typeof r.p === "number" ? "  p = " + r.p.toFixed(3) : "");
  }
  text.appendChild(line);
  const links = document.createElement("div");
  links.className = "links";
  for (const [kind, href] of Object.entries(r.links)) {
    const a = document.createElement("a");
    a.href = href;
    a.textContent = kind;
    links.appendChild(a);
  }
  text.appendChild(links);
  element.appendChild(text);
  return element;
}

function renderMore() {
  const fragment = document.createDocumentFragment();
  const end = Math.min(rendered + PAGE, shown.length);
  for (; rendered < end; rendered++) fragment.appendChild(card(shown[rendered]));
  gallery.appendChild(fragment);
  const sentinel = $("more").getBoundingClientRect();
  if (rendered < shown.length && sentinel.top < window.innerHeight + 1200) requestAnimationFrame(renderMore);
}

function update() {
  const wanted = $("class").value.trim().toLowerCase();
  const low = parseFloat($("pmin").value);
  const high = parseFloat($("pmax").value);
  const status = $("status").value;
  shown = records.filter((r) => {
    if (status === "ok" && r.error) return false;
    if (status === "failed" && !r.error) return false;
    if (wanted && !className(r).toLowerCase().includes(wanted)) return false;
    if (!r.error && typeof r.p === "number") {
      if (!isNaN(low) && r.p < low) return false;
      if (!isNaN(high) && r.p > high) return false;
    }
    return true;
  });
  shown.sort(compare($("sort").value));
  gallery.replaceChildren();
  rendered = 0;
  renderMore();
  $("count").textContent = shown.length + " of " + records.length + " images";
}

for (const id of ["class", "pmin", "pmax", "status", "sort"]) {
  $(id).addEventListener("input", update);
  $(id).addEventListener("change", update);
}
new IntersectionObserver((seen) => {
  if (seen.some((e) => e.isIntersecting) && rendered < shown.length) renderMore();
}, { rootMargin: "1200px" }).observe($("more"));
update();
</script>
</body>
</html>
"""
