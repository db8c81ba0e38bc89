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
        self.check_size(size)
        return f"{self.name}.npz" if size == 28 else f"{self.name}_{size}.npz"

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


# Generated from medmnist.info.INFO (medmnist 3.0.2); edit only by regenerating.
_DATASETS = (
    DatasetInfo(
        name="pathmnist",
        python_class="PathMNIST",
        task="multi-class",
        medmnist_task="multi-class",
        labels=(
            "adipose",
            "background",
            "debris",
            "lymphocytes",
            "mucus",
            "smooth muscle",
            "normal colon mucosa",
            "cancer-associated stroma",
            "colorectal adenocarcinoma epithelium",
        ),
        n_channels=3,
        n_samples={"train": 89996, "val": 10004, "test": 7180},
        is_3d=False,
        files={
            28: (
                "https://zenodo.org/records/10519652/files/pathmnist.npz?download=1",
                "a8b06965200029087d5bd730944a56c1",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/pathmnist_64.npz?download=1",
                "55aa9c1e0525abe5a6b9d8343a507616",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/pathmnist_128.npz?download=1",
                "ac42d08fb904d92c244187169d1fd1d9",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/pathmnist_224.npz?download=1",
                "2c51a510bcdc9cf8ddb2af93af1eadec",
            ),
        },
        license="CC BY 4.0",
    ),
    DatasetInfo(
        name="chestmnist",
        python_class="ChestMNIST",
        task="multi-label",
        medmnist_task="multi-label, binary-class",
        labels=(
            "atelectasis",
            "cardiomegaly",
            "effusion",
            "infiltration",
            "mass",
            "nodule",
            "pneumonia",
            "pneumothorax",
            "consolidation",
            "edema",
            "emphysema",
            "fibrosis",
            "pleural",
            "hernia",
        ),
        n_channels=1,
        n_samples={"train": 78468, "val": 11219, "test": 22433},
        is_3d=False,
        files={
            28: (
                "https://zenodo.org/records/10519652/files/chestmnist.npz?download=1",
                "02c8a6516a18b556561a56cbdd36c4a8",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/chestmnist_64.npz?download=1",
                "9de6cd0b934ebb5b7426cfba5efbae16",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/chestmnist_128.npz?download=1",
                "db107e5590b27930b62dbaf558aebee3",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/chestmnist_224.npz?download=1",
                "45bd33e6f06c3e8cdb481c74a89152aa",
            ),
        },
        license="CC BY 4.0",
    ),
    DatasetInfo(
        name="dermamnist",
        python_class="DermaMNIST",
        task="multi-class",
        medmnist_task="multi-class",
        labels=(
            "actinic keratoses and intraepithelial carcinoma",
            "basal cell carcinoma",
            "benign keratosis-like lesions",
            "dermatofibroma",
            "melanoma",
            "melanocytic nevi",
            "vascular lesions",
        ),
        n_channels=3,
        n_samples={"train": 7007, "val": 1003, "test": 2005},
        is_3d=False,
        files={
            28: (
                "https://zenodo.org/records/10519652/files/dermamnist.npz?download=1",
                "0744692d530f8e62ec473284d019b0c7",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/dermamnist_64.npz?download=1",
                "b70a2f5635c6199aeaa28c31d7202e1f",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/dermamnist_128.npz?download=1",
                "2defd784463fa5243564e855ed717de1",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/dermamnist_224.npz?download=1",
                "8974907d8e169bef5f5b96bc506ae45d",
            ),
        },
        license="CC BY-NC 4.0",
    ),
    DatasetInfo(
        name="octmnist",
        python_class="OCTMNIST",
        task="multi-class",
        medmnist_task="multi-class",
        labels=("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
        n_channels=1,
        n_samples={"train": 97477, "val": 10832, "test": 1000},
        is_3d=False,
        files={
            28: (
                "https://zenodo.org/records/10519652/files/octmnist.npz?download=1",
                "c68d92d5b585d8d81f7112f81e2d0842",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/octmnist_64.npz?download=1",
                "e229e9440236b774d9f0dfef9d07bdaf",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/octmnist_128.npz?download=1",
                "0a97e76651ace45c5d943ee3f65b63ae",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/octmnist_224.npz?download=1",
                "abc493b6d529d5de7569faaef2773ba3",
            ),
        },
        license="CC BY 4.0",
    ),
    DatasetInfo(
        name="pneumoniamnist",
        python_class="PneumoniaMNIST",
        task="binary-class",
        medmnist_task="binary-class",
        labels=("normal", "pneumonia"),
        n_channels=1,
        n_samples={"train": 4708, "val": 524, "test": 624},
        is_3d=False,
        files={
            28: (
                "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1",
                "28209eda62fecd6e6a2d98b1501bb15f",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/pneumoniamnist_64.npz?download=1",
                "8f4eceb4ccffa70c672198ea285246c6",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/pneumoniamnist_128.npz?download=1",
                "05b46931834c231683c68f40c47b2971",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/pneumoniamnist_224.npz?download=1",
                "d6a3c71de1b945ea11211b03746c1fe1",
            ),
        },
        license="CC BY 4.0",
    ),
    DatasetInfo(
        name="retinamnist",
        python_class="RetinaMNIST",
        task="ordinal-regression",
        medmnist_task="ordinal-regression",
        labels=("0", "1", "2", "3", "4"),
        n_channels=3,
        n_samples={"train": 1080, "val": 120, "test": 400},
        is_3d=False,
        files={
            28: (
                "https://zenodo.org/records/10519652/files/retinamnist.npz?download=1",
                "bd4c0672f1bba3e3a89f0e4e876791e4",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/retinamnist_64.npz?download=1",
                "afda852cc34dcda56f86ad2b2457dbcc",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/retinamnist_128.npz?download=1",
                "e48e916a24454daf90583d4e6efb1a18",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/retinamnist_224.npz?download=1",
                "eae7e3b6f3fcbda4ae613ebdcbe35348",
            ),
        },
        license="CC BY 4.0",
    ),
    DatasetInfo(
        name="breastmnist",
        python_class="BreastMNIST",
        task="binary-class",
        medmnist_task="binary-class",
        labels=("malignant", "normal, benign"),
        n_channels=1,
        n_samples={"train": 546, "val": 78, "test": 156},
        is_3d=False,
        files={
            28: (
                "https://zenodo.org/records/10519652/files/breastmnist.npz?download=1",
                "750601b1f35ba3300ea97c75c52ff8f6",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/breastmnist_64.npz?download=1",
                "742edef2a1fd1524b2efff4bd7ba9364",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/breastmnist_128.npz?download=1",
                "363e4b3f8d712e9b5de15470a2aaadf1",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/breastmnist_224.npz?download=1",
                "b56378a6eefa9fed602bb16d192d4c8b",
            ),
        },
        license="CC BY 4.0",
    ),
    DatasetInfo(
        name="bloodmnist",
        python_class="BloodMNIST",
        task="multi-class",
        medmnist_task="multi-class",
        labels=(
            "basophil",
            "eosinophil",
            "erythroblast",
            "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
            "lymphocyte",
            "monocyte",
            "neutrophil",
            "platelet",
        ),
        n_channels=3,
        n_samples={"train": 11959, "val": 1712, "test": 3421},
        is_3d=False,
        files={
            28: (
                "https://zenodo.org/records/10519652/files/bloodmnist.npz?download=1",
                "7053d0359d879ad8a5505303e11de1dc",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/bloodmnist_64.npz?download=1",
                "2b94928a2ae4916078ca51e05b6b800b",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/bloodmnist_128.npz?download=1",
                "adace1e0ed228fccda1f39692059dd4c",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/bloodmnist_224.npz?download=1",
                "b718ff6835fcbdb22ba9eacccd7b2601",
            ),
        },
        license="CC BY 4.0",
    ),
    DatasetInfo(
        name="tissuemnist",
        python_class="TissueMNIST",
        task="multi-class",
        medmnist_task="multi-class",
        labels=(
            "Collecting Duct, Connecting Tubule",
            "Distal Convoluted Tubule",
            "Glomerular endothelial cells",
            "Interstitial endothelial cells",
            "Leukocytes",
            "Podocytes",
            "Proximal Tubule Segments",
            "Thick Ascending Limb",
        ),
        n_channels=1,
        n_samples={"train": 165466, "val": 23640, "test": 47280},
        is_3d=False,
        files={
            28: (
                "https://zenodo.org/records/10519652/files/tissuemnist.npz?download=1",
                "ebe78ee8b05294063de985d821c1c34b",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/tissuemnist_64.npz?download=1",
                "123ece2eba09d0aa5d698fda57103344",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/tissuemnist_128.npz?download=1",
                "61b955355d7425a89687b06cca3ce0c2",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/tissuemnist_224.npz?download=1",
                "b077128c4a949f0a4eb01517f9037b9c",
            ),
        },
        license="CC BY 4.0",
    ),
    DatasetInfo(
        name="organamnist",
        python_class="OrganAMNIST",
        task="multi-class",
        medmnist_task="multi-class",
        labels=(
            "bladder",
            "femur-left",
            "femur-right",
            "heart",
            "kidney-left",
            "kidney-right",
            "liver",
            "lung-left",
            "lung-right",
            "pancreas",
            "spleen",
        ),
        n_channels=1,
        n_samples={"train": 34561, "val": 6491, "test": 17778},
        is_3d=False,
        files={
            28: (
                "https://zenodo.org/records/10519652/files/organamnist.npz?download=1",
                "68e3f8846a6bd62f0c9bf841c0d9eacc",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/organamnist_64.npz?download=1",
                "2dcccc29b88e6da5a01161ef20cda288",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/organamnist_128.npz?download=1",
                "eeae80d0a227a8d099027e1b3cfd3b60",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/organamnist_224.npz?download=1",
                "50747347e05c87dd3aaf92c49f9f3170",
            ),
        },
        license="CC BY 4.0",
    ),
    DatasetInfo(
        name="organcmnist",
        python_class="OrganCMNIST",
        task="multi-class",
        medmnist_task="multi-class",
        labels=(
            "bladder",
            "femur-left",
            "femur-right",
            "heart",
            "kidney-left",
            "kidney-right",
            "liver",
            "lung-left",
            "lung-right",
            "pancreas",
            "spleen",
        ),
        n_channels=1,
        n_samples={"train": 12975, "val": 2392, "test": 8216},
        is_3d=False,
        files={
            28: (
                "https://zenodo.org/records/10519652/files/organcmnist.npz?download=1",
                "b9ceb9546e10131b32923c5bbeaea2b1",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/organcmnist_64.npz?download=1",
                "3ce34a8724ea6f548e6db4744d03b6a9",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/organcmnist_128.npz?download=1",
                "773c1f009daa3fe5d9a2a201b2a7ed94",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/organcmnist_224.npz?download=1",
                "050f5e875dc056f6768abf94ec9995d1",
            ),
        },
        license="CC BY 4.0",
    ),
    DatasetInfo(
        name="organsmnist",
        python_class="OrganSMNIST",
        task="multi-class",
        medmnist_task="multi-class",
        labels=(
            "bladder",
            "femur-left",
            "femur-right",
            "heart",
            "kidney-left",
            "kidney-right",
            "liver",
            "lung-left",
            "lung-right",
            "pancreas",
            "spleen",
        ),
        n_channels=1,
        n_samples={"train": 13932, "val": 2452, "test": 8827},
        is_3d=False,
        files={
            28: (
                "https://zenodo.org/records/10519652/files/organsmnist.npz?download=1",
                "9ab87b696fb54e2a387ebe992d6ed5f1",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/organsmnist_64.npz?download=1",
                "53a6d115339d874c25e309a994ff46d3",
            ),
            128: (
                "https://zenodo.org/records/10519652/files/organsmnist_128.npz?download=1",
                "ded0c5fa01a95dc4978b956f613e9b8e",
            ),
            224: (
                "https://zenodo.org/records/10519652/files/organsmnist_224.npz?download=1",
                "b354719e553fbbb2513d5533f52a4cb1",
            ),
        },
        license="CC BY 4.0",
    ),
    DatasetInfo(
        name="organmnist3d",
        python_class="OrganMNIST3D",
        task="multi-class",
        medmnist_task="multi-class",
        labels=(
            "liver",
            "kidney-right",
            "kidney-left",
            "femur-right",
            "femur-left",
            "bladder",
            "heart",
            "lung-right",
            "lung-left",
            "spleen",
            "pancreas",
        ),
        n_channels=1,
        n_samples={"train": 971, "val": 161, "test": 610},
        is_3d=True,
        files={
            28: (
                "https://zenodo.org/records/10519652/files/organmnist3d.npz?download=1",
                "a0c5a1ff56af4f155c46d46fbb45a2fe",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/organmnist3d_64.npz?download=1",
                "58a2205adf14a9d0a189cb06dc78bf10",
            ),
        },
        license="CC BY 4.0",
    ),
    DatasetInfo(
        name="nodulemnist3d",
        python_class="NoduleMNIST3D",
        task="binary-class",
        medmnist_task="binary-class",
        labels=("benign", "malignant"),
        n_channels=1,
        n_samples={"train": 1158, "val": 165, "test": 310},
        is_3d=True,
        files={
            28: (
                "https://zenodo.org/records/10519652/files/nodulemnist3d.npz?download=1",
                "8755a7e9e05a4d9ce80a24c3e7a256f3",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/nodulemnist3d_64.npz?download=1",
                "c47c5b7d457bf6332200d2ea6d64ecd8",
            ),
        },
        license="CC BY 4.0",
    ),
    DatasetInfo(
        name="adrenalmnist3d",
        python_class="AdrenalMNIST3D",
        task="binary-class",
        medmnist_task="binary-class",
        labels=("normal", "hyperplasia"),
        n_channels=1,
        n_samples={"train": 1188, "val": 98, "test": 298},
        is_3d=True,
        files={
            28: (
                "https://zenodo.org/records/10519652/files/adrenalmnist3d.npz?download=1",
                "bbd3c5a5576322bc4cdfea780653b1ce",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/adrenalmnist3d_64.npz?download=1",
                "17721accfe9fb005146a47d33bc54b2f",
            ),
        },
        license="CC BY 4.0",
    ),
    DatasetInfo(
        name="fracturemnist3d",
        python_class="FractureMNIST3D",
        task="multi-class",
        medmnist_task="multi-class",
        labels=("buckle rib fracture", "nondisplaced rib fracture", "displaced rib fracture"),
        n_channels=1,
        n_samples={"train": 1027, "val": 103, "test": 240},
        is_3d=True,
        files={
            28: (
                "https://zenodo.org/records/10519652/files/fracturemnist3d.npz?download=1",
                "6aa7b0143a6b42da40027a9dda61302f",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/fracturemnist3d_64.npz?download=1",
                "f01d7e6316aedf4210da0da5b7437b42",
            ),
        },
        license="CC BY 4.0",
    ),
    DatasetInfo(
        name="vesselmnist3d",
        python_class="VesselMNIST3D",
        task="binary-class",
        medmnist_task="binary-class",
        labels=("vessel", "aneurysm"),
        n_channels=1,
        n_samples={"train": 1335, "val": 191, "test": 382},
        is_3d=True,
        files={
            28: (
                "https://zenodo.org/records/10519652/files/vesselmnist3d.npz?download=1",
                "b41fd4f7e7e2feedddb201585ecafa1b",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/vesselmnist3d_64.npz?download=1",
                "6bb274a8846e1097066dcd64e2c4520f",
            ),
        },
        license="CC BY 4.0",
    ),
    DatasetInfo(
        name="synapsemnist3d",
        python_class="SynapseMNIST3D",
        task="binary-class",
        medmnist_task="binary-class",
        labels=("inhibitory synapse", "excitatory synapse"),
        n_channels=1,
        n_samples={"train": 1230, "val": 177, "test": 352},
        is_3d=True,
        files={
            28: (
                "https://zenodo.org/records/10519652/files/synapsemnist3d.npz?download=1",
                "1235b78a3cd6280881dd7850a78eadb6",
            ),
            64: (
                "https://zenodo.org/records/10519652/files/synapsemnist3d_64.npz?download=1",
                "43bd14ebf3af9d3dd072446fedc14d5e",
            ),
        },
        license="CC BY 4.0",
    ),
)

MEDMNIST_DATASETS: Mapping[str, DatasetInfo] = MappingProxyType({info.name: info for info in _DATASETS})
