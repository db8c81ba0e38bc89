"""Synthetic test data: MedMNIST-format npz files, MSD-style NIfTI task folders and paired 2D PNG folders."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from medboost.data.medmnist_info import DatasetInfo, get_info

N_SPLITS = {"train": 20, "val": 6, "test": 6}


def synthetic_arrays(
    info: DatasetInfo, size: int = 28, seed: int = 0, n_splits: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if info.is_3d:
        shape = (size, size, size)
    else:
        shape = (size, size) if info.n_channels == 1 else (size, size, 3)
    arrays = {}
    for split, n in (n_splits or N_SPLITS).items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        if info.is_multi_label:
            labels = rng.integers(0, 2, size=(n, info.num_classes))
            labels[0], labels[1] = 0, 1  # every label takes both values
        else:
            labels = (np.arange(n) % info.num_classes).reshape(n, 1)
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    return arrays


def write_npz(folder: Path, name: str, size: int = 28, n_splits: dict[str, int] | None = None, **overrides) -> Path:
    info = get_info(name)
    arrays = synthetic_arrays(info, size, n_splits=n_splits)
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / info.file_name(size)
    np.savez(path, **arrays)
    return path


# -- segmentation ------------------------------------------------------------------------------------------------
SHAPES = [(12, 14, 10), (13, 12, 11), (10, 15, 12), (14, 13, 10), (11, 12, 13), (12, 12, 12), (13, 14, 11), (10, 11, 9)]


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def case_arrays(shape, seed: int, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A positive random image and a label with classes 1 and 2 in two blocks."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(1, 100, size=(*shape, channels) if channels > 1 else shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[2:6, 2:6, 2:6] = 1
    label[6:9, 3:8, 4:8] = 2
    return image, label


def write_case(root: Path, case: str, shape, seed: int, channels: int = 1) -> None:
    image, label = case_arrays(shape, seed, channels)
    write_nifti(root / "imagesTr" / f"{case}.nii.gz", image)
    write_nifti(root / "labelsTr" / f"{case}.nii.gz", label)


def make_msd(root: Path, shapes=SHAPES) -> Path:
    for i, shape in enumerate(shapes):
        write_case(root, f"case_{i:03d}", shape, seed=i)
    return root


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def make_2d(root: Path, n: int = 6, mask_dir: str = "masks") -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.integers(1, 255, size=(40, 36), dtype=np.uint8)
        mask = np.zeros((40, 36), np.uint8)
        mask[5 + i : 20 + i, 4:30] = 255
        suffix = ".tif" if i == 1 else ".png"  # formats may mix within one folder
        write_png(root / "images" / f"{i}{suffix}", image)
        write_png(root / mask_dir / f"{i}.png", mask)
    return root


# -- an easy (learnable) classification task -----------------------------------------------------------------------
EASY_SPLITS = {"train": 48, "val": 16, "test": 16}
TILE = 7  # period of the multi-class / multi-label texture (px)


def easy_arrays(
    info: DatasetInfo, size: int = 28, seed: int = 0, n_splits: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """:func:`synthetic_arrays` labels with images that show them, so that a few steps of training must score well.

    Binary: the whole image is dark (class 0) or bright (class 1), a cue no flip, crop, rotation or intensity jitter
    removes. Multi-class and multi-label: a texture with period ``TILE`` px on every axis, whose in-tile pixels
    ``k`` with ``k % num_classes == j`` are bright when class/label ``j`` is present. Every patch of a ViT with a patch
    size that is a multiple of ``TILE`` sees the same, linearly decodable code; but a crop or rotation shifts the
    texture, so train these unaugmented.
    """
    splits = n_splits or EASY_SPLITS
    arrays = synthetic_arrays(info, size, seed, splits)
    rng = np.random.default_rng(seed + 1)
    spatial = (size,) * info.spatial_dims
    in_tile = np.ravel_multi_index(np.indices(spatial) % TILE, (TILE,) * info.spatial_dims) % info.num_classes
    for split in splits:
        labels = arrays[f"{split}_labels"]
        n = len(labels)
        active = labels.astype(bool) if info.is_multi_label else np.eye(info.num_classes, dtype=bool)[labels[:, 0]]
        images = rng.integers(0, 64, size=(n, *spatial)).astype(np.uint8)
        for i in range(n):
            if info.task == "binary-class":
                bright = np.full(spatial, bool(active[i, 1]))
            else:
                bright = np.isin(in_tile, np.flatnonzero(active[i]))
            images[i] += np.uint8(160) * bright.astype(np.uint8)
        if info.n_channels == 3 and not info.is_3d:
            images = np.repeat(images[..., None], 3, axis=-1)
        arrays[f"{split}_images"] = images
    return arrays


def write_easy_npz(folder: Path, name: str, size: int = 28, n_splits: dict[str, int] | None = None) -> Path:
    """A MedMNIST-format file of :func:`easy_arrays` (the learnable counterpart of :func:`write_npz`)."""
    info = get_info(name)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / info.file_name(size)
    np.savez(path, **easy_arrays(info, size, n_splits=n_splits))
    return path
