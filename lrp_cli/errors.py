"""Exit codes and the errors behind them: a pipeline must tell bad usage, bad inputs and a failing
machine apart from the exit code alone."""

from __future__ import annotations

import errno

EXIT_OK = 0  # every input explained
EXIT_FAILED_INPUTS = 1  # the run finished, some inputs failed (each one reported)
EXIT_USAGE = 2  # usage, configuration, model or output-folder problem: nothing was processed
EXIT_ENVIRONMENT = (
    3  # the machine failed the run (disk full, out of memory, worker killed) or an internal error
)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_BROKEN_PIPE = 141  # the reader of stdout went away (128 + SIGPIPE, as shells report it)

# errors of the disk or file system rather than of one file: the run cannot go on
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


class RunError(RuntimeError):
    """A problem that stops the run before any image is processed (exit code 2)."""


class EnvironmentFailure(RuntimeError):
    """The machine failed the run: disk full, out of memory, a worker process killed (exit code 3)."""


def is_out_of_memory(error: BaseException) -> bool:
    """torch's and Python's out-of-memory errors, including the CPU allocator's plain RuntimeError."""
    import torch  # not at the top: the exit codes are read before torch loads (see lrp_cli.interrupt)

    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def disk_failure(error: BaseException, what: str) -> EnvironmentFailure | None:
    """An EnvironmentFailure naming ``what`` was being written, if ``error`` is a disk-level failure."""
    if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
        return EnvironmentFailure(
            f"{error.strerror} while writing {what}; finished outputs and the manifest are whole: "
            "fix the disk, then run again with --resume"
        )
    return None


def worker_failure(error: BaseException) -> EnvironmentFailure | None:
    """An EnvironmentFailure for torch's report of a DataLoader worker that died (killed, out of memory)."""
    if not isinstance(error, RuntimeError) or "DataLoader worker" not in str(error):
        return None
    return EnvironmentFailure(
        f"a DataLoader worker process died ({str(error).splitlines()[0]}); the system may have run out of "
        "memory: lower --workers or --batch-size, then run again with --resume"
    )
