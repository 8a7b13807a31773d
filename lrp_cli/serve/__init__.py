"""``lrp-heatmap serve``: the interactive page on a local uvicorn server (see ``app.py``)."""

from __future__ import annotations

import socket
import sys
import threading
from typing import TYPE_CHECKING, TextIO

from ..config import Config
from ..errors import RunError

if TYPE_CHECKING:
    from ..live import LiveStream
    from .engine import Engine

LOOPBACK = "127.0.0.1"


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the server starts so a busy port is a clear usage error."""
    if not 0 <= port <= 65535:
        raise RunError(f"--port {port} is not a TCP port (0-65535)")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except (UnicodeError, socket.gaierror) as error:
        sock.close()
        raise RunError(f"--host {host!r} is not an address of this machine: {error}") from None
    except OSError as error:
        sock.close()
        raise RunError(
            f"cannot listen on {host}:{port}: {error.strerror or error}; choose another --port or --host"
        ) from None
    return sock


def run_server(engine: Engine, sock: socket.socket, max_upload: int, live: LiveStream | None = None) -> None:
    """Serve the page on ``sock`` until Ctrl-C (uvicorn then shuts down gracefully and this returns)."""
    import uvicorn

    from .app import create_app

    app = create_app(engine, max_upload=max_upload, live=live)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
    )
    if live is not None:  # the server ends with the stream (a video file played to its end)

        def stop_with_stream() -> None:
            live.done.wait()
            server.should_exit = True

        threading.Thread(target=stop_with_stream, name="lrp-live-stop", daemon=True).start()
    server.run(sockets=[sock])


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(config: Config, host: str, port: int, max_upload_mb: float, err: TextIO | None = None) -> int:
    """Load the model, then serve the page until Ctrl-C; returns the exit code."""
    from .engine import Engine

    err = err or sys.stderr
    if not max_upload_mb > 0:
        raise RunError(f"--max-upload-mb {max_upload_mb} must be positive")
    sock = listen(host, port)
    try:
        engine = Engine(config)
        err.write(f"lrp-heatmap: serving {engine.loaded.name} on {address(sock)} (Ctrl-C to stop)\n")
        if host not in (LOOPBACK, "localhost", "::1"):
            err.write(f"lrp-heatmap: warning: --host {host} makes the page reachable from other machines\n")
        err.flush()
        run_server(engine, sock, int(max_upload_mb * (1 << 20)))
    finally:
        sock.close()
    return 0
