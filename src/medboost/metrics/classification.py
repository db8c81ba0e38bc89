"""MedMNIST's official ACC and AUC, reproduced exactly, plus a fuller per-class report.

:func:`get_auc` and :func:`get_acc` compute the same numbers as ``medmnist.evaluator.getAUC`` / ``getACC`` (medmnist
3.0.2), bit for bit, without importing medmnist:

- multi-label: mean over labels of ``roc_auc_score`` per label; ACC is the mean over labels of the accuracy of
  ``score > 0.5``. Scores are sigmoid probabilities (the threshold is on probabilities, not logits).
- binary-class: AUC of the positive-class score (the last column when two columns are given, as medmnist does with
  softmax outputs); ACC of ``score > 0.5``.
- multi-class and ordinal-regression: mean of the one-vs-rest AUCs of each column; ACC of the argmax. Scores are
  softmax probabilities (the AUCs only depend on the ranking within a column, the argmax on neither).

The means are sums taken label by label in order, then divided, as in medmnist; ``sum()`` is avoided on purpose
because Python >= 3.12 uses compensated summation for floats and could differ in the last bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

from medboost.errors import DataError

__all__ = [
    "TASKS",
    "classification_report",
    "evaluate",
    "get_acc",
    "get_auc",
    "majority_share",
    "normalize_task",
    "predictions",
    "scores_from_logits",
]

TASKS = ("multi-class", "binary-class", "multi-label", "ordinal-regression")
_ALIASES = {"multi-label, binary-class": "multi-label"}  # medmnist's own name for ChestMNIST's task


def normalize_task(task: str) -> str:
    """medboost's task name for ``task``; accepts medmnist's ``"multi-label, binary-class"`` too."""
    name = _ALIASES.get(task, task)
    if name not in TASKS:
        raise DataError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return name


def scores_from_logits(logits: torch.Tensor | np.ndarray, task: str) -> torch.Tensor | np.ndarray:
    """Model outputs -> the scores the metrics expect: sigmoid for multi-label, softmax over classes otherwise.

    A binary-class model with a single output column gets a sigmoid (its probability of the positive class). The
    result has the input's type (tensor or NumPy array).
    """
    task = normalize_task(task)
    as_numpy = isinstance(logits, np.ndarray)
    x = torch.from_numpy(logits) if as_numpy else logits
    x = x.detach().float()
    if task == "multi-label" or (task == "binary-class" and (x.ndim == 1 or x.shape[-1] == 1)):
        out = torch.sigmoid(x)
    else:
        out = torch.softmax(x, dim=-1)
    return out.cpu().numpy() if as_numpy else out


def _to_numpy(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object or arr.size == 0:
        raise DataError(f"{what} must be a non-empty numeric array, got dtype {arr.dtype} and shape {arr.shape}")
    return arr


def _prepare(y_true: Any, y_score: Any, task: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Validate and shape the inputs as medmnist does after its ``squeeze()`` calls (without squeezing N == 1 away).

    Returns ``y_true`` as ``(N,)`` (single-label) or ``(N, L)`` and ``y_score`` as ``(N,)`` (binary) or ``(N, C)``.
    """
    task = normalize_task(task)
    y_true = _to_numpy(y_true, "y_true")
    y_score = _to_numpy(y_score, "y_score").astype(np.float64, copy=False)
    if not np.isfinite(y_score).all():
        raise DataError("y_score contains NaN or infinite values")
    n = y_true.shape[0]
    if y_score.shape[0] != n:
        raise DataError(f"y_true has {n} samples but y_score has {y_score.shape[0]}")
    if task == "multi-label":
        if y_true.ndim != 2 or y_score.shape != y_true.shape:
            raise DataError(
                f"multi-label needs y_true and y_score of equal shape (N, L), got {y_true.shape} and {y_score.shape}"
            )
        return y_true, y_score, task
    if y_true.ndim > 2 or (y_true.ndim == 2 and y_true.shape[1] != 1):
        raise DataError(f"{task} needs y_true of shape (N,) or (N, 1), got {y_true.shape}")
    y_true = y_true.reshape(n)
    if task == "binary-class":
        return y_true, _binary_scores(y_score), task
    if y_score.ndim != 2 or y_score.shape[1] < 2:
        raise DataError(f"{task} needs y_score of shape (N, num_classes), got {y_score.shape}")
    return y_true, y_score, task


def _binary_scores(y_score: np.ndarray) -> np.ndarray:
    if y_score.ndim == 1 or (y_score.ndim == 2 and y_score.shape[1] == 1):
        return y_score.reshape(-1)
    if y_score.ndim == 2:
        return y_score[:, -1]  # medmnist: the last column is the positive class
    raise DataError(f"binary-class needs y_score of shape (N,), (N, 1) or (N, 2), got {y_score.shape}")


def _roc_auc(y_true: np.ndarray, y_score: np.ndarray, what: str) -> float:
    if np.unique(y_true).size < 2:
        raise DataError(f"AUC of {what} is undefined: y_true holds only one class ({np.unique(y_true).tolist()})")
    return float(roc_auc_score(y_true, y_score))


def _mean_in_order(values: Sequence[float]) -> float:
    total = 0.0
    for v in values:
        total += v
    return total / len(values)


