"""``lrp-heatmap serve``: the JSON API against the engine run directly in the test, its validation and
size limit, and the page in headless Chromium (upload, a patch, the webcam)."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from lrp_cli.config import load_config
from lrp_cli.data import prepare
from lrp_cli.lrp import Explainer
from lrp_cli.render import pictures
from lrp_cli.serve import listen
from lrp_cli.serve.app import create_app
from lrp_cli.serve.engine import Engine
from lrp_cli.serve.patches import Patch, apply_patches, box

RESOLUTION = 48
LIMIT = 1 << 20


def photo_bytes(width: int = 80, height: int = 60, seed: int = 0, image_format: str = "PNG") -> bytes:
    """A photo-like test image: smooth gradients, a bright disc and a dark bar, plus mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    picture = np.stack([x, y, 1 - x], axis=2) * 160 + 40
    disc = (x - 0.45) ** 2 + (y - 0.35) ** 2 < 0.03
    picture[disc] = [240, 200, 40]
    picture[int(0.6 * height) : int(0.7 * height), : width // 2] = [20, 20, 60]
    picture += rng.normal(0, 6, picture.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8), "RGB").save(buffer, image_format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    out = tmp_path_factory.mktemp("serve") / "never-written"
    config = load_config(None, {"resolution": RESOLUTION, "device": "cpu", "output": str(out)})
    return Engine(config)


@pytest.fixture(scope="module")
def server(engine: Engine):
    """uvicorn on a free loopback port in a thread, with a 1 MiB request limit; always shut down."""
    import uvicorn

    sock = listen("127.0.0.1", 0)
    app = create_app(engine, max_upload=LIMIT)
    instance = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not instance.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        instance.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert not thread.is_alive()


def reference(engine: Engine, photo: Image.Image, composite: str, topk: float):
    """The engine run directly: a fresh Explainer on the same model and the pipeline's preprocessing
    (prepare, /255, mean/std) written out here."""
    loaded = engine.loaded
    explainer = Explainer(loaded.module, composite, topk, mean=loaded.mean, std=loaded.std)
    image = prepare(photo, RESOLUTION, "squash", loaded.interpolation)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = (torch.tensor(v).reshape(3, 1, 1) for v in (loaded.mean, loaded.std))
    result = explainer(((pixels - mean) / std).unsqueeze(0))
    relevance = result.relevance[0].numpy()
    probabilities = result.logits[0].softmax(0)
    return relevance, probabilities, explainer.composite


def explain(url: str, image: bytes, options: str | None = None, **files: bytes) -> httpx.Response:
    parts = {"image": ("photo.png", image, "image/png")} | {k: (k, v, "image/png") for k, v in files.items()}
    data = {"options": options} if options is not None else {}
    return httpx.post(f"{url}/api/explain", files=parts, data=data, timeout=60)


def decoded(data_url: str) -> np.ndarray:
    header, payload = data_url.split(",", 1)
    assert header.startswith("data:image/")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB"), dtype=np.int16)


def relevance_of(answer: dict) -> np.ndarray:
    raw = answer["relevance"]
    return np.frombuffer(base64.b64decode(raw["data"]), raw["dtype"]).reshape(raw["shape"])


@pytest.mark.parametrize(("composite", "topk"), [("auto", 1.0), ("seed", 0.05)])
def test_api_equals_the_engine(server: str, engine: Engine, composite: str, topk: float) -> None:
    """Relevance, top-5 probabilities and the heatmap are those of the engine run on the same photo."""
    image = photo_bytes()
    options = f'{{"composite": "{composite}", "topk": {topk}, "relevance": true}}'
    response = explain(server, image, options)
    assert response.status_code == 200, response.text
    answer = response.json()
    photo = Image.open(io.BytesIO(image)).convert("RGB")
    relevance, probabilities, preset = reference(engine, photo, composite, topk)
    heat = relevance.sum(0)
    assert answer["composite"] == preset.name and answer["topk"] == topk
    np.testing.assert_allclose(relevance_of(answer), heat, rtol=0, atol=1e-5 * np.abs(heat).max())
    assert answer["relevance_sum"] == pytest.approx(
        float(relevance.sum(dtype=np.float64)), rel=1e-4, abs=1e-7
    )
    values, indices = probabilities.topk(5)
    assert [entry["index"] for entry in answer["top"]] == indices.tolist()
    np.testing.assert_allclose([entry["probability"] for entry in answer["top"]], values.numpy(), rtol=1e-4)
    assert answer["label"] == engine.loaded.label(answer["class_index"])
    assert (answer["width"], answer["height"]) == photo.size
    drawn = pictures(relevance, np.asarray(photo), preset.signed, "squash", 0.6)
    heatmap = decoded(answer["heatmap"])
    assert heatmap.shape == np.asarray(drawn.heatmap).shape
    assert np.mean(np.abs(heatmap - np.asarray(drawn.heatmap, dtype=np.int16)) > 2) < 0.01
    assert decoded(answer["overlay"]).shape == (photo.height, photo.width, 3)


def test_solid_patch_is_what_the_model_sees(server: str, engine: Engine) -> None:
    """A solid patch at fractions (0.25, 0.5, 0.5, 0.25) of an 80x60 photo greys exactly pixels
    x 20..59, y 30..44: the answer equals the engine on the photo painted here."""
    image = photo_bytes()
    patch = '{"kind": "solid", "x": 0.25, "y": 0.5, "w": 0.5, "h": 0.25, "color": "#102030"}'
    answer = explain(server, image, f'{{"patches": [{patch}], "relevance": true}}').json()
    painted = np.asarray(Image.open(io.BytesIO(image)).convert("RGB")).copy()
    painted[30:45, 20:60] = [16, 32, 48]
    relevance, probabilities, _ = reference(engine, Image.fromarray(painted), "auto", 1.0)
    np.testing.assert_allclose(relevance_of(answer), relevance.sum(0), atol=1e-5 * np.abs(relevance).max())
    assert answer["top"][0]["probability"] == pytest.approx(float(probabilities.max()), rel=1e-4)
    plain = explain(server, image, '{"relevance": true}').json()
    assert np.abs(relevance_of(plain) - relevance_of(answer)).max() > 1e-3 * np.abs(relevance_of(plain)).max()


def test_patch_kinds() -> None:
    """Blur, noise and image patches change only their box; noise is fixed by its seed."""
    photo = Image.open(io.BytesIO(photo_bytes(seed=3))).convert("RGB")
    source = np.asarray(photo, dtype=np.int16)
    inside = np.zeros(source.shape[:2], bool)
    left, top, right, bottom = box(Patch("blur", 0.1, 0.2, 0.4, 0.5), *photo.size)
    assert (left, top, right, bottom) == (8, 12, 40, 42)
    inside[top:bottom, left:right] = True
    swatch = Image.new("RGB", (7, 5), (1, 250, 3))
    results = {}
    for kind, extra in (("blur", {}), ("noise", {"seed": 4}), ("image", {})):
        patch = Patch(kind, 0.1, 0.2, 0.4, 0.5, **extra)
        results[kind] = np.asarray(apply_patches(photo, [patch], swatch), dtype=np.int16)
        assert np.array_equal(results[kind][~inside], source[~inside]), kind
        assert not np.array_equal(results[kind][inside], source[inside]), kind
    assert results["blur"][inside].std() < source[inside].std()  # smoother
    assert np.array_equal(results["image"][inside].reshape(-1, 3).max(0), [1, 250, 3])
    again = np.asarray(apply_patches(photo, [Patch("noise", 0.1, 0.2, 0.4, 0.5, seed=4)]), dtype=np.int16)
    other = np.asarray(apply_patches(photo, [Patch("noise", 0.1, 0.2, 0.4, 0.5, seed=5)]), dtype=np.int16)
    assert np.array_equal(again, results["noise"]) and not np.array_equal(other, results["noise"])


@pytest.mark.parametrize(
    ("options", "status", "message"),
    [
        ('{"composite": "nope"}', 422, "composite: unknown preset 'nope'"),
        ('{"composite": "patternnet"}', 422, "needs --patterns FILE"),
        ('{"topk": 0}', 422, "topk: 0 is outside (0, 1]"),
        ('{"topk": "a"}', 422, "topk: expected a number"),
        ('{"target": 1000}', 422, "target:"),
        ('{"colour": 1}', 422, "unknown key 'colour'"),
        ("[1, 2", 400, "options: not valid JSON"),
        ('"text"', 400, "expected a JSON object"),
        ('{"patches": {}}', 422, "patches: expected a list"),
        ('{"patches": [{"kind": "lava", "x": 0, "y": 0, "w": 1, "h": 1}]}', 422, "patches[0].kind"),
        ('{"patches": [{"kind": "solid", "x": 0, "y": 0, "w": 1.5, "h": 1}]}', 422, "patches[0].w: 1.5"),
        ('{"patches": [{"kind": "solid", "x": 0, "y": 0, "w": 1}]}', 422, "patches[0].h: missing"),
        ('{"patches": [{"kind": "solid", "x": 0, "y": 0, "w": 1, "h": 1, "color": "red"}]}', 422, "#rrggbb"),
        ('{"patches": [{"kind": "image", "x": 0, "y": 0, "w": 1, "h": 1}]}', 422, "needs a patch image"),
    ],
)
def test_bad_options_are_refused(server: str, options: str, status: int, message: str) -> None:
    response = explain(server, photo_bytes(20, 20), options)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_bad_requests(server: str, engine: Engine) -> None:
    """Not an image 415, no image 422, not multipart 415, over the limit 413 (announced or chunked),
    unknown paths 404 as JSON; and nothing was written to disk."""
    response = explain(server, b"GIF89a not really")
    assert response.status_code == 415 and "image: not an image file" in response.json()["error"]
    response = httpx.post(f"{server}/api/explain", data={"options": "{}"}, files={"x": ("x", b"1")})
    assert response.status_code == 422 and "image: missing" in response.json()["error"]
    response = httpx.post(f"{server}/api/explain", json={"image": "x"})
    assert response.status_code == 415 and "multipart/form-data" in response.json()["error"]
    response = explain(server, photo_bytes() + b"\0" * LIMIT)
    assert response.status_code == 413 and "over the limit of 1048576 bytes" in response.json()["error"]
    head = b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    chunks = (head if i == 0 else b"\0" * 65536 for i in range(20))  # no Content-Length: counted as read
    response = httpx.post(
        f"{server}/api/explain", content=chunks, headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert response.status_code == 413
    response = httpx.get(f"{server}/api/nothing")
    assert response.status_code == 404 and response.json() == {"error": "Not Found"}
    assert httpx.get(f"{server}/api/explain").status_code == 405
    assert not Path(engine.config.output).exists()


def test_page_is_self_contained(server: str) -> None:
    """The page and its files come from the package; nothing is fetched from another host."""
    page = httpx.get(server)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name in ("app.js", "app.css"):
        asset = httpx.get(f"{server}/static/{name}")
        assert asset.status_code == 200
        assert "http://" not in asset.text and "https://" not in asset.text
    assert "http" not in page.text.replace('name="viewport"', "")
    info = httpx.get(f"{server}/api/info").json()
    assert info["resolution"] == RESOLUTION and "seed" in info["composites"] and info["live"] is False


def test_page_in_chromium(server: str, engine: Engine, chrome, tmp_path: Path) -> None:
    """Upload, a dragged patch changes the heatmap, the top 5 are shown, the webcam streams frames,
    and the browser logs no error."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = photo_bytes(96, 72, seed=1)
    path = tmp_path / "photo.png"
    path.write_bytes(image)
    wait = WebDriverWait(chrome, 60, poll_frequency=0.1)
    chrome.get(server)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    chrome.find_element(By.ID, "file").send_keys(str(path))
    status = chrome.find_element(By.ID, "status")
    wait.until(lambda d: status.get_attribute("data-state") == "done", f"no answer: {status.text}")
    before = chrome.find_element(By.ID, "heatmap").get_attribute("src")
    items = chrome.find_elements(By.CSS_SELECTOR, "#top5 li")
    _, probabilities, _ = reference(engine, Image.open(path).convert("RGB"), "auto", 1.0)
    values, indices = probabilities.topk(5)
    assert [int(item.get_attribute("data-index")) for item in items] == indices.tolist()
    assert items[0].text.startswith(engine.loaded.label(int(indices[0])))
    assert f"{100 * float(values[0]):.1f}%" in items[0].text

    canvas = chrome.find_element(By.ID, "editor")
    ActionChains(chrome).move_to_element_with_offset(canvas, -60, -40).click_and_hold().move_by_offset(
        90, 70
    ).release().perform()
    wait.until(lambda d: status.text == "done (1 patches)", f"no answer with the patch: {status.text}")
    after = chrome.find_element(By.ID, "heatmap").get_attribute("src")
    assert np.abs(decoded(after) - decoded(before)).max() > 20  # the heatmap's pixels changed

    chrome.find_element(By.ID, "webcam").click()
    fps = chrome.find_element(By.ID, "fps")
    wait.until(lambda d: int(fps.get_attribute("data-frames")) >= 3, f"webcam: {status.text}")
    assert "frames/s" in fps.text
    webcam = chrome.find_element(By.ID, "overlay").get_attribute("src")
    assert decoded(webcam).shape == (480, 640, 3)  # the fake camera's frames, explained
    chrome.find_element(By.ID, "webcam").click()
    errors = [entry for entry in chrome.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []


def test_serve_refuses_a_busy_port() -> None:
    """A port already in use is a one-line usage error (exit 2), before the model loads."""
    from typer.testing import CliRunner

    from lrp_cli.cli import app

    busy = listen("127.0.0.1", 0)
    try:
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--port", str(port)])
    finally:
        busy.close()
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.output and "Traceback" not in result.output


def test_explainers_are_kept_warm(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """One explainer per (composite, topk), reused; the least recently used goes beyond WARM_EXPLAINERS
    (set to 2 here to keep the test short)."""
    from lrp_cli.serve import engine as module

    monkeypatch.setattr(module, "WARM_EXPLAINERS", 2)
    first = engine._explainer("epsilon", 0.5)
    assert engine._explainer("epsilon", 0.5) is first
    second = engine._explainer("epsilon", 0.25)
    assert engine._explainer("epsilon", 0.5) is first  # now the most recently used
    engine._explainer("epsilon", 0.125)
    assert list(engine._explainers) == [("epsilon", 0.5), ("epsilon", 0.125)]
    assert engine._explainer("epsilon", 0.25) is not second
