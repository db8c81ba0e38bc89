"""Paired seed differences with a test-case bootstrap interval."""

from __future__ import annotations

import numpy as np
import pytest

from medboost.errors import MedboostError
from medboost.metrics.classification import get_auc
from medboost.metrics.paired import paired_difference


def _auc(labels, scores):
    return get_auc(labels, scores, "binary-class")


def _data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    good = [np.stack([1 - p, p], 1) for p in (np.clip(labels * 0.6 + rng.random(n) * 0.7, 0, 1) for _ in range(3))]
    weak = [np.stack([1 - p, p], 1) for p in (np.clip(labels * 0.1 + rng.random(n), 0, 1) for _ in range(3))]
    return labels, good, weak


def test_a_clearly_better_model_gets_a_positive_interval_and_its_own_differences():
    labels, good, weak = _data()
    out = paired_difference(labels, good, weak, _auc, resamples=300)
    expected = [_auc(labels, a) - _auc(labels, b) for a, b in zip(good, weak)]
    assert out["per_seed"] == pytest.approx(expected)
    assert out["mean"] == pytest.approx(np.mean(expected))
    assert 0 < out["ci"][0] < out["mean"] < out["ci"][1]
    # The reverse comparison is the mirror image (the same resamples: same seed).
    back = paired_difference(labels, weak, good, _auc, resamples=300)
    assert back["ci"] == pytest.approx([-out["ci"][1], -out["ci"][0]])


def test_a_model_against_itself_differs_by_exactly_zero():
    labels, good, _ = _data()
    out = paired_difference(labels, good, good, _auc, resamples=100)
    assert out["per_seed"] == [0.0, 0.0, 0.0] and out["ci"] == [0.0, 0.0]


def test_one_class_resamples_are_skipped_and_counted():
    labels = np.array([0] * 9 + [1])
    scores = [np.stack([1 - labels * 0.9, labels * 0.9], 1).astype(float)]
    out = paired_difference(labels, scores, scores, _auc, resamples=200)
    assert 0 < out["skipped_resamples"] < 200  # P(no positive in 10 draws) = 0.9^10 ~ 35 %


def test_mismatched_runs_are_refused():
    labels, good, weak = _data()
    with pytest.raises(MedboostError, match="same seeds"):
        paired_difference(labels, good, weak[:2], _auc)
    with pytest.raises(MedboostError, match="199 test scores for 200 test labels"):
        paired_difference(labels, good, [w[:199] for w in weak], _auc)
