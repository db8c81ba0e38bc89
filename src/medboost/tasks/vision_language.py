"""Vision-language (MedBLIP) as a LightningModule: trained on MedBLIP's losses, evaluated zero-shot on closed
questions by candidate log-likelihood, and at test also by free generation mapped to a candidate.

Every sample is one (volume, question) pair; its question is the part after ``/`` of its sample id
(``"<scan_id>/<question key>"``, see :class:`~medboost.data.vision_language.VisionLanguageDataset`). Metrics are
per question (each question has its own candidates) and the monitored ``val_acc`` is their mean, so a question with
more samples does not outweigh another.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score, recall_score, roc_auc_score
from torch import nn

from medboost.engine.config import OptimConfig
from medboost.models.medblip import match_candidate
from medboost.tasks.base import TaskModule

#: The generated-answer column of a case whose text names no candidate (counted as wrong).
UNPARSEABLE = -1


def candidate_probabilities(scores: np.ndarray) -> np.ndarray:
    """Softmax over each row's candidates; the ``-inf`` columns (fewer candidates than the widest row) get 0."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def candidate_auc(target: np.ndarray, probs: np.ndarray, classes: int) -> float:
    """One question's AUC from its candidate probabilities: the binary AUC of the second candidate, or the macro
    one-vs-rest AUC over the candidates that occur in the targets with both outcomes; NaN when no candidate does (a
    single-class set has no AUC)."""
    if classes == 2:
        return float(roc_auc_score(target, probs[:, 1])) if len(set(target)) == 2 else math.nan
    aucs = [
        float(roc_auc_score(target == c, probs[:, c])) for c in range(classes) if 0 < (target == c).sum() < len(target)
    ]
    return float(np.mean(aucs)) if aucs else math.nan


def question_metrics(target: np.ndarray, scores: np.ndarray, generated: np.ndarray, names: list[str]) -> dict:
    """One question's test metrics: accuracy, balanced accuracy, macro-F1, per-class recall, confusion matrix (rows
    true, columns predicted, in candidate order), AUC and log-loss from the candidate scores; accuracy of the generated
    answers (unparseable = wrong) and the share that named no candidate."""
    classes = len(names)
    probs = candidate_probabilities(scores[:, :classes])
    pred = probs.argmax(axis=1)
    labels = list(range(classes))
    recall = recall_score(target, pred, labels=labels, average=None, zero_division=0)
    # Balanced accuracy = mean recall over the candidates that occur as answers (sklearn's definition, computed
    # here because sklearn warns on every small test set whose predictions name a candidate no answer has).
    present = np.isin(labels, target)
    return {
        "n": len(target),
        "candidates": names,
        "acc": float((pred == target).mean()),
        "balanced_acc": float(recall[present].mean()),
        "macro_f1": float(f1_score(target, pred, labels=labels, average="macro", zero_division=0)),
        "auc": candidate_auc(target, probs, classes),
        # The log-loss of the candidate probabilities: a proper scoring rule, so it rewards ranking and calibration
        # at once and, unlike accuracy or AUC on a few validation subjects, never ties.
        "log_loss": float(-np.log(np.clip(probs[np.arange(len(target)), target], 1e-12, None)).mean()),
        "recall": {n: float(r) for n, r in zip(names, recall)},
        "confusion_matrix": confusion_matrix(target, pred, labels=labels).tolist(),
        "gen_acc": float((generated == target).mean()),
        "gen_unparseable": float((generated == UNPARSEABLE).mean()),
    }


