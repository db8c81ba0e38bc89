"""Paired comparisons of two models on one test split: the difference of a metric over seeds, with a bootstrap
confidence interval that resamples the test cases.

Two sources of uncertainty, kept apart: the seeds (training randomness: the per-seed paired differences and their
mean +- std) and the test split (which cases happened to be in it: the bootstrap). Each bootstrap replicate draws one
resample of the test cases and scores BOTH models and EVERY seed on that same resample, so the interval is of the
paired difference of the seed means, not of two independent intervals.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medboost.errors import DataError, MedboostError

Metric = Callable[[np.ndarray, np.ndarray], float]


def _check(labels: np.ndarray, scores_a: Sequence[np.ndarray], scores_b: Sequence[np.ndarray]) -> None:
    if len(scores_a) != len(scores_b) or not scores_a:
        raise MedboostError(f"paired comparison needs the same seeds for both models, got {len(scores_a)} and "
                            f"{len(scores_b)} runs")  # fmt: skip
    for scores in (*scores_a, *scores_b):
        if len(scores) != len(labels):
            raise MedboostError(
                f"a run has {len(scores)} test scores for {len(labels)} test labels: not one test split"
            )


def paired_difference(
    labels: np.ndarray,
    scores_a: Sequence[np.ndarray],
    scores_b: Sequence[np.ndarray],
    metric: Metric,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """``metric(a) - metric(b)`` for seed-paired runs of models ``a`` and ``b`` on the same test cases.

    ``scores_a[i]`` and ``scores_b[i]`` are seed ``i``'s test scores (one row per case, in ``labels``' order).
    Returns the per-seed differences, their mean and std, and the percentile bootstrap interval (``level``) of the
    mean difference over ``resamples`` resamples of the test cases (replicates where the metric is undefined, e.g. a
    resample with one class only, are skipped and counted).
    """
    labels = np.asarray(labels)
    _check(labels, scores_a, scores_b)
    per_seed = [metric(labels, a) - metric(labels, b) for a, b in zip(scores_a, scores_b)]
    rng = np.random.default_rng(seed)
    replicates, skipped = [], 0
    for _ in range(resamples):
        idx = rng.integers(0, len(labels), len(labels))
        try:
            diffs = [metric(labels[idx], a[idx]) - metric(labels[idx], b[idx]) for a, b in zip(scores_a, scores_b)]
        except (DataError, ValueError):  # e.g. an AUC on a resample that holds one class only
            skipped += 1
            continue
        replicates.append(statistics.fmean(diffs))
    tail = (1 - level) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail]).tolist() if replicates else (float("nan"),) * 2
    return {
        "per_seed": per_seed,
        "mean": statistics.fmean(per_seed),
        "std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
        "ci": [low, high],
        "level": level,
        "resamples": resamples,
        "skipped_resamples": skipped,
    }
