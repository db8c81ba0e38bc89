"""Per-class, per-volume segmentation metrics: Dice, Jaccard, HD95, NSD, sensitivity, specificity, precision, accuracy.

MedVisionLlama's public code merges every foreground class into one and scores a single volume; this module keeps each
class separate and keeps one row per (volume, class), so that a whole test split is scored, rows gathered from several
processes can be aggregated again (:meth:`SegmentationMetrics.from_rows`), and the table can be exported to CSV.

Every number comes from MONAI's functional metrics, called on one one-hot volume at a time:
``compute_dice``, ``compute_iou``, ``compute_hausdorff_distance(percentile=95)``, ``compute_surface_dice`` and
``get_confusion_matrix`` + ``compute_confusion_matrix_metric``. Definitions that follow from that choice:

- HD95 is MONAI's: the larger of the two directed 95th percentiles of the distances between the boundary voxels
  (voxels of the mask with a background 4-/6-neighbour) of prediction and target, with linear interpolation between
  order statistics. It is in millimetres when a spacing is given, otherwise in voxels.
- Counts and ratios are computed in float32, as MONAI does (relative error about 1e-7 on very large volumes).
- NSD is MONAI's default (``use_subvoxels=False``): the fraction of boundary voxels of both masks that lie within the
  tolerance of the other mask's boundary; the boundary is counted in voxels, not in surface area as in DeepMind's
  ``surface-distance``. The tolerance is in the same unit as HD95 (mm with a spacing, voxels without).

Empty-class conventions (per volume and class; "empty" means no voxel of that class):

======================================  ==============  ====  ====  ===========  ===========  =========
case                                    Dice, Jaccard   HD95  NSD   sensitivity  specificity  precision
======================================  ==============  ====  ====  ===========  ===========  =========
target and prediction both empty        1 (*)           NaN   NaN   NaN          1            NaN
target empty, prediction not            0 (*)           inf   0     NaN          < 1          0
prediction empty, target not            0               inf   0     0            1            NaN
======================================  ==============  ====  ====  ===========  ===========  =========

(*) With ``ignore_empty=True`` (MONAI's default for Dice) both are NaN whenever the target is empty. The default here
is ``False`` so that correctly predicting that a structure is absent counts as a success and predicting a structure
that is absent counts as a failure. Accuracy is always defined; specificity is NaN only when the class fills the
whole volume.

HD95 with exactly one mask empty is set to ``inf`` here on purpose: MONAI's percentile of an all-infinite distance
array interpolates ``inf - inf`` and returns NaN, which would make a missed structure indistinguishable from an
absent one and silently drop it from the mean.

Aggregation: NaN means "undefined" and ``inf`` means "infinitely far"; both are left out of the mean and standard
deviation and counted separately (``n_nan``, ``n_inf``), so no undefined value is ever turned into 0 and a missed
structure stays visible. ``n`` is the number of finite values averaged. The standard deviation is the sample one
(``ddof=1``) and is ``None`` below two values. Sums use :func:`math.fsum`, which is exactly rounded, so the result
does not depend on the order of the rows (rows gathered from processes in any order give identical numbers).
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import (
    compute_confusion_matrix_metric,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    compute_surface_dice,
    get_confusion_matrix,
)

from medboost.errors import ConfigError, DataError

__all__ = ["METRICS", "SegmentationMetrics"]

METRICS = ("dice", "jaccard", "hd95", "nsd", "sensitivity", "specificity", "precision", "accuracy")
_CONFUSION_METRICS = ("sensitivity", "specificity", "precision", "accuracy")
_ROW_KEYS = ("volume", "class_index", "class", "distance_unit")
_SHAPES = "(B, H, W), (B, 1, H, W), (B, H, W, D) or (B, 1, H, W, D)"
# MONAI warns for every empty mask; empty classes are expected here and handled by the documented conventions.
_EMPTY_WARNING = r"the (ground truth|prediction) of class"
# MONAI 1.5/1.6 passes its own deprecated argument internally; the warning is MONAI's to fix, not the caller's.
_MONAI_INTERNAL_WARNING = r".*always_return_as_numpy"


class SegmentationMetrics:
    """Accumulates per-volume, per-class segmentation metrics (update -> aggregate -> reset).

    Args:
        num_classes: number of labels including background (label 0); at least 2.
        include_background: also report class 0. The foreground mean never includes it.
        spacing: voxel size in mm, one number (isotropic) or one per spatial axis; distances are in voxels if None.
            :meth:`update` can override it per batch or per volume.
        nsd_tolerance_mm: NSD tolerance, one number or one per class (indexed by label, background included); in mm
            with a spacing, in voxels without.
        class_names: one name per label, background included; defaults to ``class_0``, ``class_1``, ...
        ignore_empty: Dice and Jaccard are NaN (not 1 or 0) when the target of a class is empty.
    """

    def __init__(
        self,
        num_classes: int,
        include_background: bool = False,
        spacing: float | Sequence[float] | None = None,
        nsd_tolerance_mm: float | Sequence[float] = 1.0,
        class_names: Sequence[str] | None = None,
        ignore_empty: bool = False,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"num_classes must be an integer >= 2 (background + foreground), got {num_classes!r}")
        self.num_classes = num_classes
        self.include_background = bool(include_background)
        self.spacing = None if spacing is None else _check_spacing_values(spacing, "spacing", ConfigError)
        self.nsd_tolerance = _check_tolerance(nsd_tolerance_mm, num_classes)
        self.class_names = _check_class_names(class_names, num_classes)
        self.ignore_empty = bool(ignore_empty)
        self.classes = list(range(0 if self.include_background else 1, num_classes))
        self.reset()

    def reset(self) -> None:
        """Forget every volume added so far."""
        self._rows: list[dict[str, Any]] = []
        self._seen: set[str] = set()
        self._distance_unit: str | None = None

    def config(self) -> dict[str, Any]:
        """The constructor arguments, e.g. to rebuild an identical instance with :meth:`from_rows`."""
        return {
            "num_classes": self.num_classes,
            "include_background": self.include_background,
            "spacing": self.spacing,
            "nsd_tolerance_mm": self.nsd_tolerance,
            "class_names": list(self.class_names),
            "ignore_empty": self.ignore_empty,
        }

    def update(
        self,
        pred: Any,
        target: Any,
        ids: Sequence[Any] | None = None,
        spacing: float | Sequence[float] | Sequence[Sequence[float]] | None = None,
    ) -> list[dict[str, Any]]:
        """Score a batch of integer label maps and keep one row per (volume, class); returns this batch's rows.

        ``pred`` and ``target`` are tensors or arrays of shape (B, H, W), (B, 1, H, W), (B, H, W, D) or
        (B, 1, H, W, D); a 4-D input whose second axis has length 1 is read as (B, 1, H, W). ``ids`` name the volumes
        (pass them whenever rows from several processes are merged: the default ids are a per-instance counter).
        ``spacing`` overrides the constructor's for this batch: one number, one per axis, or one of those per volume.
        """
        p = _label_maps(pred, "pred", self.num_classes)
        t = _label_maps(target, "target", self.num_classes)
        if p.shape != t.shape:
            raise DataError(
                f"pred and target shapes differ: {tuple(np.shape(pred))} vs {tuple(np.shape(target))} "
                f"(label maps {p.shape} vs {t.shape})"
            )
        _check_label_range(p, "pred", self.num_classes)
        _check_label_range(t, "target", self.num_classes)
        volume_ids = self._new_ids(ids, len(p))
        spacings = _resolve_spacing(self.spacing if spacing is None else spacing, len(p), p.ndim - 1)
        unit = self._check_unit("voxel" if spacings[0] is None else "mm")
        rows = []
        for i, volume in enumerate(volume_ids):
            values = self._volume_metrics(p[i], t[i], spacings[i])
            rows.extend(self._rows_for(volume, values, unit))
        self._rows.extend(rows)
        self._seen.update(volume_ids)
        return [dict(r) for r in rows]

    def per_volume_rows(self) -> list[dict[str, Any]]:
        """One dict per (volume, class): volume, class_index, class, distance_unit and every metric (raw floats)."""
        return [dict(r) for r in self._rows]

    @classmethod
    def from_rows(
        cls, rows: Iterable[Mapping[str, Any]], *, drop_duplicates: bool = False, **config: Any
    ) -> SegmentationMetrics:
        """An instance holding ``rows`` (from :meth:`per_volume_rows`, the ``per_volume`` table or a CSV read back).

        ``config`` takes the constructor's arguments; ``num_classes``, ``include_background`` and ``class_names`` are
        inferred from the rows when left out. Every volume must have one row per reported class. A (volume, class)
        pair seen twice is an error unless ``drop_duplicates`` is set and the copies are identical (the padding that
        ``DistributedSampler`` adds repeats volumes).
        """
        parsed = [_parse_row(r, i) for i, r in enumerate(rows)]
        if not parsed:
            raise DataError("from_rows got no rows")
        metrics = cls(**_infer_config(parsed, config))
        metrics._load_rows(parsed, drop_duplicates)
        return metrics

    def aggregate(self) -> dict[str, Any]:
        """A JSON-ready summary: settings, per-class statistics, the foreground mean and the per-volume table.

        ``per_class[name][metric]`` is ``{"mean", "std", "n", "n_nan", "n_inf"}`` over volumes;
        ``mean_foreground[metric]`` is ``{"mean", "n_classes"}``, the mean of the foreground classes' means (classes
        whose mean is undefined are left out and not counted). Undefined values are ``None``; in ``per_volume``
        infinite HD95 values are the string ``"inf"`` (strict JSON has no infinity).
        """
        if not self._rows:
            raise DataError("no volumes to aggregate: call update() (or from_rows()) first")
        per_class = {
            self.class_names[c]: {m: _summary([r[m] for r in self._rows if r["class_index"] == c]) for m in METRICS}
            for c in self.classes
        }
        foreground = [self.class_names[c] for c in self.classes if c != 0]
        means = {m: _mean_of_means([per_class[name][m]["mean"] for name in foreground]) for m in METRICS}
        return {
            "settings": self._settings(),
            "n_volumes": len({r["volume"] for r in self._rows}),
            "per_class": per_class,
            "mean_foreground": means,
            "per_volume": [{k: _json_value(v) for k, v in r.items()} for r in self._rows],
        }

    def to_csv(self, path: str | Path) -> Path:
        """Write the per-volume table; floats are written in full (``repr``), so :meth:`from_rows` reads them back
        exactly (``csv.DictReader`` rows can be passed as they are)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*_ROW_KEYS, *METRICS])
            writer.writeheader()
            writer.writerows(self._rows)
        return path

    # -- internals ------------------------------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "classes": [self.class_names[c] for c in self.classes],
            "include_background": self.include_background,
            "spacing": self.spacing,
            "distance_unit": self._distance_unit,
            "nsd_tolerance": [self.nsd_tolerance[c] for c in self.classes],
            "hd_percentile": 95,
            "ignore_empty": self.ignore_empty,
        }

    def _new_ids(self, ids: Sequence[Any] | None, batch: int) -> list[str]:
        start = len(self._seen)
        names = [str(start + i) for i in range(batch)] if ids is None else [str(v) for v in ids]
        if len(names) != batch:
            raise DataError(f"got {len(names)} volume ids for a batch of {batch} volumes")
        repeated = sorted(set(n for n in names if n in self._seen or names.count(n) > 1))
        if repeated:
            raise DataError(f"volume ids must be unique; already used: {', '.join(repeated[:5])}")
        return names

    def _check_unit(self, unit: str) -> str:
        # Averaging millimetres with voxels would give a meaningless number, so a mix is refused.
        if self._distance_unit is not None and unit != self._distance_unit:
            raise DataError(
                f"some volumes were scored with distances in {self._distance_unit} and this batch in {unit}; "
                "give a spacing for all volumes or for none"
            )
        self._distance_unit = unit
        return unit

    def _volume_metrics(self, pred: np.ndarray, target: np.ndarray, spacing: list[float] | None) -> dict[str, Any]:
        p, t = _one_hot(pred, self.num_classes), _one_hot(target, self.num_classes)
        bg = self.include_background
        tolerances = [self.nsd_tolerance[c] for c in self.classes]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_EMPTY_WARNING)
            warnings.filterwarnings("ignore", message=_MONAI_INTERNAL_WARNING, category=FutureWarning)
            values = {
                "dice": compute_dice(p, t, include_background=bg, ignore_empty=self.ignore_empty),
                "jaccard": compute_iou(p, t, include_background=bg, ignore_empty=self.ignore_empty),
                "hd95": _hd95(p, t, bg, spacing),
                "nsd": compute_surface_dice(p, t, tolerances, include_background=bg, spacing=spacing),
            }
        confusion = get_confusion_matrix(p, t, include_background=bg)
        for name in _CONFUSION_METRICS:
            values[name] = compute_confusion_matrix_metric(name, confusion)
        return {name: v[0].tolist() for name, v in values.items()}

    def _rows_for(self, volume: str, values: dict[str, list[float]], unit: str) -> list[dict[str, Any]]:
        rows = []
        for j, c in enumerate(self.classes):
            row = {"volume": volume, "class_index": c, "class": self.class_names[c], "distance_unit": unit}
            row.update({m: float(values[m][j]) for m in METRICS})
            rows.append(row)
        return rows

    def _load_rows(self, rows: list[dict[str, Any]], drop_duplicates: bool) -> None:
        by_key: dict[tuple[str, int], dict[str, Any]] = {}
        for row in rows:
            key = (row["volume"], row["class_index"])
            if key in by_key:
                if not drop_duplicates or not _same_row(by_key[key], row):
                    raise DataError(
                        f"volume {key[0]!r} class {key[1]} appears more than once"
                        + ("" if drop_duplicates else " (pass drop_duplicates=True for identical padded copies)")
                        + "; give each volume a unique id in update()"
                    )
                continue
            by_key[key] = row
        self._check_complete(by_key)
        for row in by_key.values():
            self._check_unit(row["distance_unit"])
            if row["class"] != self.class_names[row["class_index"]]:
                raise DataError(
                    f"row for volume {row['volume']!r} names class {row['class_index']} {row['class']!r}, "
                    f"expected {self.class_names[row['class_index']]!r}"
                )
        self._rows = list(by_key.values())
        self._seen = {r["volume"] for r in self._rows}

    def _check_complete(self, by_key: Mapping[tuple[str, int], Any]) -> None:
        # A volume missing a class means a gather went wrong; averaging what is left would bias the class means.
        found: dict[str, set[int]] = {}
        for volume, c in by_key:
            found.setdefault(volume, set()).add(c)
        expected = set(self.classes)
        for volume, classes in found.items():
            if classes != expected:
                raise DataError(
                    f"volume {volume!r} has rows for classes {sorted(classes)}, expected exactly {sorted(expected)}"
                )


