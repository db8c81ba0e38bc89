"""Synthetic MedMNIST-format npz files for tests (random images, labels covering every class)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
