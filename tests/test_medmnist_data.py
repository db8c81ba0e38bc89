"""MedMNIST table, file checks, datasets, data module and seeded transforms (synthetic files + the real shared ones)."""

from __future__ import annotations

import ast
import importlib.util
import io
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic_data import N_SPLITS, write_npz

from medboost.data import transforms as T
from medboost.data.medmnist import (
    MedMNISTDataModule,
    MedMNISTDataset,
    download_file,
    file_md5,
    load_npz,
    locate,
    search_dirs,
)
from medboost.data.medmnist_info import MEDMNIST_DATASETS, dataset_names, get_info
from medboost.errors import DataError

REAL_DIR = Path(__file__).parents[1].parent / "shared" / "data" / "medmnist"
REAL_SPLITS = {
    "breastmnist": (546, 78, 156),
    "retinamnist": (1080, 120, 400),
    "adrenalmnist3d": (1188, 98, 298),
}
# One dataset per (task, 2D/3D) pair that MedMNIST has; 3D has no multi-label or ordinal dataset.
SYNTHETIC = ["breastmnist", "pathmnist", "chestmnist", "retinamnist", "nodulemnist3d", "organmnist3d"]


@pytest.fixture(autouse=True)
def _isolated_search_path(tmp_path, monkeypatch):
    """Keep the user's ~/.medmnist and $MEDBOOST_DATA out of every test."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEDBOOST_DATA", raising=False)


def real_file(name: str) -> Path:
    path = REAL_DIR / f"{name}.npz"
    if not path.is_file():
        pytest.skip(f"real MedMNIST file {path} is absent (shared data folder not mounted)")
    return path


# --------------------------------------------------------------------------------------------------- table


def _installed_medmnist_info() -> dict:
    spec = importlib.util.find_spec("medmnist")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the medmnist package is not installed; nothing to compare the table with")
    # Parsed, not imported: importing medmnist creates ~/.medmnist and needs torchvision/pandas.
    tree = ast.parse(Path(spec.submodule_search_locations[0], "info.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "INFO":
            return ast.literal_eval(node.value)
    pytest.fail("medmnist/info.py has no INFO literal")


def test_table_matches_installed_medmnist():
    official = _installed_medmnist_info()
    assert list(official) == list(MEDMNIST_DATASETS)
    for name, entry in official.items():
        info = MEDMNIST_DATASETS[name]
        assert info.python_class == entry["python_class"]
        assert info.medmnist_task == entry["task"]
        assert info.labels == tuple(entry["label"][str(i)] for i in range(len(entry["label"])))
        assert info.n_channels == entry["n_channels"]
        assert dict(info.n_samples) == entry["n_samples"]
        assert info.license == entry["license"]
        for size in info.sizes:
            suffix = "" if size == 28 else f"_{size}"
            assert info.url(size) == entry[f"url{suffix}"]
            assert info.md5(size) == entry[f"MD5{suffix}"]
        assert len(info.sizes) == len([k for k in entry if k.startswith("url")])


def test_table_shape_and_helpers():
    infos = list(MEDMNIST_DATASETS.values())
    assert len(infos) == 18 and len(dataset_names()) == 18
    assert sum(i.is_3d for i in infos) == 6
    assert all(i.sizes == (28, 64) for i in infos if i.is_3d)
    assert all(i.sizes == (28, 64, 128, 224) for i in infos if not i.is_3d)
    assert {i.task for i in infos} == {"multi-class", "binary-class", "multi-label", "ordinal-regression"}
    chest = get_info("ChestMNIST")
    assert chest.task == "multi-label" and chest.num_classes == 14 and chest.is_multi_label
    retina = get_info("retinamnist")
    assert retina.task == "ordinal-regression" and retina.num_classes == 5 and retina.n_channels == 3
    breast = get_info("BreastMNIST")
    assert breast is get_info("breastmnist")
    assert breast.file_name(28) == "breastmnist.npz" and breast.file_name(224) == "breastmnist_224.npz"
    assert breast.url(64).startswith("https://zenodo.org/") and "breastmnist_64.npz" in breast.url(64)
    assert breast.md5(28) == "750601b1f35ba3300ea97c75c52ff8f6"
    assert get_info("adrenalmnist3d").spatial_dims == 3 and breast.spatial_dims == 2


def test_unknown_name_and_size():
    with pytest.raises(DataError, match="unknown MedMNIST dataset 'foomnist'.*BreastMNIST.*SynapseMNIST3D"):
        get_info("foomnist")
    with pytest.raises(DataError, match="AdrenalMNIST3D has no size 128; published sizes: 28, 64"):
        get_info("adrenalmnist3d").file_name(128)
    with pytest.raises(DataError, match="unknown MedMNIST dataset"):
        locate("foomnist")
    with pytest.raises(DataError, match="unknown MedMNIST dataset"):
        MedMNISTDataModule("foomnist")


# --------------------------------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_dataset_items(tmp_path, name):
    info = get_info(name)
    path = write_npz(tmp_path, name)
    splits = load_npz(path, info, verify_md5=False)
    assert {s: len(a.labels) for s, a in splits.items()} == N_SPLITS
    assert all(a.images.dtype == np.uint8 for a in splits.values())
    ds = MedMNISTDataset(*splits["train"], info)
    x, y = ds[3]
    spatial = (28,) * info.spatial_dims
    assert x.dtype == torch.float32 and tuple(x.shape) == (info.n_channels, *spatial)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    raw = splits["train"].images[3]
    expected = torch.from_numpy(raw.astype(np.float32) / 255.0)
    expected = expected.permute(2, 0, 1) if raw.ndim == 3 and not info.is_3d else expected[None]
    assert torch.equal(x, expected)
    if info.is_multi_label:
        assert y.dtype == torch.float32 and tuple(y.shape) == (14,)
        assert torch.equal(y, torch.from_numpy(splits["train"].labels[3].astype(np.float32)))
    else:
        assert y.dtype == torch.int64 and y.ndim == 0 and int(y) == 3 % info.num_classes
    rgb = MedMNISTDataset(*splits["train"], info, as_rgb=True)
    assert rgb.in_channels == 3 and tuple(rgb[3][0].shape) == (3, *spatial)
    assert torch.equal(rgb[3][0][0], x[0]) and torch.equal(rgb[3][0][-1], x[-1])


def test_dataset_transform_is_applied(tmp_path):
    splits = load_npz(write_npz(tmp_path, "breastmnist"), "breastmnist", verify_md5=False)
    ds = MedMNISTDataset(*splits["val"], "breastmnist", split="val", transform=T.eval_transform_2d(size=64))
    x, _ = ds[0]
    assert tuple(x.shape) == (1, 64, 64) and float(x.min()) >= -1.0 - 1e-6


def test_datamodule_on_synthetic_file(tmp_path):
    write_npz(tmp_path, "chestmnist")
    dm = MedMNISTDataModule("ChestMNIST", data_dir=tmp_path, batch_size=8, seed=3, verify_md5=False, as_rgb=True)
    assert (dm.task, dm.num_classes, dm.in_channels, dm.spatial_dims, dm.image_size) == ("multi-label", 14, 3, 2, 28)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.md5 == file_md5(tmp_path / "chestmnist.npz") and dm.path == tmp_path / "chestmnist.npz"
    x, y, index = next(iter(dm.train_dataloader()))
    assert tuple(x.shape) == (8, 3, 28, 28) and tuple(y.shape) == (8, 14) and y.dtype == torch.float32
    assert index.dtype == torch.int64 and len(set(index.tolist())) == 8  # indices for exact distributed metrics
    assert [len(b[1]) for b in dm.val_dataloader()] == [6] and sum(len(b[1]) for b in dm.test_dataloader()) == 6
    assert dm.input_shape == (3, 28, 28)
    record = dm.record()
    assert record["n_samples"] == N_SPLITS and record["md5"] == dm.md5 and record["task"] == "multi-label"


def _train_order(tmp_path: Path, seed: int) -> list[int]:
    dm = MedMNISTDataModule("breastmnist", data_dir=tmp_path, batch_size=5, seed=seed, verify_md5=False)
    dm.setup()
    # Identify samples by their image bytes: the synthetic images are all distinct.
    lookup = {bytes(img): i for i, img in enumerate(dm.dataset("train").images)}
    order = []
    for x, _, _ in dm.train_dataloader():
        order += [lookup[bytes((xi[0] * 255).round().to(torch.uint8).numpy())] for xi in x]
    return order


def test_train_loader_shuffle_is_seeded(tmp_path):
    write_npz(tmp_path, "breastmnist")
    first, again, other = _train_order(tmp_path, 0), _train_order(tmp_path, 0), _train_order(tmp_path, 1)
    assert sorted(first) == list(range(20))
    assert first == again and first != other and first != list(range(20))


def test_shuffle_depends_on_epoch_not_history(tmp_path):
    # Epoch k's order is a function of (seed, k): a resumed run sees the batches an uninterrupted one would.
    write_npz(tmp_path, "breastmnist")
    dm = MedMNISTDataModule("breastmnist", data_dir=tmp_path, batch_size=5, seed=0, verify_md5=False)
    dm.setup()
    loader = dm.train_dataloader()
    epoch0 = [i for b in loader for i in b[2].tolist()]
    loader.sampler.set_epoch(1)
    epoch1 = [i for b in loader for i in b[2].tolist()]
    fresh = dm.train_dataloader()
    fresh.sampler.set_epoch(1)
    assert epoch1 == [i for b in fresh for i in b[2].tolist()] and epoch1 != epoch0


def test_datamodule_3d_as_rgb_with_seeded_transform(tmp_path):
    write_npz(tmp_path, "nodulemnist3d")
    dm = MedMNISTDataModule(
        "nodulemnist3d",
        data_dir=tmp_path,
        batch_size=4,
        verify_md5=False,
        as_rgb=True,
        train_transform=T.train_transform_3d(),
    )
    dm.setup()
    torch.manual_seed(0)
    a = next(iter(dm.train_dataloader()))[0]
    torch.manual_seed(0)
    b = next(iter(dm.train_dataloader()))[0]
    assert tuple(a.shape) == (4, 3, 28, 28, 28) and torch.equal(a, b)
    assert dm.in_channels == 3 and dm.spatial_dims == 3


def test_setup_before_dataset_access_is_required():
    with pytest.raises(DataError, match="call setup\\(\\) before"):
        MedMNISTDataModule("breastmnist").dataset("train")


# --------------------------------------------------------------------------------------------------- transforms


def _run(transform, x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return transform(x.clone())


@pytest.mark.parametrize(
    "transform, shape",
    [
        (T.train_transform_2d(), (1, 28, 28)),
        (T.train_transform_2d(size=64), (3, 28, 28)),
        (T.RandomResizedCrop2d(16), (1, 28, 28)),
        (T.RandomRotation2d(30), (3, 28, 28)),
        (T.train_transform_3d(), (1, 28, 28, 28)),
        (T.IntensityJitter(0.2, 0.2), (1, 28, 28, 28)),
    ],
)
def test_transforms_reproducible_with_seed(transform, shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    a, b, c = _run(transform, x, 0), _run(transform, x, 0), _run(transform, x, 1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.isfinite(a).all()


def test_transform_output_shapes_and_deterministic_ones():
    x2 = torch.rand(1, 28, 28)
    assert tuple(T.train_transform_2d(size=224)(x2).shape) == (1, 224, 224)
    assert tuple(T.train_transform_2d()(x2).shape) == (1, 28, 28)
    assert tuple(T.RandomResizedCrop2d((20, 24))(x2).shape) == (1, 20, 24)
    assert tuple(T.Resize(224)(x2).shape) == (1, 224, 224)
    assert tuple(T.Resize(14)(torch.rand(1, 28, 28, 28)).shape) == (1, 14, 14, 14)
    assert torch.equal(T.eval_transform_2d(size=64)(x2), T.eval_transform_2d(size=64)(x2))
    const = torch.full((1, 28, 28), 0.25)
    assert torch.allclose(T.Resize(224)(const), torch.full((1, 224, 224), 0.25))
    assert torch.allclose(T.Normalize(0.5, 0.5)(const), torch.full_like(const, -0.5))
    rgb = torch.rand(3, 8, 8)
    normed = T.Normalize([0.1, 0.2, 0.3], [1.0, 2.0, 4.0])(rgb)
    assert torch.allclose(normed[2], (rgb[2] - 0.3) / 4.0)
    # Rotating a constant image with fill equal to that constant changes nothing.
    assert torch.allclose(T.RandomRotation2d(45, fill=0.25)(const), const, atol=1e-6)


def test_flip_only_flips_listed_axes():
    x = torch.arange(8.0).reshape(1, 2, 2, 2)
    out = T.RandomFlip(p=1.0, axes=(0, 1, 2))(x)
    assert torch.equal(out, torch.flip(x, dims=(1, 2, 3)))
    assert torch.equal(T.RandomFlip(p=0.0, axes=(0, 1, 2))(x), x)
    x2 = torch.arange(4.0).reshape(1, 2, 2)
    assert torch.equal(T.RandomFlip(p=1.0)(x2), torch.flip(x2, dims=(2,)))


def test_transform_bad_input():
    with pytest.raises(DataError, match="RandomRotation2d expects one 2D image tensor"):
        T.RandomRotation2d()(torch.rand(1, 4, 4, 4))
    with pytest.raises(DataError, match="3 mean / 3 std values for an image of 1 channels"):
        T.Normalize([0.5] * 3, [0.5] * 3)(torch.rand(1, 4, 4))
    with pytest.raises(DataError, match="std must be positive"):
        T.Normalize(0.5, 0.0)


# --------------------------------------------------------------------------------------------------- real files


@pytest.mark.parametrize("name", sorted(REAL_SPLITS))
def test_real_files_verify(name):
    real_file(name)
    info = get_info(name)
    path = locate(name, data_dir=REAL_DIR)
    assert path == REAL_DIR / f"{name}.npz"
    assert file_md5(path) == info.md5(28)
    splits = load_npz(path, info, verify_md5=True)
    assert tuple(len(splits[s].labels) for s in ("train", "val", "test")) == REAL_SPLITS[name]
    ds = MedMNISTDataset(*splits["test"], info, split="test")
    x, y = ds[0]
    assert tuple(x.shape) == (info.n_channels, *(28,) * info.spatial_dims)
    assert y.dtype == torch.int64 and 0 <= int(y) < info.num_classes


def test_real_file_found_through_env_and_default_root(monkeypatch, tmp_path):
    real_file("breastmnist")
    # $MEDBOOST_DATA may point at the data root: the medmnist/ subfolder is searched too.
    monkeypatch.setenv("MEDBOOST_DATA", str(REAL_DIR.parent))
    assert locate("BreastMNIST") == REAL_DIR / "breastmnist.npz"
    assert search_dirs(tmp_path) == [tmp_path, REAL_DIR.parent, tmp_path / "home" / ".medmnist"]
    monkeypatch.delenv("MEDBOOST_DATA")
    home_copy = tmp_path / "home" / ".medmnist" / "breastmnist.npz"
    home_copy.parent.mkdir(parents=True)
    home_copy.write_bytes((REAL_DIR / "breastmnist.npz").read_bytes())
    assert locate("breastmnist") == home_copy


def test_real_breastmnist_datamodule_rgb_224():
    real_file("breastmnist")
    dm = MedMNISTDataModule(
        "breastmnist",
        data_dir=REAL_DIR,
        batch_size=32,
        as_rgb=True,
        train_transform=T.train_transform_2d(size=224),
        eval_transform=T.eval_transform_2d(size=224),
    )
    dm.setup()
    assert dm.md5 == get_info("breastmnist").md5(28)
    assert dm.input_shape == (3, 224, 224)
    x, y, _ = next(iter(dm.train_dataloader()))
    assert tuple(x.shape) == (32, 3, 224, 224) and y.dtype == torch.int64
    # 73% of BreastMNIST is label 1 (see docs): the labels came through unchanged.
    labels = dm.dataset("train").labels[:, 0]
    assert set(labels.tolist()) == {0, 1} and 0.6 < labels.mean() < 0.8


# --------------------------------------------------------------------------------------------------- bad input


def test_wrong_md5(tmp_path):
    path = write_npz(tmp_path, "breastmnist")
    expected = get_info("breastmnist").md5(28)
    with pytest.raises(DataError) as err:
        load_npz(path, "breastmnist")
    msg = str(err.value)
    assert "breastmnist.npz: MD5 mismatch" in msg and f"expected {expected}, got {file_md5(path)}" in msg
    assert "verify_md5=False" in msg
    with pytest.raises(DataError, match="MD5 mismatch"):
        MedMNISTDataModule("breastmnist", data_dir=tmp_path).setup()


def test_missing_keys(tmp_path):
    path = write_npz(tmp_path, "breastmnist", test_labels=None, val_images=None)
    with pytest.raises(DataError, match=r"breastmnist.npz: missing key\(s\) val_images, test_labels;"):
        load_npz(path, "breastmnist", verify_md5=False)


@pytest.mark.parametrize(
    "name, key, array, message",
    [
        (
            "breastmnist",
            "train_images",
            np.zeros((20, 28, 28, 3), np.uint8),
            r"train_images has shape \(20, 28, 28, 3\); expected \(N, 28, 28\) for BreastMNIST at size 28",
        ),
        (
            "retinamnist",
            "val_images",
            np.zeros((6, 28, 28), np.uint8),
            r"val_images has shape \(6, 28, 28\); expected \(N, 28, 28, 3\)",
        ),
        (
            "adrenalmnist3d",
            "test_images",
            np.zeros((6, 28, 28), np.uint8),
            r"test_images has shape \(6, 28, 28\); expected \(N, 28, 28, 28\) for AdrenalMNIST3D at size 28 \(3D\)",
        ),
        (
            "breastmnist",
            "train_labels",
            np.zeros(20, np.uint8),
            r"train_labels has shape \(20,\); expected \(N, 1\) for BreastMNIST \(binary-class\)",
        ),
        (
            "chestmnist",
            "train_labels",
            np.zeros((20, 1), np.uint8),
            r"train_labels has shape \(20, 1\); expected \(N, 14\) for ChestMNIST \(multi-label\)",
        ),
        (
            "breastmnist",
            "val_labels",
            np.full((6, 1), 2, np.uint8),
            r"val_labels: label values must lie in 0..1 for BreastMNIST",
        ),
        ("chestmnist", "val_labels", np.full((6, 14), 3, np.uint8), r"val_labels: label values must lie in 0..1"),
        (
            "breastmnist",
            "train_images",
            np.full((20, 28, 28), np.nan, np.float32),
            r"train_images: images contain NaN or infinite values",
        ),
        (
            "breastmnist",
            "train_images",
            np.full((20, 28, 28), 0.5, np.float32),
            r"float images must hold whole numbers 0..255",
        ),
        ("breastmnist", "train_labels", np.full((20, 1), np.nan), r"train_labels: labels contain NaN"),
        ("breastmnist", "train_labels", np.zeros((19, 1), np.uint8), r"train split has 20 images but 19 labels"),
        ("breastmnist", "test_images", np.zeros((0, 28, 28), np.uint8), r"test_images is empty"),
    ],
)
def test_bad_arrays(tmp_path, name, key, array, message):
    path = write_npz(tmp_path, name, **{key: array})
    with pytest.raises(DataError, match=message) as err:
        load_npz(path, name, verify_md5=False)
    assert str(err.value).startswith(path.name)


def test_float_images_with_whole_values_are_accepted(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(20, 28, 28)).astype(np.float64)
    splits = load_npz(write_npz(tmp_path, "breastmnist", train_images=images), "breastmnist", verify_md5=False)
    assert splits["train"].images.dtype == np.uint8 and np.array_equal(splits["train"].images, images)


def test_not_an_npz(tmp_path):
    path = tmp_path / "breastmnist.npz"
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError, match="breastmnist.npz: not a readable .npz file"):
        load_npz(path, "breastmnist", verify_md5=False)
    with pytest.raises(DataError, match="no such file"):
        load_npz(tmp_path / "nope.npz", "breastmnist")


def test_missing_file_without_download(tmp_path):
    info = get_info("pathmnist")
    with pytest.raises(DataError) as err:
        locate("pathmnist", size=64, data_dir=tmp_path / "data")
    msg = str(err.value)
    assert "pathmnist_64.npz (PathMNIST, size 64) not found" in msg
    assert str(tmp_path / "data" / "pathmnist_64.npz") in msg
    assert str(tmp_path / "data" / "medmnist" / "pathmnist_64.npz") in msg
    assert str(tmp_path / "home" / ".medmnist" / "pathmnist_64.npz") in msg
    assert info.url(64) in msg and info.md5(64) in msg and "download=True" in msg


def test_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    info = get_info("breastmnist")
    with pytest.raises(DataError) as err:
        locate("breastmnist", data_dir=tmp_path, download=True)
    msg = str(err.value)
    assert msg.startswith("could not download MedMNIST file breastmnist.npz (BreastMNIST, size 28)")
    assert "Temporary failure in name resolution" in msg
    assert info.url(28) in msg and info.md5(28) in msg and str(tmp_path / "breastmnist.npz") in msg
    assert "To place it manually" in msg
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


class _FakeResponse(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_download_success_and_corrupt_download(tmp_path, monkeypatch):
    source = real_file("breastmnist")
    payload = source.read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _FakeResponse(payload))
    path = locate("breastmnist", data_dir=tmp_path / "dl", download=True, progress=False)
    assert path == tmp_path / "dl" / "breastmnist.npz" and file_md5(path) == get_info("breastmnist").md5(28)
    assert len(load_npz(path, "breastmnist")["train"].labels) == 546

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _FakeResponse(payload[:-10]))
    with pytest.raises(DataError, match="downloaded breastmnist.npz from .* but its MD5 is .*, expected 7506"):
        locate("breastmnist", data_dir=tmp_path / "dl2", download=True, progress=False)
    assert list((tmp_path / "dl2").iterdir()) == []


def test_download_file_from_file_url(tmp_path):
    src = write_npz(tmp_path / "src", "breastmnist")
    dest = download_file(src.as_uri(), tmp_path / "out" / "copy.npz", file_md5(src), progress=True)
    assert dest.read_bytes() == src.read_bytes()