def get_auc(y_true: Any, y_score: Any, task: str) -> float:
    """MedMNIST's AUC (``medmnist.evaluator.getAUC``); see the module docstring for what each task computes."""
    y_true, y_score, task = _prepare(y_true, y_score, task)
    if task == "multi-label":
        return _mean_in_order([_roc_auc(y_true[:, i], y_score[:, i], f"label {i}") for i in range(y_score.shape[1])])
    if task == "binary-class":
        return _roc_auc(y_true, y_score, "the positive class")
    per_class = [
        _roc_auc((y_true == i).astype(float), y_score[:, i], f"class {i} (one-vs-rest)")
        for i in range(y_score.shape[1])
    ]
    return _mean_in_order(per_class)


def get_acc(y_true: Any, y_score: Any, task: str, threshold: float = 0.5) -> float:
    """MedMNIST's ACC (``medmnist.evaluator.getACC``): threshold for multi-label and binary-class, argmax otherwise."""
    y_true, y_score, task = _prepare(y_true, y_score, task)
    if task == "multi-label":
        y_pred = y_score > threshold
        return _mean_in_order([float(accuracy_score(y_true[:, i], y_pred[:, i])) for i in range(y_true.shape[1])])
    return float(accuracy_score(y_true, predictions(y_score, task, threshold)))


def majority_share(y_true: Any, task: str) -> float:
    """The ACC of the trivial model that always answers the most frequent class of ``y_true`` (per label for
    multi-label), computed by :func:`get_acc` itself: a model whose ACC does not beat it has learned no decision rule,
    whatever its AUC."""
    task = normalize_task(task)
    y_true = _to_numpy(y_true, "y_true")
    if task == "multi-label":
        return get_acc(y_true, np.broadcast_to(y_true.mean(axis=0) > 0.5, y_true.shape).astype(float), task)
    counts = np.bincount(y_true.reshape(len(y_true), -1)[:, 0].astype(np.int64))
    # At least two columns: a binary split holding only class 0 must not read as one positive-class score column.
    constant = np.zeros((len(y_true), max(len(counts), 2)))
    constant[:, int(np.argmax(counts))] = 1.0
    return get_acc(y_true, constant, task)


def evaluate(y_true: Any, y_score: Any, task: str, threshold: float = 0.5) -> dict[str, float]:
    """``{"acc": ..., "auc": ...}`` as MedMNIST's Evaluator reports them."""
    return {"acc": get_acc(y_true, y_score, task, threshold), "auc": get_auc(y_true, y_score, task)}


def predictions(y_score: Any, task: str, threshold: float = 0.5) -> np.ndarray:
    """Hard predictions as the ACC uses them: ``score > threshold`` (multi-label, binary-class) or the argmax."""
    task = normalize_task(task)
    y_score = _to_numpy(y_score, "y_score")
    if task == "multi-label":
        return (y_score > threshold).astype(np.int64)
    if task == "binary-class":
        return (_binary_scores(y_score) > threshold).astype(np.int64)
    return np.argmax(y_score, axis=-1)


def _per_class(y_true: np.ndarray, y_pred: np.ndarray, names: Sequence[str]) -> list[dict[str, Any]]:
    labels = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    return [
        {
            "name": names[i],
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i in labels
    ]


def _label_names(label_names: Sequence[str] | None, count: int) -> list[str]:
    if label_names is None:
        return [str(i) for i in range(count)]
    if len(label_names) != count:
        raise DataError(f"{len(label_names)} label names given for {count} classes/labels")
    return list(label_names)


def classification_report(
    y_true: Any,
    y_score: Any,
    task: str,
    label_names: Sequence[str] | None = None,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """ACC and AUC (as MedMNIST computes them) plus per-class precision/recall/F1 and confusion matrices.

    Single-label tasks: ``per_class`` (one entry per class) and ``confusion_matrix`` (rows true class, columns
    predicted). Multi-label: ``per_label`` with each label's precision/recall/F1 of the positive class, its own AUC and
    ACC, and a 2 x 2 confusion matrix. Everything is plain Python (JSON-ready).
    """
    y_true_p, y_score_p, task = _prepare(y_true, y_score, task)
    report: dict[str, Any] = {
        "task": task,
        "acc": get_acc(y_true, y_score, task, threshold),
        "auc": get_auc(y_true, y_score, task),
        "n": int(y_true_p.shape[0]),
    }
    y_pred = predictions(y_score_p, task, threshold)
    if task == "multi-label":
        names = _label_names(label_names, y_true_p.shape[1])
        report["per_label"] = [
            _label_entry(y_true_p[:, i], y_score_p[:, i], y_pred[:, i], name) for i, name in enumerate(names)
        ]
        return report
    count = 2 if task == "binary-class" else y_score_p.shape[1]
    names = _label_names(label_names, count)
    report["per_class"] = _per_class(y_true_p, y_pred, names)
    report["macro_f1"] = _mean_in_order([c["f1"] for c in report["per_class"]])
    report["confusion_matrix"] = confusion_matrix(y_true_p, y_pred, labels=list(range(count))).tolist()
    return report


def _label_entry(y_true: np.ndarray, y_score: np.ndarray, y_pred: np.ndarray, name: str) -> dict[str, Any]:
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=[1], average=None, zero_division=0
    )
    return {
        "name": name,
        "precision": float(precision[0]),
        "recall": float(recall[0]),
        "f1": float(f1[0]),
        "support": int(support[0]),
        "auc": _roc_auc(y_true, y_score, f"label {name}"),
        "acc": float(accuracy_score(y_true, y_pred)),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=[0, 1]).tolist(),
    }
