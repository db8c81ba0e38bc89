"""MedMNIST v2 / MedMNIST+ files: find (or download) them, check them, and serve them as tensors.

Files are the official ``.npz`` releases (``{train,val,test}_{images,labels}``, uint8). They are looked up, in order, in
an explicit ``data_dir``, in ``$MEDBOOST_DATA`` and in the ``medmnist`` package's default folder ``~/.medmnist`` (so a
copy that ``medmnist`` already downloaded is reused); each folder is tried as is and with a ``medmnist/`` subfolder, so
``MEDBOOST_DATA`` may point at a data root that holds several collections.

Labels follow the task: an int64 class index for multi-class, binary-class and ordinal-regression, and a float vector
of the 14 binary labels for ChestMNIST (multi-label; it is never reduced to its first label).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medboost.data.base import SplitDataModule
from medboost.data.medmnist_info import SPLITS, DatasetInfo, get_info
from medboost.errors import DataError

__all__ = [
    "ENV_VAR",
    "MedMNISTDataModule",
    "MedMNISTDataset",
    "SplitArrays",
    "default_root",
    "download_file",
    "file_md5",
    "load_npz",
    "locate",
    "search_dirs",
]

ENV_VAR = "MEDBOOST_DATA"
_DOWNLOAD_TIMEOUT_S = 60
_CHUNK = 1 << 20


class SplitArrays(NamedTuple):
    """One split as stored: ``images`` uint8 (``N x S x S``, ``N x S x S x 3`` or ``N x S x S x S``), ``labels``
    int64 (``N x 1``, or ``N x 14`` for multi-label)."""

    images: np.ndarray
    labels: np.ndarray


# --------------------------------------------------------------------------------------------------- finding files


def default_root() -> Path:
    """The ``medmnist`` package's default download folder, computed without importing it (importing creates it)."""
    return Path.home() / ".medmnist"


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders :func:`locate` searches, in order: ``data_dir``, ``$MEDBOOST_DATA``, ``~/.medmnist``."""
    dirs = [Path(data_dir).expanduser()] if data_dir else []
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]).expanduser())
    dirs.append(default_root())
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _candidates(dirs: Iterable[Path], file_name: str) -> list[Path]:
    return [p for d in dirs for p in (d / file_name, d / "medmnist" / file_name)]


def _manual_help(info: DatasetInfo, size: int, target: Path) -> str:
    return (
        f"To place it manually: download {info.url(size)} on a machine with network access, check that its MD5 is "
        f"{info.md5(size)} (e.g. `md5sum {info.file_name(size)}`), and copy it to {target} (or to any folder above, "
        f"or set ${ENV_VAR} / pass data_dir)."
    )


def _paths_block(paths: Iterable[Path]) -> str:
    return "\n".join(f"  {p}" for p in paths)


def locate(
    name: str, size: int = 28, data_dir: str | os.PathLike | None = None, download: bool = False, progress: bool = True
) -> Path:
    """Return the path of the official file of dataset ``name`` at ``size``, downloading it if asked.

    A download goes to the first search folder (``data_dir`` if given, else ``$MEDBOOST_DATA``, else ``~/.medmnist``),
    through a temporary file that is moved into place only after its MD5 matched. Raises :class:`DataError` naming the
    file, every path tried, the URL and the MD5 when the file is missing and cannot be downloaded.
    """
    info = get_info(name)
    file_name = info.file_name(size)
    dirs = search_dirs(data_dir)
    tried = _candidates(dirs, file_name)
    for path in tried:
        if path.is_file():
            return path
    target = dirs[0] / file_name
    if not download:
        raise DataError(
            f"MedMNIST file {file_name} ({info.python_class}, size {size}) not found. Looked for:\n"
            f"{_paths_block(tried)}\n"
            f"Pass download=True to fetch it from {info.url(size)} (MD5 {info.md5(size)}). "
            + _manual_help(info, size, target)
        )
    try:
        download_file(info.url(size), target, info.md5(size), progress=progress)
    except (OSError, http.client.HTTPException) as exc:
        raise DataError(
            f"could not download MedMNIST file {file_name} ({info.python_class}, size {size}) from {info.url(size)}: "
            f"{exc}\nExpected MD5: {info.md5(size)}. The file was looked for at:\n{_paths_block(tried)}\n"
            + _manual_help(info, size, target)
        ) from exc
    return target


def file_md5(path: str | os.PathLike) -> str:
    """Hex MD5 of a file, read in 1 MiB chunks (the 224 files are several GB)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    return Progress(*columns, TimeRemainingColumn(), console=Console(stderr=True), transient=True, disable=not enabled)