# -- input checks ---------------------------------------------------------------------------------------------------


def _to_numpy(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x.float() if x.is_floating_point() else x).numpy()  # half/bfloat16 have no NumPy dtype
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{what} must be a numeric label map, got dtype {arr.dtype}")
    return arr


def _label_maps(x: Any, what: str, num_classes: int) -> np.ndarray:
    """``x`` as an int64 array (B, *spatial) of whole numbers; the range is checked separately."""
    arr = _to_numpy(x, what)
    if arr.ndim == 5 or (arr.ndim == 4 and arr.shape[1] == 1):
        if arr.shape[1] != 1:
            raise DataError(
                f"{what} has shape {arr.shape}: {arr.shape[1]} channels look like scores or one-hot masks; "
                f"pass integer label maps (argmax over channels) of shape {_SHAPES}"
            )
        arr = arr[:, 0]
    elif arr.ndim not in (3, 4):
        raise DataError(f"{what} must have shape {_SHAPES}, got {arr.shape}")
    if arr.size == 0:
        raise DataError(f"{what} is empty (shape {arr.shape})")
    if arr.dtype.kind == "f":
        _check_whole_numbers(arr, what)
    return arr.astype(np.int64)


def _check_whole_numbers(arr: np.ndarray, what: str) -> None:
    n_nan = int(np.isnan(arr).sum())
    if n_nan:
        raise DataError(f"{what} contains {n_nan} NaN value(s); label maps must hold integer class labels")
    if not np.isfinite(arr).all():
        raise DataError(f"{what} contains infinite values; label maps must hold integer class labels")
    fractional = arr[arr != np.round(arr)]
    if fractional.size:
        raise DataError(
            f"{what} holds non-integer labels (e.g. {fractional.flat[0]!r}); pass class indices, not probabilities"
        )


