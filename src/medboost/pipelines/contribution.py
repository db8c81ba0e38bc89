"""What a trained model's boosters contribute, recorded with every boosted run: the branch norms measured during the
run's test at the selected checkpoint, and the same test repeated with every booster's branch removed
(:func:`~medboost.models.booster.booster_bypassed`). A booster whose ``M2`` starts at zero may never grow its branch
in a short budget; these numbers say whether the block did anything at all."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from medboost.errors import TrainingError
from medboost.metrics.classification import evaluate
from medboost.models.booster import BoosterNormProbe, booster_bypassed

BRANCH_REMOVED_AS = "each LLMBooster returns its input: x + M2(..) -> x (outer, hybrid), x -> x (none, inner)"


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


def bypassed_test(trainer, task, dm, attribute: str) -> Any:
    """``task.<attribute>`` (what the task's test collects: outputs or metrics) of the model at hand (the selected
    checkpoint, loaded by the run's test) with every booster's branch removed.

    The run's own test loop is reused as is: ``trainer.test`` again, without a checkpoint path, so the weights
    already loaded are the ones evaluated, through the same loader, precision and cross-process gathering. The run's
    own value is put back afterwards: it, not this one, feeds the report, the plots and the saved model; a task's
    prediction writer is off for the repeat, so the written predictions stay the run's."""
    kept = getattr(task, attribute)
    writer = getattr(task, "on_prediction", None)
    try:
        task.on_prediction = None
        with booster_bypassed(task.model):
            trainer.test(task, datamodule=dm, verbose=False)
        bypassed = getattr(task, attribute)
    finally:
        task.on_prediction = writer
        setattr(task, attribute, kept)
    return bypassed


def classification_contribution(
    task: str, with_branch: dict[str, np.ndarray], without_branch: dict[str, np.ndarray], norms: dict | None
) -> dict[str, Any]:
    """``result["booster_contribution"]`` of a classifier: test ACC/AUC with and without the boosters' branch (the
    same metric code as the run's test report), their differences (with minus without), the largest change of any
    test score, and the branch norms measured during the run's test."""
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
        "branch_removed_as": BRANCH_REMOVED_AS,
    }


def segmentation_contribution(with_branch: dict, without_branch: dict, norms: dict | None) -> dict[str, Any]:
    """``result["booster_contribution"]`` of a segmenter: the test's foreground-mean Dice and HD95, and each class's
    Dice, with and without the boosters' branch (``SegmentationMetrics.aggregate()`` of both tests), the Dice
    difference (with minus without), and the branch norms measured during the run's test."""
    if with_branch["n_volumes"] != without_branch["n_volumes"]:
        raise TrainingError("the bypassed test saw other volumes than the run's test: the test loader is not fixed")

    def foreground(metrics: dict, name: str) -> float | None:
        return metrics["mean_foreground"][name]["mean"]

    dice, dice_off = foreground(with_branch, "dice"), foreground(without_branch, "dice")
    return {
        "test_dice": dice,
        "test_dice_without_branch": dice_off,
        "delta_dice": None if dice is None or dice_off is None else dice - dice_off,
        "test_hd95": foreground(with_branch, "hd95"),
        "test_hd95_without_branch": foreground(without_branch, "hd95"),
        "per_class_dice": {
            name: {"with": stats["dice"]["mean"], "without": without_branch["per_class"][name]["dice"]["mean"]}
            for name, stats in with_branch["per_class"].items()
        },
        **(norms or dict.fromkeys(BoosterNormProbe.KEYS)),
        "branch_removed_as": BRANCH_REMOVED_AS,
    }
