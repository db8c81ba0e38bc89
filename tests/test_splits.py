"""Subject-level splits shared by every task: seeded, disjoint, k-fold, nested training fractions, JSON round trip,
several items per subject, and the committed benchmark splits (same lists, same MD5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medboost.data.splits import SPLITS, kfold_split, load_split, make_split, save_split, split_md5, subset_train
from medboost.errors import ConfigError, DataError

COMMITTED = Path(__file__).parents[1] / "benchmarks" / "splits"


CASES = [f"hippocampus_{i:03d}" for i in range(100)]


def test_make_split_is_seeded_disjoint_and_complete():
    split = make_split(CASES, seed=3, val_fraction=0.1, test_fraction=0.2)
    assert split == make_split(list(reversed(CASES)), seed=3, val_fraction=0.1, test_fraction=0.2)
    assert [len(split[s]) for s in ("train", "val", "test")] == [70, 10, 20]
    assert sorted(sum(split.values(), [])) == CASES
    assert make_split(CASES, seed=4)["test"] != split["test"]
    with pytest.raises(DataError, match="case ids must be unique"):
        make_split(CASES + CASES[:1], seed=0)
    with pytest.raises(DataError, match="too few"):
        make_split(CASES[:2], seed=0, val_fraction=0.3, test_fraction=0.3)


def test_train_fractions_are_nested_and_leave_val_test_alone():
    split = make_split(CASES, seed=1)
    subsets = {f: subset_train(split, f, seed=1) for f in (0.1, 0.3, 1.0)}
    assert [len(subsets[f]["train"]) for f in (0.1, 0.3, 1.0)] == [7, 21, 70]
    assert set(subsets[0.1]["train"]) < set(subsets[0.3]["train"]) < set(subsets[1.0]["train"])
    assert subsets[1.0] == split
    assert all(subsets[f]["val"] == split["val"] and subsets[f]["test"] == split["test"] for f in subsets)


def test_kfold_covers_every_non_test_case_once():
    folds = [kfold_split(CASES, k=5, fold=f, seed=2, test_fraction=0.2) for f in range(5)]
    test = make_split(CASES, seed=2, val_fraction=0.0, test_fraction=0.2)["test"]
    assert all(f["test"] == test for f in folds)
    vals = [c for f in folds for c in f["val"]]
    assert sorted(vals) == sorted(set(CASES) - set(test))
    assert all(not set(f["train"]) & set(f["val"]) and len(f["train"]) + len(f["val"]) == 80 for f in folds)
    with pytest.raises(ConfigError):
        kfold_split(CASES, k=5, fold=5)


def test_split_json_roundtrip_and_missing_cases(tmp_path):
    split = make_split(CASES, seed=0)
    path = save_split(split, tmp_path / "split.json", seed=0)
    assert load_split(path, CASES) == split
    assert split_md5(load_split(path)) == split_md5(split)
    with pytest.raises(DataError, match=r"split.json: 2 listed case\(s\) are missing.*hippocampus_000"):
        load_split(path, CASES[2:])
    with pytest.raises(DataError, match="split file not found"):
        load_split(tmp_path / "nope.json")
    bad = tmp_path / "overlap.json"
    bad.write_text(json.dumps({"train": ["a", "b"], "val": ["b"], "test": []}))
    with pytest.raises(DataError, match="'b' is in both train and val"):
        load_split(bad)


# -- several items per subject --------------------------------------------------------------------------------------
# 30 subjects with 1 to 3 visits each (60 items): a subject's visits must never be in two splits.
VISITS = {f"sub{s:02d}_visit{v}": f"sub{s:02d}" for s in range(30) for v in range(1 + s % 3)}


def subjects_of(split: dict[str, list[str]]) -> dict[str, set[str]]:
    return {s: {VISITS[i] for i in split[s]} for s in SPLITS}


def assert_whole_subjects(split: dict[str, list[str]]) -> None:
    by_split = subjects_of(split)
    assert sorted(i for s in SPLITS for i in split[s]) == sorted(VISITS)
    assert all(not by_split[a] & by_split[b] for a in SPLITS for b in SPLITS if a < b)


def test_grouped_split_keeps_each_subject_in_one_split_and_counts_subjects():
    split = make_split(list(VISITS), seed=0, val_fraction=0.1, test_fraction=0.2, groups=VISITS)
    assert_whole_subjects(split)
    assert [len(subjects_of(split)[s]) for s in SPLITS] == [21, 3, 6]
    with pytest.raises(DataError, match="groups names no subject for 1 item"):
        make_split([*VISITS, "stray"], groups=VISITS)


def test_grouped_kfold_and_train_fraction_move_whole_subjects():
    folds = [kfold_split(list(VISITS), k=4, fold=f, seed=1, test_fraction=0.2, groups=VISITS) for f in range(4)]
    for fold in folds:
        assert_whole_subjects(fold)
    val_subjects = [subject for f in folds for subject in subjects_of(f)["val"]]
    assert sorted(val_subjects) == sorted(set(VISITS.values()) - subjects_of(folds[0])["test"])
    subset = subset_train(folds[0], 0.5, seed=1, groups=VISITS)
    kept = subjects_of(subset)["train"]
    assert len(kept) == 9 and all(VISITS[i] not in kept for i in set(folds[0]["train"]) - set(subset["train"]))


def test_a_split_file_that_separates_a_subjects_items_is_refused(tmp_path):
    path = tmp_path / "leak.json"
    path.write_text(json.dumps({"train": ["sub01_visit0"], "val": [], "test": ["sub01_visit1"]}))
    assert load_split(path)["test"] == ["sub01_visit1"]  # without groups the ids are unrelated
    with pytest.raises(DataError, match=r"subject 'sub01' is in both train \(sub01_visit0\) and test"):
        load_split(path, groups=VISITS)


# -- committed benchmark splits ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "md5", "fractions"),
    [
        ("hippocampus", "4a6bad662616d711095fc869fc698c1d", (0.1, 0.2)),
        ("isbi2012", "18e5f0273ecd3cd501e51f448f218f17", (0.2, 0.2)),
    ],
)
def test_committed_splits_load_with_their_md5_and_are_make_splits_output(name, md5, fractions):
    split = load_split(COMMITTED / f"{name}.json")
    assert split_md5(split) == md5  # the digest the benchmark results record
    cases = [c for s in SPLITS for c in split[s]]
    assert make_split(cases, 0, *fractions) == split  # the hash order has not changed
