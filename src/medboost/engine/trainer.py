"""The one training engine: a Lightning Trainer with checkpoints (selected on validation), resume, logs and timing.

Every task (classification, segmentation, vision-language) hands a LightningModule and a DataModule to
:func:`fit_and_test`; the engine selects the checkpoint on the validation metric, evaluates test once at that
checkpoint, and returns what it measured.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, RichProgressBar, WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger

from medboost.engine.config import RunConfig
from medboost.engine.records import write_json
from medboost.errors import ConfigError


class EpochTimer(Callback):
    """Wall time per training epoch and training throughput (samples/s), measured on rank 0."""

    def __init__(self):
        self.epoch_seconds: list[float] = []
        self.samples: list[int] = []
        self._start = 0.0
        self._count = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()
        self._count = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # (image, target, index) tuples, or a dict of lists and tensors (vision-language batches)
        self._count += len(batch["image"] if isinstance(batch, dict) else batch[0])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_seconds.append(time.perf_counter() - self._start)
        self.samples.append(self._count * trainer.world_size)

    def summary(self) -> dict[str, float | None]:
        if not self.epoch_seconds:
            return {"seconds_per_epoch": None, "samples_per_second": None}
        # The first epoch pays one-off costs (allocation, lazy init); skip it when there are others.
        secs = self.epoch_seconds[1:] or self.epoch_seconds
        samples = self.samples[1:] or self.samples
        return {
            "seconds_per_epoch": sum(secs) / len(secs),
            "samples_per_second": sum(samples) / sum(secs),
            "epochs_timed": len(secs),
        }


class EpochHistory(Callback):
    """Every epoch's epoch-level metrics (training loss, validation metrics, learning rate), kept across resumes.

    The rows travel inside the checkpoints (Lightning stores a callback's ``state_dict``), so a run killed mid-epoch
    and resumed from ``last.ckpt`` still reports every epoch, and ``logs/metrics.csv`` is rewritten whole after each
    epoch from them. (Lightning's CSVLogger deletes the previous file on resume, and buffers rows that a ``kill -9``
    loses.) Rows are recorded at the end of the training epoch, after validation and before the checkpoints of that
    epoch are written.
    """

    def __init__(self, csv_path: Path | None = None):
        self.rows: list[dict[str, float]] = []
        self.csv_path = csv_path

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        row: dict[str, float] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        metrics = trainer.callback_metrics
        for key, value in sorted(metrics.items()):
            if key.endswith("_step") or f"{key}_epoch" in metrics:
                continue  # the last batch's value, not the epoch's (which is also there, as KEY_epoch)
            row[key] = float(value)
        if trainer.optimizers:
            row["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
        if self.csv_path is not None and trainer.is_global_zero:
            self._write_csv()

    def _write_csv(self) -> None:
        keys = list(dict.fromkeys(k for row in self.rows for k in row))
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows({k: ("" if _nan(v) else v) for k, v in row.items()} for row in self.rows)
        tmp.replace(self.csv_path)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def build_trainer(cfg: RunConfig, run_dir: Path, monitor: str, mode: str, extra_callbacks: list[Callback] = ()):
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best-{epoch:03d}", monitor=monitor, mode=mode, save_top_k=1
    )
    # Lightning >= 2.6 writes `save_last` only when a top-k checkpoint was written in the same step, so "last" is a
    # checkpoint callback of its own: the newest epoch, always, for resuming an interrupted run.
    last = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="last", monitor=None, save_top_k=1, enable_version_counter=False
    )
    callbacks: list[Callback] = [checkpoint, last, *extra_callbacks]
    t = cfg.trainer
    if t.patience is not None:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=t.patience))
    if t.ema_decay is not None:
        from lightning.pytorch.callbacks import EMAWeightAveraging

        callbacks.append(EMAWeightAveraging(decay=t.ema_decay))
    if t.progress:
        callbacks.append(RichProgressBar(leave=True))  # one bar per epoch, with its metrics
    trainer = L.Trainer(
        **t.lightning_kwargs(),
        callbacks=callbacks,
        logger=TensorBoardLogger(run_dir, name="tensorboard", version="", default_hp_metric=False),
        gradient_clip_val=cfg.optim.grad_clip,
        enable_progress_bar=t.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=run_dir,
    )
    return trainer, checkpoint


def fit_and_test(
    cfg: RunConfig,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    monitor: str,
    mode: str = "max",
    resume: bool = True,
    callbacks: list[Callback] = (),
) -> dict[str, Any]:
    """Train with validation-based checkpoint selection, then test once at the selected checkpoint.

    ``monitor`` / ``mode`` are the task's own selection metric; ``trainer.monitor`` in the config replaces them (a
    name with ``loss`` in it is minimised). With ``resume`` a run whose ``checkpoints/last.ckpt`` exists continues from
    it (same seed, same result as an uninterrupted run).
    """
    if cfg.trainer.monitor is not None:
        monitor, mode = cfg.trainer.monitor, "min" if "loss" in cfg.trainer.monitor else "max"
    run_dir = cfg.run_dir
    new_folder = not run_dir.exists()
    guard_run_dir(cfg, resume)
    timer, history = EpochTimer(), EpochHistory(run_dir / "logs" / "metrics.csv")
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if resume and last.is_file() else None
    start = time.perf_counter()
    try:
        trainer, checkpoint = build_trainer(cfg, run_dir, monitor, mode, [timer, history, *callbacks])
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except BaseException as exc:
        # A run that failed before its first checkpoint (bad data found by a loader, a shape error) leaves no folder
        # behind; a folder with a checkpoint is kept for resuming, and a folder that existed before is never touched.
        if new_folder and module.global_rank == 0 and not any((run_dir / "checkpoints").glob("*.ckpt")):
            shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(exc, MisconfigurationException) and "could not find the monitored key" in str(exc):
            raise ConfigError(f"trainer.monitor {monitor!r}: {exc}".split(" HINT:")[0]) from exc
        raise
    fit_seconds = time.perf_counter() - start
    rows = list(history.rows)  # before test: loading the best checkpoint also restores the callbacks' older state
    # With EMA the selected checkpoint's weights are the averaged ones; Lightning's EMA callback would load the raw
    # weights back over them when the checkpoint is restored for test, so test (and the saved model) runs without it.
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, WeightAveraging)]
    best = checkpoint.best_model_path or None
    test = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    best_score = checkpoint.best_model_score
    return {
        "history": rows,
        "trainer": trainer,
        "best_checkpoint": best,
        "best_epoch": _epoch_from_path(best),
        "monitor": monitor,
        "best_val": float(best_score) if best_score is not None else None,
        "test": {k: float(v) for k, v in (test[0] if test else {}).items()},
        "resumed_from": ckpt_path,
        "fit_seconds": fit_seconds,
        **timer.summary(),
    }


def dry_run(cfg: RunConfig, module: L.LightningModule, datamodule: L.LightningDataModule) -> None:
    """Check a run end to end without writing anything: the trainer settings are validated by building the Trainer
    the run would use, then one training batch (forward, loss, backward, optimiser step) and one validation batch run
    on one device (Lightning's ``fast_dev_run``: no checkpoints, no logs, no run folder)."""
    L.Trainer(**cfg.trainer.lightning_kwargs(), logger=False, enable_checkpointing=False, enable_progress_bar=False)
    t = cfg.trainer
    trainer = L.Trainer(
        fast_dev_run=1,
        accelerator=t.accelerator,
        devices=1,
        precision=t.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=cfg.optim.grad_clip,
    )
    trainer.fit(module, datamodule=datamodule)


def guard_run_dir(cfg: RunConfig, resume: bool = True) -> None:
    """Record the config a run folder was started with, and refuse to resume that folder under a different one: a
    checkpoint trained for 10 epochs must never be silently continued or reported as a 15-epoch run. Without
    ``resume`` the run starts over and its config replaces the stored one."""
    stored_path = cfg.run_dir / "run_config.json"
    if resume and stored_path.is_file():
        _refuse_other_config(cfg, stored_path, lambda stored: stored)
    else:
        write_json(stored_path, cfg.to_dict())


def finished_result(cfg: RunConfig) -> dict | None:
    """The ``result.json`` of a run that already finished with exactly this config, or None when there is none (a
    long benchmark reuses finished runs). A result made with another config is an error, never a silent reuse."""
    done = cfg.run_dir / "result.json"
    return _refuse_other_config(cfg, done, lambda result: result["config"]) if done.is_file() else None


def _refuse_other_config(cfg: RunConfig, path: Path, config_of) -> dict:
    """Read the JSON at ``path``; raise ConfigError naming the file and the differing keys unless the config it holds
    (``config_of(data)``) is ``cfg``'s. Returns the data."""
    try:
        data = json.loads(path.read_text())
        changed = cfg.differences(config_of(data))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); delete the run folder to start over") from exc
    if changed:
        raise ConfigError(
            f"{path}: this run folder was made with a different config ({', '.join(changed)} differ); "
            "choose another output folder or name, or delete the folder to start over"
        )
    return data


def _epoch_from_path(path: str | None) -> int | None:
    if not path:
        return None
    stem = Path(path).stem  # best-epoch=012
    try:
        return int(stem.split("=")[-1])
    except ValueError:
        return None


def start_run(cfg: RunConfig) -> float:
    """Use every core for intra-op work (PyTorch may default lower inside containers) unless the user chose a thread
    count with ``OMP_NUM_THREADS``, and seed every RNG (model initialisation draws from them before the first epoch).
    Returns the start time."""
    import os

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return time.perf_counter()