def _check_label_range(arr: np.ndarray, what: str, num_classes: int) -> None:
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(
            f"{what} labels must lie in [0, {num_classes - 1}] for num_classes={num_classes}; found {lo}..{hi}"
        )


def _check_spacing_values(spacing: Any, what: str, error: type[Exception] = DataError) -> float | list[float]:
    values = np.atleast_1d(np.asarray(spacing, dtype=float)) if _is_numeric(spacing) else None
    if values is None or values.ndim != 1 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise error(f"{what} must be a positive number or a sequence of positive numbers, got {spacing!r}")
    return float(values[0]) if np.ndim(spacing) == 0 else [float(v) for v in values]


def _is_numeric(x: Any) -> bool:
    try:
        return np.asarray(x).dtype.kind in "biuf"
    except (TypeError, ValueError):
        return False


def _resolve_spacing(spacing: Any, batch: int, ndim: int) -> list[list[float] | None]:
    """One spacing per volume, each a list with one value per spatial axis (or None for voxel units)."""
    if spacing is None:
        return [None] * batch
    # Only a sequence of sequences is per volume: a flat sequence is always per axis, whatever its length.
    nested = np.ndim(spacing) >= 1 and len(spacing) > 0 and np.ndim(spacing[0]) >= 1
    per_volume = list(spacing) if nested else [spacing] * batch
    if len(per_volume) != batch:
        raise DataError(f"got {len(per_volume)} spacings for a batch of {batch} volumes")
    return [_axis_spacing(s, ndim) for s in per_volume]


