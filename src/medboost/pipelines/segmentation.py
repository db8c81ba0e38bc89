"""One segmentation run end to end: checked data, model, training, sliding-window test on every test case, written
predictions (NIfTI in the source grid for 3D, PNG for 2D) with overlays, metrics and a saved model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medboost.data.segmentation import SegmentationDataModule
from medboost.engine.config import RunConfig, section_kwargs
from medboost.engine.records import run_record, write_json
from medboost.engine.trainer import fit_and_test, start_run
from medboost.models import create_model, save_pretrained
from medboost.models.booster import boosters
from medboost.pipelines.contribution import BoosterProbeCallback, bypassed_test, segmentation_contribution
from medboost.report.segmentation_io import overlay_png, write_nifti_like, write_png_mask
from medboost.tasks.segmentation import SegmentationTask


def build_datamodule(cfg: RunConfig) -> SegmentationDataModule:
    return SegmentationDataModule(**section_kwargs(cfg.data, SegmentationDataModule, seed=cfg.seed))


def build_model(cfg: RunConfig, dm: SegmentationDataModule):
    kwargs = dict(
        spatial_dims=dm.spatial_dims, in_channels=dm.in_channels, num_classes=dm.num_classes, img_size=list(dm.roi_size)
    )
    return create_model(cfg.model.name, **{**kwargs, **cfg.model.kwargs})


def prediction_writer(dm: SegmentationDataModule, folder: Path, names: list[str]):
    """Write each test prediction in its source file's grid (NIfTI with the input's affine, or a PNG mask) plus an
    overlay of image, ground truth and prediction."""

    def write(split: str, index: int, image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor) -> None:
        info = dm.case_info(split, index)
        original = dm.invert(split, index, pred).squeeze().numpy().astype(np.uint8)
        if dm.spatial_dims == 3:
            write_nifti_like(original, info.image, folder / f"{info.case_id}.nii.gz")
        else:
            write_png_mask(original, folder / f"{info.case_id}.png", num_classes=len(names))
        overlay_png(
            image[0].numpy(),
            label[0].numpy(),
            pred.numpy(),
            folder / f"{info.case_id}_overlay.png",
            title=info.case_id,
            class_names=names,
        )

    return write


def prepare(cfg: RunConfig, predictions: Path | None = None) -> tuple[SegmentationDataModule, Any, SegmentationTask]:
    """The checked data, the model sized for it, and the training task (writing test predictions to
    ``predictions`` when given): everything a run needs before training."""
    dm = build_datamodule(cfg)
    dm.setup()
    model = build_model(cfg, dm)
    task = SegmentationTask(
        model,
        dm.num_classes,
        dm.roi_size,
        cfg.optim,
        cfg.seed,
        class_names=dm.label_names,
        spacings=dm.grid_spacings("test"),
        sw_overlap=cfg.data.sw_overlap,
        on_prediction=prediction_writer(dm, predictions, dm.label_names) if predictions else None,
    )
    return dm, model, task


def train_segmenter(cfg: RunConfig, resume: bool = True, callbacks=()) -> dict[str, Any]:
    """Train ``cfg`` (task: segmentation); write ``result.json``, ``model/``, ``predictions/`` to the run folder."""
    started = start_run(cfg)
    run_dir = cfg.run_dir
    dm, model, task = prepare(cfg, predictions=run_dir / "predictions" if cfg.data.write_predictions else None)
    probe = BoosterProbeCallback() if boosters(model) else None
    extra = [*callbacks, *([probe] if probe else [])]
    outcome = fit_and_test(cfg, task, dm, monitor="val_dice", mode="max", resume=resume, callbacks=extra)
    trainer = outcome.pop("trainer")
    # Every process takes part in the bypassed test (it gathers across them); only rank 0 records it.
    bypassed = bypassed_test(trainer, task, dm, "test_metrics") if probe and task.test_metrics else None
    result: dict[str, Any] = {
        **run_record(cfg, dm.record(), model, outcome),
        "test_metrics": task.test_metrics,
    }
    if bypassed is not None:
        result["booster_contribution"] = segmentation_contribution(task.test_metrics, bypassed, probe.norms)
    if trainer.is_global_zero:
        save_pretrained(
            model,
            run_dir / "model",
            extra={
                "task": "segmentation",
                "label_names": dm.label_names,
                "input": {
                    "spatial_dims": dm.spatial_dims,
                    "in_channels": dm.in_channels,
                    "roi_size": list(dm.roi_size),
                    "normalize": cfg.data.normalize,
                    "spacing": cfg.data.spacing,
                    "num_classes": dm.num_classes,
                },
            },
        )
        result["wall_seconds"] = time.perf_counter() - started
        write_json(run_dir / "result.json", result)
    return result
