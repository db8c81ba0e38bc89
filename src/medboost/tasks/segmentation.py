"""Segmentation as a LightningModule: soft Dice + cross-entropy, sliding-window evaluation on whole images,
per-class metrics over every volume of the split (gathered exactly once each across processes)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from torch import nn

from medboost.engine.config import OptimConfig
from medboost.metrics.segmentation import SegmentationMetrics
from medboost.tasks.base import TaskModule


def foreground_means(summary: dict) -> dict[str, float | None]:
    """``{metric: mean over foreground classes}`` from :meth:`SegmentationMetrics.aggregate` (None if undefined)."""
    return {name: entry["mean"] for name, entry in summary["mean_foreground"].items()}


class SegmentationTask(TaskModule):
    """Trains on ROI crops; validates and tests on whole images with sliding windows of the ROI size.

    The loss is the soft (differentiable) Dice plus cross-entropy over all classes; the public MedVisionLlama code's
    Dice on thresholded predictions has no gradient and is not used. ``on_prediction(split, index, image, labels)`` is
    called for every test image (writing NIfTI/PNG predictions and overlays). ``spacings`` are the voxel sizes (mm) of
    the test images as served, by dataset index: surface distances (HD95, NSD) are measured in each image's own grid
    (in voxels when None).
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        roi_size: Sequence[int],
        optim: OptimConfig,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
        spacings: Sequence[Sequence[float]] | None = None,
        sw_overlap: float = 0.5,
        on_prediction: Callable | None = None,
    ):
        super().__init__(model, optim, seed)
        self.num_classes = num_classes
        self.roi_size = tuple(roi_size)
        self.class_names = list(class_names) if class_names else None
        self.spacings = [tuple(s) for s in spacings] if spacings is not None else None
        self.sw_overlap = sw_overlap
        self.on_prediction = on_prediction
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)
        self.test_metrics: dict | None = None
        self._test_rows: list[dict] = []  # per (volume, class) metric rows of this process

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        loss = self.loss(self(x), y)
        self.check_finite(loss)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x.shape[0])
        return loss

    def predict_labels(self, image: torch.Tensor) -> torch.Tensor:
        """Whole-image label map ``(B, *spatial)`` by sliding windows of the training ROI."""
        logits = sliding_window_inference(
            image, self.roi_size, sw_batch_size=4, predictor=self.model, overlap=self.sw_overlap, mode="gaussian"
        )
        return logits.argmax(dim=1)

    def validation_step(self, batch, batch_idx):
        # Model selection needs Dice only; surface distances (HD95, NSD) cost more than the forward pass on a CPU, so
        # they are computed at test time only.
        x, y, index = batch
        pred = self.predict_labels(x)
        onehot = [one_hot(t, self.num_classes) for t in (pred.unsqueeze(1), y)]
        dice = compute_dice(onehot[0], onehot[1], include_background=False, ignore_empty=False)
        self.collect("val", dice.float(), index)

    def test_step(self, batch, batch_idx):
        x, y, index = batch
        pred = self.predict_labels(x)
        metrics = SegmentationMetrics(**self._metric_config())
        # Volume ids are dataset indices, so padded duplicates from a distributed sampler can be recognised.
        spacing = [self.spacings[i] for i in index.tolist()] if self.spacings is not None else None
        metrics.update(pred, y, ids=index.tolist(), spacing=spacing)
        self._test_rows.extend(metrics.per_volume_rows())
        if self.on_prediction is not None:
            for b, i in enumerate(index.tolist()):
                self.on_prediction("test", i, x[b].cpu(), y[b].cpu(), pred[b].cpu())

    def _metric_config(self) -> dict:
        return {"num_classes": self.num_classes, "class_names": self.class_names}

    def _aggregate_test(self) -> dict:
        rows, self._test_rows = self._test_rows, []
        if self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[list[dict]] = [None] * self.trainer.world_size  # type: ignore[list-item]
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        # A distributed sampler pads uneven splits with repeated images: each volume counts once.
        return SegmentationMetrics.from_rows(rows, drop_duplicates=True, **self._metric_config()).aggregate()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._collected.clear()
            return
        dice, _ = self.gathered("val")  # (volumes, foreground classes), each volume once
        per_class = dice.nanmean(dim=0)
        mean = float(per_class.nanmean())
        self.log("val_dice", mean, prog_bar=True)
        for c, value in enumerate(per_class.tolist(), start=1):
            self.log(f"val_dice_{self.class_names[c] if self.class_names else c}", value)

    def on_test_epoch_end(self) -> None:
        self.test_metrics = self._aggregate_test()
        for name, value in foreground_means(self.test_metrics).items():
            if value is not None:
                self.log(f"test_{name}", value)
