"""Segmentation data as tensors: a cached, seeded dataset of checked case pairs and the Lightning data module that
finds, checks, splits and serves an MSD task folder or a paired 2D folder.

The steps live in their own modules: :mod:`~medboost.data.pairing` (image/label pairs from file headers),
:mod:`~medboost.data.content_checks` (voxel contents), :mod:`~medboost.data.splits` (subject-level splits, made
before any augmentation, the test split a whole split) and :mod:`~medboost.data.segmentation_transforms`.

Randomness: the random transforms of a training item are reseeded, item by item, with a number drawn from torch's
global generator (:meth:`SegmentationDataset.__getitem__`). With the loaders of
:class:`~medboost.data.base.SplitDataModule` (epoch-seeded order and worker seeds, non-persistent training workers)
and the training task's per-epoch reseeding, epoch ``k`` sees the same crops and augmentations in a fresh and in a
resumed run, for any ``num_workers``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from torch.utils.data import Dataset

from medboost.data.base import SplitDataModule
from medboost.data.content_checks import check_pairs
from medboost.data.pairing import CasePair, PairingReport, find_pairs
from medboost.data.segmentation_transforms import (
    augmentation_transforms,
    preprocessing_transforms,
    roi_size_per_axis,
)
from medboost.data.splits import (
    SPLITS,
    kfold_split,
    load_split,
    make_split,
    require_ids,
    save_split,
    split_md5,
    subset_train,
    validate_split,
)
from medboost.errors import ConfigError, DataError

__all__ = ["CaseInfo", "SegmentationDataModule", "SegmentationDataset"]


def _plain(x: Any) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


class SegmentationDataset(Dataset):
    """Cases as ``(image, label)``: ``image`` float32 ``C x *spatial``, ``label`` int64 ``1 x *spatial``.

    ``preprocess`` (deterministic) results are cached in memory when ``cache`` is set (call :meth:`fill_cache` before
    handing the dataset to worker processes, so each worker inherits the filled cache). ``augment``, if given, runs
    on a copy of the cached item after being reseeded from torch's global generator, one draw per item.
    """

    def __init__(self, pairs: Sequence[CasePair], preprocess: Compose, augment: Compose | None = None, cache=True):
        self.pairs = list(pairs)
        self.preprocess = preprocess
        self.augment = augment
        self.cache = cache
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def preprocessed(self, index: int) -> dict[str, Any]:
        """The deterministic result for one case (MetaTensors with their metadata and applied operations)."""
        if index in self._cache:
            return self._cache[index]
        pair = self.pairs[index]
        try:
            item = self.preprocess({"image": str(pair.image), "label": str(pair.label)})
        except Exception as exc:  # MONAI wraps reader errors in RuntimeError; name the files either way
            raise DataError(f"{pair.image} / {pair.label}: preprocessing failed ({exc})") from exc
        if self.cache:
            self._cache[index] = item
        return item

    def fill_cache(self) -> None:
        for index in range(len(self)):
            self.preprocessed(index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.preprocessed(index)
        if self.augment is not None:
            # Reseed from the global torch generator: reproducible under torch.manual_seed and per-epoch reseeding.
            self.augment.set_random_state(seed=int(torch.randint(0, 2**31 - 1, ()).item()))
            item = self.augment({"image": item["image"].clone(), "label": item["label"].clone()})
            item = item[0] if isinstance(item, list) else item  # RandCropByPosNegLabeld returns a list of samples
        image = _plain(item["image"]).float()
        label = _plain(item["label"]).round().long()
        return image, label


@dataclass(frozen=True)
class CaseInfo:
    """Where a val/test item came from (for writing its prediction next to, and in the grid of, the source file) and
    the grid the model sees."""

    case_id: str
    image: Path
    label: Path
    affine: np.ndarray  # original voxel -> world (identity for 2D)
    original_shape: tuple[int, ...]  # spatial shape of the file
    shape: tuple[int, ...]  # spatial shape the model sees (after orientation, spacing, padding)
    # Voxel size (mm) per axis of that grid: reoriented and resampled as the model sees it. None for 2D files, which
    # carry no geometry (distances are then in pixels).
    spacing: tuple[float, ...] | None


class SegmentationDataModule(SplitDataModule[SegmentationDataset]):
    """An MSD task or paired 2D folder, checked, split by subject and served as tensors.

    Loaders yield ``(image, label, index)``: training batches of ROI crops ``(B, C, *roi)`` float32 and
    ``(B, 1, *roi)`` int64; val/test batches of one whole (padded to at least ``roi_size``) image, whose case id,
    files and geometry :meth:`case_info` gives and whose prediction :meth:`invert` maps back to the file's grid.

    ``split`` is a split JSON path (see :func:`~medboost.data.splits.save_split`), a split dict, or None for
    :func:`~medboost.data.splits.make_split` with ``seed``; ``k_folds``/``fold`` make a k-fold split instead (the
    test split stays fixed). ``train_fraction`` keeps a nested, seeded subset of the training cases only.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        spatial_dims: int | None = None,
        roi_size: int | Sequence[int] = 64,
        split: str | os.PathLike | Mapping[str, Sequence[str]] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        train_fraction: float = 1.0,
        k_folds: int | None = None,
        fold: int = 0,
        batch_size: int = 2,
        num_workers: int = 0,
        augment: bool = True,
        normalize: str | None = "zscore",
        spacing: Sequence[float] | None = None,
        orientation: str | None = "RAS",
        channels: Sequence[int | str] | int | str | None = None,
        crop: str = "posneg",
        cache: bool = True,
        seed: int = 0,
        strict: bool = True,
        label_names: Mapping[int, str] | None = None,
        pin_memory: bool = False,
    ):
        super().__init__(batch_size, num_workers, seed, pin_memory)
        if k_folds is not None and not 0 <= fold < k_folds:
            raise ConfigError(f"fold must be in 0 .. {k_folds - 1} for k_folds={k_folds}, got {fold}")
        if spatial_dims not in (None, 2, 3):
            raise ConfigError(f"spatial_dims must be 2, 3 or None, got {spatial_dims}")
        self.root = Path(root)
        self._spatial_dims = spatial_dims
        self._roi_arg = roi_size
        self.split_source = split
        self.val_fraction, self.test_fraction, self.train_fraction = val_fraction, test_fraction, train_fraction
        self.fold, self.k_folds = fold, k_folds
        self.augment, self.normalize, self.spacing, self.orientation = augment, normalize, spacing, orientation
        self.channels, self.crop, self.cache, self.strict = channels, crop, cache, strict
        self.label_names_arg = label_names
        self._report: PairingReport | None = None
        self.split: dict[str, list[str]] | None = None
        self.split_file_md5: str | None = None

    @property
    def source(self) -> str:
        return str(self.root)

    @property
    def eval_batch_size(self) -> int:
        return 1  # whole images differ in size: one per batch

    # -- discovery ------------------------------------------------------------------------------------------------
    @property
    def report(self) -> PairingReport:
        """Pairing and content checks (run once, on first use: properties below need them before ``setup``)."""
        if self._report is None:
            report = check_pairs(find_pairs(self.root, self.channels), self.strict, label_names=self.label_names_arg)
            if self._spatial_dims is not None and self._spatial_dims != report.spatial_dims:
                raise ConfigError(
                    f"{self.root}: spatial_dims={self._spatial_dims}, but the data is {report.spatial_dims}D"
                )
            self._report = report
        return self._report

    @property
    def spatial_dims(self) -> int:
        return self.report.spatial_dims

    @property
    def roi_size(self) -> tuple[int, ...]:
        return roi_size_per_axis(self._roi_arg, self.spatial_dims)

    @property
    def num_classes(self) -> int:
        """Classes including background (label values are 0 .. num_classes - 1)."""
        return max(self.report.label_names) + 1

    @property
    def label_names(self) -> list[str]:
        names = self.report.label_names
        return [names.get(i, f"class_{i}") for i in range(self.num_classes)]

    @property
    def in_channels(self) -> int:
        channels = self.report.channels
        return len(channels) if channels is not None else self.report.pairs[0].channels

    # -- splits and datasets ----------------------------------------------------------------------------------------
    def _make_split(self) -> dict[str, list[str]]:
        cases = self.report.case_ids
        source = self.split_source
        if isinstance(source, Mapping):
            split = validate_split({s: list(source.get(s, [])) for s in SPLITS}, "split argument")
            require_ids(split, cases, f"split argument for {self.root}")
        elif source is not None:
            split = load_split(source, cases)
            self.split_file_md5 = hashlib.md5(Path(source).read_bytes(), usedforsecurity=False).hexdigest()
        elif self.k_folds is not None:
            split = kfold_split(cases, self.k_folds, self.fold, self.seed, self.test_fraction)
        else:
            split = make_split(cases, self.seed, self.val_fraction, self.test_fraction)
        return subset_train(split, self.train_fraction, self.seed) if self.train_fraction < 1 else split

    def _preprocess(self) -> Compose:
        return preprocessing_transforms(
            self.spatial_dims,
            self.roi_size,
            channels=self.report.channels,
            orientation=self.orientation,
            spacing=self.spacing,
            normalize=self.normalize,
            label_mapping=self.report.label_mapping,
        )

    def build_datasets(self) -> dict[str, SegmentationDataset]:
        self.split = self._make_split()
        random_part = augmentation_transforms(self.spatial_dims, self.roi_size, augment=self.augment, crop=self.crop)
        datasets = {}
        for name in SPLITS:
            pairs = [self.report.pair(c) for c in self.split[name]]
            augment = random_part if name == "train" else None
            datasets[name] = SegmentationDataset(pairs, self._preprocess(), augment, self.cache)
            if self.cache:
                datasets[name].fill_cache()  # before workers fork, so they share it
        return datasets

    def save_split(self, path: str | os.PathLike) -> Path:
        """Write the split in use (after ``setup``) so another run can reuse it."""
        if self.split is None:
            raise DataError(f"{self.root}: call setup() before saving the split")
        return save_split(self.split, path, root=str(self.root), seed=self.seed, train_fraction=self.train_fraction)

    # -- provenance and predictions ---------------------------------------------------------------------------------
    def case_info(self, split: str, index: int) -> CaseInfo:
        """Case id, source files, original affine and shapes of item ``index`` of ``split``, and its grid spacing."""
        dataset = self.dataset(split)
        pair = dataset.pairs[index]
        label = dataset.preprocessed(index)["label"]
        # The served label's own affine, after reorientation and resampling: the file's affine lists the spacings in
        # the file's axis order, which RAS reorientation may permute.
        spacing = tuple(float(s) for s in label.pixdim) if self.spatial_dims == 3 else None
        shape = tuple(label.shape[1:])
        return CaseInfo(pair.case_id, pair.image, pair.label, pair.affine, pair.spatial_shape, shape, spacing)

    def grid_spacings(self, split: str) -> list[tuple[float, ...]] | None:
        """Each item's voxel size (mm) in the grid the model sees, by index (None for 2D data: pixels)."""
        if self.spatial_dims != 3:
            return None
        return [self.case_info(split, i).spacing for i in range(len(self.dataset(split)))]

    def invert(self, split: str, index: int, prediction: torch.Tensor) -> torch.Tensor:
        """Map a prediction made on val/test item ``index`` (``C x *shape`` or ``*shape``, e.g. class indices) back
        to the source file's grid: undoes padding, resampling and reorientation (nearest-neighbour for labels)."""
        dataset = self.dataset(split)
        reference = dataset.preprocessed(index)["label"]
        squeeze = prediction.ndim == self.spatial_dims
        pred = prediction.unsqueeze(0) if squeeze else prediction
        if tuple(pred.shape[1:]) != tuple(reference.shape[1:]):
            raise DataError(
                f"{split} item {index}: prediction shape {tuple(pred.shape[1:])} differs from the "
                f"preprocessed shape {tuple(reference.shape[1:])}"
            )
        meta = MetaTensor(pred.detach().cpu().float(), meta=dict(reference.meta))
        meta.applied_operations = [dict(op) for op in reference.applied_operations]
        restored = _plain(dataset.preprocess.inverse({"label": meta})["label"])
        restored = restored.round().to(prediction.dtype) if not prediction.is_floating_point() else restored
        return restored[0] if squeeze else restored

    def record(self) -> dict[str, Any]:
        """What a result record should say about the data (call after ``setup``)."""
        report = self.report
        split = self.split or {s: [] for s in SPLITS}
        return {
            "dataset": self.root.name,
            "root": str(self.root),
            "layout": report.layout,
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "channels": list(report.channels) if report.channels is not None else None,
            "num_classes": self.num_classes,
            "label_names": self.label_names,
            "label_names_source": report.label_names_source,
            "label_mapping": {str(k): v for k, v in report.label_mapping.items()},
            "roi_size": list(self.roi_size),
            "split": {s: list(split[s]) for s in SPLITS},
            "split_md5": split_md5(split) if self.split else None,
            "split_file": str(self.split_source) if isinstance(self.split_source, str | os.PathLike) else None,
            "split_file_md5": self.split_file_md5,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "train_fraction": self.train_fraction,
            "k_folds": self.k_folds,
            "fold": self.fold if self.k_folds is not None else None,
            "preprocessing": {
                "normalize": self.normalize,
                "orientation": self.orientation if self.spatial_dims == 3 else None,
                "spacing": list(self.spacing) if self.spacing else None,
                "augment": self.augment,
                "crop": self.crop,
            },
            "problems": [{"file": p.file, "reason": p.reason, "severity": p.severity} for p in report.problems],
            **super().record(),
        }
