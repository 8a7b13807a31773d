"""One run per output folder: a lock file held with ``flock``, which the kernel releases when its owner
dies (even by SIGKILL), so a lock left by a crash is recognised and taken over."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import EnvironmentFailure, RunError

LOCK_NAME = ".lrp-heatmap.lock"


def _describe(content: bytes) -> str:
    """'PID 123 on host h, started 2025-01-01 12:00:00' from a lock file's content."""
    try:
        owner = json.loads(content.decode("utf-8"))
        job = f"{owner['job']}: " if owner.get("job") else ""
        return f"{job}PID {owner['pid']} on host {owner['host']}, started {owner['started']}"
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        return "another process"


class FolderLock:
    """Held from :meth:`acquire` to :meth:`release`; ``taken_over`` names a crashed previous owner.

    A torchrun job holds one lock for all its ranks: rank 0 takes it (``job`` names the job in the
    lock file) and tells the others whether they may start (lrp_cli.distributed), so a second job, or a
    second single run, is refused like any other."""

    def __init__(self, folder: Path, job: str | None = None) -> None:
        self.folder = folder
        self.job = job
        self.path = folder / LOCK_NAME
        self.fd: int | None = None
        self.taken_over: str | None = None

    def acquire(self) -> FolderLock:
        """Create the folder if needed and take the lock; RunError names the owner if another run has it."""
        if self.folder.exists() and not self.folder.is_dir():
            raise RunError(f"output folder {self.folder} is a file; choose another --output")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not os.access(self.folder, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            while self.fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    owner = _describe(os.pread(fd, 4096, 0))
                    os.close(fd)
                    raise RunError(
                        f"output folder {self.folder} is in use by another lrp-heatmap run ({owner}); "
                        "wait for it to finish or choose another --output"
                    ) from None
                if self._still_linked(fd):  # else its owner removed it between our open and flock: retry
                    self.fd = fd
                else:
                    os.close(fd)
            previous = os.pread(self.fd, 4096, 0)
            owner = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            if self.job:
                owner["job"] = self.job
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(owner).encode(), 0)
        except OSError as error:
            self.release()
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                raise EnvironmentFailure(
                    f"cannot write to output folder {self.folder}: {error.strerror}"
                ) from None
            raise RunError(
                f"cannot write to output folder {self.folder}: {error.strerror or error}; "
                "choose another --output"
            ) from None
        if previous.strip():  # its owner ended without releasing it: killed or crashed
            self.taken_over = _describe(previous)
        return self

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no other run sees a half-released lock)."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
