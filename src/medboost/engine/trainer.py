"""The one training engine: a Lightning Trainer with checkpoints (selected on validation), resume, logs and timing.

Every task (classification, segmentation, vision-language) hands a LightningModule and a DataModule to
:func:`fit_and_test`; the engine selects the checkpoint on the validation metric, evaluates test once at that
checkpoint, and returns what it measured.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

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
        self._count += len(batch[0])

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
    loggers = [
        CSVLogger(run_dir, name="logs", version=""),
        TensorBoardLogger(run_dir, name="tensorboard", version="", default_hp_metric=False),
    ]
    trainer = L.Trainer(
        max_epochs=t.max_epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        precision=t.precision,
        callbacks=callbacks,
        logger=loggers,
        gradient_clip_val=cfg.optim.grad_clip,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=t.deterministic,
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

    With ``resume`` a run whose ``checkpoints/last.ckpt`` exists continues from it (same seed, same result as an
    uninterrupted run).
    """
    run_dir = cfg.run_dir
    guard_run_dir(cfg, resume)
    timer = EpochTimer()
    trainer, checkpoint = build_trainer(cfg, run_dir, monitor, mode, [timer, *callbacks])
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if resume and last.is_file() else None
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    fit_seconds = time.perf_counter() - start
    best = checkpoint.best_model_path or None
    test = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    best_score = checkpoint.best_model_score
    return {
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
    """Use every core for intra-op work (PyTorch may default lower inside containers) and seed every RNG (model
    initialisation draws from them before the first epoch). Returns the start time."""
    import os

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return time.perf_counter()
