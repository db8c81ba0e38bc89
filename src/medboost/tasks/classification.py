"""Classification as a LightningModule: losses for every MedMNIST task type, mixup/cutmix, MedMNIST metrics."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medboost.engine.config import LossConfig, OptimConfig
from medboost.metrics.classification import evaluate, normalize_task, scores_from_logits
from medboost.tasks.base import TaskModule


def mix_batch(x: torch.Tensor, mixup: float, cutmix: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup or CutMix (chosen at random when both are on) for 2D or 3D batches.

    Returns the mixed batch, the permutation of partners and the weight ``lam`` of the original targets.
    """
    perm = torch.randperm(x.shape[0], device=x.device)
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand(()) < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()))).beta(alpha, alpha))
    if not use_cutmix:
        return lam * x + (1 - lam) * x[perm], perm, lam
    # A box with volume fraction (1 - lam), same relative size on every spatial axis.
    spatial = x.shape[2:]
    side = (1 - lam) ** (1 / len(spatial))
    slices = [slice(None), slice(None)]
    area = 1.0
    for size in spatial:
        length = int(round(size * side))
        start = int(torch.randint(0, size - length + 1, ()))
        slices.append(slice(start, start + length))
        area *= length / size
    mixed = x.clone()
    mixed[tuple(slices)] = x[perm][tuple(slices)]
    return mixed, perm, 1 - area


class ClassificationTask(TaskModule):
    """Trains ``model`` for a MedMNIST task type and reports ACC/AUC exactly as the official Evaluator does.

    Multi-label (ChestMNIST): 14 sigmoid outputs with BCE. Binary, multi-class and ordinal (evaluated as
    multi-class): softmax cross-entropy with optional label smoothing.
    """

    def __init__(
        self,
        model: nn.Module,
        task: str,
        optim: OptimConfig,
        loss: LossConfig,
        seed: int = 0,
    ):
        super().__init__(model, optim, seed)
        self.task = normalize_task(task)
        self.loss_config = loss

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task == "multi-label":
            return F.binary_cross_entropy_with_logits(logits, y.float())
        return F.cross_entropy(logits, y, label_smoothing=self.loss_config.label_smoothing)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        cfg = self.loss_config
        if (cfg.mixup > 0 or cfg.cutmix > 0) and torch.rand(()) < cfg.mix_prob:
            x, perm, lam = mix_batch(x, cfg.mixup, cfg.cutmix)
            logits = self(x)
            loss = lam * self._loss(logits, y) + (1 - lam) * self._loss(logits, y[perm])
        else:
            loss = self._loss(self(x), y)
        self.check_finite(loss)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x.shape[0])
        return loss

    def _eval_step(self, batch, stage: str):
        x, y, index = batch
        logits = self(x)
        self.collect(stage, logits.float(), y, index)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, "val" if dataloader_idx == 0 else "test_each_epoch")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _metrics(self, stage: str) -> dict[str, float] | None:
        gathered = self.gathered(stage)
        if gathered is None:
            return None
        logits, y, _ = gathered
        loss = float(self._loss(logits, y))
        scores = scores_from_logits(logits, self.task).numpy()
        labels = y.numpy().reshape(len(y), -1)
        return {"loss": loss, **evaluate(labels, scores, self.task)}, (labels, scores)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._collected.clear()
            return
        for stage, prefix in (("val", "val"), ("test_each_epoch", "test")):
            result = self._metrics(stage)
            if result is None:
                continue
            metrics, _ = result
            for name, value in metrics.items():
                self.log(f"{prefix}_{name}", value, prog_bar=prefix == "val", sync_dist=False)

    def on_test_epoch_end(self) -> None:
        result = self._metrics("test")
        if result is None:
            return
        metrics, (labels, scores) = result
        self.test_outputs = {"labels": labels, "scores": scores}
        for name, value in metrics.items():
            self.log(f"test_{name}", value)
