"""Subject-level, seeded train/val/test splits for every task: plain, k-fold, nested training fractions, saved and
loaded as JSON, compared by MD5.

Items are named by string ids (a segmentation case, a scan of an image + text manifest). When a subject has several
items (visits, sequences, slices), ``groups`` maps each item id to its subject id: splits are then drawn over subjects,
fractions count subjects, and all items of a subject land in the same split, so no subject is seen in training and
scored in test. Without ``groups`` every item is its own subject.

Splits are made before any augmentation, so no augmented copy of a validation or test item can reach training (a
defect of the public MedVisionLlama code), and the test split is a whole split, not one volume.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medboost.errors import ConfigError, DataError

__all__ = [
    "SPLITS",
    "kfold_split",
    "load_split",
    "make_split",
    "require_ids",
    "save_split",
    "split_md5",
    "subset_train",
    "validate_split",
]

SPLITS = ("train", "val", "test")

Groups = Mapping[str, str] | None


def _seeded_order(ids: Sequence[str], seed: int, salt: str) -> list[str]:
    # A hash order rather than an RNG shuffle: the same on every platform and library version, and adding an item
    # never moves the others between splits.
    def key(item: str) -> str:
        return hashlib.sha256(f"{salt}:{seed}:{item}".encode()).hexdigest()

    return sorted(ids, key=key)


def _count(n: int, fraction: float) -> int:
    return 0 if fraction <= 0 else max(1, round(n * fraction))


def _by_subject(ids: Sequence[str], groups: Groups) -> dict[str, list[str]]:
    """Item ids by subject id, in first-seen order (each item its own subject without ``groups``)."""
    ids = list(ids)
    dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dupes:
        raise DataError(f"case ids must be unique; repeated: {', '.join(dupes[:10])}")
    if groups is None:
        return {i: [i] for i in ids}
    orphans = [i for i in ids if i not in groups]
    if orphans:
        raise DataError(f"groups names no subject for {len(orphans)} item(s): {', '.join(orphans[:10])}")
    subjects: dict[str, list[str]] = {}
    for i in ids:
        subjects.setdefault(str(groups[i]), []).append(i)
    return subjects


def _items(subject_split: Mapping[str, Sequence[str]], subjects: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """A split of subjects as a split of their items (each list sorted)."""
    return {s: sorted(i for subject in subject_split[s] for i in subjects[subject]) for s in SPLITS}


def make_split(
    ids: Sequence[str], seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2, groups: Groups = None
) -> dict[str, list[str]]:
    """Subject-level split ``{"train", "val", "test"}`` of item ids (each list sorted), seeded and disjoint."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be >= 0, sum < 1")
    subjects = _by_subject(ids, groups)
    order = _seeded_order(list(subjects), seed, "split")
    n_test, n_val = _count(len(order), test_fraction), _count(len(order), val_fraction)
    if n_test + n_val >= len(order):
        raise DataError(
            f"{len(order)} subject(s) are too few for val {val_fraction} and test {test_fraction} fractions"
        )
    split = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return _items(split, subjects)


def kfold_split(
    ids: Sequence[str], k: int, fold: int, seed: int = 0, test_fraction: float = 0.0, groups: Groups = None
) -> dict[str, list[str]]:
    """Fold ``fold`` of ``k``: ``val`` is the fold's share of the non-test subjects, ``train`` the rest.

    The ``test`` split (``test_fraction`` of the subjects) is the same for every fold and equals :func:`make_split`'s
    test split for the same seed, so folds are cross-validated on data the final test never sees.
    """
    if k < 2 or not 0 <= fold < k:
        raise ConfigError(f"k-fold needs k >= 2 and 0 <= fold < k, got k={k}, fold={fold}")
    subjects = _by_subject(ids, groups)
    test_items = set(make_split(ids, seed, 0.0, test_fraction, groups)["test"]) if test_fraction > 0 else set()
    test = {s for s, items in subjects.items() if items[0] in test_items}  # whole subjects: one item tells
    rest = _seeded_order([s for s in subjects if s not in test], seed, "kfold")
    if len(rest) < k:
        raise DataError(f"{len(rest)} non-test subject(s) are too few for {k} folds")
    bounds = [round(i * len(rest) / k) for i in range(k + 1)]
    val = set(rest[bounds[fold] : bounds[fold + 1]])
    split = {"train": [s for s in rest if s not in val], "val": list(val), "test": list(test)}
    return _items(split, subjects)


