"""Segmentation outputs: NIfTI on the reference grid, PNG masks, overlays."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medboost.errors import DataError
from medboost.report.segmentation_io import _pick_slice, class_colour, overlay_png, write_nifti_like, write_png_mask

SHAPE = (7, 6, 5)


@pytest.fixture
def reference(tmp_path):
    """A float CT-like reference with a rotated, anisotropic, translated affine and intensity scaling."""
    angle = np.deg2rad(30)
    affine = np.array(
        [
            [0.8 * np.cos(angle), -0.8 * np.sin(angle), 0.0, -90.5],
            [0.8 * np.sin(angle), 0.8 * np.cos(angle), 0.0, 12.25],
            [0.0, 0.0, 2.5, 40.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    image = nib.Nifti1Image(np.random.default_rng(0).normal(size=SHAPE).astype(np.float32), affine)
    image.header.set_slope_inter(2.0, -1024.0)
    path = tmp_path / "case_0001.nii.gz"
    nib.save(image, str(path))
    return path


def labels(shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 4, size=shape)


def test_nifti_keeps_reference_affine_and_shape(reference, tmp_path):
    data = labels()
    out = write_nifti_like(torch.from_numpy(data), reference, tmp_path / "pred" / "case_0001.nii.gz")
    written, ref = nib.load(str(out)), nib.load(str(reference))
    assert not np.allclose(ref.affine, np.eye(4))
    np.testing.assert_array_equal(written.affine, ref.affine)
    assert written.shape == ref.shape
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), data)  # the reference's scaling is not applied
    assert written.header.get_intent()[0] == "label"
    assert written.header["sform_code"] == ref.header["sform_code"]


def test_nifti_accepts_the_spatial_shape_of_a_4d_reference(tmp_path):
    path = tmp_path / "multimodal.nii"
    nib.save(nib.Nifti1Image(np.zeros((*SHAPE, 4), dtype=np.float32), np.diag([1.0, 1.0, 1.0, 1.0])), str(path))
    written = nib.load(str(write_nifti_like(labels(), path, tmp_path / "out.nii")))
    assert written.shape == SHAPE


def test_nifti_shape_mismatch_names_both_shapes(reference, tmp_path):
    with pytest.raises(DataError, match=r"labels have shape \(1, 7, 6, 5\) but the reference image .* \(7, 6, 5\)"):
        write_nifti_like(labels((1, *SHAPE)), reference, tmp_path / "out.nii.gz")


@pytest.mark.parametrize(
    ("data", "out_name", "message"),
    [
        (np.full(SHAPE, 300), "out.nii.gz", "go up to 300; uint8 label files hold at most 255"),
        (np.full(SHAPE, 0.5), "out.nii.gz", "non-integer labels"),
        (np.full(SHAPE, np.nan), "out.nii.gz", "NaN"),
        (labels(), "out.png", "needs a .nii or .nii.gz name"),
    ],
)
def test_nifti_bad_labels_or_name(reference, tmp_path, data, out_name, message):
    with pytest.raises(DataError, match=message):
        write_nifti_like(data, reference, tmp_path / out_name)


def test_nifti_missing_reference(tmp_path):
    with pytest.raises(DataError, match="reference image not found"):
        write_nifti_like(labels(), tmp_path / "absent.nii.gz", tmp_path / "out.nii.gz")


def test_png_mask_exact_and_scaled(tmp_path):
    data = labels((9, 11))
    exact = np.asarray(Image.open(write_png_mask(data, tmp_path / "exact.png", exact=True)))
    np.testing.assert_array_equal(exact, data)
    scaled = np.asarray(Image.open(write_png_mask(data, tmp_path / "scaled.png", num_classes=4)))
    np.testing.assert_array_equal(scaled, data * 85)
    with pytest.raises(DataError, match="needs a 2-D label map"):
        write_png_mask(labels(), tmp_path / "volume.png")
    with pytest.raises(DataError, match="labels go up to 3 but num_classes is 3"):
        write_png_mask(data, tmp_path / "x.png", num_classes=3)


@pytest.mark.parametrize("shape", [(12, 10), (12, 10, 6)])
def test_overlay_png_is_a_valid_image(tmp_path, shape):
    rng = np.random.default_rng(2)
    image = rng.normal(size=shape)
    target = np.zeros(shape, dtype=np.int64)
    target[3:7, 2:6] = 1
    target[8:10, 6:9] = 2
    out = overlay_png(image, target, np.roll(target, 1, axis=0), tmp_path / "fig" / "overlay.png", title="case 1")
    with Image.open(out) as png:
        png.verify()
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > 2 * png.height  # three panels side by side


def test_overlay_slice_choice_and_errors(tmp_path):
    truth = np.zeros((8, 8, 5), dtype=np.int64)
    guess = np.zeros_like(truth)
    truth[2:5, 2:5, 3] = 1
    truth[2:4, 2:4, 1] = 2
    guess[:, :, 4] = 1
    assert _pick_slice(truth, guess, axis=-1) == 3  # most ground-truth foreground
    assert _pick_slice(np.zeros_like(truth), guess, axis=-1) == 4  # falls back to the prediction
    assert _pick_slice(np.zeros_like(truth), np.zeros_like(guess), axis=-1) == 2  # middle slice
    assert _pick_slice(truth, guess, axis=0) == 2
    image = np.zeros(truth.shape)
    with pytest.raises(DataError, match="image, target and pred shapes differ"):
        overlay_png(image, truth, guess[..., :4], tmp_path / "x.png")
    with pytest.raises(DataError, match="slice_index 9 is outside the 5 slices"):
        overlay_png(image, truth, guess, tmp_path / "x.png", slice_index=9)


def test_class_colours_are_fixed_and_distinct():
    colours = [class_colour(c) for c in range(1, 11)]
    assert len(set(colours)) == 10
    assert class_colour(3) == colours[2]
