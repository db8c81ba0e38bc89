"""One 3D volume from a NIfTI file or a DICOM series folder, and MedBLIP's volume preprocessing as MONAI transforms.

A :class:`Volume` holds ``float32`` voxels ``(1, *spatial)``, the 4x4 affine from voxel index to RAS millimetres (the
NIfTI convention; DICOM's LPS patient coordinates are converted) and the voxel spacing. DICOM series are checked:
one series per folder, one orientation and pixel grid, evenly spaced slices along the slice normal; anything else is
refused with a :class:`~medboost.errors.DataError` naming the folder, so a volume is never silently built from a
wrong stack of slices.

Preprocessing (MedBLIP): min-max to ``[0, 1]``, trilinear resize keeping the physical aspect so the longest side has
``size`` voxels, zero-pad centred to ``size^3``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import MapTransform, Resize, SpatialPad
from monai.utils import convert_to_tensor

from medboost.errors import ConfigError, DataError

__all__ = [
    "LoadVolumed",
    "MinMaxScaled",
    "ResizeLongestd",
    "Volume",
    "VolumePreprocess",
    "dicom_demographics",
    "medblip_preprocessing",
    "parse_dicom_age",
    "read_dicom_series",
    "read_nifti",
    "read_volume",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Relative tolerance on slice gaps: scanners write positions with ~1e-4 mm rounding, a missing slice doubles a gap.
_GAP_TOLERANCE = 0.01
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """Voxels ``(1, *spatial)`` float32, ``affine`` voxel index -> RAS mm, ``spacing`` in mm per spatial axis."""

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...]
    source: str


def _spacing(affine: np.ndarray) -> tuple[float, ...]:
    return tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))


def read_nifti(path: str | os.PathLike) -> Volume:
    """A NIfTI volume (3D, or 4D with one frame) as it is stored; its affine is the file's."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: volume file not found")
    try:
        image = nib.load(str(path))
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as exc:  # nibabel raises many types for truncated or foreign files
        raise DataError(f"{path}: not a readable NIfTI volume ({exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {data.shape}")
    affine = np.asarray(image.affine, dtype=np.float64)
    return Volume(data[None], affine, _spacing(affine), str(path))


def _pydicom():
    try:
        import pydicom
    except ImportError as exc:
        raise ConfigError(
            "reading DICOM needs pydicom: pip install 'medboost[dicom]' (or pip install pydicom)"
        ) from exc
    return pydicom


def _read_slices(folder: Path) -> list[Any]:
    pydicom = _pydicom()
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"{folder}: no DICOM files in the series folder")
    slices = []
    for f in files:
        try:
            slices.append(pydicom.dcmread(str(f)))
        except Exception as exc:  # InvalidDicomError, truncated files
            raise DataError(f"{folder}: {f.name} is not a readable DICOM file ({exc})") from exc
    return slices


def _same(slices: Sequence[Any], attribute: str, folder: Path, what: str) -> Any:
    """The one value every slice has for ``attribute`` (numbers compared to 1e-4), else a DataError."""
    first = slices[0].get(attribute)
    if first is None:
        raise DataError(f"{folder}: {slices[0].filename} lacks {attribute}; cannot build the volume geometry")
    for s in slices[1:]:
        value = s.get(attribute)
        if value is None or not np.allclose(np.asarray(value, float), np.asarray(first, float), atol=1e-4):
            raise DataError(f"{folder}: {what} differs between slices ({first} vs {value}); one series per folder")
    return first


def _check_one_series(slices: Sequence[Any], folder: Path) -> None:
    uids = {str(s.get("SeriesInstanceUID", "")) for s in slices}
    if len(uids) > 1:
        raise DataError(f"{folder}: {len(uids)} DICOM series mixed in one folder ({', '.join(sorted(uids)[:3])})")
    if any(s.get("Rows") is None or s.get("Columns") is None for s in slices):
        raise DataError(f"{folder}: a file without Rows/Columns (not an image slice) is in the series folder")
    shapes = {(int(s.Rows), int(s.Columns)) for s in slices}
    if len(shapes) > 1:
        raise DataError(f"{folder}: slices of different sizes {sorted(shapes)}; one series per folder")