def _axis_spacing(spacing: Any, ndim: int) -> list[float]:
    checked = _check_spacing_values(spacing, "spacing")
    values = [checked] * ndim if isinstance(checked, float) else checked
    values = values * ndim if len(values) == 1 else values  # one value per volume means isotropic, as in MONAI
    if len(values) != ndim:
        raise DataError(f"spacing {spacing!r} has {len(values)} values for {ndim}-D volumes")
    return values


def _check_tolerance(tolerance: Any, num_classes: int) -> list[float]:
    values = np.atleast_1d(np.asarray(tolerance, dtype=float)) if _is_numeric(tolerance) else None
    if values is None or values.ndim != 1 or not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ConfigError(f"nsd_tolerance_mm must be a number >= 0 or one per class, got {tolerance!r}")
    if np.ndim(tolerance) == 0:
        return [float(values[0])] * num_classes
    if len(values) != num_classes:
        raise ConfigError(f"nsd_tolerance_mm has {len(values)} values for {num_classes} classes (background included)")
    return [float(v) for v in values]


def _check_class_names(names: Sequence[str] | None, num_classes: int) -> list[str]:
    if names is None:
        return [f"class_{c}" for c in range(num_classes)]
    names = [str(n) for n in names]
    if len(names) != num_classes:
        raise ConfigError(f"class_names has {len(names)} names for {num_classes} classes (background included)")
    if len(set(names)) != len(names):
        raise ConfigError(f"class_names must be unique, got {names}")
    return names


