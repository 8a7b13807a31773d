"""torchrun: the ranks of one job share the inputs of ``lrp-heatmap run`` and ``snapshot check``.

Rank 0 discovers the inputs (stdin is read once, and ranks on several machines cannot disagree about
a folder listing), locks the output folder for the whole job and sends the list to every rank. Each
rank takes a contiguous shard of that list -- no padding, no duplicates, and concatenated in rank
order the shards are the single-process order again -- explains it on its own device and records it
in its own ``manifest.rankR.jsonl``. At the end rank 0 folds the rank manifests into
``manifest.jsonl``; after a crash the next run does it first (``--resume``) or drops them (a fresh run).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from .errors import (
    EXIT_BROKEN_PIPE,
    EXIT_ENVIRONMENT,
    EXIT_FAILED_INPUTS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    EnvironmentFailure,
    RunError,
    disk_failure,
)
from .manifest import MANIFEST, ManifestState, ManifestWriter, read_manifest

T = TypeVar("T")

SEVERITY = (EXIT_OK, EXIT_FAILED_INPUTS, EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_USAGE, EXIT_ENVIRONMENT)
"""Exit codes from best to worst: the job ends with the worst code of its ranks."""

WAIT = timedelta(days=7)
"""How long a rank that finished its share waits for the others (gloo's default, 30 minutes, is far
shorter than the imbalance between shards of a large job can be). A rank that dies is noticed by
torchrun, which stops the rest, so nothing waits this long for a dead peer."""

RANK_MANIFEST = re.compile(r"manifest\.rank(\d+)\.jsonl")
MERGE_MARKER = ".lrp-heatmap.merge"


@dataclass(frozen=True)
class Job:
    """Where this process stands in a torchrun job (torchrun's environment variables); one process
    outside torchrun is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    run_id: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Job:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
        defaults = (0, 1, 0, 1)
        values = []
        for name, default in zip(names, defaults):
            text = environ.get(name, "")
            if not text:
                values.append(default)
            elif text.isdigit():
                values.append(int(text))
            else:
                raise RunError(
                    f"environment variable {name}={text!r} is not a rank number; start with torchrun"
                )
        rank, world, local_rank, local_world = values
        if "LOCAL_WORLD_SIZE" not in environ:
            local_world = world
        if not 0 <= rank < world:
            raise RunError(f"RANK={rank} is outside WORLD_SIZE={world}; start with torchrun")
        run_id = (
            environ.get("TORCHELASTIC_RUN_ID")
            or f"{environ.get('MASTER_ADDR', '')}:{environ.get('MASTER_PORT', '')}"
        )
        return cls(rank, world, local_rank, local_world, run_id)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share: ``items[rank*n//W : (rank+1)*n//W]`` (sizes differ by at most one)."""
        count = len(items)
        return list(items[self.rank * count // self.world_size : (self.rank + 1) * count // self.world_size])

    def describe(self) -> str:
        return f"torchrun job {self.run_id} with {self.world_size} ranks, rank 0"


def worst(codes: Iterable[int]) -> int:
    """The worst exit code; one this module does not rank counts as an environment failure."""
    return max(codes, key=lambda code: SEVERITY.index(code if code in SEVERITY else EXIT_ENVIRONMENT))


def exit_code(error: BaseException) -> int:
    """The code the CLI gives an exception that ends a rank (see lrp_cli.cli)."""
    from .clihelp import is_usage_error

    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else EXIT_ENVIRONMENT
    if is_usage_error(error) and not isinstance(error, EnvironmentFailure):
        return EXIT_USAGE
    return EXIT_ENVIRONMENT


@contextmanager
def process_group(job: Job) -> Iterator[Any]:
    """A gloo group over every rank (CPU collectives only: a few small objects per job)."""
    import torch.distributed as dist

    if dist.is_initialized():  # the caller's own group (pipeline.run inside a torchrun program): kept
        yield dist
        return
    dist.init_process_group("gloo", timeout=WAIT, rank=job.rank, world_size=job.world_size)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def agree(dist: Any, job: Job, work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 and hand its result to every rank. If it raises, rank 0 raises it and the
    other ranks exit quietly with its exit code (so the message is printed once)."""
    outcome: list[Any] = [None]
    error: BaseException | None = None
    if job.rank == 0:
        try:
            outcome[0] = ("ok", work())
        except BaseException as failure:
            error = failure
            outcome[0] = ("error", exit_code(failure))
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    kind, value = outcome[0]
    if kind == "error":
        raise SystemExit(value)
    return value


def configure_device(job: Job, config: Any = None) -> None:
    """On a GPU host, GPU ``LOCAL_RANK`` (modulo the GPUs present: more ranks than GPUs share them) for
    ``device: auto``/``cuda``, set as ``config.device`` and as the current device; on the CPU the host's
    cores split between its ranks (torchrun would leave each one thread)."""
    import torch

    if torch.cuda.is_available() and (config is None or config.device in ("auto", "cuda")):
        index = job.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        if config is not None:
            config.device = f"cuda:{index}"
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // job.local_world_size))


def rank_manifest(out_dir: Path, rank: int) -> Path:
    return out_dir / f"manifest.rank{rank}.jsonl"


def rank_manifests(out_dir: Path) -> list[Path]:
    """Rank manifests in the folder, in rank order."""
    found = []
    if out_dir.is_dir():
        for path in out_dir.iterdir():
            match = RANK_MANIFEST.fullmatch(path.name)
            if match:
                found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def _whole(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1]


def merge_rank_manifests(out_dir: Path) -> int:
    """Append every rank manifest's whole lines to ``manifest.jsonl`` (rank order) and remove them;
    returns the bytes of cut-short last records dropped on the way. Call holding the folder's lock.

    Safe to cut at any point: a marker file records the manifest's size before the appends, so a merge
    interrupted before the rank manifests are removed is redone from that size, and one interrupted
    while removing them (all appends done and synced) only finishes removing them.
    """
    manifest, marker = out_dir / MANIFEST, out_dir / MERGE_MARKER
    parts = rank_manifests(out_dir)
    if marker.exists():
        try:
            started = json.loads(marker.read_text(encoding="utf-8"))
            size, names = int(started["size"]), list(started["parts"])
        except (OSError, ValueError, KeyError, TypeError):
            size, names = None, []
        if size is not None and {p.name for p in parts} != set(names):  # the appends were all done
            for part in parts:
                if part.name in names:
                    part.unlink()
            marker.unlink()
            return merge_rank_manifests(out_dir)
    else:
        size = None
    if not parts:
        marker.unlink(missing_ok=True)
        return 0
    from .render import atomic_write

    present = len(_whole(manifest)) if manifest.exists() else 0
    if size is None:
        size = present
        atomic_write(marker, json.dumps({"size": size, "parts": [p.name for p in parts]}).encode())
    dropped = 0
    writer = ManifestWriter(manifest, fresh=False, keep_bytes=min(size, present))
    try:
        for part in parts:
            data = part.read_bytes()
            whole = data[: data.rfind(b"\n") + 1]
            dropped += len(data) - len(whole)
            written = 0
            while written < len(whole):
                written += os.write(writer.fd, whole[written:])
    except OSError as error:
        raise disk_failure(error, str(manifest)) or error from None
    finally:
        writer.close()  # synced before the rank manifests go
    for part in parts:
        part.unlink()
    marker.unlink()
    return dropped


def adopt_rank_manifests(out_dir: Path, resume: bool, err: Any) -> None:
    """What a crashed torchrun job left: folded into the manifest for ``--resume``, dropped for a fresh
    run (whose manifest starts empty). Call holding the folder's lock."""
    if not resume:
        for part in rank_manifests(out_dir):
            part.unlink()
        (out_dir / MERGE_MARKER).unlink(missing_ok=True)
        return
    if rank_manifests(out_dir) or (out_dir / MERGE_MARKER).exists():
        dropped = merge_rank_manifests(out_dir)
        err.write("lrp-heatmap: merged the rank manifests of an unfinished torchrun job into the manifest\n")
        if dropped:
            err.write(f"lrp-heatmap: dropped {dropped} bytes of records cut short by the crash; redone\n")


@dataclass
class RankShare:
    """What :func:`lrp_cli.pipeline._run_locked` needs to run one rank's share."""

    manifest: Path  # this rank's own manifest
    state: ManifestState  # what the merged manifest records as done

    def writer(self) -> ManifestWriter:
        return ManifestWriter(self.manifest, fresh=True)


def _counts(path: Path) -> tuple[int, int]:
    """(explained, failed) records in a rank manifest."""
    explained = failed = 0
    if path.exists():
        for line in _whole(path).splitlines():
            with_error = json.loads(line).get("error") is not None
            failed += with_error
            explained += not with_error
    return explained, failed


def run_job(
    job: Job,
    config: Any,
    inputs: Sequence[str],
    *,
    resume: bool,
    json_output: bool,
    quiet: bool,
    stdin: Iterable[str] | None,
) -> int:
    """One rank of ``torchrun ... -m lrp_cli run``: the job's exit code (the worst of its ranks)."""
    from . import pipeline
    from .lock import FolderLock
    from .outputs import take_over_folder

    err = sys.stderr
    out_dir = Path(os.path.abspath(config.output))
    lock = FolderLock(out_dir, job=job.describe())

    def take_folder() -> list[Any]:
        items = pipeline.find_inputs(config, inputs, stdin, out_dir)
        lock.acquire()
        take_over_folder(lock, err)
        adopt_rank_manifests(out_dir, resume, err)
        if not resume:
            ManifestWriter(out_dir / MANIFEST, fresh=True).close()
        return items

    with process_group(job) as dist:
        try:
            items = agree(dist, job, take_folder)
            configure_device(job, config)
            state = read_manifest(out_dir / MANIFEST) if resume else ManifestState()
            if job.rank > 0:  # rank 0 reports a damaged manifest once
                state.bad_lines, state.torn_bytes = [], 0
            share = RankShare(rank_manifest(out_dir, job.rank), state)
            error: BaseException | None = None
            try:
                free = FolderLock(out_dir)  # the job's lock is rank 0's, announced already
                code = pipeline._run_locked(
                    config, job.shard(items), free, resume, json_output, True, rank=share
                )
            except BaseException as failure:
                error, code = failure, exit_code(failure)
            results: list[Any] = [None] * job.world_size
            dist.all_gather_object(results, (code, *_counts(share.manifest)))
            job_code = worst(result[0] for result in results)
            if job.rank == 0:
                merge_rank_manifests(out_dir)
                write_job_report(config, out_dir)
                if not quiet and not json_output:
                    explained = sum(result[1] for result in results)
                    failed = sum(result[2] for result in results)
                    stopped = [
                        f"rank {r} exit {result[0]}" for r, result in enumerate(results) if result[0] > 1
                    ]
                    err.write(
                        f"lrp-heatmap: {explained} explained, {failed} failed over {job.world_size} ranks"
                        f"{' (' + ', '.join(stopped) + ')' if stopped else ''}; manifest {out_dir / MANIFEST}\n"
                    )
                lock.release()
            # torchrun stops every rank once one exits non-zero: nobody leaves before the merge is done
            dist.barrier()
        finally:
            lock.release()
    if error is not None:
        raise error
    return job_code


def write_job_report(config: Any, out_dir: Path) -> None:
    """The HTML report over the merged manifest (lrp_cli.report), as a local run writes it."""
    from .report import read_records, report_wanted, write_report

    manifest = out_dir / MANIFEST
    if report_wanted(config.report, manifest):
        write_report(out_dir, read_records(manifest))


_OWN_GROUP: set[bool] = set()
"""Not empty while ``snapshot check`` holds a process group it started itself."""


def share_items(work: Callable[[], list[T]]) -> list[T]:
    """``snapshot check`` under torchrun: rank 0 discovers (``work``), every rank gets its contiguous
    share; outside torchrun simply ``work()``. The group stays up for :func:`gather_comparisons`."""
    job = Job.from_env()
    if not job.distributed:
        return work()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=WAIT, rank=job.rank, world_size=job.world_size)
        _OWN_GROUP.add(True)  # ours to close in gather_comparisons
    configure_device(job)
    return job.shard(agree(dist, job, work))


def gather_comparisons(comparisons: list[T], seen: set[str], changes: list[str]) -> tuple[list[T], set[str]]:
    """Every rank's comparisons in rank order (the input order) and the names they saw, for rank 0 to
    report; the other ranks exit quietly with the verdict's code (0 pass, 1 drift)."""
    job = Job.from_env()
    if not job.distributed:
        return comparisons, seen
    import torch.distributed as dist

    results: list[Any] = [None] * job.world_size
    dist.all_gather_object(results, (comparisons, seen))
    if _OWN_GROUP:
        _OWN_GROUP.clear()
        dist.destroy_process_group()
    merged = [comparison for part, _ in results for comparison in part]
    names = set().union(*(part for _, part in results))
    if job.rank > 0:
        passed = not changes and all(getattr(c, "status", None) == "pass" for c in merged)
        raise SystemExit(0 if passed else 1)
    return merged, names
