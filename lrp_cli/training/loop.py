"""The training run behind ``lrp-heatmap train``: epochs under ``torch.autocast``, checkpoints, metrics,
``--resume``, and DDP when started by torchrun.

Every random draw is a function of the seed: the split and the initialisation of it alone, data order
and augmentation of (seed, epoch, image), the model's own draws (dropout) of (seed, epoch, process), so
a run resumed from ``last.pt`` (weights, optimizer, schedule and scaler restored) repeats the
uninterrupted one exactly on the CPU.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..config import Config, ConfigError, load_config, merge
from ..data import InputError
from ..errors import EXIT_INTERRUPTED, EXIT_OK, RunError
from ..lock import FolderLock
from ..pipeline import input_resolution, resolve_device
from . import checkpoint
from .curves import CURVES, METRICS, read_metrics, write_curves, write_metrics
from .folders import ClassImages, EpochBatches, Preprocessing, Split, find_split, loader
from .model import build, freeze_backbone, train_mode

BEST, LAST = "best.pt", "last.pt"
PLOT_EVERY = 60.0
"""Seconds between redraws of curves.png during a run (a plot costs about a second); always at the end."""
CLI_KEYS = {"output": "output", "batch_size": "batch_size", "precision": "precision"}
"""Shared command-line options that mean the training's own setting when given to ``train``."""


def from_cli(
    config_path: Path | None,
    data_dir: str,
    overrides: dict[str, Any],
    train_options: dict[str, Any],
    *,
    resume: bool,
    quiet: bool,
) -> int:
    """``lrp-heatmap train``: the config file, then the usual overrides, then the ``train:`` ones
    (dedicated options, and ``--output``/``--batch-size``/``--precision``, which set the training's)."""
    overrides = dict(overrides)
    given = {key: value for key, value in train_options.items() if value is not None}
    given |= {CLI_KEYS[key]: overrides.pop(key) for key in list(overrides) if key in CLI_KEYS}
    settings = load_config(config_path, overrides)
    if given:
        settings = merge(settings, {"train": {**settings.train, **given}}, "command line")
    return train(settings, data_dir, resume=resume, quiet=quiet)


@dataclass
class Distributed:
    """This process's place among torchrun's processes (one process, rank 0 of 1, without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: str) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
        dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Each value summed over the processes."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device`` (None: float32 throughout)."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "key 'train.precision' = 'fp16' needs a CUDA device (fp16 training scales its gradients on the GPU); "
            "use bf16 or fp32 on the CPU"
        )
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lr_factor(settings: dict[str, Any], epoch: int) -> float:
    """Learning-rate multiplier for the 0-based ``epoch``: linear warm-up, then the schedule."""
    warmup = settings["warmup_epochs"]
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    if settings["schedule"] == "constant":
        return 1.0
    if settings["schedule"] == "step":
        return settings["step_gamma"] ** ((epoch - warmup) // settings["step_epochs"])
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / max(1, settings["epochs"] - warmup)))


def make_optimizer(parameters: Iterable[nn.Parameter], settings: dict[str, Any]) -> torch.optim.Optimizer:
    common = {"lr": settings["lr"], "weight_decay": settings["weight_decay"]}
    if settings["optimizer"] == "sgd":
        return torch.optim.SGD(parameters, momentum=settings["momentum"], **common)
    kind = torch.optim.Adam if settings["optimizer"] == "adam" else torch.optim.AdamW
    return kind(parameters, **common)


def _device(config: Config, dist: Distributed) -> torch.device:
    if dist.world > 1 and torch.cuda.is_available() and config.device != "cpu":
        torch.cuda.set_device(dist.local_rank)
        return torch.device("cuda", dist.local_rank)
    return resolve_device(config.device)


def train(
    config: Config,
    data_dir: str | Path,
    *,
    resume: bool = False,
    quiet: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    err: TextIO | None = None,
) -> int:
    """Train ``config.model`` on the class folders of ``data_dir`` as ``config.train`` says; returns the
    exit code. ``on_epoch`` is called with each epoch's metrics after its checkpoints are written."""
    dist = Distributed.start(config.device)
    try:
        return _Run(config, dist, err or sys.stderr, quiet).go(Path(data_dir), resume, on_epoch)
    finally:
        dist.close()


