"""One classification run end to end: data, model, training, validation-selected test, saved model and report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from medboost.data import transforms as T
from medboost.data.medmnist import MedMNISTDataModule
from medboost.engine.config import RunConfig, section_kwargs
from medboost.engine.records import run_record, write_json
from medboost.engine.trainer import fit_and_test, start_run
from medboost.errors import TrainingError
from medboost.metrics.classification import classification_report, evaluate
from medboost.models import create_model, save_pretrained
from medboost.models.booster import BoosterNormProbe, booster_bypassed, boosters
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
    bypassed = bypassed_test_outputs(trainer, task, dm) if probe and hasattr(task, "test_outputs") else None
    run_dir = cfg.run_dir
    result: dict[str, Any] = run_record(cfg, dm.record(), model, outcome)
    if trainer.is_global_zero and hasattr(task, "test_outputs"):
        labels, scores = task.test_outputs["labels"], task.test_outputs["scores"]
        names = list(dm.info.labels)
        result["test_report"] = classification_report(labels, scores, dm.task, label_names=names)
        # Per-case test labels and scores (test-split order): paired comparisons between runs resample these.
        result["test_outputs"] = {"labels": labels, "scores": scores}
        if bypassed is not None:
            result["booster_contribution"] = contribution_record(dm.task, task.test_outputs, bypassed, probe.norms)
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


class BoosterProbeCallback(Callback):
    """Measures the boosters' branch norms (:class:`BoosterNormProbe`) during the run's test at the selected
    checkpoint: the first test only, so the bypassed re-test that follows cannot overwrite it. The per-process sums
    are added over processes (a distributed sampler's few padded duplicates count twice: a negligible bias in a
    mean of ratios)."""

    def __init__(self):
        self.norms: dict[str, float | None] | None = None
        self._probe: BoosterNormProbe | None = None

    def on_test_start(self, trainer, pl_module) -> None:
        if self.norms is None:
            self._probe = BoosterNormProbe(pl_module.model).__enter__()

    def on_test_end(self, trainer, pl_module) -> None:
        if self._probe is None:
            return
        probe, self._probe = self._probe, None
        probe.__exit__(None, None, None)
        keys = probe.KEYS
        totals = torch.tensor([[probe.sums[k], probe.counts[k]] for k in keys], dtype=torch.float64)
        totals = trainer.strategy.reduce(totals.to(pl_module.device), reduce_op="sum").cpu()
        self.norms = {k: (float(s / n) if n else None) for k, (s, n) in zip(keys, totals.tolist())}


def bypassed_test_outputs(trainer, task: ClassificationTask, dm: MedMNISTDataModule) -> dict[str, np.ndarray]:
    """Test labels and scores of the model at hand (the selected checkpoint, loaded by the run's test) with every
    booster's branch removed (:func:`booster_bypassed`).

    The run's own test loop is reused as is: ``trainer.test`` again, without a checkpoint path, so the weights
    already loaded are the ones evaluated, through the same loader, precision and cross-process gathering. The run's
    test outputs are put back afterwards: they, not these, feed the report, the plots and the saved model."""
    kept = task.test_outputs
    with booster_bypassed(task.model):
        trainer.test(task, datamodule=dm, verbose=False)
    bypassed, task.test_outputs = task.test_outputs, kept
    return bypassed


def contribution_record(
    task: str, with_branch: dict[str, np.ndarray], without_branch: dict[str, np.ndarray], norms: dict | None
) -> dict[str, Any]:
    """``result["booster_contribution"]``: test ACC/AUC with and without the boosters' branch (the same metric code
    as the run's test report), their differences (with minus without), the largest change of any test score, and
    the branch norms measured during the run's test."""
    if not np.array_equal(with_branch["labels"], without_branch["labels"]):
        raise TrainingError("the bypassed test saw other labels than the run's test: the test loader is not fixed")
    on = evaluate(with_branch["labels"], with_branch["scores"], task)
    off = evaluate(without_branch["labels"], without_branch["scores"], task)
    return {
        "test_acc": on["acc"],
        "test_auc": on["auc"],
        "test_acc_without_branch": off["acc"],
        "test_auc_without_branch": off["auc"],
        "delta_acc": on["acc"] - off["acc"],
        "delta_auc": on["auc"] - off["auc"],
        "max_abs_score_change": float(np.abs(with_branch["scores"] - without_branch["scores"]).max()),
        **(norms or dict.fromkeys(BoosterNormProbe.KEYS)),
        "branch_removed_as": "each LLMBooster returns its input: x + M2(..) -> x (outer, hybrid), x -> x (none, inner)",
    }


def _plots(run_dir: Path, task: str, names, labels, scores, report: dict) -> None:
    figures = run_dir / "figures"
    metrics_csv = run_dir / "logs" / "metrics.csv"
    if metrics_csv.is_file():
        plots.training_curves(metrics_csv, figures / "training_curves.png")
    plots.roc_curves(labels, scores, task, names, figures / "roc_test.png")
    if "confusion_matrix" in report:
        plots.confusion_matrix_plot(report["confusion_matrix"], names, figures / "confusion_test.png")
