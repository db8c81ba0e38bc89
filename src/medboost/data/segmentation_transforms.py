"""MONAI transforms of segmentation cases: the deterministic preprocessing (load, channels, label mapping, RAS
orientation, resampling, normalisation, padding; cached and invertible) and the random training part (ROI crop,
flips, rotations, intensity changes).

The random part is reseeded item by item from torch's global generator (see
:class:`medboost.data.segmentation.SegmentationDataset`), so it follows ``torch.manual_seed``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from monai.data.image_reader import NibabelReader, PILReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapLabelValued,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)

from medboost.data.pairing import convert_2d_image
from medboost.errors import ConfigError

__all__ = ["SelectChannelsd", "augmentation_transforms", "preprocessing_transforms", "roi_size_per_axis"]


class SelectChannelsd(MapTransform):
    """Keep the given channels (e.g. two of the four MSD brain-tumour modalities) of channel-first images."""

    def __init__(self, keys: Sequence[Hashable] | Hashable, channels: Sequence[int]):
        super().__init__(keys)
        self.channels = list(channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key][self.channels]
        return d


def roi_size_per_axis(roi_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """One positive ROI size per spatial axis (an int is the same size on every axis)."""
    roi = (roi_size,) * spatial_dims if isinstance(roi_size, int) else tuple(int(r) for r in roi_size)
    if len(roi) != spatial_dims or min(roi) < 1:
        raise ConfigError(f"roi_size {roi_size} does not fit {spatial_dims}D data (one positive size per axis)")
    return roi


def _loaders(spatial_dims: int) -> list[MapTransform]:
    if spatial_dims == 3:
        return [LoadImaged(["image", "label"], reader=NibabelReader(), image_only=True)]
    # numpy (row, column) indexing, so arrays and predictions match the files as PIL shows them.
    return [
        LoadImaged("image", reader=PILReader(converter=convert_2d_image, reverse_indexing=False), image_only=True),
        LoadImaged("label", reader=PILReader(reverse_indexing=False), image_only=True),
    ]


def _normalizer(normalize: str | None) -> list[MapTransform]:
    if normalize is None or normalize == "none":
        return []
    if normalize == "zscore":
        # Over nonzero voxels: the zero background of skull-stripped or cropped MRI would bias mean and std.
        return [NormalizeIntensityd("image", nonzero=True, channel_wise=True)]
    if normalize == "percentile":
        return [ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True, channel_wise=True)]
    raise ConfigError(f"normalize must be 'zscore', 'percentile' or None, got {normalize!r}")


def preprocessing_transforms(
    spatial_dims: int,
    roi_size: int | Sequence[int],
    *,
    channels: Sequence[int] | None = None,
    orientation: str | None = "RAS",
    spacing: Sequence[float] | None = None,
    normalize: str | None = "zscore",
    label_mapping: Mapping[int, int] | None = None,
) -> Compose:
    """The deterministic part (cached): load, channel first, select channels, map label values, orient, resample,
    normalise, pad to at least ``roi_size``. Validation and test use only this (whole images)."""
    roi = roi_size_per_axis(roi_size, spatial_dims)
    keys = ["image", "label"]
    steps: list[MapTransform] = [*_loaders(spatial_dims), EnsureChannelFirstd(keys)]
    if channels is not None:
        steps.append(SelectChannelsd("image", channels))
    if label_mapping:
        orig, target = zip(*sorted(label_mapping.items()))
        steps.append(MapLabelValued("label", list(orig), list(target)))
    # The geometric steps allow a missing key so that a prediction alone (under "label") can be inverted.
    if spatial_dims == 3 and orientation:
        # labels=None: axis names from the MetaTensor's space (RAS for NIfTI), MONAI's coming default.
        steps.append(Orientationd(keys, axcodes=orientation, labels=None, allow_missing_keys=True))
    if spacing is not None:
        if spatial_dims != 3:
            raise ConfigError("spacing applies to 3D volumes only (2D image files carry no spacing)")
        steps.append(Spacingd(keys, pixdim=tuple(spacing), mode=("bilinear", "nearest"), allow_missing_keys=True))
    steps += _normalizer(normalize)
    steps.append(SpatialPadd(keys, spatial_size=roi, mode="constant", allow_missing_keys=True))
    return Compose(steps)


def _rotations(spatial_dims: int, roi: tuple[int, ...], keys: list[str]) -> list[MapTransform]:
    # A 90-degree turn only where the two axes have the same ROI size (else crops of one batch differ in shape); a
    # small free rotation (+-15 degrees, size kept) everywhere.
    planes = [(a, b) for a in range(spatial_dims) for b in range(a + 1, spatial_dims) if roi[a] == roi[b]]
    steps: list[MapTransform] = [RandRotate90d(keys, prob=0.5, spatial_axes=p) for p in planes]
    angle = math.radians(15)
    ranges = {"range_x": angle} if spatial_dims == 2 else {"range_x": angle, "range_y": angle, "range_z": angle}
    steps.append(RandRotated(keys, **ranges, prob=0.2, mode=("bilinear", "nearest"), padding_mode="zeros"))
    return steps


def augmentation_transforms(
    spatial_dims: int, roi_size: int | Sequence[int], *, augment: bool = True, crop: str = "posneg"
) -> Compose:
    """The random part of training: a crop of ``roi_size`` (``"posneg"``: centred on foreground and background
    voxels half the time each; ``"random"``: uniform), then, with ``augment``, flips on every spatial axis,
    rotations, and intensity scale/shift."""
    roi = roi_size_per_axis(roi_size, spatial_dims)
    keys = ["image", "label"]
    if crop == "posneg":
        steps: list[MapTransform] = [RandCropByPosNegLabeld(keys, "label", roi, pos=1, neg=1, num_samples=1)]
    elif crop == "random":
        steps = [RandSpatialCropd(keys, roi, random_size=False)]
    else:
        raise ConfigError(f"crop must be 'posneg' or 'random', got {crop!r}")
    if augment:
        steps += [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)]
        steps += _rotations(spatial_dims, roi, keys)
        steps += [RandScaleIntensityd("image", factors=0.1, prob=0.5), RandShiftIntensityd("image", 0.1, prob=0.5)]
    return Compose(steps)
