"""medboost's own table of the 18 MedMNIST v2 / MedMNIST+ datasets (12 2D, 6 3D).

The entries were generated once from the ``INFO`` dict of the ``medmnist`` package (version 3.0.2) and are kept here as
plain data, so that medboost never imports ``medmnist`` at run time (importing it creates ``~/.medmnist`` and its
dataset module needs torchvision). ``tests/test_medmnist_data.py`` compares this table with the installed package.

Tasks use medboost's four names: ``multi-class``, ``binary-class``, ``multi-label`` (ChestMNIST: 14 binary labels,
which medmnist calls ``"multi-label, binary-class"``; kept in :attr:`DatasetInfo.medmnist_task`) and
``ordinal-regression`` (RetinaMNIST: 5 levels, evaluated as multi-class).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from medboost.errors import DataError

__all__ = [
    "MEDMNIST_DATASETS",
    "MEDMNIST_VERSION",
    "SIZES_2D",
    "SIZES_3D",
    "SPLITS",
    "TASKS",
    "DatasetInfo",
    "dataset_names",
    "get_info",
]

MEDMNIST_VERSION = "3.0.2"
"""Version of the ``medmnist`` package the table was generated from."""

TASKS = ("multi-class", "binary-class", "multi-label", "ordinal-regression")
SPLITS = ("train", "val", "test")
SIZES_2D = (28, 64, 128, 224)
SIZES_3D = (28, 64)


@dataclass(frozen=True)
class DatasetInfo:
    """What medboost knows about one MedMNIST dataset.

    ``files`` maps each published image size to its ``(url, md5)``; ``labels`` are the class names (multi-class,
    binary-class, ordinal-regression) or the label names (multi-label), in label-index order.
    """

    name: str
    python_class: str
    task: str
    medmnist_task: str
    labels: tuple[str, ...]
    n_channels: int
    n_samples: Mapping[str, int] = field(hash=False)
    is_3d: bool
    files: Mapping[int, tuple[str, str]] = field(hash=False)
    license: str

    def __post_init__(self) -> None:
        # Read-only views: the table is shared by every caller, so nobody may edit an entry in place.
        object.__setattr__(self, "n_samples", MappingProxyType(dict(self.n_samples)))
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))

    @property
    def num_classes(self) -> int:
        """Number of classes, or of binary labels for a multi-label dataset (the width of a model's output)."""
        return len(self.labels)

    @property
    def is_multi_label(self) -> bool:
        return self.task == "multi-label"

    @property
    def spatial_dims(self) -> int:
        return 3 if self.is_3d else 2

    @property
    def sizes(self) -> tuple[int, ...]:
        """The published image sizes (edge length in pixels or voxels)."""
        return tuple(sorted(self.files))

    def check_size(self, size: int) -> int:
        """Return ``size`` if it is published for this dataset, else raise :class:`DataError`."""
        if size not in self.files:
            raise DataError(
                f"{self.python_class} has no size {size!r}; published sizes: {', '.join(map(str, self.sizes))}"
            )
        return size

    def file_name(self, size: int = 28) -> str:
        """The official file name: ``breastmnist.npz`` for size 28, ``breastmnist_64.npz`` otherwise."""
        return _file_name(self.name, self.check_size(size))

    def url(self, size: int = 28) -> str:
        return self.files[self.check_size(size)][0]

    def md5(self, size: int = 28) -> str:
        return self.files[self.check_size(size)][1]


def dataset_names() -> tuple[str, ...]:
    """The 18 dataset names in medmnist's order (the 12 2D datasets first)."""
    return tuple(MEDMNIST_DATASETS)


def get_info(name: str) -> DatasetInfo:
    """Look a dataset up by name, case-insensitively: ``"breastmnist"`` and ``"BreastMNIST"`` both work."""
    key = str(name).strip().lower()
    if key not in MEDMNIST_DATASETS:
        known = ", ".join(info.python_class for info in MEDMNIST_DATASETS.values())
        raise DataError(f"unknown MedMNIST dataset {name!r}; known datasets: {known}")
    return MEDMNIST_DATASETS[key]


_ZENODO = "https://zenodo.org/records/10519652/files"  # every MedMNIST+ file is in this one Zenodo record


def _file_name(name: str, size: int) -> str:
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def _dataset(
    name: str,
    python_class: str,
    task: str,
    *,
    n_channels: int,
    n_samples: tuple[int, int, int],
    labels: tuple[str, ...],
    md5s: tuple[str, ...],
    is_3d: bool = False,
    license: str = "CC BY 4.0",
    medmnist_task: str | None = None,
) -> DatasetInfo:
    """One entry from what varies between datasets: ``n_samples`` in :data:`SPLITS` order, ``md5s`` in size order.
    The sizes follow from ``is_3d``, each file's URL from its name, and medmnist's task name is medboost's except for
    ChestMNIST."""
    sizes = SIZES_3D if is_3d else SIZES_2D
    files = {
        size: (f"{_ZENODO}/{_file_name(name, size)}?download=1", md5) for size, md5 in zip(sizes, md5s, strict=True)
    }
    return DatasetInfo(
        name=name,
        python_class=python_class,
        task=task,
        medmnist_task=medmnist_task or task,
        labels=labels,
        n_channels=n_channels,
        n_samples=dict(zip(SPLITS, n_samples, strict=True)),
        is_3d=is_3d,
        files=files,
        license=license,
    )


# Generated from medmnist.info.INFO (medmnist 3.0.2); edit only by regenerating. Hand-wrapped: one entry per dataset.
# fmt: off
_DATASETS = (
    _dataset(
        "pathmnist", "PathMNIST", "multi-class", n_channels=3, n_samples=(89996, 10004, 7180),
        labels=("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
                "cancer-associated stroma", "colorectal adenocarcinoma epithelium"),
        md5s=("a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
              "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec"),
    ),
    _dataset(
        "chestmnist", "ChestMNIST", "multi-label", n_channels=1, n_samples=(78468, 11219, 22433),
        medmnist_task="multi-label, binary-class",
        labels=("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
                "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"),
        md5s=("02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16",
              "db107e5590b27930b62dbaf558aebee3", "45bd33e6f06c3e8cdb481c74a89152aa"),
    ),
    _dataset(
        "dermamnist", "DermaMNIST", "multi-class", n_channels=3, n_samples=(7007, 1003, 2005), license="CC BY-NC 4.0",
        labels=("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi", "vascular lesions"),
        md5s=("0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
              "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d"),
    ),
    _dataset(
        "octmnist", "OCTMNIST", "multi-class", n_channels=1, n_samples=(97477, 10832, 1000),
        labels=("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
        md5s=("c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
              "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3"),
    ),
    _dataset(
        "pneumoniamnist", "PneumoniaMNIST", "binary-class", n_channels=1, n_samples=(4708, 524, 624),
        labels=("normal", "pneumonia"),
        md5s=("28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
              "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1"),
    ),
    _dataset(
        "retinamnist", "RetinaMNIST", "ordinal-regression", n_channels=3, n_samples=(1080, 120, 400),
        labels=("0", "1", "2", "3", "4"),
        md5s=("bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
              "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348"),
    ),
    _dataset(
        "breastmnist", "BreastMNIST", "binary-class", n_channels=1, n_samples=(546, 78, 156),
        labels=("malignant", "normal, benign"),
        md5s=("750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
              "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b"),
    ),
    _dataset(
        "bloodmnist", "BloodMNIST", "multi-class", n_channels=3, n_samples=(11959, 1712, 3421),
        labels=("basophil", "eosinophil", "erythroblast",
                "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte", "monocyte",
                "neutrophil", "platelet"),
        md5s=("7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
              "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601"),
    ),
    _dataset(
        "tissuemnist", "TissueMNIST", "multi-class", n_channels=1, n_samples=(165466, 23640, 47280),
        labels=("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule", "Glomerular endothelial cells",
                "Interstitial endothelial cells", "Leukocytes", "Podocytes", "Proximal Tubule Segments",
                "Thick Ascending Limb"),
        md5s=("ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
              "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c"),
    ),
    _dataset(
        "organamnist", "OrganAMNIST", "multi-class", n_channels=1, n_samples=(34561, 6491, 17778),
        labels=("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
                "lung-right", "pancreas", "spleen"),
        md5s=("68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
              "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170"),
    ),
    _dataset(
        "organcmnist", "OrganCMNIST", "multi-class", n_channels=1, n_samples=(12975, 2392, 8216),
        labels=("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
                "lung-right", "pancreas", "spleen"),
        md5s=("b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
              "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1"),
    ),
    _dataset(
        "organsmnist", "OrganSMNIST", "multi-class", n_channels=1, n_samples=(13932, 2452, 8827),
        labels=("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
                "lung-right", "pancreas", "spleen"),
        md5s=("9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
              "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1"),
    ),
    _dataset(
        "organmnist3d", "OrganMNIST3D", "multi-class", n_channels=1, n_samples=(971, 161, 610), is_3d=True,
        labels=("liver", "kidney-right", "kidney-left", "femur-right", "femur-left", "bladder", "heart", "lung-right",
                "lung-left", "spleen", "pancreas"),
        md5s=("a0c5a1ff56af4f155c46d46fbb45a2fe", "58a2205adf14a9d0a189cb06dc78bf10"),
    ),
    _dataset(
        "nodulemnist3d", "NoduleMNIST3D", "binary-class", n_channels=1, n_samples=(1158, 165, 310), is_3d=True,
        labels=("benign", "malignant"),
        md5s=("8755a7e9e05a4d9ce80a24c3e7a256f3", "c47c5b7d457bf6332200d2ea6d64ecd8"),
    ),
    _dataset(
        "adrenalmnist3d", "AdrenalMNIST3D", "binary-class", n_channels=1, n_samples=(1188, 98, 298), is_3d=True,
        labels=("normal", "hyperplasia"),
        md5s=("bbd3c5a5576322bc4cdfea780653b1ce", "17721accfe9fb005146a47d33bc54b2f"),
    ),
    _dataset(
        "fracturemnist3d", "FractureMNIST3D", "multi-class", n_channels=1, n_samples=(1027, 103, 240), is_3d=True,
        labels=("buckle rib fracture", "nondisplaced rib fracture", "displaced rib fracture"),
        md5s=("6aa7b0143a6b42da40027a9dda61302f", "f01d7e6316aedf4210da0da5b7437b42"),
    ),
    _dataset(
        "vesselmnist3d", "VesselMNIST3D", "binary-class", n_channels=1, n_samples=(1335, 191, 382), is_3d=True,
        labels=("vessel", "aneurysm"),
        md5s=("b41fd4f7e7e2feedddb201585ecafa1b", "6bb274a8846e1097066dcd64e2c4520f"),
    ),
    _dataset(
        "synapsemnist3d", "SynapseMNIST3D", "binary-class", n_channels=1, n_samples=(1230, 177, 352), is_3d=True,
        labels=("inhibitory synapse", "excitatory synapse"),
        md5s=("1235b78a3cd6280881dd7850a78eadb6", "43bd14ebf3af9d3dd072446fedc14d5e"),
    ),
)
# fmt: on

MEDMNIST_DATASETS: Mapping[str, DatasetInfo] = MappingProxyType({info.name: info for info in _DATASETS})
