"""The MedMNIST benchmark's arm selection: ``--arms`` picks main and ablation arms by name (it once left the
ablations unfiltered, so asking for one started all nine), and a wrong name is an error before anything trains."""

import sys
from pathlib import Path

import numpy as np
import pytest

from medboost.metrics.classification import get_auc
from medboost.metrics.paired import paired_difference

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import medmnist_boost  # noqa: E402


def test_arms_filter_main_and_ablation_arms_alike():
    picked = medmnist_boost.select_arms("breastmnist", ["vit", "R-LLM plain adapters"], no_ablations=False)
    assert list(picked) == ["vit", "R-LLM plain adapters"]
    assert picked["R-LLM plain adapters"].kwargs["booster"]["zero_init"] is False
    assert len(medmnist_boost.select_arms("breastmnist", None, no_ablations=False)) == 6 + 9
    assert list(medmnist_boost.select_arms("breastmnist", None, no_ablations=True)) == list(medmnist_boost.arms(2))
    # The ablations are BreastMNIST's only.
    assert medmnist_boost.select_arms("retinamnist", ["R-LLM plain adapters"], no_ablations=False) == {}


def test_unknown_arm_is_refused_with_the_valid_names(capsys):
    with pytest.raises(SystemExit) as stop:
        medmnist_boost.main(["--arms", "vit", "R-LLM plain adapter"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "unknown arm(s) ['R-LLM plain adapter']" in err and "R-LLM plain adapters" in err


def test_ablation_and_main_arm_names_do_not_collide():
    assert not set(medmnist_boost.arms(2)) & set(medmnist_boost.ablation_arms())


def _fake_runs(arms: list[str], seeds: int = 2, cases: int = 40) -> dict[str, list[dict]]:
    rng = np.random.default_rng(0)
    labels = (np.arange(cases) % 2).tolist()
    return {
        arm: [
            {"data": {"task": "binary-class"}, "test_outputs": {"labels": labels, "scores": rng.random(cases).tolist()}}
            for _ in range(seeds)
        ]
        for arm in arms
    }


def test_paired_summaries_compare_boosted_arms_to_both_references_and_reuse_known_pairs():
    runs = _fake_runs(["vit", "vit+smollm2", "vit+random-block", "resnet18"])
    pairs = medmnist_boost.paired_summaries(runs, resamples=20)
    assert set(pairs) == {"vit+smollm2", "vit+random-block"}
    assert set(pairs["vit+smollm2"]) == {"vit", "vit+random-block"} and set(pairs["vit+random-block"]) == {"vit"}
    labels = np.asarray(runs["vit"][0]["test_outputs"]["labels"])
    scores = {arm: [np.asarray(r["test_outputs"]["scores"]) for r in rs] for arm, rs in runs.items()}
    direct = paired_difference(
        labels, scores["vit+smollm2"], scores["vit"], lambda y, s: get_auc(y, s, "binary-class"), resamples=20
    )
    assert pairs["vit+smollm2"]["vit"] == direct
    # A pair computed earlier in the same invocation is taken as is, the missing ones computed.
    marker = {"mean": 123.0}
    again = medmnist_boost.paired_summaries(runs, resamples=20, known={"vit+smollm2": {"vit": marker}})
    assert again["vit+smollm2"]["vit"] is marker
    assert again["vit+smollm2"]["vit+random-block"] == pairs["vit+smollm2"]["vit+random-block"]