# -- metric helpers -------------------------------------------------------------------------------------------------


def _one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """(1, C, *spatial) float one-hot of one label map, the layout MONAI's functional metrics take."""
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(labels), num_classes)
    return one_hot.movedim(-1, 0).unsqueeze(0).float()


def _hd95(pred: torch.Tensor, target: torch.Tensor, include_background: bool, spacing: list[float] | None):
    hd = compute_hausdorff_distance(pred, target, include_background=include_background, percentile=95, spacing=spacing)
    first = 0 if include_background else 1
    pred_any = pred[:, first:].flatten(2).any(-1)
    target_any = target[:, first:].flatten(2).any(-1)
    # MONAI returns NaN when exactly one mask is empty (the percentile of all-infinite distances interpolates
    # inf - inf); the structure is missed or invented, so the distance is infinite, not undefined.
    return torch.where(pred_any ^ target_any, torch.tensor(float("inf")), hd)


def _summary(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    finite = arr[np.isfinite(arr)].tolist()
    n = len(finite)
    mean = math.fsum(finite) / n if n else None
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "n_nan": int(np.isnan(arr).sum()), "n_inf": int(np.isinf(arr).sum())}


def _mean_of_means(means: list[float | None]) -> dict[str, Any]:
    defined = [m for m in means if m is not None]
    return {"mean": math.fsum(defined) / len(defined) if defined else None, "n_classes": len(defined)}


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


# -- rows -----------------------------------------------------------------------------------------------------------


def _parse_row(row: Mapping[str, Any], index: int) -> dict[str, Any]:
    missing = [k for k in (*_ROW_KEYS, *METRICS) if k not in row]
    if missing:
        raise DataError(f"row {index} lacks {', '.join(missing)}")
    try:
        parsed = {"volume": str(row["volume"]), "class_index": int(row["class_index"]), "class": str(row["class"])}
        parsed["distance_unit"] = str(row["distance_unit"])
        parsed.update({m: _row_float(row[m]) for m in METRICS})
    except (TypeError, ValueError) as e:
        raise DataError(f"row {index} has a malformed value: {e}") from e
    return parsed


def _row_float(value: Any) -> float:
    # None and "" are how JSON and CSV carry an undefined value; "inf"/"nan" strings parse with float().
    return float("nan") if value is None or value == "" else float(value)


def _same_row(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def _infer_config(rows: list[dict[str, Any]], config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` completed from the rows: the class count, whether class 0 is reported, and the class names."""
    indices = {r["class_index"] for r in rows}
    if min(indices) < 0:
        raise DataError(f"rows name a negative class index {min(indices)}")
    num_classes = config.get("num_classes", max(max(indices) + 1, 2))
    if max(indices) >= num_classes:
        raise DataError(f"rows name class {max(indices)} but num_classes is {num_classes}")
    names = [f"class_{c}" for c in range(num_classes)]
    for r in rows:
        names[r["class_index"]] = r["class"]
    inferred = {"num_classes": num_classes, "include_background": 0 in indices, "class_names": names}
    return {**inferred, **config}