def subset_train(
    split: Mapping[str, Sequence[str]], fraction: float, seed: int = 0, groups: Groups = None
) -> dict[str, list[str]]:
    """Keep ``fraction`` of the training subjects (val and test untouched). Subsets are nested: for one seed the 10%
    subset lies inside the 30% subset, which lies inside the full training split."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"train_fraction must be in (0, 1], got {fraction}")
    subjects = _by_subject(split["train"], groups)
    n = len(subjects) if fraction == 1 else max(1, math.ceil(fraction * len(subjects) - 1e-9))
    kept = _seeded_order(list(subjects), seed, "train_fraction")[:n]
    train = sorted(i for subject in kept for i in subjects[subject])
    return {"train": train, "val": list(split["val"]), "test": list(split["test"])}


def validate_split(split: Any, where: str, groups: Groups = None) -> dict[str, list[str]]:
    """``split`` as plain lists, checked: the three lists of string ids, disjoint, and with ``groups`` no subject in
    two splits. Raises :class:`DataError` naming ``where`` and the offending id."""
    if not isinstance(split, Mapping) or any(not isinstance(split.get(s), list) for s in SPLITS):
        raise DataError(f"{where}: a split must have lists 'train', 'val' and 'test' of case ids")
    seen: dict[str, str] = {}
    for s in SPLITS:
        for item in split[s]:
            if not isinstance(item, str):
                raise DataError(f"{where}: case ids must be strings, found {item!r} in {s}")
            if item in seen:
                raise DataError(f"{where}: case {item!r} is in both {seen[item]} and {s}; splits must be disjoint")
            seen[item] = s
    if groups is not None:
        _check_subjects(seen, groups, where)
    return {s: list(split[s]) for s in SPLITS}


def _check_subjects(split_of: Mapping[str, str], groups: Mapping[str, str], where: str) -> None:
    first: dict[str, tuple[str, str]] = {}  # subject -> (its first item, that item's split)
    for item, s in split_of.items():
        if item not in groups:
            continue  # an item without a subject is its own subject
        other, other_split = first.setdefault(str(groups[item]), (item, s))
        if other_split != s:
            raise DataError(
                f"{where}: subject {groups[item]!r} is in both {other_split} ({other}) and {s} ({item}); all items "
                "of a subject must be in one split"
            )


def require_ids(split: Mapping[str, Sequence[str]], available: Sequence[str], where: str) -> None:
    """Every id of ``split`` must be ``available`` (usable in the data); one error names those that are not."""
    available = set(available)
    missing = sorted(i for s in SPLITS for i in split[s] if i not in available)
    if missing:
        shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise DataError(f"{where}: {len(missing)} listed case(s) are missing or unusable in the data: {shown}")


def save_split(split: Mapping[str, Sequence[str]], path: str | os.PathLike, **meta: Any) -> Path:
    """Write a split as JSON (``train``/``val``/``test`` lists and optional ``meta`` such as the seed)."""
    path = Path(path)
    data = {**validate_split({s: list(split[s]) for s in SPLITS}, str(path)), "meta": meta}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def load_split(
    path: str | os.PathLike, ids: Sequence[str] | None = None, groups: Groups = None
) -> dict[str, list[str]]:
    """Read a split JSON; with ``ids`` every listed item must be among them (a clear error names those missing)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"{path}: split file not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable split JSON ({exc})") from exc
    split = validate_split(data, str(path), groups)
    if ids is not None:
        require_ids(split, ids, str(path))
    return split


def split_md5(split: Mapping[str, Sequence[str]]) -> str:
    """MD5 of the split's canonical JSON (sorted id lists): equal digests mean equal splits."""
    canonical = json.dumps({s: sorted(split[s]) for s in SPLITS}, sort_keys=True, separators=(",", ":"))
    return hashlib.md5(canonical.encode(), usedforsecurity=False).hexdigest()
