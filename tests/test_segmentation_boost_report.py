"""The segmentation benchmark's report: the booster's contribution columns (Dice without the branch, branch norm)
for boosted arms, blank for the others, and every table row as wide as its header."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import segmentation_boost  # noqa: E402


def _result(seed: int, dice: float, contribution: dict | None) -> dict:
    per_class = {name: {"dice": {"mean": dice}, "hd95": {"mean": 4.0}} for name in ("anterior", "posterior")}
    result = {
        "config": {"seed": seed},
        "best_epoch": 3,
        "best_val": dice,
        "seconds_per_epoch": 10.0,
        "model": {"parameters": 2e6, "trainable_parameters": 1e6},
        "data": {},
        "test_metrics": {"per_class": per_class, "mean_foreground": {"dice": {"mean": dice}, "hd95": {"mean": 4.0}}},
    }
    if contribution is not None:
        result["booster_contribution"] = contribution
    return result


def test_contribution_columns_are_filled_for_boosted_arms_only():
    boosted = [
        _result(s, d, {"test_dice_without_branch": d - 0.1, "relative_output_norm": 0.2 + s / 10})
        for s, d in enumerate((0.7, 0.8))
    ]
    plain = [_result(s, 0.75, None) for s in range(2)]
    summary = segmentation_boost.arm_summary(boosted)
    assert summary["dice_without_branch"] == pytest.approx([0.65, 0.0707], abs=1e-4)
    assert segmentation_boost.arm_summary(plain)["dice_without_branch"] is None
    report = {
        "command": "x",
        "date": "d",
        "environment": {"versions": {"torch": "t"}},
        "wall_seconds": 60,
        "datasets": {
            "hippocampus": {
                "epochs": 4,
                "arms": {"vit-seg": segmentation_boost.arm_summary(plain), "vit-seg+smollm2": summary},
            }
        },
    }
    table = [line for line in segmentation_boost.markdown(report).splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1, table
    assert "| vit-seg+smollm2 | 0.750 ± 0.071 |" in table[3] and "0.650 ± 0.071 | 0.250 ± 0.071 |" in table[3]
    assert "| 4.00 ± 0.00 |  |  |" in table[2]  # the plain arm: no contribution


def test_unknown_arm_or_bad_jobs_is_a_usage_error(capsys):
    for argv, message in ((["--arms", "vit-seg+smolm2"], "unknown arm(s)"), (["--jobs", "0"], "--jobs must be")):
        with pytest.raises(SystemExit) as stop:
            segmentation_boost.main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err
