"""Segmentation data: strict pairing and every bad-input report, subject-level splits, seeded MONAI transforms, the
data module (synthetic NIfTI and PNG files written here, plus the real Hippocampus, trap and ISBI files)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_data import SHAPES, case_arrays, make_2d, make_msd, write_nifti, write_png

from medboost.data.content_checks import check_pairs
from medboost.data.pairing import find_msd_pairs, find_paired_2d
from medboost.data.segmentation import SegmentationDataModule, SegmentationDataset
from medboost.data.segmentation_transforms import augmentation_transforms, preprocessing_transforms
from medboost.data.splits import split_md5
from medboost.errors import ConfigError, DataError

SHARED = Path(__file__).parents[1].parent / "shared" / "data"
HIPPO = SHARED / "msd" / "Task04_Hippocampus"
TRAPS = SHARED / "msd" / "Task04_Hippocampus_traps"
ISBI = SHARED / "em" / "isbi2012"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The test machine is shared: two intra-op threads fighting other processes make tiny tensor ops 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data {path} is absent (shared data folder not mounted)")
    return path


# --------------------------------------------------------------------------------------------------- synthetic files


def problems_by_name(report) -> dict[str, str]:
    return {Path(p.file.split(" / ")[-1]).name: p.reason for p in report.problems}


# --------------------------------------------------------------------------------------------------- pairing


def test_msd_pairs_by_file_name_skip_hidden_files_and_infer_labels(tmp_path):
    root = make_msd(tmp_path / "Task99_Synth", SHAPES[:4])
    (root / "imagesTr" / "._case_000.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (root / "labelsTr" / "._case_000.nii.gz").write_bytes(b"junk")
    report = find_msd_pairs(root)
    assert report.case_ids == ["case_000", "case_001", "case_002", "case_003"]
    assert report.problems == []
    assert [p.spatial_shape for p in report.pairs] == SHAPES[:4]
    assert report.label_names is None  # no dataset.json and not an MSD task: inferred after reading the labels
    checked = check_pairs(report)
    assert checked.label_names == {0: "background", 1: "class_1", 2: "class_2"}
    assert checked.label_names_source == "inferred from the labels"


def test_every_bad_input_is_reported_by_name_and_never_used(tmp_path):
    root = make_msd(tmp_path / "Task99_Bad", SHAPES[:3])
    image, label = case_arrays((12, 12, 12), seed=9)
    write_nifti(root / "imagesTr" / "orphan_image.nii.gz", image)
    write_nifti(root / "labelsTr" / "orphan_label.nii.gz", label)
    write_nifti(root / "imagesTr" / "shape_bad.nii.gz", image)
    write_nifti(root / "labelsTr" / "shape_bad.nii.gz", label[:, :, :10])
    write_nifti(root / "imagesTr" / "geometry_bad.nii.gz", image)
    write_nifti(root / "labelsTr" / "geometry_bad.nii.gz", label, np.diag([2.0, 2.0, 2.0, 1.0]))
    write_nifti(root / "imagesTr" / "out_of_range.nii.gz", image)
    write_nifti(root / "labelsTr" / "out_of_range.nii.gz", np.where(label == 2, 5, label).astype(np.uint8))
    write_nifti(root / "imagesTr" / "fractional.nii.gz", image)
    write_nifti(root / "labelsTr" / "fractional.nii.gz", label.astype(np.float32) * 0.5)
    nan_image = image.copy()
    nan_image[3, 3, 3] = np.nan
    write_nifti(root / "imagesTr" / "nan_image.nii.gz", nan_image)
    write_nifti(root / "labelsTr" / "nan_image.nii.gz", label)
    write_nifti(root / "imagesTr" / "empty_mask.nii.gz", image)
    write_nifti(root / "labelsTr" / "empty_mask.nii.gz", np.zeros_like(label))
    truncated = write_nifti(root / "imagesTr" / "truncated.nii.gz", image)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    write_nifti(root / "labelsTr" / "truncated.nii.gz", label)
    (root / "imagesTr" / "garbage.nii.gz").write_bytes(b"this is not a NIfTI file")
    write_nifti(root / "labelsTr" / "garbage.nii.gz", label)

    names = {0: "background", 1: "a", 2: "b"}
    with pytest.raises(DataError) as info:
        check_pairs(find_msd_pairs(root), strict=True, label_names=names)
    message = str(info.value)
    with pytest.warns(UserWarning) as caught:
        report = check_pairs(find_msd_pairs(root), strict=False, label_names=names)
    reasons = problems_by_name(report)
    expected = {
        "orphan_image.nii.gz": "image without label",
        "orphan_label.nii.gz": "label without image",
        "shape_bad.nii.gz": "shape mismatch: label 12x12x10 vs image 12x12x12",
        "geometry_bad.nii.gz": "geometry mismatch",
        "out_of_range.nii.gz": "label values [5] outside the label set",
        "fractional.nii.gz": "label values must be integers",
        "nan_image.nii.gz": "image contains 1 NaN or infinite voxel(s)",
        "empty_mask.nii.gz": "empty mask: all background",
        "truncated.nii.gz": "unreadable or truncated file",
        "garbage.nii.gz": "unreadable image",
    }
    assert set(reasons) == set(expected)
    for name, reason in expected.items():
        assert reason in reasons[name], (name, reasons[name])
        if name != "empty_mask.nii.gz":  # the one warning: allowed and used, never an error
            assert name in message and reason in message
    assert "empty_mask" not in message
    assert report.case_ids == ["case_000", "case_001", "case_002", "empty_mask"]
    assert [p.severity for p in report.problems if "empty" in p.reason] == ["warning"]
    assert len(caught) == len(expected)
    assert "(dropped)" in str(caught[0].message)


def test_dataset_json_pairs_names_and_modality_selection(tmp_path):
    root = tmp_path / "Task98_MultiModal"
    for i in range(4):
        image, label = case_arrays((10, 11, 9), seed=i, channels=3)
        image = image * 0 + np.array([10.0, 20.0, 30.0], np.float32)  # channel c holds 10 * (c + 1)
        write_nifti(root / "imagesTr" / f"mm_{i}.nii.gz", image)
        write_nifti(root / "labelsTr" / f"mm_{i}.nii.gz", np.where(label == 2, 3, label) if i == 3 else label)
    write_nifti(root / "imagesTr" / "unlisted.nii.gz", image)
    meta = {
        "labels": {"0": "background", "1": "edema", "2": "tumour"},
        "modality": {"0": "FLAIR", "1": "T1w", "2": "T2w"},
        "training": [{"image": f"./imagesTr/mm_{i}.nii.gz", "label": f"./labelsTr/mm_{i}.nii.gz"} for i in range(5)],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    report = find_msd_pairs(root, modality=["T2w", "flair"])
    assert report.channels == (2, 0)
    assert report.modality == {0: "FLAIR", 1: "T1w", 2: "T2w"}
    with pytest.warns(UserWarning):
        checked = check_pairs(report, strict=False)
    reasons = problems_by_name(checked)
    missing = sorted(p.reason for p in checked.problems if "mm_4" in p.file)
    assert missing == ["image listed in dataset.json does not exist", "label listed in dataset.json does not exist"]
    assert "label values [3] outside the label set 0=background, 1=edema, 2=tumour" in reasons["mm_3.nii.gz"]
    assert reasons["unlisted.nii.gz"] == "not listed in dataset.json; not used"
    assert checked.case_ids == ["mm_0", "mm_1", "mm_2"]

    with pytest.warns(UserWarning):
        dm = SegmentationDataModule(
            root,
            roi_size=8,
            channels=["T2w", "FLAIR"],
            normalize=None,
            strict=False,
            val_fraction=0.34,
            test_fraction=0.0,
        )
        dm.setup()
    assert (dm.in_channels, dm.num_classes, dm.label_names) == (2, 3, ["background", "edema", "tumour"])
    image, label, _ = next(iter(dm.val_dataloader()))
    assert image.shape == (1, 2, 10, 11, 9)
    assert image[0, 0].unique().tolist() == [30.0] and image[0, 1].unique().tolist() == [10.0]
    with pytest.raises(DataError, match="unknown modality 'PET'.*0=FLAIR, 1=T1w, 2=T2w"):
        find_msd_pairs(root, modality="PET")
    with pytest.raises(DataError, match=r"channel\(s\) \[5\]"):
        find_msd_pairs(root, modality=5)


def test_real_trap_files_are_named_with_their_reason(tmp_path):
    need(TRAPS)
    need(HIPPO)
    root = tmp_path / "Task04_Hippocampus"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
        for case in ("hippocampus_001", "hippocampus_003", "hippocampus_004"):
            (root / sub / f"{case}.nii.gz").symlink_to(HIPPO / sub / f"{case}.nii.gz")
    # The traps as someone might drop them in: an image and a label whose partners do not exist, and a label from
    # another study (512x512x94, 0.73 x 0.73 x 5 mm) in place of a real case's label.
    (root / "imagesTr" / "hippocampus_118.nii.gz").symlink_to(TRAPS / "image_hippocampus_118.nii.gz")
    (root / "labelsTr" / "hippocampus_010.nii.gz").symlink_to(TRAPS / "label_hippocampus_010.nii.gz")
    (root / "labelsTr" / "hippocampus_004.nii.gz").unlink()
    (root / "labelsTr" / "hippocampus_004.nii.gz").symlink_to(TRAPS / "label_hippocampus_281_512x512x94.nii.gz")

    report = find_msd_pairs(root)
    reasons = problems_by_name(report)
    assert reasons["hippocampus_118.nii.gz"] == "image without label"
    assert reasons["hippocampus_010.nii.gz"] == "label without image"
    assert reasons["hippocampus_004.nii.gz"].startswith("shape mismatch: label 512x512x94 vs image 36x52x38")
    assert "geometry mismatch: image spacing (1.0, 1.0, 1.0)" in reasons["hippocampus_004.nii.gz"]
    assert "label spacing (0.7344, 0.7344, 5.0) origin (-375.266, -375.266, 0.0)" in reasons["hippocampus_004.nii.gz"]
    assert report.case_ids == ["hippocampus_001", "hippocampus_003"]
    with pytest.raises(DataError, match="3 problem") as info:
        check_pairs(report)
    for name in ("hippocampus_118", "hippocampus_010", "hippocampus_004"):
        assert name in str(info.value)

    # Dropped in under their own names, they still pair with nothing.
    for trap in TRAPS.iterdir():
        sub = "imagesTr" if trap.name.startswith("image") else "labelsTr"
        (root / sub / trap.name).symlink_to(trap)
    reasons = problems_by_name(find_msd_pairs(root))
    assert reasons["image_hippocampus_118.nii.gz"] == "image without label"
    assert reasons["label_hippocampus_010.nii.gz"] == "label without image"
    assert reasons["label_hippocampus_281_512x512x94.nii.gz"] == "label without image"


def test_real_hippocampus_all_260_pairs_are_clean():
    report = check_pairs(find_msd_pairs(need(HIPPO)))
    assert len(report.pairs) == 260 and report.problems == []
    assert report.label_names == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert report.label_names_source == "built-in MSD table"
    assert {p.channels for p in report.pairs} == {1}


def test_paired_2d_folder_reports_and_maps_255(tmp_path):
    root = make_2d(tmp_path / "cells")
    write_png(root / "images" / "no_mask.png", np.ones((40, 36), np.uint8))
    write_png(root / "masks" / "no_image.png", np.zeros((40, 36), np.uint8))
    write_png(root / "images" / "small.png", np.ones((20, 36), np.uint8))
    write_png(root / "masks" / "small.png", np.zeros((40, 36), np.uint8))
    write_png(root / "images" / "rgb_mask.png", np.ones((40, 36), np.uint8))
    write_png(root / "masks" / "rgb_mask.png", np.zeros((40, 36, 3), np.uint8))
    write_png(root / "images" / "twice.png", np.ones((40, 36), np.uint8))
    write_png(root / "images" / "twice.jpg", np.ones((40, 36), np.uint8))
    write_png(root / "masks" / "twice.png", np.zeros((40, 36), np.uint8))
    (root / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    write_png(root / "masks" / "broken.png", np.zeros((40, 36), np.uint8))

    report = find_paired_2d(root)
    reasons = problems_by_name(report)
    assert reasons["no_mask.png"] == "image without label"
    assert reasons["no_image.png"] == "label without image"
    assert reasons["small.png"] == "shape mismatch: mask 40x36 vs image 20x36"
    assert "not single-channel" in reasons["rgb_mask.png"]
    ambiguous = [Path(p.file).name for p in report.problems if p.reason.startswith("ambiguous: several files")]
    assert ambiguous == ["twice.jpg", "twice.png", "twice.png"]  # both images and the mask they would share
    assert reasons["broken.png"].startswith("unreadable image")
    assert report.case_ids == ["0", "1", "2", "3", "4", "5"]
    with pytest.warns(UserWarning):
        checked = check_pairs(report, strict=False)
    assert "twice" in report.summary() and "5 pair(s) kept" not in report.summary()
    assert checked.label_mapping == {255: 1}
    assert checked.label_names == {0: "background (mask value 0)", 1: "foreground (mask value 255)"}


def test_paired_2d_data_module_with_labels_folder(tmp_path):
    root = make_2d(tmp_path / "cells", n=6, mask_dir="labels")
    dm = SegmentationDataModule(root, roi_size=(16, 24), batch_size=3, val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    assert (dm.spatial_dims, dm.in_channels, dm.num_classes) == (2, 1, 2)
    image, label, index = next(iter(dm.train_dataloader()))
    assert image.shape == (3, 1, 16, 24) and image.dtype == torch.float32
    assert label.shape == (3, 1, 16, 24) and label.dtype == torch.int64
    assert set(label.unique().tolist()) <= {0, 1} and index.shape == (3,)
    image, label, _ = next(iter(dm.val_dataloader()))
    info = dm.case_info("val", 0)
    mask = np.asarray(Image.open(info.label)) // 255  # numpy (row, column) order, as the file shows it
    assert image.shape == (1, 1, 40, 36) and np.array_equal(label[0, 0].numpy(), mask)
    assert np.array_equal(dm.invert("val", 0, label[0]).numpy(), mask[None])  # channel-first prediction
    assert dm.record()["label_mapping"] == {"255": 1}
    with pytest.raises(ConfigError, match="spatial_dims=3, but the data is 2D"):
        _ = SegmentationDataModule(root, spatial_dims=3).num_classes
    with pytest.raises(ConfigError, match="spacing applies to 3D"):
        SegmentationDataModule(root, spacing=(1.0, 1.0)).setup()


def test_real_isbi_pairs_and_whole_slices(tmp_path):
    need(ISBI)
    report = check_pairs(find_paired_2d(ISBI))
    assert len(report.pairs) == 30 and report.problems == []
    assert report.case_ids[:3] == ["0", "1", "2"]
    assert report.label_mapping == {255: 1} and report.label_names == {0: "membrane", 1: "cell_interior"}
    root = tmp_path / "isbi2012"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
        for i in range(5):
            (root / sub / f"{i}.png").symlink_to(ISBI / sub / f"{i}.png")
    dm = SegmentationDataModule(root, roi_size=128, batch_size=2, val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    assert dm.label_names == ["membrane", "cell_interior"]
    image, label, _ = next(iter(dm.train_dataloader()))
    assert image.shape == (2, 1, 128, 128) and label.shape == (2, 1, 128, 128)
    image, label, _ = next(iter(dm.test_dataloader()))
    mask = np.asarray(Image.open(dm.case_info("test", 0).label)) // 255
    assert image.shape == (1, 1, 512, 512) and np.array_equal(label[0, 0].numpy(), mask)


# --------------------------------------------------------------------------------------------------- transforms


def synthetic_dataset(tmp_path: Path, augment: bool = True) -> SegmentationDataset:
    report = check_pairs(find_msd_pairs(make_msd(tmp_path / "Task99_Synth", SHAPES[:3])))
    preprocess = preprocessing_transforms(3, 8)
    return SegmentationDataset(report.pairs, preprocess, augmentation_transforms(3, 8, augment=augment))


def test_augmentation_follows_the_torch_seed(tmp_path):
    dataset = synthetic_dataset(tmp_path)

    def draw(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return [t for i in range(len(dataset)) for t in dataset[i]]

    first, again, other = draw(0), draw(0), draw(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, other))
    image, label = dataset[0]
    assert image.shape == (1, 8, 8, 8) and label.shape == (1, 8, 8, 8) and label.dtype == torch.int64


def test_normalisations(tmp_path):
    report = check_pairs(find_msd_pairs(make_msd(tmp_path / "Task99_Synth", SHAPES[:1])))
    pair = {"image": str(report.pairs[0].image), "label": str(report.pairs[0].label)}
    zscore = preprocessing_transforms(3, 4, normalize="zscore")(dict(pair))["image"]
    assert abs(float(zscore.mean())) < 1e-4 and abs(float(zscore.std()) - 1) < 1e-2
    scaled = preprocessing_transforms(3, 4, normalize="percentile")(dict(pair))["image"]
    assert float(scaled.min()) == 0.0 and float(scaled.max()) == 1.0
    with pytest.raises(ConfigError, match="normalize"):
        preprocessing_transforms(3, 4, normalize="minmax")


# --------------------------------------------------------------------------------------------------- data module


def test_data_module_loaders_case_info_and_record(tmp_path):
    root = make_msd(tmp_path / "Task99_Synth")
    dm = SegmentationDataModule(root, roi_size=(8, 10, 8), batch_size=2, val_fraction=0.25, test_fraction=0.25)
    assert (dm.spatial_dims, dm.in_channels, dm.num_classes) == (3, 1, 3)
    dm.setup()
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [4, 2, 2]
    batches = list(dm.train_dataloader())
    image, label, index = batches[0]
    assert image.shape == (2, 1, 8, 10, 8) and image.dtype == torch.float32
    assert label.shape == (2, 1, 8, 10, 8) and label.dtype == torch.int64
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == [0, 1, 2, 3]
    for i, (image, label, index) in enumerate(dm.val_dataloader()):
        info = dm.case_info("val", i)
        original = np.asanyarray(nib.load(str(info.label)).dataobj)
        padded = tuple(max(s, r) for s, r in zip(info.original_shape, (8, 10, 8)))
        assert image.shape == (1, 1, *padded) and info.shape == padded and index.tolist() == [i]
        assert info.original_shape == original.shape and np.array_equal(info.affine, np.eye(4))
        assert np.array_equal(dm.invert("val", i, label[0, 0]).numpy(), original)  # padding undone
    record = dm.record()
    assert record["n_samples"] == {"train": 4, "val": 2, "test": 2}
    assert record["split"] == dm.split and record["split_md5"] == split_md5(dm.split)
    assert record["label_names"] == ["background", "class_1", "class_2"] and record["problems"] == []
    assert json.loads(json.dumps(record)) == record  # goes into a JSON result record as it is

    path = dm.save_split(tmp_path / "split.json")
    again = SegmentationDataModule(root, roi_size=(8, 10, 8), split=path, train_fraction=0.5, seed=7)
    again.setup()
    assert again.split["val"] == dm.split["val"] and set(again.split["train"]) < set(dm.split["train"])
    assert again.record()["split_file_md5"] is not None
    os.remove(root / "imagesTr" / f"{dm.split['test'][0]}.nii.gz")
    with pytest.warns(UserWarning, match="label without image"):
        broken = SegmentationDataModule(root, roi_size=8, split=path, strict=False)
        with pytest.raises(DataError, match=f"missing or unusable in the data: {dm.split['test'][0]}"):
            broken.setup()


def test_kfold_data_module_and_epoch_seeded_workers(tmp_path):
    root = make_msd(tmp_path / "Task99_Synth")
    dm = SegmentationDataModule(root, roi_size=8, k_folds=3, fold=1, test_fraction=0.25, batch_size=2, num_workers=1)
    dm.setup()
    assert len(dm.split["test"]) == 2 and len(dm.split["val"]) == 2 and len(dm.split["train"]) == 4
    loader = dm.train_dataloader()

    def epoch(k: int) -> list[torch.Tensor]:
        loader.sampler.set_epoch(k)
        return [t for batch in loader for t in batch]

    first, again, other = epoch(0), epoch(0), epoch(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # a resumed run repeats epoch 0 exactly
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    with pytest.raises(ConfigError, match="fold must be in 0 .. 2 for k_folds=3, got 3"):
        SegmentationDataModule(root, k_folds=3, fold=3)


def test_real_hippocampus_data_module(tmp_path):
    need(HIPPO)
    root = tmp_path / "Task04_Hippocampus"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
        for path in sorted((HIPPO / sub).glob("*.nii.gz"))[:10]:
            (root / sub / path.name).symlink_to(path)
    dm = SegmentationDataModule(root, roi_size=(32, 48, 32), batch_size=4, spacing=(1.5, 1.5, 1.5))
    dm.setup()
    assert dm.label_names == ["background", "Anterior", "Posterior"] and dm.in_channels == 1
    image, label, _ = next(iter(dm.train_dataloader()))
    assert image.shape == (4, 1, 32, 48, 32) and label.shape == (4, 1, 32, 48, 32)
    assert set(label.unique().tolist()) <= {0, 1, 2}
    image, label, _ = next(iter(dm.test_dataloader()))
    info = dm.case_info("test", 0)
    assert image.shape[2:] == info.shape and all(s >= r for s, r in zip(info.shape, (32, 48, 32)))
    restored = dm.invert("test", 0, label[0, 0])
    original = np.asanyarray(nib.load(str(info.label)).dataobj)
    assert restored.shape == original.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        agreement = (restored.numpy() == original).mean()  # resampled to 1.5 mm and back: nearly, not exactly
    assert agreement > 0.95


def test_reoriented_volume_is_served_in_ras_and_inverted_to_the_file_grid(tmp_path):
    # Stored with flipped and swapped axes (as many scanners write): the model sees RAS, predictions go back exactly.
    root = tmp_path / "Task99_Oblique"
    affine = np.array([[-1.0, 0, 0, 10], [0, 0, 1.5, -3], [0, -1, 0, 5], [0, 0, 0, 1]])
    for i in range(5):
        image, label = case_arrays((12, 13, 10), seed=i)
        write_nifti(root / "imagesTr" / f"c{i}.nii.gz", image, affine)
        write_nifti(root / "labelsTr" / f"c{i}.nii.gz", label, affine)
    dm = SegmentationDataModule(root, roi_size=8, val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    image, label, _ = next(iter(dm.val_dataloader()))
    info = dm.case_info("val", 0)
    assert (info.original_shape, info.shape, tuple(image.shape[2:])) == ((12, 13, 10), (12, 10, 13), (12, 10, 13))
    assert np.array_equal(info.affine, affine) and info.spacing == (1.0, 1.5, 1.0)  # the served grid's, not the file's
    original = np.asanyarray(nib.load(str(info.label)).dataobj)
    assert np.array_equal(dm.invert("val", 0, label[0, 0]).numpy(), original)
