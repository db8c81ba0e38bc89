"""The compact MedMNIST table (what varies is stored, URLs and sizes derived) holds exactly what the full table held.

The digest was taken from the table as first generated from medmnist 3.0.2, every URL and MD5 written out; it needs
no medmnist install (``tests/test_medmnist_data.py`` compares with the package when it is installed).
"""

from __future__ import annotations

import hashlib
import json

from medboost.data.medmnist_info import MEDMNIST_DATASETS, SIZES_2D, SIZES_3D, SPLITS

GENERATED_TABLE_SHA256 = "1f7da1fddf8ce46739a83a206dfd2e7dbd441d436ee9d5be731797d2fec7c5da"


def _facts() -> list:
    """Every public fact of every entry, in table order."""
    return [
        [
            info.name, info.python_class, info.task, info.medmnist_task, list(info.labels), info.n_channels,
            dict(info.n_samples), info.is_3d, info.license,
            [[size, info.file_name(size), info.url(size), info.md5(size)] for size in info.sizes],
        ]
        for info in MEDMNIST_DATASETS.values()
    ]  # fmt: skip


def test_table_equals_the_generated_one():
    assert hashlib.sha256(json.dumps(_facts(), sort_keys=True).encode()).hexdigest() == GENERATED_TABLE_SHA256


def test_a_few_entries_by_hand():
    breast, organ3d = MEDMNIST_DATASETS["breastmnist"], MEDMNIST_DATASETS["organmnist3d"]
    assert breast.url(28) == "https://zenodo.org/records/10519652/files/breastmnist.npz?download=1"
    assert breast.md5(28) == "750601b1f35ba3300ea97c75c52ff8f6"
    assert organ3d.url(64) == "https://zenodo.org/records/10519652/files/organmnist3d_64.npz?download=1"
    assert organ3d.md5(64) == "58a2205adf14a9d0a189cb06dc78bf10"
    assert MEDMNIST_DATASETS["chestmnist"].md5(224) == "45bd33e6f06c3e8cdb481c74a89152aa"
    assert MEDMNIST_DATASETS["chestmnist"].medmnist_task == "multi-label, binary-class"
    assert MEDMNIST_DATASETS["dermamnist"].license == "CC BY-NC 4.0"
    assert dict(MEDMNIST_DATASETS["tissuemnist"].n_samples) == {"train": 165466, "val": 23640, "test": 47280}
    assert all(tuple(info.n_samples) == SPLITS for info in MEDMNIST_DATASETS.values())
    assert all(info.sizes == (SIZES_3D if info.is_3d else SIZES_2D) for info in MEDMNIST_DATASETS.values())
