"""The MedMNIST benchmark's arm selection: ``--arms`` picks main and ablation arms by name (it once left the
ablations unfiltered, so asking for one started all nine), and a wrong name is an error before anything trains."""

import sys
from pathlib import Path

import pytest

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
