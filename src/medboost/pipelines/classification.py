"""One classification run end to end: data, model, training, validation-selected test, saved model and report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from medboost.data import transforms as T
from medboost.data.medmnist import MedMNISTDataModule
from medboost.engine.config import RunConfig, section_kwargs
from medboost.engine.records import run_record, write_json
from medboost.engine.trainer import fit_and_test, start_run
from medboost.metrics.classification import classification_report
from medboost.models import create_model, save_pretrained
from medboost.models.booster import boosters
from medboost.pipelines.contribution import BoosterProbeCallback, bypassed_test, classification_contribution
from medboost.report import plots
from medboost.tasks.classification import ClassificationTask


def build_datamodule(cfg: RunConfig) -> MedMNISTDataModule:
    d = cfg.data
    dm = MedMNISTDataModule(**section_kwargs(d, MedMNISTDataModule, seed=cfg.seed))
    if dm.spatial_dims == 2:
        train = T.train_transform_2d(size=d.resize) if d.augment else T.eval_transform_2d(size=d.resize)
        dm.train_transform, dm.eval_transform = train, T.eval_transform_2d(size=d.resize)
    else:
        dm.train_transform = T.train_transform_3d() if d.augment else T.eval_transform_3d()
        dm.eval_transform = T.eval_transform_3d()
    return dm


def build_model(cfg: RunConfig, dm: MedMNISTDataModule):
    """The configured model, sized for the data (channels, classes, image size, 2D/3D)."""
    kwargs: dict[str, Any] = dict(spatial_dims=dm.spatial_dims, in_channels=dm.in_channels, num_classes=dm.num_classes)
    if cfg.model.name.startswith(("vit", "vivit")):  # transformers are built for one input size
        kwargs["img_size"] = cfg.data.resize or dm.image_size
    return create_model(cfg.model.name, **{**kwargs, **cfg.model.kwargs})


def input_spec(cfg: RunConfig, dm: MedMNISTDataModule) -> dict[str, Any]:
    """How a raw image must be prepared for the model (saved with it, used by ``medboost predict``)."""
    return {
        "spatial_dims": dm.spatial_dims,
        "in_channels": dm.in_channels,
        "img_size": cfg.data.resize or dm.image_size,
        "num_classes": dm.num_classes,
        # The eval transforms' normalisation: 2D (x - 0.5) / 0.5 on [0, 1] images; 3D volumes stay in [0, 1].
        "normalize": [0.5, 0.5] if dm.spatial_dims == 2 else None,
    }


def prepare(cfg: RunConfig) -> tuple[MedMNISTDataModule, Any, ClassificationTask]:
    """The checked data, the model sized for it, and the training task: everything a run needs before training."""
    dm = build_datamodule(cfg)
    dm.setup()
    model = build_model(cfg, dm)
    dm.test_every_epoch = cfg.report_best_test_epoch
    return dm, model, ClassificationTask(model, dm.task, cfg.optim, cfg.loss, cfg.seed)


def train_classifier(cfg: RunConfig, resume: bool = True, make_plots: bool = True, callbacks=()) -> dict[str, Any]:
    """Train ``cfg`` and write ``result.json``, ``model/`` (loadable with ``load_pretrained``) and plots to the run
    folder. Returns the result record."""
    started = start_run(cfg)
    dm, model, task = prepare(cfg)
    probe = BoosterProbeCallback() if boosters(model) else None
    extra = [*callbacks, *([probe] if probe else [])]
    outcome = fit_and_test(cfg, task, dm, monitor="val_auc", mode="max", resume=resume, callbacks=extra)
    trainer = outcome.pop("trainer")
    # Every process takes part in the bypassed test (it gathers across them); only rank 0 records it.
    bypassed = bypassed_test(trainer, task, dm, "test_outputs") if probe and hasattr(task, "test_outputs") else None
    run_dir = cfg.run_dir
    result: dict[str, Any] = run_record(cfg, dm.record(), model, outcome)
    if trainer.is_global_zero and hasattr(task, "test_outputs"):
        labels, scores = task.test_outputs["labels"], task.test_outputs["scores"]
        names = list(dm.info.labels)
        result["test_report"] = classification_report(labels, scores, dm.task, label_names=names)
        # Per-case test labels and scores (test-split order): paired comparisons between runs resample these.
        result["test_outputs"] = {"labels": labels, "scores": scores}
        if bypassed is not None:
            result["booster_contribution"] = classification_contribution(
                dm.task, task.test_outputs, bypassed, probe.norms
            )
        if cfg.report_best_test_epoch and result["history"]:
            best = max(result["history"], key=lambda e: e.get("test_auc", float("-inf")))
            result["best_test_epoch_for_comparison_only"] = best
        save_pretrained(
            model,
            run_dir / "model",
            extra={"task": dm.task, "label_names": names, "dataset": dm.info.name, "input": input_spec(cfg, dm)},
        )
        if make_plots:
            _plots(run_dir, dm.task, names, labels, scores, result["test_report"])
        result["wall_seconds"] = time.perf_counter() - started
        write_json(run_dir / "result.json", result)
    return result


def _plots(run_dir: Path, task: str, names, labels, scores, report: dict) -> None:
    figures = run_dir / "figures"
    metrics_csv = run_dir / "logs" / "metrics.csv"
    if metrics_csv.is_file():
        plots.training_curves(metrics_csv, figures / "training_curves.png")
    plots.roc_curves(labels, scores, task, names, figures / "roc_test.png")
    if "confusion_matrix" in report:
        plots.confusion_matrix_plot(report["confusion_matrix"], names, figures / "confusion_test.png")