class VisionLanguageTask(TaskModule):
    """Trains a MedBLIP model and evaluates it per question.

    Args:
        model: a :class:`~medboost.models.medblip.MedBLIP`.
        optim: the optimiser section.
        sample_ids: per evaluation stage (``"val"``, ``"test"``), the dataset's sample ids by index.
        max_candidates: the widest candidate list of the data (scores are padded to it so batches concatenate).
        seed: as :class:`~medboost.tasks.base.TaskModule`.
        max_new_tokens: length limit of the free answers generated at test.
    """

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        sample_ids: dict[str, list[str]],
        max_candidates: int,
        seed: int = 0,
        max_new_tokens: int = 16,
    ):
        super().__init__(model, optim, seed)
        self.sample_ids = sample_ids
        self.max_candidates = max_candidates
        self.max_new_tokens = max_new_tokens
        self._texts: dict[int, tuple[str, str, list[str], str]] = {}

    def training_step(self, batch, batch_idx):
        out = self.model(batch["image"], batch["ehr_text"], batch["question"], batch["answer"])
        loss, size = out["loss"], len(batch["question"])
        self.check_finite(loss)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        for name, value in out.items():
            if name != "loss":
                self.log(f"train_{name}", value, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def _eval_step(self, batch, stage: str) -> None:
        image, ehr, questions, candidates = batch["image"], batch["ehr_text"], batch["question"], batch["candidates"]
        scores = self.model.score_candidates(image, ehr, questions, candidates)["mean"].float()
        padded = scores.new_full((len(questions), self.max_candidates), -math.inf)
        padded[:, : scores.shape[1]] = scores
        target = torch.tensor([c.index(a) for a, c in zip(batch["answer"], candidates)], device=scores.device)
        generated = torch.full_like(target, UNPARSEABLE)
        if stage == "test":
            texts = self.model.generate(image, ehr, questions, self.max_new_tokens)
            for i, (text, cands) in enumerate(zip(texts, candidates)):
                match = match_candidate(text, cands)
                generated[i] = UNPARSEABLE if match is None else match
                self._texts[int(batch["index"][i])] = (batch["answer"][i], questions[i], cands, text)
        self.collect(stage, padded, target, generated, batch["index"])

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _per_question(self, stage: str) -> tuple[dict[str, dict], dict[str, np.ndarray]] | None:
        gathered = self.gathered(stage)
        if gathered is None:
            return None
        scores, target, generated, index = (t.numpy() for t in gathered)
        keys = np.array([self.sample_ids[stage][i].rsplit("/", 1)[1] for i in index])
        tables = {}
        for key in dict.fromkeys(keys):
            rows = keys == key
            count = int(np.isfinite(scores[rows][0]).sum())
            names = self._candidate_names(stage, index[rows][0], count)
            tables[key] = question_metrics(target[rows], scores[rows], generated[rows], names)
        return tables, {"scores": scores, "target": target, "generated": generated, "index": index, "keys": keys}

    def _candidate_names(self, stage: str, index: int, count: int) -> list[str]:
        if stage == "test" and index in self._texts:
            return list(self._texts[index][2])
        return [str(i) for i in range(count)]  # validation logs accuracies only; names are not shown

    def on_validation_epoch_end(self) -> None:
        result = self._per_question("val")
        if result is None or self.trainer.sanity_checking:
            return
        tables, _ = result
        for key, table in tables.items():
            self.log(f"val_{key}_acc", table["acc"], sync_dist=False)
            # AUC beside accuracy: on a small validation split one case moves accuracy by a large step, while the
            # candidate scores' ranking shows whether the model learns before its argmax flips.
            self.log(f"val_{key}_auc", table["auc"], sync_dist=False)
            self.log(f"val_{key}_log_loss", table["log_loss"], sync_dist=False)
        self.log("val_acc", float(np.mean([t["acc"] for t in tables.values()])), prog_bar=True, sync_dist=False)
        self.log("val_auc", float(np.nanmean([t["auc"] for t in tables.values()])), sync_dist=False)
        self.log("val_log_loss", float(np.mean([t["log_loss"] for t in tables.values()])), sync_dist=False)

    def on_test_epoch_start(self) -> None:
        self._texts = {}

    def on_test_epoch_end(self) -> None:
        self._gather_texts()
        result = self._per_question("test")
        if result is None:
            return
        tables, arrays = result
        for key, table in tables.items():
            for name in ("acc", "balanced_acc", "macro_f1", "auc", "gen_acc"):
                self.log(f"test_{key}_{name}", table[name])
        self.log("test_acc", float(np.mean([t["acc"] for t in tables.values()])))
        self.log("test_gen_acc", float(np.mean([t["gen_acc"] for t in tables.values()])))
        self.test_outputs = {"questions": tables, "cases": self._cases(arrays)}

    def _gather_texts(self) -> None:
        """Every rank's generated texts (strings cannot be all-gathered as tensors)."""
        if self.trainer.world_size > 1:
            parts: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(parts, self._texts)
            self._texts = {k: v for part in parts for k, v in part.items()}

    def _cases(self, arrays: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """One row per test sample, in dataset order: subject, question, answer, predictions and scores."""
        rows = []
        for i, key, target, scores, gen in zip(
            arrays["index"], arrays["keys"], arrays["target"], arrays["scores"], arrays["generated"]
        ):
            answer, question, cands, text = self._texts[int(i)]
            pred = int(np.argmax(scores))
            rows.append(
                {
                    "sample_id": self.sample_ids["test"][i],
                    "subject": self.sample_ids["test"][i].rsplit("/", 1)[0],
                    "question_key": key,
                    "question": question,
                    "answer": answer,
                    "scored_prediction": cands[pred],
                    "scored_correct": int(pred == target),
                    "generated_text": text,
                    "generated_prediction": "" if gen == UNPARSEABLE else cands[gen],
                    "generated_correct": int(gen == target),
                    "scores": {c: float(s) for c, s in zip(cands, scores)},
                }
            )
        return rows