def download_file(url: str, dest: str | os.PathLike, md5: str, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` with a progress bar, verifying ``md5`` before the file appears at ``dest``.

    Network and file-system failures propagate as ``OSError`` / ``http.client.HTTPException`` (``locate`` turns them
    into one :class:`DataError` with manual instructions); an MD5 mismatch raises :class:`DataError` directly.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file lives next to the target so the final os.replace is an atomic rename on one file system.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with _progress_bar(progress) as bar:
                task = bar.add_task(dest.name, total=total)
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(task, advance=len(chunk))
        if digest.hexdigest() != md5:
            raise DataError(
                f"downloaded {dest.name} from {url} but its MD5 is {digest.hexdigest()}, expected {md5}; the download "
                "is corrupt or the remote file changed. Nothing was written; try again or place the file manually."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# --------------------------------------------------------------------------------------------------- checking files


def _check_md5(path: Path, info: DatasetInfo, size: int, actual: str | None) -> None:
    expected = info.md5(size)
    actual = actual or file_md5(path)
    if actual != expected:
        raise DataError(
            f"{path.name}: MD5 mismatch for {info.python_class} size {size} at {path}: expected {expected}, got "
            f"{actual}. The file is corrupt, truncated or not the official release; delete it and download it again "
            f"({info.url(size)}), or pass verify_md5=False for a file you made yourself."
        )


def _expected_image_shape(info: DatasetInfo, size: int) -> tuple[int, ...]:
    if info.is_3d:
        return (size, size, size)
    return (size, size) if info.n_channels == 1 else (size, size, info.n_channels)


def _as_uint8(arr: np.ndarray, where: str) -> np.ndarray:
    """Accept uint8, or integer/float arrays that hold whole numbers 0..255 (a uint8 image saved in another dtype)."""
    if arr.dtype == np.uint8:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{where}: images must be numeric (uint8 0..255), got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise DataError(f"{where}: images contain NaN or infinite values")
        if not (arr == np.round(arr)).all():
            raise DataError(
                f"{where}: float images must hold whole numbers 0..255 like the official uint8 files; scale them "
                "with (x * 255).round().astype(np.uint8)"
            )
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise DataError(f"{where}: image values must lie in 0..255, got {arr.min()}..{arr.max()}")
    return arr.astype(np.uint8)


def _check_images(arr: np.ndarray, where: str, info: DatasetInfo, size: int) -> np.ndarray:
    expected = _expected_image_shape(info, size)
    if arr.ndim != len(expected) + 1 or tuple(arr.shape[1:]) != expected:
        kind = "3D" if info.is_3d else f"2D, {info.n_channels} channel(s)"
        raise DataError(
            f"{where} has shape {tuple(arr.shape)}; expected (N, {', '.join(map(str, expected))}) for "
            f"{info.python_class} at size {size} ({kind})"
        )
    if arr.shape[0] == 0:
        raise DataError(f"{where} is empty")
    return _as_uint8(arr, where)


def _check_labels(arr: np.ndarray, where: str, info: DatasetInfo) -> np.ndarray:
    width = info.num_classes if info.is_multi_label else 1
    if arr.ndim != 2 or arr.shape[1] != width:
        raise DataError(
            f"{where} has shape {tuple(arr.shape)}; expected (N, {width}) for {info.python_class} ({info.task})"
        )
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise DataError(f"{where}: labels must be integers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise DataError(f"{where}: labels contain NaN or infinite values")
        if not (arr == np.round(arr)).all():
            raise DataError(f"{where}: labels must be whole numbers, found fractional values")
    high = 1 if info.is_multi_label else info.num_classes - 1
    if arr.size and (arr.min() < 0 or arr.max() > high):
        raise DataError(
            f"{where}: label values must lie in 0..{high} for {info.python_class} ({info.task}), got "
            f"{arr.min()}..{arr.max()}"
        )
    return arr.astype(np.int64)


def _read(npz: Any, key: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(npz[key])
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path.name}: could not read array {key!r} ({exc})") from exc


def load_npz(
    path: str | os.PathLike,
    info: DatasetInfo | str,
    size: int = 28,
    verify_md5: bool = True,
    md5: str | None = None,
) -> dict[str, SplitArrays]:
    """Read and check a MedMNIST ``.npz`` file; return ``{"train"|"val"|"test": SplitArrays(images, labels)}``.

    ``verify_md5=False`` skips the checksum (and the official split sizes) for files you made yourself; every
    structural check still runs. ``md5`` is the file's digest when the caller already computed it (saves a second
    pass over a multi-GB file). Every problem raises :class:`DataError` naming the file and the array.
    """
    path = Path(path)
    info = get_info(info) if isinstance(info, str) else info
    info.check_size(size)
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected {info.file_name(size)} for {info.python_class})")
    if verify_md5:
        _check_md5(path, info, size, md5)
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path.name}: not a readable .npz file ({exc})") from exc
    if not hasattr(npz, "files"):
        raise DataError(f"{path.name}: expected an .npz archive of arrays, found a single array")
    with npz:
        required = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
        missing = [k for k in required if k not in npz.files]
        if missing:
            raise DataError(
                f"{path.name}: missing key(s) {', '.join(missing)}; a MedMNIST file holds {', '.join(required)} "
                f"(found: {', '.join(npz.files) or 'nothing'})"
            )
        splits = {s: _load_split(npz, s, path, info, size) for s in SPLITS}
    if verify_md5:
        _check_official_counts(splits, path, info)
    return splits


def _load_split(npz: Any, split: str, path: Path, info: DatasetInfo, size: int) -> SplitArrays:
    images = _check_images(_read(npz, f"{split}_images", path), f"{path.name}: {split}_images", info, size)
    labels = _check_labels(_read(npz, f"{split}_labels", path), f"{path.name}: {split}_labels", info)
    if len(images) != len(labels):
        raise DataError(
            f"{path.name}: {split} split has {len(images)} images but {len(labels)} labels; they must match"
        )
    return SplitArrays(images, labels)


def _check_official_counts(splits: dict[str, SplitArrays], path: Path, info: DatasetInfo) -> None:
    # Redundant once the MD5 matched, but cheap, and it guards the table itself against a bad regeneration.
    counts = {s: len(a.labels) for s, a in splits.items()}
    if counts != dict(info.n_samples):
        raise DataError(f"{path.name}: split sizes {counts} differ from the official {dict(info.n_samples)}")


# --------------------------------------------------------------------------------------------------- torch side


class MedMNISTDataset(Dataset):
    """One split of a MedMNIST dataset as tensors.

    Items are ``(image, label)``: ``image`` float32 in [0, 1] shaped ``C x H x W`` (2D) or ``C x D x H x W`` (3D),
    then passed through ``transform`` if given; ``label`` an int64 scalar, or a float32 vector of the 14 labels for
    multi-label. ``as_rgb`` repeats a single channel to 3 (2D grayscale for ImageNet-style models; 3D as in the R-LLM
    3D recipe); it changes nothing for RGB datasets.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        info: DatasetInfo | str,
        *,
        split: str = "train",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        as_rgb: bool = False,
    ):
        self.info = get_info(info) if isinstance(info, str) else info
        if len(images) != len(labels):
            raise DataError(f"{self.info.python_class} {split}: {len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.split = split
        self.transform = transform
        self.as_rgb = as_rgb

    @classmethod
    def from_file(
        cls,
        name: str,
        split: str,
        size: int = 28,
        data_dir: str | os.PathLike | None = None,
        download: bool = False,
        verify_md5: bool = True,
        **kwargs: Any,
    ) -> MedMNISTDataset:
        """Locate (or download) the official file and return one split of it; ``kwargs`` go to the constructor."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        info = get_info(name)
        path = locate(info.name, size, data_dir=data_dir, download=download)
        arrays = load_npz(path, info, size, verify_md5=verify_md5)[split]
        return cls(arrays.images, arrays.labels, info, split=split, **kwargs)

    @property
    def in_channels(self) -> int:
        return 3 if self.as_rgb else self.info.n_channels

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> torch.Tensor:
        """The image before ``transform``: float32 in [0, 1], channels first."""
        x = torch.from_numpy(np.ascontiguousarray(self.images[index])).float().div_(255.0)
        if self.info.n_channels == 3 and not self.info.is_3d:
            x = x.permute(2, 0, 1).contiguous()  # stored H x W x 3
        else:
            x = x.unsqueeze(0)
        if self.as_rgb and x.shape[0] == 1:
            x = x.repeat(3, *([1] * (x.ndim - 1)))
        return x

    def target(self, index: int) -> torch.Tensor:
        label = self.labels[index]
        if self.info.is_multi_label:
            return torch.as_tensor(label, dtype=torch.float32)
        return torch.tensor(int(label[0]), dtype=torch.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.image(index)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.target(index)

    def __repr__(self) -> str:
        return (
            f"MedMNISTDataset({self.info.python_class}, split={self.split!r}, n={len(self)}, "
            f"task={self.info.task!r}, in_channels={self.in_channels})"
        )


class MedMNISTDataModule(SplitDataModule[MedMNISTDataset]):
    """The three splits of one MedMNIST dataset, with seeded shuffling, for Lightning or plain loops.

    ``setup`` checks the file (MD5 unless ``verify_md5=False``) and loads all splits at once. ``train_transform`` is
    applied to the training split, ``eval_transform`` to val and test. The attributes ``info``, ``task``,
    ``num_classes``, ``in_channels``, ``spatial_dims``, ``image_size``, ``path`` and ``md5`` describe the data for
    model construction and result records (:meth:`record`).
    """

    def __init__(
        self,
        dataset: str,
        size: int = 28,
        data_dir: str | os.PathLike | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        download: bool = False,
        as_rgb: bool = False,
        train_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        eval_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        seed: int = 0,
        verify_md5: bool = True,
        pin_memory: bool = False,
        drop_last: bool = False,
    ):
        super().__init__(batch_size, num_workers, seed, pin_memory, drop_last)
        self.info = get_info(dataset)
        self.info.check_size(size)
        self.size = size
        self.data_dir = data_dir
        self.download = download
        self.as_rgb = as_rgb
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.verify_md5 = verify_md5
        self.path: Path | None = None
        self.md5: str | None = None
        self.test_every_epoch = False

    @property
    def source(self) -> str:
        return f"{self.info.python_class} data module"

    @property
    def task(self) -> str:
        return self.info.task

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def in_channels(self) -> int:
        return 3 if self.as_rgb else self.info.n_channels

    @property
    def spatial_dims(self) -> int:
        return self.info.spatial_dims

    @property
    def image_size(self) -> int:
        """Edge length of the stored images (a resize in the transforms changes what the model sees)."""
        return self.size

    def prepare_data(self) -> None:
        # Lightning calls this on one process only: the place to download, never to assign state.
        locate(self.info.name, self.size, data_dir=self.data_dir, download=self.download)

    def build_datasets(self) -> dict[str, MedMNISTDataset]:
        self.path = locate(self.info.name, self.size, data_dir=self.data_dir, download=self.download)
        self.md5 = file_md5(self.path)
        arrays = load_npz(self.path, self.info, self.size, verify_md5=self.verify_md5, md5=self.md5)
        return {
            split: MedMNISTDataset(
                images,
                labels,
                self.info,
                split=split,
                transform=self.train_transform if split == "train" else self.eval_transform,
                as_rgb=self.as_rgb,
            )
            for split, (images, labels) in arrays.items()
        }

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one model input after ``eval_transform`` (e.g. ``(3, 224, 224)`` after a 28 -> 224 resize)."""
        return tuple(self.dataset("val")[0][0].shape)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        val = self._loader("val", train=False)
        # The paper code's "best test epoch" needs test scores every epoch (reported for comparison only).
        return [val, self._loader("test", train=False)] if self.test_every_epoch else val

    def record(self) -> dict[str, Any]:
        """What a result record should say about the data (call after ``setup``)."""
        return {
            "dataset": self.info.name,
            "size": self.size,
            "task": self.task,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "spatial_dims": self.spatial_dims,
            "file": str(self.path) if self.path else None,
            "md5": self.md5,
            "md5_verified": self.verify_md5,
            **super().record(),
        }
