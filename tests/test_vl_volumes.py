"""Volumes for the vision-language data: DICOM series geometry and demographics, NIfTI, MedBLIP preprocessing."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")

from medboost.data.volumes import (  # noqa: E402
    dicom_demographics,
    medblip_preprocessing,
    parse_dicom_age,
    read_dicom_series,
    read_volume,
)
from medboost.errors import DataError  # noqa: E402

SHARED = Path(__file__).parents[1].parent / "shared" / "data"
T1POST = SHARED / "dicom" / "tcia_brain_mri" / "Study3" / "11-T1post-18670"
IXI_T1 = SHARED / "brain" / "ixi_2mm" / "t1" / "IXI012-HH-1211_T1.nii.gz"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data {path} is absent (shared data folder not mounted)")
    return path


@pytest.fixture(scope="module")
def t1post():
    return read_dicom_series(need(T1POST))


def test_dicom_series_shape_and_rescaled_values(t1post):
    files = sorted(T1POST.iterdir())
    first = pydicom.dcmread(str(files[0]))
    assert t1post.array.shape == (1, len(files), int(first.Rows), int(first.Columns)) == (1, 22, 320, 280)
    assert t1post.array.dtype == np.float32
    assert t1post.spacing == pytest.approx((6.5, 0.6875, 0.6875), abs=1e-6)


def test_dicom_affine_matches_every_slice_header(t1post):
    # Slice k of the volume must be the file whose ImagePositionPatient is where the affine puts voxel (k, 0, 0),
    # and voxel (k, r, c) must hold that file's pixel (r, c).
    by_position = {}
    for f in T1POST.iterdir():
        ds = pydicom.dcmread(str(f))
        by_position[tuple(np.round(np.asarray(ds.ImagePositionPatient, float), 3))] = ds
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    for k in range(t1post.array.shape[1]):
        world = (lps @ t1post.affine @ np.array([k, 0, 0, 1.0]))[:3]
        ds = by_position[tuple(np.round(world, 3))]
        np.testing.assert_array_equal(t1post.array[0, k], ds.pixel_array.astype(np.float32))
    # One row step moves along the column direction cosine by the row spacing.
    orientation = np.asarray(ds.ImageOrientationPatient, float)
    step = lps[:3, :3] @ t1post.affine[:3, 1]
    np.testing.assert_allclose(step, orientation[3:] * float(ds.PixelSpacing[0]), atol=1e-6)


def test_dicom_age_and_sex_from_headers():
    assert dicom_demographics(need(T1POST)) == {"age": 41.0, "sex": "M"}
    assert parse_dicom_age("074Y") == 74
    assert parse_dicom_age("006M") == pytest.approx(0.5)
    assert parse_dicom_age("") is None and parse_dicom_age("74") is None


def _copy_series(tmp_path: Path) -> Path:
    folder = tmp_path / "series"
    shutil.copytree(need(T1POST), folder)
    return folder


def _by_position(folder: Path) -> list[Path]:
    normal = None
    keyed = []
    for f in folder.iterdir():
        ds = pydicom.dcmread(str(f))
        o = np.asarray(ds.ImageOrientationPatient, float)
        normal = np.cross(o[:3], o[3:]) if normal is None else normal
        keyed.append((float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))), f))
    return [f for _, f in sorted(keyed)]


def test_dicom_missing_slice_is_refused(tmp_path):
    folder = _copy_series(tmp_path)
    _by_position(folder)[10].unlink()
    with pytest.raises(DataError, match=r"series.*1 slice\(s\) missing"):
        read_dicom_series(folder)


def test_dicom_uneven_spacing_is_refused(tmp_path):
    folder = _copy_series(tmp_path)
    f = _by_position(folder)[5]
    ds = pydicom.dcmread(str(f))
    ds.ImagePositionPatient = [float(v) + 1.7 * n for v, n in zip(ds.ImagePositionPatient, (0, 0.18, 0.98))]
    ds.save_as(str(f))
    with pytest.raises(DataError, match="inconsistent slice spacing"):
        read_dicom_series(folder)


def test_dicom_mixed_series_is_refused(tmp_path):
    folder = _copy_series(tmp_path)
    other = SHARED / "dicom" / "tcia_brain_mri" / "Study3" / "26401-T1prereg-52906"
    shutil.copy(sorted(other.iterdir())[0], folder / "intruder.dcm")
    with pytest.raises(DataError, match=f"{folder}: 2 DICOM series mixed"):
        read_dicom_series(folder)


def test_nifti_volume_keeps_file_geometry():
    path = need(IXI_T1)
    volume = read_volume(path)
    image = nib.load(str(path))
    assert volume.array.shape == (1, *image.shape) == (1, 120, 120, 90)
    np.testing.assert_allclose(volume.affine, image.affine)
    assert volume.spacing == pytest.approx((2.0, 2.0, 2.0), abs=1e-3)


def test_preprocessing_output_shape_range_and_aspect():
    size = 32
    out = medblip_preprocessing(size)({"image": need(IXI_T1)})["image"]
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (1, size, size, size)
    assert float(out.min()) == 0.0 and 0.0 < float(out.max()) <= 1.0
    # 120 x 120 x 90 voxels of 2 mm: the longest sides fill 32 voxels, the short one 24, centred (4 zeros each side).
    lo, hi = _data_box(out)
    assert hi - lo == pytest.approx([32, 32, 24], abs=1)


def test_preprocessing_keeps_physical_aspect_of_anisotropic_dicom():
    # 22 slices x 6.5 mm = 143 mm, 320 x 0.6875 = 220 mm, 280 x 0.6875 = 192.5 mm: the slice axis is the shortest.
    out = medblip_preprocessing(32)({"image": need(T1POST)})["image"]
    expected = np.round(np.array([143.0, 220.0, 192.5]) * 32 / 220.0)
    assert (_extent(out) == expected).all()


def _extent(volume: torch.Tensor) -> np.ndarray:
    # The padded volume's data box: padding adds exact zeros, and the resized box is where any slice is non-zero
    # (the T1post series has no all-zero rows, columns or slices).
    lo, hi = _data_box(volume)
    return hi - lo


def _data_box(volume: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    nonzero = (volume[0] > 0).nonzero().numpy()
    return nonzero.min(0), nonzero.max(0) + 1


@pytest.mark.parametrize("fill", [np.nan, 3.0])
def test_nan_or_constant_volume_is_refused_naming_the_file(tmp_path, fill):
    path = tmp_path / "bad.nii.gz"
    data = np.ones((8, 8, 8), np.float32) * 3.0
    data[2, 2, 2] = fill
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    message = "NaN or infinite" if np.isnan(fill) else "constant"
    with pytest.raises(DataError, match=f"{path}: the volume .*{message}"):
        medblip_preprocessing(8)({"image": path})


def test_unknown_volume_kind_is_refused(tmp_path):
    (tmp_path / "scan.mha").write_bytes(b"x")
    with pytest.raises(DataError, match=r"scan.mha: a volume must be a NIfTI file"):
        read_volume(tmp_path / "scan.mha")
    with pytest.raises(DataError, match="not found"):
        read_volume(tmp_path / "absent.nii.gz")
