"""The ASGI app of ``lrp-heatmap serve``: one page, a JSON API, and the live stream when there is one.

Nothing is written to disk: uploads are read into memory (size-limited before they are parsed), the
pictures go back in the JSON answer, and saving is the browser's download.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..lrp import COMPOSITES
from ..render import image_bytes, relevance_map
from .engine import Engine, RequestError, check_setting, decode_bytes
from .patches import KINDS, MAX_PATCHES, apply_patches, parse_patches

if TYPE_CHECKING:
    from ..live import LiveStream

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_UPLOAD = 16 << 20
"""Largest request body accepted (bytes): an image, a patch image and the options together."""
_OPTIONS = {"composite", "topk", "patches", "target", "relevance"}

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class TooLarge(Exception):
    """The request body grew past the limit while it was being read."""


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes: at once from Content-Length, else while reading."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await too_large(self.limit)(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise TooLarge
            return message

        await self.app(scope, limited, send)


def too_large(limit: int) -> JSONResponse:
    return error(
        413, f"request body over the limit of {limit} bytes ({limit / 2**20:g} MiB); send a smaller image"
    )


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def data_url(data: bytes, kind: str) -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def parse_options(text: str | None, engine: Engine) -> dict[str, Any]:
    """The ``options`` form field (JSON) with defaults from the server's config; RequestError if bad."""
    try:
        options = json.loads(text) if text else {}
    except json.JSONDecodeError as problem:
        raise RequestError(f"options: not valid JSON ({problem})", status=400) from None
    if not isinstance(options, dict):
        raise RequestError(f"options: expected a JSON object, got {type(options).__name__}", status=400)
    unknown = set(options) - _OPTIONS
    if unknown:
        raise RequestError(
            f"options: unknown key {sorted(unknown)[0]!r}; known: {', '.join(sorted(_OPTIONS))}"
        )
    composite, topk = check_setting(
        options.get("composite", engine.default[0]), options.get("topk", engine.default[1])
    )
    target = options.get("target")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int) or target < 0):
        raise RequestError(f"target: expected null or a class index, got {target!r}")
    relevance = options.get("relevance", False)
    if not isinstance(relevance, bool):
        raise RequestError(f"relevance: expected true or false, got {relevance!r}")
    patches = parse_patches(options.get("patches"))
    return {
        "composite": composite,
        "topk": topk,
        "target": target,
        "patches": patches,
        "relevance": relevance,
    }


def create_app(
    engine: Engine, *, max_upload: int = DEFAULT_MAX_UPLOAD, live: LiveStream | None = None
) -> Any:
    """The app for one engine; ``live`` adds the camera stream (``/live.mjpeg``) to the page."""

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def info(request: Request) -> Response:
        loaded = engine.loaded
        return JSONResponse(
            {
                "model": loaded.name,
                "resolution": engine.resolution,
                "composite": engine.default[0],
                "topk": engine.default[1],
                "composites": ["auto", *sorted(COMPOSITES)],
                "patch_kinds": list(KINDS),
                "max_patches": MAX_PATCHES,
                "max_upload": max_upload,
                "live": live is not None,
            }
        )

    async def explain(request: Request) -> Response:
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise RequestError("expected a multipart/form-data upload with an 'image' file", status=415)
        parser = MultiPartParser(request.headers, request.stream(), max_files=2, max_fields=4)
        parser.spool_max_size = max_upload  # uploads stay in memory: the body limit is below this
        try:
            form = await parser.parse()
        except MultiPartException as problem:
            raise RequestError(f"malformed upload: {problem.message}", status=400) from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise RequestError("image: missing; send the photo as the file field 'image'")
        options_field = form.get("options")
        options = parse_options(options_field if isinstance(options_field, str) else None, engine)
        image_data = await upload.read()
        patch_upload = form.get("patch_image")
        patch_data = (
            await patch_upload.read()
            if patch_upload is not None and not isinstance(patch_upload, str)
            else None
        )
        await form.close()

        def work() -> dict[str, Any]:
            photo = decode_bytes(image_data, engine.config.max_pixels, "image")
            patch_image = (
                decode_bytes(patch_data, engine.config.max_pixels, "patch_image") if patch_data else None
            )
            patched = apply_patches(photo, options["patches"], patch_image)
            explained = engine.explain(patched, options["composite"], options["topk"], options["target"])
            heatmap, overlay = engine.pictures(patched, explained)
            answer = {
                "heatmap": data_url(image_bytes(heatmap, "png"), "png"),
                "overlay": data_url(image_bytes(overlay, "jpg"), "jpeg"),
                "width": photo.width,
                "height": photo.height,
                "top": explained.top,
                "class_index": explained.class_index,
                "label": engine.label(explained.class_index),
                "probability": explained.probability,
                "relevance_sum": explained.relevance_sum,
                "composite": explained.composite,
                "topk": explained.topk,
                "patches": len(options["patches"]),
                "ms": round(explained.ms, 2),
            }
            if options["relevance"]:  # the raw map for scripts: (H, W) float32, summed over colour channels
                heat = relevance_map(explained.relevance).astype("<f4")
                answer["relevance"] = {
                    "shape": list(heat.shape),
                    "dtype": "<f4",
                    "data": base64.b64encode(heat.tobytes()).decode(),
                }
            return answer

        return JSONResponse(await run_in_threadpool(work))

    async def live_status(request: Request) -> Response:
        if live is None:
            raise RequestError("no live stream: start one with 'lrp-heatmap live'", status=404)
        return JSONResponse(live.status())

    async def live_frames(request: Request) -> Response:
        if live is None:
            raise RequestError("no live stream: start one with 'lrp-heatmap live'", status=404)
        stream = live

        async def frames() -> AsyncIterator[bytes]:
            number = 0
            while True:
                frame = await run_in_threadpool(stream.wait_frame, number, 1.0)
                if frame is None:
                    if stream.finished:
                        return
                    continue
                number, jpeg = frame
                yield b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n" % (
                    len(jpeg),
                    jpeg,
                )

        return StreamingResponse(frames(), media_type="multipart/x-mixed-replace; boundary=frame")

    async def request_error(request: Request, problem: Exception) -> Response:
        return error(getattr(problem, "status", 422), str(problem))

    async def http_error(request: Request, problem: Exception) -> Response:
        assert isinstance(problem, HTTPException)
        return error(problem.status_code, str(problem.detail))

    async def body_too_large(request: Request, problem: Exception) -> Response:
        return too_large(max_upload)

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/api/info", info),
            Route("/api/explain", explain, methods=["POST"]),
            Route("/api/live", live_status),
            Route("/live.mjpeg", live_frames),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        exception_handlers={RequestError: request_error, HTTPException: http_error, TooLarge: body_too_large},
    )
    return BodyLimit(app, max_upload)