def _slice_step(positions: np.ndarray, folder: Path) -> float:
    """The one gap between consecutive slice positions (sorted), refusing repeats, gaps and uneven spacing."""
    gaps = np.diff(positions)
    step = float(np.median(gaps))
    if np.any(gaps < 1e-4 * max(step, 1.0)):
        raise DataError(f"{folder}: two slices share one position along the slice normal (repeated or mixed series)")
    off = np.abs(gaps - step) > _GAP_TOLERANCE * step
    if not np.any(off):
        return step
    ratios = gaps[off] / step
    if np.allclose(ratios, np.round(ratios), atol=0.05) and np.all(np.round(ratios) >= 2):
        missing = int(np.sum(np.round(ratios) - 1))
        raise DataError(f"{folder}: {missing} slice(s) missing from the series (a gap of {gaps[off].max():.3g} mm)")
    raise DataError(f"{folder}: inconsistent slice spacing ({gaps.min():.4g} to {gaps.max():.4g} mm)")


def _pixels(s: Any, folder: Path) -> np.ndarray:
    try:
        data = s.pixel_array.astype(np.float32)
    except Exception as exc:  # compressed pixel data without a decoder, corrupt data
        raise DataError(f"{folder}: cannot decode the pixels of {Path(s.filename).name} ({exc})") from exc
    slope, intercept = float(s.get("RescaleSlope", 1) or 1), float(s.get("RescaleIntercept", 0) or 0)
    return data * slope + intercept


def read_dicom_series(folder: str | os.PathLike) -> Volume:
    """One DICOM series folder as a volume of shape ``(1, slices, rows, columns)``, slices ordered along the slice
    normal (not by file name or InstanceNumber), stored values rescaled by slope/intercept."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: DICOM series folder not found")
    slices = _read_slices(folder)
    if len(slices) < 2:
        raise DataError(f"{folder}: a 3D series needs at least 2 slices, found {len(slices)}")
    _check_one_series(slices, folder)
    orientation = np.asarray(_same(slices, "ImageOrientationPatient", folder, "ImageOrientationPatient"), float)
    row_spacing, column_spacing = (float(v) for v in _same(slices, "PixelSpacing", folder, "PixelSpacing"))
    along_row, along_column = orientation[:3], orientation[3:]
    normal = np.cross(along_row, along_column)
    for s in slices:
        if s.get("ImagePositionPatient") is None:
            raise DataError(f"{folder}: {Path(s.filename).name} lacks ImagePositionPatient")
    positions = np.array([float(np.dot(normal, np.asarray(s.ImagePositionPatient, float))) for s in slices])
    order = np.argsort(positions)
    slices = [slices[i] for i in order]
    step = _slice_step(positions[order], folder)
    # Voxel (k, r, c) -> LPS: first slice's corner + k slices along the normal + r rows + c columns.
    lps = np.eye(4)
    lps[:3, 0] = normal * step
    lps[:3, 1] = along_column * row_spacing
    lps[:3, 2] = along_row * column_spacing
    lps[:3, 3] = np.asarray(slices[0].ImagePositionPatient, float)
    affine = _LPS_TO_RAS @ lps
    array = np.stack([_pixels(s, folder) for s in slices])[None]
    return Volume(array.astype(np.float32), affine, (step, row_spacing, column_spacing), str(folder))


def read_volume(path: str | os.PathLike) -> Volume:
    """A NIfTI file (``.nii``/``.nii.gz``) or a DICOM series folder."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise DataError(f"{path}: a volume must be a NIfTI file (.nii, .nii.gz) or a DICOM series folder")
    return read_nifti(path)


_AGE_UNITS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def parse_dicom_age(value: str | None) -> float | None:
    """DICOM PatientAge (``nnnY``, ``nnnM``, ``nnnW``, ``nnnD``) in years; None when absent or malformed."""
    match = re.fullmatch(r"\s*(\d{1,3})\s*([YMWD])\s*", str(value or ""))
    return None if match is None else int(match.group(1)) * _AGE_UNITS[match.group(2)]


