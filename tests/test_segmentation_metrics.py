"""Segmentation metrics: hand-computed values, empty-class conventions, agreement with MONAI, rows round trip."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU, SurfaceDiceMetric

from medboost.errors import ConfigError, DataError
from medboost.metrics.segmentation import METRICS, SegmentationMetrics

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # MONAI's empty-mask notes


def two_squares() -> tuple[np.ndarray, np.ndarray]:
    """A 4x4 target square and the same square moved down one row, in a 10x10 image.

    Overlap 12 pixels: TP 12, FP 4, FN 4, TN 80. Each square has 12 boundary pixels; 6 of each lie on the other's
    boundary (distance 0) and the other 6 at distance 1.
    """
    target = np.zeros((1, 10, 10), dtype=np.int64)
    target[0, 2:6, 2:6] = 1
    return np.roll(target, 1, axis=1), target


def cube(shift: int = 0, axis: int = 0, size: int = 16) -> np.ndarray:
    volume = np.zeros((1, size, size, size), dtype=np.int64)
    volume[0, 4:8, 4:8, 4:8] = 1
    return np.roll(volume, shift, axis=axis + 1)


def random_labels(shape: tuple[int, ...], num_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, size=shape)


def only(rows: list[dict], class_index: int = 1) -> dict:
    (row,) = [r for r in rows if r["class_index"] == class_index]
    return row


# -- hand-computed values ---------------------------------------------------------------------------------------------


def test_two_squares_hand_computed():
    pred, target = two_squares()
    row = only(SegmentationMetrics(2).update(pred, target))
    expected = {
        "dice": 24 / 32,
        "jaccard": 12 / 20,
        "sensitivity": 12 / 16,
        "specificity": 80 / 84,
        "precision": 12 / 16,
        "accuracy": 92 / 100,
        "hd95": 1.0,
        "nsd": 1.0,
    }
    assert {m: row[m] for m in expected} == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("tolerance", "expected"), [(0.0, 0.5), (0.5, 0.5), (1.0, 1.0), (50.0, 1.0)])
def test_nsd_tolerance_2d(tolerance, expected):
    pred, target = two_squares()
    assert only(SegmentationMetrics(2, nsd_tolerance_mm=tolerance).update(pred, target))["nsd"] == expected


def test_nsd_shifted_cube_3d():
    # Shift 1 along x: of the 56 boundary voxels of each cube, 12 + 12 + 12 lie on the other's boundary.
    exact = only(SegmentationMetrics(2, nsd_tolerance_mm=0.0).update(cube(1), cube()))["nsd"]
    assert exact == pytest.approx(72 / 112, rel=1e-6)
    assert only(SegmentationMetrics(2, nsd_tolerance_mm=1.0).update(cube(1), cube()))["nsd"] == 1.0


@pytest.mark.parametrize(
    ("shift", "axis", "spacing", "expected"),
    [
        (1, 0, None, 1.0),
        (2, 0, None, 2.0),
        (3, 1, None, 3.0),
        (2, 0, (2.5, 1.0, 1.0), 5.0),
        (3, 2, (1.0, 1.0, 3.0), 9.0),
    ],
)
def test_hd95_shifted_cube(shift, axis, spacing, expected):
    # The far face (16 of 56 boundary voxels, > 5%) is exactly `shift` voxels from the nearest target boundary voxel.
    row = only(SegmentationMetrics(2, spacing=spacing).update(cube(shift, axis), cube()))
    assert row["hd95"] == pytest.approx(expected, rel=1e-6)
    assert row["distance_unit"] == ("voxel" if spacing is None else "mm")


@pytest.mark.parametrize("shape", [(2, 12, 12), (2, 8, 8, 6)])
def test_perfect_prediction(shape):
    labels = random_labels(shape, 3, seed=0)
    m = SegmentationMetrics(3)
    m.update(labels, labels)
    for row in m.per_volume_rows():
        assert {k: row[k] for k in METRICS} == dict.fromkeys(METRICS, 1.0) | {"hd95": 0.0}


# -- empty classes ----------------------------------------------------------------------------------------------------


def _empty_cases() -> tuple[np.ndarray, np.ndarray]:
    """Volume 0: class 1 absent in both; volume 1: only predicted; volume 2: only in the target."""
    pred = np.zeros((3, 8, 8), dtype=np.int64)
    target = np.zeros_like(pred)
    pred[1, 2:5, 2:5] = 1
    target[2, 2:5, 2:5] = 1
    return pred, target


def test_empty_class_conventions():
    m = SegmentationMetrics(2)
    rows = m.update(*_empty_cases())
    nan = float("nan")
    expected = [
        {
            "dice": 1.0,
            "jaccard": 1.0,
            "hd95": nan,
            "nsd": nan,
            "sensitivity": nan,
            "specificity": 1.0,
            "precision": nan,
        },
        {"dice": 0.0, "jaccard": 0.0, "hd95": math.inf, "nsd": 0.0, "sensitivity": nan, "precision": 0.0},
        {"dice": 0.0, "jaccard": 0.0, "hd95": math.inf, "nsd": 0.0, "sensitivity": 0.0, "specificity": 1.0},
    ]
    for row, want in zip(rows, expected):
        for key, value in want.items():
            assert row[key] == value or (math.isnan(value) and math.isnan(row[key])), (row["volume"], key)
    assert rows[1]["specificity"] == pytest.approx(55 / 64)
    assert [r["accuracy"] for r in rows] == pytest.approx([1.0, 55 / 64, 55 / 64])


def test_empty_classes_are_excluded_and_counted_never_zeroed():
    m = SegmentationMetrics(2)
    m.update(*_empty_cases())
    stats = m.aggregate()["per_class"]["class_1"]
    # Dice over the three volumes is [1, 0, 0]: mean 1/3, sample std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3).
    assert stats["dice"] == {"mean": 1 / 3, "std": pytest.approx(math.sqrt(1 / 3)), "n": 3, "n_nan": 0, "n_inf": 0}
    assert stats["hd95"] == {"mean": None, "std": None, "n": 0, "n_nan": 1, "n_inf": 2}
    assert stats["nsd"] == {"mean": 0.0, "std": 0.0, "n": 2, "n_nan": 1, "n_inf": 0}
    assert stats["precision"] == {"mean": 0.0, "std": None, "n": 1, "n_nan": 2, "n_inf": 0}
    assert m.aggregate()["mean_foreground"]["hd95"] == {"mean": None, "n_classes": 0}
    json.dumps(m.aggregate(), allow_nan=False)  # strict JSON: no NaN or Infinity


def test_ignore_empty_makes_dice_undefined_for_empty_targets():
    rows = SegmentationMetrics(2, ignore_empty=True).update(*_empty_cases())
    assert [math.isnan(r["dice"]) for r in rows] == [True, True, False]
    assert [math.isnan(r["jaccard"]) for r in rows] == [True, True, False]


def test_hd95_is_finite_mean_over_volumes_with_both_masks():
    pred, target = two_squares()
    empty = np.zeros_like(pred)
    m = SegmentationMetrics(2)
    m.update(np.concatenate([pred, empty]), np.concatenate([target, target]))
    assert m.aggregate()["per_class"]["class_1"]["hd95"] == {"mean": 1.0, "std": None, "n": 1, "n_nan": 0, "n_inf": 1}


# -- classes ----------------------------------------------------------------------------------------------------------


def test_classes_are_reported_separately_not_merged():
    target = np.zeros((1, 10, 10), dtype=np.int64)
    target[0, 1:4, 1:4] = 1
    target[0, 6:9, 6:9] = 2
    pred = target.copy()
    pred[0, 6:9, 6:9] = 0
    pred[0, 6:9, 0:3] = 2  # class 2 predicted in the wrong place
    m = SegmentationMetrics(3, class_names=["background", "liver", "tumour"])
    m.update(pred, target)
    result = m.aggregate()
    assert list(result["per_class"]) == ["liver", "tumour"]
    assert result["per_class"]["liver"]["dice"]["mean"] == 1.0
    assert result["per_class"]["tumour"]["dice"]["mean"] == 0.0
    assert result["mean_foreground"]["dice"] == {"mean": 0.5, "n_classes": 2}
    merged = SegmentationMetrics(2).update(np.minimum(pred, 1), np.minimum(target, 1))[0]["dice"]
    assert merged == pytest.approx(0.5)  # merging hides that one class is perfect and the other missed


def test_include_background_reports_class_0_but_keeps_it_out_of_the_mean():
    pred, target = two_squares()
    result = SegmentationMetrics(2, include_background=True).update(pred, target)
    assert [r["class_index"] for r in result] == [0, 1]
    m = SegmentationMetrics(2, include_background=True)
    m.update(pred, target)
    agg = m.aggregate()
    assert list(agg["per_class"]) == ["class_0", "class_1"]
    assert agg["mean_foreground"]["dice"] == {"mean": pytest.approx(0.75), "n_classes": 1}


# -- agreement with MONAI's class-based metrics ----------------------------------------------------------------------


def _one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(labels), num_classes).movedim(-1, 1).float()


@pytest.mark.parametrize(("shape", "spacing"), [((3, 16, 16), None), ((2, 10, 9, 8), (1.5, 1.0, 2.0))])
def test_agrees_with_monai_class_metrics(shape, spacing):
    pred, target = random_labels(shape, 3, seed=1), random_labels(shape, 3, seed=2)
    pred[0][pred[0] == 2] = 0  # volume 0: class 2 only in the target
    target[-1][target[-1] == 2] = 1  # last volume: class 2 nowhere ...
    pred[-1][pred[-1] == 2] = 1
    m = SegmentationMetrics(3, spacing=spacing, nsd_tolerance_mm=1.5)
    m.update(pred, target)
    ours = {k: torch.tensor([r[k] for r in m.per_volume_rows()]).reshape(shape[0], 2) for k in METRICS}

    p1, t1 = _one_hot(pred, 3), _one_hot(target, 3)
    dice = DiceMetric(include_background=False, reduction="none", num_classes=3, ignore_empty=False)
    torch.testing.assert_close(ours["dice"], dice(torch.from_numpy(pred)[:, None], torch.from_numpy(target)[:, None]))
    iou = MeanIoU(include_background=False, reduction="none", ignore_empty=False)
    torch.testing.assert_close(ours["jaccard"], iou(p1, t1))
    nsd = SurfaceDiceMetric([1.5, 1.5], include_background=False, reduction="none")
    torch.testing.assert_close(ours["nsd"], nsd(p1, t1, spacing=spacing), equal_nan=True)
    hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(p1, t1, spacing=spacing)
    one_sided = torch.isinf(ours["hd95"])
    assert one_sided[0, 1] and one_sided.sum() == 1  # the documented departure: MONAI gives NaN there
    assert torch.isnan(hd[one_sided]).all()
    torch.testing.assert_close(ours["hd95"][~one_sided], hd[~one_sided], equal_nan=True)
    assert torch.isnan(ours["hd95"][-1, 1])  # class 2 absent from both


def test_confusion_metrics_match_direct_counts():
    pred, target = random_labels((2, 9, 7, 5), 4, seed=3), random_labels((2, 9, 7, 5), 4, seed=4)
    rows = SegmentationMetrics(4).update(pred, target)
    for row in rows:
        b, c = int(row["volume"]), row["class_index"]
        p, t = pred[b] == c, target[b] == c
        tp, fp, fn, tn = (p & t).sum(), (p & ~t).sum(), (~p & t).sum(), (~p & ~t).sum()
        want = {
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "precision": tp / (tp + fp),
            "accuracy": (tp + tn) / p.size,
            "dice": 2 * tp / (2 * tp + fp + fn),
            "jaccard": tp / (tp + fp + fn),
        }
        assert {k: row[k] for k in want} == pytest.approx(want, rel=1e-6)


# -- rows round trip --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored() -> SegmentationMetrics:
    pred, target = random_labels((6, 8, 8, 6), 3, seed=5), random_labels((6, 8, 8, 6), 3, seed=6)
    pred[1][pred[1] == 2] = 0  # an infinite HD95 ...
    target[2][target[2] == 1] = 0
    pred[2][pred[2] == 1] = 0  # ... and an undefined one
    m = SegmentationMetrics(3, spacing=(1.0, 1.0, 2.5), class_names=["bg", "a", "b"])
    m.update(pred, target, ids=[f"case{i}" for i in range(6)])
    return m


def _without_table(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "per_volume"}


def _sorted_table(result: dict) -> list:
    return sorted(result["per_volume"], key=lambda r: (r["volume"], r["class_index"]))


def test_rows_from_two_processes_aggregate_identically(scored):
    rows = scored.per_volume_rows()
    rank0 = [r for r in rows if int(r["volume"][-1]) % 2 == 0]  # DistributedSampler interleaves volumes
    rank1 = [r for r in rows if int(r["volume"][-1]) % 2 == 1]
    expected = scored.aggregate()
    for gathered in (rank0 + rank1, rank1[::-1] + rank0):
        merged = SegmentationMetrics.from_rows(gathered, **scored.config()).aggregate()
        assert _without_table(merged) == _without_table(expected)  # exact, not approximate
        assert _sorted_table(merged) == _sorted_table(expected)


def test_rows_round_trip_through_json_and_csv(scored, tmp_path):
    expected = scored.aggregate()
    from_json = json.loads(json.dumps(expected, allow_nan=False))["per_volume"]
    assert SegmentationMetrics.from_rows(from_json, spacing=(1.0, 1.0, 2.5)).aggregate() == expected
    with open(scored.to_csv(tmp_path / "rows.csv"), newline="") as f:
        from_csv = list(csv.DictReader(f))
    assert SegmentationMetrics.from_rows(from_csv, spacing=(1.0, 1.0, 2.5)).aggregate() == expected


def test_from_rows_refuses_duplicates_and_incomplete_volumes(scored):
    rows = scored.per_volume_rows()
    with pytest.raises(DataError, match="'case0' class 1 appears more than once"):
        SegmentationMetrics.from_rows(rows + rows[:1])
    padded = SegmentationMetrics.from_rows(rows + rows[:2], drop_duplicates=True, **scored.config())
    assert padded.aggregate() == scored.aggregate()
    changed = dict(rows[0], dice=0.123)
    with pytest.raises(DataError, match="appears more than once"):
        SegmentationMetrics.from_rows([*rows, changed], drop_duplicates=True)
    with pytest.raises(DataError, match="volume 'case0' has rows for classes \\[2\\], expected exactly \\[1, 2\\]"):
        SegmentationMetrics.from_rows(rows[1:])
    with pytest.raises(DataError, match="lacks dice"):
        SegmentationMetrics.from_rows([{k: v for k, v in rows[0].items() if k != "dice"}])


# -- state and input checks -------------------------------------------------------------------------------------------


def test_reset_and_default_ids():
    pred, target = two_squares()
    m = SegmentationMetrics(2)
    m.update(pred, target)
    m.update(torch.from_numpy(pred)[:, None], torch.from_numpy(target).float())  # (B, 1, H, W) and float labels
    assert [r["volume"] for r in m.per_volume_rows()] == ["0", "1"]
    assert m.per_volume_rows()[0] == {**m.per_volume_rows()[1], "volume": "0"}
    m.reset()
    with pytest.raises(DataError, match="no volumes to aggregate"):
        m.aggregate()


def test_per_volume_spacing_and_unit_mixing():
    m = SegmentationMetrics(2)
    rows = m.update(np.concatenate([cube(2)] * 2), np.concatenate([cube()] * 2), spacing=[(2.0, 1, 1), (3.0, 1, 1)])
    assert [r["hd95"] for r in rows] == [4.0, 6.0]
    with pytest.raises(DataError, match="give a spacing for all volumes or for none"):
        m.update(cube(), cube())
    with pytest.raises(DataError, match="has 2 values for 3-D volumes"):
        SegmentationMetrics(2, spacing=(1.0, 1.0)).update(cube(), cube())


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        (np.zeros((1, 8, 8)), np.zeros((1, 8, 9)), r"pred and target shapes differ: \(1, 8, 8\) vs \(1, 8, 9\)"),
        (np.full((1, 8, 8), 3), np.zeros((1, 8, 8)), r"pred labels must lie in \[0, 2\] for num_classes=3; found 3..3"),
        (np.zeros((1, 8, 8)), np.full((1, 8, 8), -1), r"target labels must lie in \[0, 2\]"),
        (np.full((1, 8, 8), 0.5), np.zeros((1, 8, 8)), "pred holds non-integer labels"),
        (np.zeros((1, 8, 8)), np.full((1, 8, 8), np.nan), r"target contains 64 NaN value\(s\)"),
        (np.zeros((1, 3, 8, 8, 8)), np.zeros((1, 8, 8, 8)), "3 channels look like scores or one-hot"),
        (np.zeros((8, 8)), np.zeros((8, 8)), r"pred must have shape \(B, H, W\)"),
        (np.array(["a"]), np.zeros((1, 8, 8)), "pred must be a numeric label map"),
    ],
)
def test_bad_input_raises_data_error(pred, target, message):
    with pytest.raises(DataError, match=message):
        SegmentationMetrics(3).update(pred, target)


def test_repeated_ids_are_refused():
    pred, target = two_squares()
    m = SegmentationMetrics(2)
    m.update(pred, target, ids=["a"])
    with pytest.raises(DataError, match="volume ids must be unique; already used: a"):
        m.update(pred, target, ids=["a"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 1}, "num_classes must be an integer >= 2"),
        ({"num_classes": 3, "spacing": (1.0, -1.0, 1.0)}, "spacing must be a positive number"),
        ({"num_classes": 3, "nsd_tolerance_mm": (1.0, 2.0)}, "nsd_tolerance_mm has 2 values for 3 classes"),
        ({"num_classes": 3, "nsd_tolerance_mm": -1.0}, "nsd_tolerance_mm must be a number >= 0"),
        ({"num_classes": 2, "class_names": ["a", "a"]}, "class_names must be unique"),
    ],
)
def test_bad_configuration_raises_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SegmentationMetrics(**kwargs)
