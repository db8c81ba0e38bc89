"""medboost's ACC/AUC must equal medmnist's getACC/getAUC exactly; the report and logits helper must be consistent."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, roc_auc_score

from medboost.errors import DataError
from medboost.metrics.classification import (
    classification_report,
    evaluate,
    get_acc,
    get_auc,
    majority_share,
    normalize_task,
    predictions,
    scores_from_logits,
)

MEDMNIST_TASK = {"multi-label": "multi-label, binary-class"}


@pytest.fixture(scope="module")
def official():
    """medmnist's own getAUC/getACC, taken from its source.

    The functions are compiled from ``medmnist/evaluator.py`` rather than imported because that module imports pandas
    (not installed here) and importing medmnist creates ``~/.medmnist``; the two functions use only NumPy and sklearn.
    """
    spec = importlib.util.find_spec("medmnist")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the medmnist package is not installed; nothing to compare with")
    source = Path(spec.submodule_search_locations[0], "evaluator.py").read_text()
    funcs = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name in ("getAUC", "getACC")]
    assert len(funcs) == 2
    namespace = {"np": np, "roc_auc_score": roc_auc_score, "accuracy_score": accuracy_score}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), "medmnist/evaluator.py", "exec"), namespace)
    return namespace["getAUC"], namespace["getACC"]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _case(task: str, seed: int, n: int = 157, ties: bool = False, dtype=np.float64):
    """Labels as stored in MedMNIST files (uint8, (N, 1) or (N, 14)) and the scores a model would give."""
    rng = np.random.default_rng(seed)
    if task == "multi-label":
        y_true = (rng.random((n, 14)) < rng.uniform(0.05, 0.5, 14)).astype(np.uint8)
        y_true[:2] = [[0] * 14, [1] * 14]
        y_score = 1 / (1 + np.exp(-rng.normal(size=(n, 14)) - y_true))
    else:
        classes = {"binary-class": 2, "multi-class": 9, "ordinal-regression": 5}[task]
        y_true = (np.arange(n) % classes)[rng.permutation(n)].reshape(n, 1).astype(np.uint8)
        logits = rng.normal(size=(n, classes))
        logits[np.arange(n), y_true[:, 0]] += 1.0
        y_score = _softmax(logits)
    if ties:
        y_score = np.round(y_score, 1)
    return y_true, y_score.astype(dtype)


TASKS = ["multi-label", "binary-class", "multi-class", "ordinal-regression"]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties, dtype", [(False, np.float64), (False, np.float32), (True, np.float64)])
def test_exactly_equal_to_medmnist(official, task, seed, ties, dtype):
    get_auc_ref, get_acc_ref = official
    y_true, y_score = _case(task, seed, ties=ties, dtype=dtype)
    ref_task = MEDMNIST_TASK.get(task, task)
    assert get_auc(y_true, y_score, task) == get_auc_ref(y_true, y_score, ref_task)
    assert get_acc(y_true, y_score, task) == get_acc_ref(y_true, y_score, ref_task)
    # medmnist's own task name is accepted as well, and tensors give the same numbers.
    assert get_auc(y_true, y_score, ref_task) == get_auc_ref(y_true, y_score, ref_task)
    assert get_acc(torch.from_numpy(y_true), torch.from_numpy(y_score), task) == get_acc_ref(y_true, y_score, ref_task)


def test_binary_single_column_scores_match_medmnist(official):
    get_auc_ref, get_acc_ref = official
    y_true, y_score = _case("binary-class", 5)
    positive = y_score[:, 1:]  # a sigmoid model's (N, 1) output
    assert get_auc(y_true, positive, "binary-class") == get_auc_ref(y_true, positive, "binary-class")
    assert get_acc(y_true, positive, "binary-class") == get_acc_ref(y_true, positive, "binary-class")
    assert get_auc(y_true[:, 0], positive[:, 0], "binary-class") == get_auc(y_true, y_score, "binary-class")


def test_threshold_is_passed_through(official):
    _, get_acc_ref = official
    y_true, y_score = _case("multi-label", 7)
    for threshold in (0.3, 0.7):
        ref = get_acc_ref(y_true, y_score, "multi-label, binary-class", threshold)
        assert get_acc(y_true, y_score, "multi-label", threshold) == ref


def test_scores_from_logits():
    logits = torch.randn(6, 5)
    probs = scores_from_logits(logits, "multi-class")
    assert torch.allclose(probs.sum(dim=1), torch.ones(6)) and torch.equal(probs, torch.softmax(logits, dim=-1))
    assert torch.equal(scores_from_logits(logits, "ordinal-regression"), probs)
    ml = torch.randn(6, 14)
    assert torch.equal(scores_from_logits(ml, "multi-label, binary-class"), torch.sigmoid(ml))
    assert torch.equal(scores_from_logits(logits[:, :1], "binary-class"), torch.sigmoid(logits[:, :1]))
    assert torch.equal(scores_from_logits(logits[:, :2], "binary-class"), torch.softmax(logits[:, :2], dim=-1))
    as_np = scores_from_logits(logits.numpy(), "multi-class")
    assert isinstance(as_np, np.ndarray) and np.array_equal(as_np, probs.numpy())


def test_evaluate_from_logits_matches_argmax(official):
    y_true, _ = _case("multi-class", 3)
    logits = torch.randn(len(y_true), 9, generator=torch.Generator().manual_seed(0))
    scores = scores_from_logits(logits, "multi-class")
    result = evaluate(y_true, scores, "multi-class")
    assert result["acc"] == float((logits.argmax(1).numpy() == y_true[:, 0]).mean())
    get_auc, _ = official
    assert result["auc"] == get_auc(y_true, np.asarray(scores), "multi-class")


def test_report_single_label():
    y_true = np.array([0, 0, 1, 1, 2, 2, 2])
    y_score = np.eye(3)[[0, 1, 1, 1, 2, 0, 2]] * 0.8 + 0.2 / 3
    report = classification_report(y_true, y_score, "multi-class", label_names=["a", "b", "c"])
    assert report["acc"] == pytest.approx(5 / 7, abs=1e-12) and report["n"] == 7
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    c = {e["name"]: e for e in report["per_class"]}
    assert c["b"]["precision"] == pytest.approx(2 / 3) and c["b"]["recall"] == 1.0 and c["c"]["support"] == 3
    assert c["a"]["f1"] == pytest.approx(0.5)
    assert report["auc"] == get_auc(y_true, y_score, "multi-class")

    binary = classification_report(np.array([[0], [1], [1], [0]]), np.array([0.2, 0.9, 0.4, 0.6]), "binary-class")
    assert binary["confusion_matrix"] == [[1, 1], [1, 1]] and binary["acc"] == 0.5
    assert [e["name"] for e in binary["per_class"]] == ["0", "1"]


def test_report_multi_label():
    y_true, y_score = _case("multi-label", 11)
    report = classification_report(y_true, y_score, "multi-label")
    assert len(report["per_label"]) == 14
    assert report["auc"] == get_auc(y_true, y_score, "multi-label")
    assert report["acc"] == get_acc(y_true, y_score, "multi-label")
    total = 0.0
    for entry in report["per_label"]:
        total += entry["auc"]
    assert total / 14 == report["auc"]
    first = report["per_label"][0]
    pred = predictions(y_score, "multi-label")[:, 0]
    tp = int(((pred == 1) & (y_true[:, 0] == 1)).sum())
    assert first["confusion_matrix"][1][1] == tp and first["support"] == int(y_true[:, 0].sum())


def test_bad_input():
    y_true, y_score = _case("multi-class", 0)
    with pytest.raises(DataError, match="unknown task 'regression'"):
        get_auc(y_true, y_score, "regression")
    with pytest.raises(DataError, match="y_true has 157 samples but y_score has 156"):
        get_acc(y_true, y_score[:-1], "multi-class")
    bad = y_score.copy()
    bad[3, 2] = np.nan
    with pytest.raises(DataError, match="y_score contains NaN"):
        get_auc(y_true, bad, "multi-class")
    with pytest.raises(DataError, match="AUC of class 0 \\(one-vs-rest\\) is undefined"):
        get_auc(np.ones((5, 1)), np.full((5, 3), 1 / 3), "multi-class")
    with pytest.raises(DataError, match="multi-label needs y_true and y_score of equal shape"):
        get_auc(np.zeros((4, 14)), np.zeros((4, 13)), "multi-label")
    with pytest.raises(DataError, match="3 label names given for 9 classes"):
        classification_report(y_true, y_score, "multi-class", label_names=["a", "b", "c"])
    assert normalize_task("multi-label, binary-class") == "multi-label"


@pytest.mark.parametrize(
    ("task", "labels", "expected"),
    [
        ("binary-class", [[1], [1], [0], [1]], 0.75),
        ("binary-class", [0, 0, 0], 1.0),  # only class 0 present: answering 0 is right every time
        ("binary-class", [0, 1, 0, 0, 1], 0.6),
        ("multi-class", [2, 2, 0, 1, 2, 2], 4 / 6),
        ("ordinal-regression", [[4], [0], [4]], 2 / 3),
        ("multi-label", [[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 1]], (0.75 + 0.75 + 0.75) / 3),
    ],
)
def test_majority_share_is_the_acc_of_always_answering_the_most_frequent_class(task, labels, expected):
    assert majority_share(labels, task) == pytest.approx(expected)


def test_majority_share_of_real_breastmnist_test_split():
    """BreastMNIST's test split: 114 of 156 images are class 1, the share the old benchmark's ViT arms sat at."""
    path = Path(__file__).parents[1].parent / "shared" / "data" / "medmnist" / "breastmnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    labels = np.load(path)["test_labels"]
    assert majority_share(labels, "binary-class") == pytest.approx(114 / 156)
    assert np.bincount(labels[:, 0]).tolist() == [42, 114]


def test_majority_share_bad_input():
    with pytest.raises(DataError, match="non-empty"):
        majority_share([], "binary-class")
    with pytest.raises(DataError, match="unknown task"):
        majority_share([0, 1], "regression")