def dicom_demographics(folder: str | os.PathLike) -> dict[str, Any]:
    """``{"age": years or None, "sex": "M" | "F" | "O" or None}`` from the headers of a DICOM series; slices that
    disagree are refused (one patient per series)."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: DICOM series folder or file not found")
    try:
        slices = _read_slices(folder) if folder.is_dir() else [_pydicom().dcmread(str(folder))]
    except (OSError, ValueError) as exc:  # pydicom's InvalidDicomError is a ValueError
        raise DataError(f"{folder}: not a readable DICOM file ({exc})") from exc
    ages = {str(s.get("PatientAge", "") or "") for s in slices}
    sexes = {str(s.get("PatientSex", "") or "").strip().upper() for s in slices}
    if len(ages) > 1 or len(sexes) > 1:
        raise DataError(f"{folder}: slices disagree on PatientAge {sorted(ages)} or PatientSex {sorted(sexes)}")
    sex = sexes.pop()
    return {"age": parse_dicom_age(ages.pop()), "sex": sex if sex in ("M", "F", "O") else None}


class LoadVolumed(MapTransform):
    """Read ``d[key]`` (a path) into ``d[key]`` (float32 tensor ``(1, *spatial)``), with ``spacing`` and
    ``affine`` beside it and the path kept under ``source``."""

    def __init__(self, keys: Sequence[Hashable] | Hashable = "image"):
        super().__init__(keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            volume = read_volume(d[key])
            d[key] = torch.from_numpy(volume.array)
            d.update(spacing=volume.spacing, affine=volume.affine, source=volume.source)
        return d


class MinMaxScaled(MapTransform):
    """Scale to ``[0, 1]`` by the volume's own minimum and maximum; a NaN/infinite or constant volume is refused
    with a DataError naming ``d["source"]`` (a constant one would become all NaN or all zero)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key], dtype=torch.float32)
            where = d.get("source", key)
            if not torch.isfinite(x).all():
                raise DataError(f"{where}: the volume has {int((~torch.isfinite(x)).sum())} NaN or infinite voxel(s)")
            low, high = x.min(), x.max()
            if high <= low:
                raise DataError(f"{where}: the volume is constant ({float(low)}); min-max scaling is undefined")
            d[key] = (x - low) / (high - low)
        return d


def _plain(x: Any) -> torch.Tensor:
    # A plain float32 tensor: MetaTensors carry per-item metadata that default collation and caching do not need.
    return convert_to_tensor(x, dtype=torch.float32, track_meta=False)


def _longest_side_shape(shape: Sequence[int], spacing: Sequence[float], size: int) -> tuple[int, ...]:
    extent = np.asarray(shape, float) * np.asarray(spacing, float)
    return tuple(max(1, int(round(e * size / extent.max()))) for e in extent)


class ResizeLongestd(MapTransform):
    """Trilinear resize keeping the physical aspect (voxel counts x ``d["spacing"]``; the voxel aspect when there
    is no spacing) so that the longest side has ``size`` voxels. Anisotropic DICOM (e.g. 0.7 x 0.7 x 6.5 mm) thus
    keeps its true shape rather than its voxel-grid shape."""

    def __init__(self, keys: Sequence[Hashable] | Hashable, size: int):
        super().__init__(keys)
        if size < 1:
            raise ConfigError(f"resize size must be >= 1, got {size}")
        self.size = size

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key])
            spacing = d.get("spacing") or (1.0,) * (x.ndim - 1)
            target = _longest_side_shape(x.shape[1:], spacing, self.size)
            resize = Resize(target, mode="trilinear", align_corners=False, anti_aliasing=False)
            d[key] = _plain(resize(x))
        return d


class VolumePreprocess:
    """Transforms applied in order. Not MONAI's Compose, which re-raises every error as a RuntimeError: here a
    DataError naming the file reaches the user unchanged."""

    def __init__(self, transforms: Sequence[Any]):
        self.transforms = list(transforms)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for t in self.transforms:
            d = t(d)
        return d


def medblip_preprocessing(size: int = 224, load: bool = True) -> VolumePreprocess:
    """MedBLIP's volume preprocessing of ``{"image": path}`` (or of a loaded tensor when ``load`` is False): min-max
    to [0, 1], resize so the longest side is ``size`` (aspect kept), zero-pad centred to ``size^3``."""
    steps: list[Any] = [LoadVolumed("image")] if load else []
    steps += [
        MinMaxScaled("image"),
        ResizeLongestd("image", size),
        _PadCentred("image", size),
    ]
    return VolumePreprocess(steps)


class _PadCentred(MapTransform):
    def __init__(self, keys: Sequence[Hashable] | Hashable, size: int):
        super().__init__(keys)
        self.pad = SpatialPad((size, size, size), method="symmetric", mode="constant")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _plain(self.pad(d[key]))
        return d
