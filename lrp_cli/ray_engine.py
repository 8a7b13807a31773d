"""Ray Data: ``lrp-heatmap run --engine ray`` maps the explainer over a Dataset of image paths.

An actor pool holds one explainer per actor (one actor per GPU, or per few CPUs), each loading and
tracing the model once; actors decode, explain and write their images' files atomically, and stream
back one manifest record per image, which the driver appends to ``manifest.jsonl`` as they arrive. The
driver does everything that can refuse a run first (inputs, folder lock, model, rules, target: the
engine is tried once on its CPU), so a refused run leaves the manifest untouched, and ``--resume``
skips what the manifest records as done, exactly as a local run does.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .config import Config
from .data import ImageItem
from .errors import EXIT_BROKEN_PIPE, EXIT_FAILED_INPUTS, EXIT_OK, RunError
from .lock import FolderLock
from .manifest import MANIFEST, ManifestState, ManifestWriter, read_manifest

CPUS_PER_ACTOR = 4
"""Threads per explainer on a cluster without GPUs, unless ``ray_actors`` says how many actors."""


class Explain:
    """The actor: one explainer, traced once, for every batch that reaches it."""

    def __init__(self, settings: dict[str, Any], out_dir: str, threads: int) -> None:
        import torch

        from .models import load_model
        from .pipeline import prepare_engine

        torch.set_num_threads(threads)
        self.config = Config(**settings)
        self.out_dir = Path(out_dir)
        self.loaded = load_model(self.config.model, self.config.weights, self.config.mean, self.config.std)
        self.device, self.explainer = prepare_engine(self.config, self.loaded)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        """Rows ``path`` and ``name`` (file-system bytes) in, one JSON manifest record per row out."""
        from .outputs import failure_record, render_outputs
        from .pipeline import explained_batches

        items = [
            ImageItem(Path(os.fsdecode(p)), Path(os.fsdecode(n)))
            for p, n in zip(batch["path"], batch["name"])
        ]
        order = {item.path: number for number, item in enumerate(items)}
        records: list[tuple[int, dict[str, Any]]] = []
        signed = self.explainer.composite.signed
        sink = open(os.devnull, "w")  # noqa: SIM115 -- out-of-memory retries are the driver's to report
        with sink:
            for predictions, failures in explained_batches(
                self.config, items, self.loaded, self.explainer, self.device, sink
            ):
                records += [(order[item.path], failure_record(item, error)) for item, error in failures]
                records += [
                    (order[p.item.path], render_outputs(p, self.config, signed, self.out_dir, self.loaded))
                    for p in predictions
                ]
        return {
            "record": [json.dumps(record, ensure_ascii=False) for _, record in sorted(records, key=_first)]
        }


def _first(pair: tuple[int, Any]) -> int:
    return pair[0]


def dataset_of(items: Sequence[ImageItem]) -> Any:
    """A Ray Dataset with the rows :class:`Explain` takes: ``path`` and ``name`` (output stem), both as
    file-system bytes so that any file name survives."""
    import ray.data

    rows = [{"path": os.fsencode(str(item.path)), "name": os.fsencode(str(item.relative))} for item in items]
    return ray.data.from_items(rows)


def actor_plan(config: Config) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) from the cluster's resources and ``ray_actors``."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if config.device != "cpu" else 0
    cpus = max(1, int(resources.get("CPU", 1)))
    if gpus:
        actors = config.ray_actors or gpus
        return actors, cpus / actors, 1.0 if actors <= gpus else gpus / actors
    actors = config.ray_actors or max(1, cpus // CPUS_PER_ACTOR)
    return actors, cpus / actors, 0.0


def explain(dataset: Any, config: Config, out_dir: str | Path, actors: int | None = None) -> Any:
    """Map the explainer over ``dataset`` (rows ``path`` and ``name``, see :func:`dataset_of`) with a
    pool of actors; the result is a lazy Dataset of ``record`` rows (JSON manifest records), each
    image's files written to ``out_dir`` once its row is produced.

    ``config.resolution`` and ``config.composite`` should be resolved (as :func:`run_ray` does, by
    trying the engine once), so that every actor explains exactly what the manifest will name.
    """
    if actors is not None:
        config = Config(**{**config.to_dict(), "ray_actors": actors})
    count, cpus, gpus = actor_plan(config)
    settings = config.to_dict()
    if gpus == 0 and config.device == "auto":
        settings["device"] = "cpu"
    import ray.data

    return dataset.map_batches(
        Explain,
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=count),
        num_cpus=cpus,
        num_gpus=gpus,
        fn_constructor_kwargs={
            "settings": settings,
            "out_dir": str(Path(os.path.abspath(out_dir))),
            "threads": max(1, int(cpus)),
        },
        batch_format="numpy",
    )


def connect(config: Config, quiet: bool) -> None:
    """Join ``ray_address`` (or ``RAY_ADDRESS``), or start a Ray instance here; an application that
    called ``ray.init`` itself keeps its own."""
    import logging

    import ray

    if not ray.is_initialized():
        address = config.ray_address or os.environ.get("RAY_ADDRESS") or None
        try:
            ray.init(
                address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False
            )
        except ConnectionError as error:
            raise RunError(
                f"cannot reach the Ray cluster at {address!r}: {error}; check ray_address"
            ) from None
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = not quiet and sys.stderr.isatty()
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # no execution plans or progress notes on stderr


def run_ray(
    config: Config,
    inputs: Sequence[str],
    *,
    resume: bool = False,
    json_output: bool = False,
    quiet: bool = False,
    stdin: Iterable[str] | None = None,
) -> int:
    """``lrp-heatmap run --engine ray``: the same exit codes and files as a local run."""
    from .outputs import take_over_folder
    from .pipeline import find_inputs

    try:
        import ray.data  # noqa: F401 -- before anything else: the engine needs it
    except ImportError as error:
        raise RunError(f'engine: ray needs Ray Data ({error}); pip install -e ".[ray]"') from None
    err = sys.stderr
    out_dir = Path(os.path.abspath(config.output))
    items = find_inputs(config, inputs, stdin, out_dir)
    lock = FolderLock(out_dir, job="Ray Data driver").acquire()
    try:
        take_over_folder(lock, err)
        return _drive(config, items, out_dir, resume, json_output, quiet)
    finally:
        lock.release()


def _drive(
    config: Config, items: list[ImageItem], out_dir: Path, resume: bool, json_output: bool, quiet: bool
) -> int:
    from .distributed import adopt_rank_manifests, write_job_report
    from .models import load_model
    from .outputs import failure_record
    from .pipeline import Reporter, StdoutClosed, _silence_stdout, interrupted, prepare_engine
    from .video import split_media

    err = sys.stderr
    adopt_rank_manifests(out_dir, resume, err)
    manifest = out_dir / MANIFEST
    state = read_manifest(manifest) if resume else ManifestState()
    items = [item for item in items if str(item.path) not in state.done]
    images, videos = split_media(items, err)
    items = images + [
        ImageItem(v.path, v.relative, "a video: --engine ray explains images; use the local engine")
        for v in videos
    ]
    trial = Config(**{**config.to_dict(), "device": "cpu"})  # the driver may have no GPU: refuse here
    prepare_engine(trial, load_model(config.model, config.weights, config.mean, config.std))
    config.resolution, config.composite = trial.resolution, trial.composite
    connect(config, quiet or json_output)
    if state.torn_bytes:
        err.write(
            f"lrp-heatmap: {manifest} ended in an incomplete record ({state.torn_bytes} bytes, cut by a crash "
            "or a full disk); removed it, its image is done again\n"
        )
    for number in state.bad_lines:
        err.write(f"lrp-heatmap: {manifest} line {number} is not a manifest record; ignored\n")
    writer = ManifestWriter(
        manifest, fresh=not resume, keep_bytes=state.whole_bytes if state.torn_bytes else None
    )
    reporter = Reporter(writer, sys.stdout if json_output else None, err)
    usable = [item for item in items if item.error is None]
    try:
        for item in items:
            if item.error is not None:
                reporter.record(failure_record(item, item.error))
        if usable:
            for record in _records(explain(dataset_of(usable), config, out_dir)):
                reporter.record(record)
    except KeyboardInterrupt:
        return interrupted(err, reporter.succeeded, "image")
    except StdoutClosed:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    finally:
        writer.close()
    write_job_report(config, out_dir)
    if not quiet and not json_output:
        err.write(
            f"lrp-heatmap: {reporter.succeeded} explained, {reporter.failed} failed; manifest {manifest}\n"
        )
    return EXIT_FAILED_INPUTS if reporter.failed else EXIT_OK


def _records(dataset: Any) -> Iterator[dict[str, Any]]:
    """Records as the actors finish them; an actor's error is raised as itself (a ModelError stays one)."""
    from ray.exceptions import RayTaskError

    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for line in batch["record"]:
                yield json.loads(line)
    except RayTaskError as error:
        cause = error.cause if isinstance(error.cause, Exception) else None
        if cause is not None:
            raise cause from None
        raise