class _Run:
    def __init__(self, config: Config, dist: Distributed, err: TextIO, quiet: bool) -> None:
        self.config, self.settings, self.dist, self.err = config, config.train, dist, err
        self.quiet = quiet or not dist.main
        self.out = Path(self.settings["output"])
        self.device = _device(config, dist)
        self.dtype = autocast_dtype(self.settings["precision"], self.device)

    def say(self, message: str) -> None:
        if not self.quiet:
            self.err.write(f"lrp-heatmap: {message}\n")

    def go(self, data_dir: Path, resume: bool, on_epoch: Callable[[dict[str, Any]], None] | None) -> int:
        last = self.out / LAST
        if resume and not last.is_file():
            raise RunError(f"--resume: {last} does not exist; start the run without --resume")
        if not resume and last.is_file():
            raise RunError(
                f"{self.out} already holds a training run ({last}): continue it with --resume, or choose "
                "another --output"
            )
        split = self.data(data_dir)  # a data set that cannot be trained on leaves no folder behind
        lock = FolderLock(self.out).acquire() if self.dist.main else None
        try:
            return self.fit(split, last if resume else None, on_epoch)
        finally:
            if lock is not None:
                lock.release()

    def data(self, data_dir: Path) -> Split:
        s = self.settings
        split = find_split(
            data_dir, s["val_fraction"], s["seed"], self.config.max_pixels, self.config.workers, self.out
        )
        for path, reason in split.skipped:
            self.say(f"skipped {path}: {reason}")
        self.say(
            f"{len(split.classes)} classes ({', '.join(split.classes)}): {len(split.train)} training and "
            f"{len(split.val)} validation images (validation: {split.source})"
            + (f"; {len(split.skipped)} unreadable image(s) left out" if split.skipped else "")
        )
        if len(split.train) < 2 * self.dist.world:
            raise InputError(f"{data_dir}: {len(split.train)} training image(s) are too few to train on")
        return split

    def fit(self, split: Split, last: Path | None, on_epoch: Callable[[dict[str, Any]], None] | None) -> int:
        config, s, device = self.config, self.settings, self.device
        torch.manual_seed(s["seed"])
        loaded, head = build(config.model, config.weights, s["pretrained"], len(split.classes))
        resolution = input_resolution(config, loaded)
        pre = Preprocessing(
            resolution,
            config.resize,
            loaded.interpolation,
            config.mean or loaded.mean,
            config.std or loaded.std,
        )
        if s["freeze_backbone"]:
            freeze_backbone(loaded.module, head)
        module = loaded.module.to(device)
        parameters = [p for p in module.parameters() if p.requires_grad]
        optimizer = make_optimizer(parameters, s)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(s, epoch))
        scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        meta = checkpoint.metadata(loaded.name, head, split.classes, pre)
        history: list[dict[str, Any]] = []
        start, best = 0, None
        if last is not None:
            start, best = self.restore(last, meta, module, optimizer, schedule, scaler)
            history = read_metrics(self.out / METRICS, start)
            if start >= s["epochs"]:
                self.say(f"{last} has finished all {start} epochs; raise train.epochs (--epochs) to train on")
                return EXIT_OK
        model: nn.Module = module
        if self.dist.world > 1:
            model = nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None
            )
        rank, world = self.dist.rank, self.dist.world
        train_batches, train_data, val_data = self.loaders(split, pre)
        self.say(
            f"training {loaded.name} ({_origin(config, s['pretrained'])}"
            f"{', backbone frozen' if s['freeze_backbone'] else ''}) at {resolution}x{resolution} on {device}"
            f"{f' x{world} processes' if world > 1 else ''}, {str(self.dtype or torch.float32).removeprefix('torch.')}"
        )
        finished, self.plotted = start, time.monotonic()
        if device.type == "cuda":  # batches of one shape: let cuDNN time its kernels once
            torch.backends.cudnn.benchmark = True
        try:
            for epoch in range(start, s["epochs"]):
                torch.manual_seed((s["seed"] * 1_000_003 + epoch) * 1009 + rank)
                train_batches.epoch = epoch
                began = time.perf_counter()
                train_mode(module, head, s["freeze_backbone"])
                loss, correct, count = self.steps(model, train_data, optimizer, scaler, parameters, epoch)
                seconds = time.perf_counter() - began
                val_loss, val_correct, val_count = (
                    self.evaluate(module, val_data) if split.val else (0.0, 0.0, 0.0)
                )
                record = {
                    "epoch": epoch + 1,
                    "train_loss": loss / count,
                    "train_accuracy": correct / count,
                    "val_loss": val_loss / val_count if val_count else None,
                    "val_accuracy": val_correct / val_count if val_count else None,
                    "lr": optimizer.param_groups[0]["lr"],
                    "seconds": round(seconds, 3),
                    "images_per_second": round(count / seconds, 2),
                }
                schedule.step()
                score = (
                    [record["val_accuracy"], -record["val_loss"]] if val_count else [-record["train_loss"]]
                )
                improved = best is None or score > best
                best = score if improved else best
                history.append(record)
                if self.dist.main:
                    self.save(meta, module, record, improved, best, optimizer, schedule, scaler, history)
                finished = record["epoch"]
                self.say(_summary(record, s["epochs"]) + (" (best so far)" if improved else ""))
                if on_epoch is not None:
                    on_epoch(record)
        except KeyboardInterrupt:
            self.plot(meta, history)
            done = f"{self.out / LAST} holds epoch {finished}" if finished else "no epoch finished yet"
            self.say(f"interrupted; {done}: run again with --resume to continue")
            return EXIT_INTERRUPTED
        self.plot(meta, history)
        self.say(f"checkpoints {self.out / BEST} (best) and {self.out / LAST}; metrics {self.out / METRICS}")
        return EXIT_OK

    def loaders(self, split: Split, pre: Preprocessing) -> tuple[EpochBatches, DataLoader, DataLoader]:
        """The training batches (whose ``epoch`` the loop sets) and the two DataLoaders."""
        s, config, rank, world = self.settings, self.config, self.dist.rank, self.dist.world
        augment = {key: s[key] for key in ("flip", "crop_scale", "jitter")}
        train_batches = EpochBatches(
            len(split.train), s["batch_size"], s["seed"], shuffle=True, rank=rank, world=world
        )
        val_batches = EpochBatches(
            len(split.val), s["batch_size"], s["seed"], shuffle=False, rank=rank, world=world
        )
        pin = self.device.type == "cuda"
        train_images = ClassImages(split.train, pre, config.max_pixels, augment, s["seed"])
        val_images = ClassImages(split.val, pre, config.max_pixels)
        return (
            train_batches,
            loader(train_images, train_batches, config.workers, pin),
            loader(val_images, val_batches, config.workers, pin),
        )

    def steps(
        self,
        model: nn.Module,
        batches: Iterable[dict[str, Any]],
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        parameters: list[nn.Parameter],
        epoch: int,
    ) -> tuple[float, float, float]:
        """One epoch of optimizer steps: (summed loss, correct, images) over all processes."""
        device, dtype, clip = self.device, self.dtype, self.settings["grad_clip"]
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        bar = self.bar(len(batches), f"epoch {epoch + 1}/{self.settings['epochs']}")  # type: ignore[arg-type]
        for batch in batches:
            self.skipped(batch["failures"])
            if batch["pixels"] is None:
                continue
            pixels = batch["pixels"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(pixels)
            losses = F.cross_entropy(logits.float(), labels, reduction="none")
            images = self.dist.sum([float(len(labels))], device)[0]
            # DDP averages gradients over processes: scale so the step is that of the global batch's mean
            loss = losses.sum() * (self.dist.world / images)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(parameters, clip)
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                totals += torch.stack(
                    [
                        losses.sum().double(),
                        (logits.argmax(1) == labels).sum().double(),
                        totals.new_tensor(len(labels)),
                    ]
                )
            if bar is not None:
                loss_sum, correct, count = totals.tolist()
                bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.3f}", refresh=False)
                bar.update(1)
        if bar is not None:
            bar.refresh()  # the epoch's final loss and accuracy, however fast its steps went by
            bar.close()
        loss_sum, correct, count = self.dist.sum(totals.tolist(), device)
        return loss_sum, correct, count

    @torch.no_grad()
    def evaluate(self, module: nn.Module, batches: Iterable[dict[str, Any]]) -> tuple[float, float, float]:
        """(summed loss, correct, images) on the validation split, over all processes."""
        module.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        for batch in batches:
            self.skipped(batch["failures"])
            if batch["pixels"] is None:
                continue
            pixels, labels = batch["pixels"].to(self.device), batch["labels"].to(self.device)
            with torch.autocast(
                self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
            ):
                logits = module(pixels).float()
            totals += torch.stack(
                [
                    F.cross_entropy(logits, labels, reduction="sum").double(),
                    (logits.argmax(1) == labels).sum().double(),
                    totals.new_tensor(len(labels)),
                ]
            )
        loss_sum, correct, count = self.dist.sum(totals.tolist(), self.device)
        return loss_sum, correct, count

    def bar(self, total: int, title: str) -> Any:
        """A tqdm bar on stderr, only on a terminal and only in the first process."""
        if self.quiet or not self.err.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=title, unit="step", file=self.err, leave=False)

    def skipped(self, failures: list[str]) -> None:
        for failure in failures:  # an image that decoded when checked but not now (changed meanwhile)
            self.say(f"skipped {failure}")

    def save(
        self,
        meta: dict[str, Any],
        module: nn.Module,
        record: dict[str, Any],
        improved: bool,
        best: list[float],
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        history: list[dict[str, Any]],
    ) -> None:
        if improved:
            checkpoint.save(self.out / BEST, meta, module, epoch=record["epoch"], metrics=record)
        training = {
            "epoch": record["epoch"],
            "best": best,
            "settings": dict(self.settings),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict(),
        }
        checkpoint.save(
            self.out / LAST, meta, module, epoch=record["epoch"], metrics=record, training=training
        )
        write_metrics(self.out / METRICS, history)
        if time.monotonic() - self.plotted >= PLOT_EVERY:
            self.plot(meta, history)

    def plot(self, meta: dict[str, Any], history: list[dict[str, Any]]) -> None:
        if self.dist.main and history:
            write_curves(self.out / CURVES, history, f"{meta['model']} on {len(meta['classes'])} classes")
            self.plotted = time.monotonic()

    def restore(
        self,
        last: Path,
        meta: dict[str, Any],
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
    ) -> tuple[int, list[float]]:
        """Load ``last.pt`` into the run; returns (epochs done, best score)."""
        content = checkpoint.read(last)
        if content is None or "training" not in content:
            raise RunError(f"{last} is not the last checkpoint of an lrp-heatmap training run")
        for key in ("model", "head", "classes", "resolution", "mean", "std"):
            if content[key] != meta[key]:
                raise RunError(
                    f"--resume: {last} was trained with {key} {content[key]!r}, this run has {meta[key]!r}; "
                    "resume with the same model, data and preprocessing, or start afresh with another --output"
                )
        training = content["training"]
        changed = [
            f"{key} {training['settings'].get(key)!r} -> {value!r}"
            for key, value in self.settings.items()
            if key != "output" and training["settings"].get(key) != value
        ]
        if changed:
            self.say(
                f"warning: resuming with changed settings ({', '.join(changed)}); the result will differ "
                "from an uninterrupted run"
            )
        module.load_state_dict(content["state_dict"])
        optimizer.load_state_dict(training["optimizer"])
        schedule.load_state_dict(training["schedule"])
        scaler.load_state_dict(training["scaler"])
        self.say(f"resuming after epoch {training['epoch']} from {last}")
        return int(training["epoch"]), list(training["best"])


def _origin(config: Config, pretrained: bool) -> str:
    if not pretrained:
        return "from scratch"
    if config.weights:
        return f"from {config.weights}"
    return "as its factory builds it" if ":" in config.model else "from its published weights"


def _summary(record: dict[str, Any], epochs: int) -> str:
    text = (
        f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} accuracy "
        f"{record['train_accuracy']:.3f}"
    )
    if record["val_loss"] is not None:
        text += f", val loss {record['val_loss']:.4f} accuracy {record['val_accuracy']:.3f}"
    return text + f", {record['seconds']:.1f} s ({record['images_per_second']:.0f} images/s)"
