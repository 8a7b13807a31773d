"""Ctrl-C before a command has started (while torch loads, while options are parsed) ends the program
at once with exit code 130 and one line, never a KeyboardInterrupt traceback: nothing is written yet.

Importing this module arms the early handler (``cli.py`` imports it before the heavy libraries);
:func:`disarm` hands Ctrl-C back to Python's KeyboardInterrupt, which the commands handle themselves.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

from .errors import EXIT_INTERRUPTED


def _exit_now(signum: int, frame: FrameType | None) -> None:
    sys.stderr.write("lrp-heatmap: interrupted\n")
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def arm() -> None:
    """Exit quietly on Ctrl-C from now on (only where Ctrl-C has Python's default behaviour)."""
    if threading.current_thread() is threading.main_thread() and (
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):
        signal.signal(signal.SIGINT, _exit_now)


def disarm() -> None:
    """Back to KeyboardInterrupt (a command cleans up and exits 130 itself)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _exit_now:
        signal.signal(signal.SIGINT, signal.default_int_handler)


arm()
