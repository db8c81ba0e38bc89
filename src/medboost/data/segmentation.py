"""Segmentation data: strict image/label pairing, subject-level seeded splits, MONAI preprocessing, a Lightning module.

Two layouts are read:

* a Medical Segmentation Decathlon task folder (``imagesTr/`` + ``labelsTr/`` NIfTI, with or without
  ``dataset.json``; 4D multi-modal images keep their modalities as channels, a subset can be selected), and
* a plain paired 2D folder (``images/`` + ``masks/`` or ``labels/``, matched by file stem; PNG, TIF, GIF or JPEG).

Nothing is paired silently. An image without a label, a label without an image, a pair whose shapes or geometry
(affine, to a tolerance) disagree, an unreadable file, a NaN/inf image and a label with values outside the declared
label set are each reported by file name and never used (:func:`check_pairs` raises one :class:`DataError` listing
all of them, or warns and drops them with ``strict=False``); an all-background mask is allowed but reported as a
warning. The declared label set comes, in order, from an explicit ``label_names``, from ``dataset.json``, from the
built-in table of the ten MSD tasks (whose ``dataset.json`` is not always shipped), or from the labels themselves.
Binary 2D masks stored as 0/255 are mapped to {0, 1} (255 -> 1, recorded as ``label_mapping``); for ISBI 2012 class 0
is the membrane (black) and class 1 the cell interior (white).

Splits are made per subject (one file pair = one case, its id the file stem) *before* any augmentation, so no
augmented copy of a validation or test case can reach training (a defect of the public MedVisionLlama code), and the
test split is a whole split, not one volume. Every class is kept (no merging of foreground classes).

Randomness: the random transforms of a training item are reseeded, item by item, with a number drawn from torch's
global generator (:meth:`SegmentationDataset.__getitem__`). The training task reseeds that generator at every epoch
start (``torch.manual_seed(seed, epoch, rank)``) and a DataLoader seeds each worker's generator from its own
``generator`` (here the epoch-seeded sampler's), so epoch ``k`` sees the same crops and augmentations in a fresh and in
a resumed run, for any ``num_workers`` (training workers are not persistent: a persistent worker would carry its
generator over from the previous epoch).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
import zlib
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.image_reader import NibabelReader, PILReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapLabelValued,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from medboost.data.medmnist import seed_worker
from medboost.data.sampling import EpochSeededSampler, WithIndex
from medboost.errors import ConfigError, DataError

__all__ = [
    "MSD_TASKS",
    "SPLITS",
    "CaseInfo",
    "CasePair",
    "PairingProblem",
    "PairingReport",
    "SegmentationDataModule",
    "SegmentationDataset",
    "augmentation_transforms",
    "check_contents",
    "check_pairs",
    "find_msd_pairs",
    "find_paired_2d",
    "find_pairs",
    "kfold_split",
    "load_split",
    "make_split",
    "preprocessing_transforms",
    "save_split",
    "split_md5",
    "subset_train",
]

SPLITS = ("train", "val", "test")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_2D_SUFFIXES = (".png", ".tif", ".tiff", ".gif", ".jpg", ".jpeg")
MASK_FOLDERS = ("masks", "labels")

# The official dataset.json contents of the ten MSD tasks (modalities, label names), for copies shipped without it.
MSD_TASKS: dict[str, dict[str, dict[int, str]]] = {
    "Task01_BrainTumour": {
        "modality": {0: "FLAIR", 1: "T1w", 2: "t1gd", 3: "T2w"},
        "labels": {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"},
    },
    "Task02_Heart": {"modality": {0: "MRI"}, "labels": {0: "background", 1: "left atrium"}},
    "Task03_Liver": {"modality": {0: "CT"}, "labels": {0: "background", 1: "liver", 2: "cancer"}},
    "Task04_Hippocampus": {"modality": {0: "MRI"}, "labels": {0: "background", 1: "Anterior", 2: "Posterior"}},
    "Task05_Prostate": {"modality": {0: "T2", 1: "ADC"}, "labels": {0: "background", 1: "PZ", 2: "TZ"}},
    "Task06_Lung": {"modality": {0: "CT"}, "labels": {0: "background", 1: "cancer"}},
    "Task07_Pancreas": {"modality": {0: "CT"}, "labels": {0: "background", 1: "pancreas", 2: "cancer"}},
    "Task08_HepaticVessel": {"modality": {0: "CT"}, "labels": {0: "background", 1: "Vessel", 2: "Tumour"}},
    "Task09_Spleen": {"modality": {0: "CT"}, "labels": {0: "background", 1: "spleen"}},
    "Task10_Colon": {"modality": {0: "CT"}, "labels": {0: "background", 1: "colon cancer primaries"}},
}
# 2D collections whose 0/255 masks have a known meaning (the folder name is the key).
KNOWN_2D_LABELS: dict[str, dict[int, str]] = {"isbi2012": {0: "membrane", 1: "cell_interior"}}

_NIFTI_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)
_PIL_ERRORS = (OSError, EOFError, ValueError, SyntaxError, Image.DecompressionBombError)
# Image modes read as intensities as they are, and those converted first (palette and alpha carry no intensity).
_GRAY_MODES = {"1", "L", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_IMAGE_CONVERSIONS = {"P": "RGB", "PA": "RGB", "RGBA": "RGB", "CMYK": "RGB", "YCbCr": "RGB", "LA": "L", "LAB": "RGB"}
_MASK_MODES = _GRAY_MODES | {"P"}


# --------------------------------------------------------------------------------------------------- pairing


@dataclass(frozen=True)
class CasePair:
    """One case: an image file, its label file, the spatial shape and channel count from the headers, and the image's
    affine (voxel -> world; the identity for 2D files, which carry no geometry)."""

    case_id: str
    image: Path
    label: Path
    spatial_shape: tuple[int, ...]
    channels: int
    affine: np.ndarray = field(compare=False, repr=False)


@dataclass(frozen=True)
class PairingProblem:
    """A file that is not used (``severity="error"``) or that is used but looks suspicious (``"warning"``)."""

    file: str
    reason: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


@dataclass
class PairingReport:
    """What discovery found: the pairs kept, every problem, and what the data declares (label names, modalities)."""

    root: Path
    layout: str  # "msd" or "2d"
    pairs: list[CasePair]
    problems: list[PairingProblem]
    label_names: dict[int, str] | None = None
    label_names_source: str | None = None
    modality: dict[int, str] | None = None
    channels: tuple[int, ...] | None = None  # selected image channels (None: all)
    label_mapping: dict[int, int] = field(default_factory=dict)

    @property
    def spatial_dims(self) -> int:
        return 3 if self.layout == "msd" else 2

    @property
    def errors(self) -> list[PairingProblem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[PairingProblem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def case_ids(self) -> list[str]:
        return [p.case_id for p in self.pairs]

    def pair(self, case_id: str) -> CasePair:
        for p in self.pairs:
            if p.case_id == case_id:
                return p
        raise DataError(f"{self.root}: no usable case {case_id!r}")

    def summary(self) -> str:
        counts = f"{len(self.pairs)} pair(s) kept, {len(self.errors)} problem(s), {len(self.warnings)} warning(s)"
        head = f"{self.root}: {counts}"
        return "\n".join([head, *(f"  {p.severity}: {p}" for p in self.problems)])


def _is_hidden(path: Path) -> bool:
    # macOS leaves "._name" resource forks next to every file copied from its disks; they are not images.
    return path.name.startswith(".")


def _strip_suffix(name: str, suffixes: Sequence[str]) -> str | None:
    low = name.lower()
    for suffix in suffixes:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _list_files(folder: Path, suffixes: Sequence[str]) -> dict[str, list[Path]]:
    """Files of ``folder`` by case id (stem); a stem with several files is ambiguous and reported by the caller."""
    found: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        stem = _strip_suffix(path.name, suffixes)
        if stem is not None and not _is_hidden(path) and path.is_file():
            found.setdefault(stem, []).append(path)
    return found


def _nifti_header(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine from the header only (the voxel data stays on disk)."""
    img = nib.load(str(path))
    return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)


def _spacing(affine: np.ndarray) -> tuple[float, ...]:
    n = affine.shape[0] - 1
    return tuple(round(float(s), 4) for s in np.linalg.norm(affine[:n, :n], axis=0))


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def _split_channels(shape: tuple[int, ...], spatial_dims: int) -> tuple[tuple[int, ...], int] | None:
    """(spatial shape, channels) of a stored array, or None when it has too few or too many axes."""
    if len(shape) == spatial_dims:
        return shape, 1
    if len(shape) == spatial_dims + 1:
        return shape[:spatial_dims], shape[spatial_dims]
    return None


def _origin(affine: np.ndarray) -> tuple[float, ...]:
    n = affine.shape[0] - 1
    return tuple(round(float(o), 3) for o in affine[:n, n])


def _geometry_problems(image_affine: np.ndarray, label_affine: np.ndarray, tol: float) -> list[str]:
    # Scanner software writes image and label headers with float noise of ~1e-6; anything beyond ``tol`` (mm, or a
    # relative ``tol`` for large coordinates) means the label was drawn on another grid.
    if np.allclose(image_affine, label_affine, rtol=tol, atol=tol):
        return []
    return [
        f"geometry mismatch: image spacing {_spacing(image_affine)} origin {_origin(image_affine)}"
        f" vs label spacing {_spacing(label_affine)} origin {_origin(label_affine)}"
        f" (affines differ beyond tolerance {tol})"
    ]


def _pair_nifti(case_id: str, image: Path, label: Path, tol: float) -> CasePair | PairingProblem:
    """Header-level check of one NIfTI pair: readable, matching spatial shape and geometry."""
    try:
        image_shape, image_affine = _nifti_header(image)
    except _NIFTI_ERRORS as exc:
        return PairingProblem(str(image), f"unreadable image: {exc}")
    try:
        label_shape, label_affine = _nifti_header(label)
    except _NIFTI_ERRORS as exc:
        return PairingProblem(str(label), f"unreadable label: {exc}")
    split_image = _split_channels(image_shape, 3)
    if split_image is None:
        return PairingProblem(str(image), f"image has shape {_fmt_shape(image_shape)}; expected 3D or 4D (channels)")
    spatial, channels = split_image
    label_spatial = label_shape[:3] if label_shape[3:] in ((), (1,)) else label_shape
    reasons = []
    if tuple(label_spatial) != spatial:
        reasons.append(f"shape mismatch: label {_fmt_shape(label_shape)} vs image {_fmt_shape(spatial)} ({image.name})")
    reasons += _geometry_problems(image_affine, label_affine, tol)
    if reasons:
        return PairingProblem(str(label), "; ".join(reasons))
    return CasePair(case_id, image, label, spatial, channels, image_affine)


def _unpaired(images: Mapping[str, list[Path]], labels: Mapping[str, list[Path]]) -> list[PairingProblem]:
    problems = [PairingProblem(str(p[0]), "image without label") for c, p in images.items() if c not in labels]
    problems += [PairingProblem(str(p[0]), "label without image") for c, p in labels.items() if c not in images]
    for case in sorted(set(images) | set(labels)):
        files = images.get(case, []) + labels.get(case, [])
        if len(images.get(case, [])) > 1 or len(labels.get(case, [])) > 1:
            # Every file of the case is named, the partner too: none of them is used.
            names = ", ".join(f.name for f in files)
            problems += [
                PairingProblem(str(f), f"ambiguous: several files share the stem {case!r} ({names})") for f in files
            ]
    return problems


def _read_dataset_json(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable dataset.json ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("training"), list):
        raise DataError(f"{path}: expected an object with a 'training' list of {{image, label}} entries")
    return meta


def _int_keyed(names: Any, path: Path, what: str) -> dict[int, str] | None:
    """MSD writes ``{"0": "background"}``; nnU-Net v2 writes ``{"background": 0}``: accept both."""
    if names is None:
        return None
    try:
        if all(isinstance(v, int) for v in names.values()):
            return {int(v): str(k) for k, v in names.items()}
        return {int(k): str(v) for k, v in names.items()}
    except (AttributeError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: {what!r} must map indices to names, got {names!r}") from exc


def _json_pairs(task_dir: Path, meta: dict[str, Any], json_path: Path) -> tuple[dict, dict, list[PairingProblem]]:
    """Image and label files listed in dataset.json, by case id, plus the listed files that do not exist."""
    images: dict[str, list[Path]] = {}
    labels: dict[str, list[Path]] = {}
    problems = []
    for entry in meta["training"]:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(f"{json_path}: training entry {entry!r} lacks 'image' or 'label'")
        # normpath, not resolve(): a symlinked file keeps its own name in reports
        image, label = (Path(os.path.normpath(task_dir / entry[k])) for k in ("image", "label"))
        case_id = _strip_suffix(image.name, NIFTI_SUFFIXES) or image.name
        for path, kind, store in ((image, "image", images), (label, "label", labels)):
            if path.is_file():
                store.setdefault(case_id, []).append(path)
            else:
                problems.append(PairingProblem(str(path), f"{kind} listed in dataset.json does not exist"))
    return images, labels, problems


def _unlisted(folder_files: Mapping[str, list[Path]], listed: Mapping[str, list[Path]]) -> list[PairingProblem]:
    listed_paths = {Path(os.path.normpath(p)) for files in listed.values() for p in files}
    return [
        PairingProblem(str(p), "not listed in dataset.json; not used", "warning")
        for files in folder_files.values()
        for p in files
        if Path(os.path.normpath(p)) not in listed_paths
    ]


def _resolve_channels(
    modality: Sequence[int | str] | int | str | None, names: dict[int, str] | None, where: Path
) -> tuple[int, ...] | None:
    """Channel indices for a modality selection given by index or by (case-insensitive) dataset.json name."""
    if modality is None:
        return None
    wanted = [modality] if isinstance(modality, int | str) else list(modality)
    lookup = {v.lower(): k for k, v in (names or {}).items()}
    channels = []
    for m in wanted:
        if isinstance(m, int) or (isinstance(m, str) and m.isdigit()):
            channels.append(int(m))
        elif m.lower() in lookup:
            channels.append(lookup[m.lower()])
        else:
            known = ", ".join(f"{k}={v}" for k, v in sorted((names or {}).items())) or "none declared"
            raise DataError(f"{where}: unknown modality {m!r}; the dataset declares {known}")
    return tuple(channels)


def _check_channel_counts(pairs: list[CasePair], expected: int | None) -> tuple[list[CasePair], list[PairingProblem]]:
    """All images must have the same channel count: dataset.json's modality count, else the most common one."""
    if not pairs:
        return pairs, []
    expected = expected or Counter(p.channels for p in pairs).most_common(1)[0][0]
    bad = [p for p in pairs if p.channels != expected]
    problems = [PairingProblem(str(p.image), f"image has {p.channels} channel(s); expected {expected}") for p in bad]
    return [p for p in pairs if p.channels == expected], problems


def _check_selected_channels(report: PairingReport) -> None:
    if report.channels is None or not report.pairs:
        return
    n = report.pairs[0].channels
    bad = [c for c in report.channels if not 0 <= c < n]
    if bad:
        raise DataError(f"{report.root}: modality channel(s) {bad} selected, but the images have {n} channel(s)")


def find_msd_pairs(
    task_dir: str | os.PathLike,
    modality: Sequence[int | str] | int | str | None = None,
    geometry_tol: float = 1e-3,
) -> PairingReport:
    """Pair an MSD task folder's images and labels, reading NIfTI headers only.

    With ``dataset.json`` its ``training`` list defines the pairs (files in ``imagesTr``/``labelsTr`` that it does not
    list are reported as warnings and not used) and its ``labels``/``modality`` give the names; without it images and
    labels are paired by file name. ``modality`` selects channels of 4D images by index or by modality name.
    """
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise DataError(f"{task_dir}: no such MSD task folder")
    in_images = _list_files(task_dir / "imagesTr", NIFTI_SUFFIXES)
    in_labels = _list_files(task_dir / "labelsTr", NIFTI_SUFFIXES)
    json_path = task_dir / "dataset.json"
    known = MSD_TASKS.get(task_dir.name, {})
    label_names, names_source, modality_names = known.get("labels"), "built-in MSD table", known.get("modality")
    problems: list[PairingProblem] = []
    if json_path.is_file():
        meta = _read_dataset_json(json_path)
        images, labels, problems = _json_pairs(task_dir, meta, json_path)
        problems += _unlisted(in_images, images) + _unlisted(in_labels, labels)
        label_names, names_source = _int_keyed(meta.get("labels"), json_path, "labels"), "dataset.json"
        modality_names = _int_keyed(meta.get("modality", meta.get("channel_names")), json_path, "modality")
    elif not in_images and not in_labels:
        raise DataError(f"{task_dir}: not an MSD task folder (no dataset.json and no NIfTI files in imagesTr/labelsTr)")
    else:
        images, labels = in_images, in_labels
    problems += _unpaired(images, labels)
    pairs = []
    for case_id in sorted(set(images) & set(labels)):
        if len(images[case_id]) == 1 and len(labels[case_id]) == 1:
            checked = _pair_nifti(case_id, images[case_id][0], labels[case_id][0], geometry_tol)
            (pairs if isinstance(checked, CasePair) else problems).append(checked)
    pairs, channel_problems = _check_channel_counts(pairs, len(modality_names) if modality_names else None)
    report = PairingReport(
        task_dir,
        "msd",
        pairs,
        problems + channel_problems,
        label_names,
        names_source if label_names else None,
        modality_names,
        _resolve_channels(modality, modality_names, task_dir),
    )
    _check_selected_channels(report)
    return report


def _pil_header(path: Path) -> tuple[tuple[int, int], str, int]:
    """(H, W), mode and frame count, from the file header (PIL decodes pixels lazily)."""
    with Image.open(path) as im:
        return (im.size[1], im.size[0]), im.mode, int(getattr(im, "n_frames", 1))


def _image_channels(mode: str) -> int | None:
    mode = _IMAGE_CONVERSIONS.get(mode, mode)
    if mode in _GRAY_MODES:
        return 1
    return 3 if mode == "RGB" else None


def _pair_2d(case_id: str, image: Path, mask: Path) -> CasePair | PairingProblem:
    try:
        image_shape, image_mode, image_frames = _pil_header(image)
    except _PIL_ERRORS as exc:
        return PairingProblem(str(image), f"unreadable image: {exc}")
    try:
        mask_shape, mask_mode, mask_frames = _pil_header(mask)
    except _PIL_ERRORS as exc:
        return PairingProblem(str(mask), f"unreadable mask: {exc}")
    channels = _image_channels(image_mode)
    if channels is None:
        return PairingProblem(str(image), f"unsupported image mode {image_mode}")
    if mask_mode not in _MASK_MODES:
        return PairingProblem(str(mask), f"mask mode {mask_mode} is not single-channel (class index per pixel)")
    if image_frames > 1 or mask_frames > 1:
        return PairingProblem(str(image if image_frames > 1 else mask), "multi-frame file; one 2D slice expected")
    if image_shape != mask_shape:
        return PairingProblem(
            str(mask), f"shape mismatch: mask {_fmt_shape(mask_shape)} vs image {_fmt_shape(image_shape)}"
        )
    return CasePair(case_id, image, mask, image_shape, channels, np.eye(3))


def find_paired_2d(folder: str | os.PathLike) -> PairingReport:
    """Pair ``images/`` with ``masks/`` (or ``labels/``) of a 2D folder by file stem, reading file headers only."""
    folder = Path(folder)
    mask_dirs = [folder / m for m in MASK_FOLDERS if (folder / m).is_dir()]
    if not (folder / "images").is_dir() or not mask_dirs:
        raise DataError(f"{folder}: a paired 2D folder needs images/ and masks/ (or labels/)")
    if len(mask_dirs) > 1:
        raise DataError(f"{folder}: both masks/ and labels/ exist; keep one so the pairing is unambiguous")
    images = _list_files(folder / "images", IMAGE_2D_SUFFIXES)
    masks = _list_files(mask_dirs[0], IMAGE_2D_SUFFIXES)
    problems = _unpaired(images, masks)
    pairs = []
    for case_id in sorted(set(images) & set(masks), key=_natural_key):
        if len(images[case_id]) == 1 and len(masks[case_id]) == 1:
            checked = _pair_2d(case_id, images[case_id][0], masks[case_id][0])
            (pairs if isinstance(checked, CasePair) else problems).append(checked)
    pairs, channel_problems = _check_channel_counts(pairs, None)
    known = KNOWN_2D_LABELS.get(folder.name)
    return PairingReport(
        folder, "2d", pairs, problems + channel_problems, known, "built-in 2D table" if known else None
    )


def _natural_key(stem: str) -> tuple:
    # ISBI names its slices 0..29: sort 2 before 10.
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def find_pairs(root: str | os.PathLike, modality: Sequence[int | str] | int | str | None = None) -> PairingReport:
    """:func:`find_paired_2d` for a folder with ``images/``, else :func:`find_msd_pairs`."""
    root = Path(root)
    if (root / "images").is_dir():
        if modality is not None:
            raise ConfigError(f"{root}: modality selection applies to MSD task folders only")
        return find_paired_2d(root)
    return find_msd_pairs(root, modality)


# --------------------------------------------------------------------------------------------------- contents


def _read_arrays(pair: CasePair, layout: str) -> tuple[np.ndarray, np.ndarray]:
    if layout == "msd":
        return np.asanyarray(nib.load(str(pair.image)).dataobj), np.asanyarray(nib.load(str(pair.label)).dataobj)
    with Image.open(pair.image) as im, Image.open(pair.label) as mask:
        return np.asarray(_convert_2d_image(im)), np.asarray(mask)


def _label_values(label: np.ndarray) -> np.ndarray | str:
    """The distinct label values as int64, or the reason they are not class indices."""
    if np.issubdtype(label.dtype, np.floating):
        if not np.isfinite(label).all():
            return "label contains NaN or infinite values"
        values = np.unique(label)
        if not np.array_equal(values, np.round(values)):
            return f"label values must be integers, found e.g. {values[values != np.round(values)][:3].tolist()}"
        return values.astype(np.int64)
    return np.unique(label).astype(np.int64)


def _content_problems(pair: CasePair, layout: str) -> tuple[np.ndarray | None, list[PairingProblem]]:
    """Read one pair: (label values, problems); values is None when the pair cannot be used."""
    try:
        image, label = _read_arrays(pair, layout)
    except (*_NIFTI_ERRORS, *_PIL_ERRORS) as exc:
        return None, [PairingProblem(f"{pair.image} / {pair.label}", f"unreadable or truncated file: {exc}")]
    problems = []
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        n_bad = int((~np.isfinite(image)).sum())
        problems.append(PairingProblem(str(pair.image), f"image contains {n_bad} NaN or infinite voxel(s)"))
    values = _label_values(label)
    if isinstance(values, str):
        problems.append(PairingProblem(str(pair.label), values))
    return (None if problems else values), problems


def _declared_labels(
    report: PairingReport, observed: set[int], label_names: Mapping[int, str] | None
) -> tuple[dict[int, str], str, dict[int, int]]:
    """Label names, their source and the value mapping (255 -> 1 for binary 0/255 masks)."""
    mapping: dict[int, int] = {}
    names = {int(k): str(v) for k, v in label_names.items()} if label_names else report.label_names
    source = "argument" if label_names else report.label_names_source
    if observed <= {0, 255} and 255 in observed and (names is None or 255 not in names):
        mapping = {255: 1}  # 8-bit binary masks store the foreground as 255
    if names is None:
        top = max({mapping.get(v, v) for v in observed} | {1})
        names = {0: "background", **{k: f"class_{k}" for k in range(1, top + 1)}}
        if mapping:
            names = {0: "background (mask value 0)", 1: "foreground (mask value 255)"}
        source = "inferred from the labels"
    return names, source or "inferred from the labels", mapping


def check_contents(report: PairingReport, label_names: Mapping[int, str] | None = None) -> PairingReport:
    """Read every kept pair once: NaN/inf images, non-integer labels, labels outside the declared set (errors, pair
    dropped), all-background masks (warning, pair kept). Unreadable or truncated files are errors too."""
    values_by_case: dict[str, np.ndarray] = {}
    problems = list(report.problems)
    for pair in report.pairs:
        values, found = _content_problems(pair, report.layout)
        problems += found
        if values is not None:
            values_by_case[pair.case_id] = values
    observed = {int(v) for vs in values_by_case.values() for v in vs}
    names, source, mapping = _declared_labels(report, observed, label_names)
    kept = []
    for pair in report.pairs:
        if pair.case_id not in values_by_case:
            continue
        mapped = {mapping.get(int(v), int(v)) for v in values_by_case[pair.case_id]}
        outside = sorted(mapped - set(names))
        if outside:
            declared = ", ".join(f"{k}={v}" for k, v in sorted(names.items()))
            problems.append(PairingProblem(str(pair.label), f"label values {outside} outside the label set {declared}"))
            continue
        if mapped <= {0}:
            problems.append(PairingProblem(str(pair.label), "empty mask: all background", "warning"))
        kept.append(pair)
    return replace(
        report, pairs=kept, problems=problems, label_names=names, label_names_source=source, label_mapping=mapping
    )


def check_pairs(
    report: PairingReport, strict: bool = True, contents: bool = True, label_names: Mapping[int, str] | None = None
) -> PairingReport:
    """Validate a discovery report; return it with only usable pairs.

    ``contents=True`` first reads every pair (:func:`check_contents`). With ``strict=True`` any error raises one
    :class:`DataError` that lists every problem file and its reason; with ``strict=False`` each is warned about and
    the file is dropped. Warnings (e.g. empty masks) are always issued with :func:`warnings.warn` and never raise.
    """
    if contents:
        report = check_contents(report, label_names)
    if strict and report.errors:
        listing = "\n".join(f"  {p}" for p in report.errors)
        raise DataError(
            f"{report.root}: {len(report.errors)} problem(s) with the data; these files were not used:\n{listing}\n"
            "Fix or remove them, or pass strict=False to drop them with a warning."
        )
    for problem in report.problems:
        note = "" if problem.severity == "warning" else " (dropped)"
        warnings.warn(f"{problem}{note}", stacklevel=2)
    if not report.pairs:
        raise DataError(f"{report.root}: no usable image/label pair")
    return report


# --------------------------------------------------------------------------------------------------- splits


def _seeded_order(cases: Sequence[str], seed: int, salt: str) -> list[str]:
    # A hash order rather than an RNG shuffle: the same on every platform and library version, and adding a case
    # never moves the others between splits.
    def key(case: str) -> str:
        return hashlib.sha256(f"{salt}:{seed}:{case}".encode()).hexdigest()

    return sorted(cases, key=key)


def _count(n: int, fraction: float) -> int:
    return 0 if fraction <= 0 else max(1, round(n * fraction))


def _check_cases(cases: Sequence[str]) -> list[str]:
    cases = list(cases)
    dupes = sorted(c for c, n in Counter(cases).items() if n > 1)
    if dupes:
        raise DataError(f"case ids must be unique; repeated: {', '.join(dupes[:10])}")
    return cases


def make_split(
    cases: Sequence[str], seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> dict[str, list[str]]:
    """Subject-level split ``{"train", "val", "test"}`` of case ids (each list sorted), seeded and disjoint."""
    cases = _check_cases(cases)
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be >= 0, sum < 1")
    order = _seeded_order(cases, seed, "split")
    n_test, n_val = _count(len(cases), test_fraction), _count(len(cases), val_fraction)
    if n_test + n_val >= len(cases):
        raise DataError(f"{len(cases)} case(s) are too few for val {val_fraction} and test {test_fraction} fractions")
    split = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return {s: sorted(split[s]) for s in SPLITS}


def kfold_split(
    cases: Sequence[str], k: int, fold: int, seed: int = 0, test_fraction: float = 0.0
) -> dict[str, list[str]]:
    """Fold ``fold`` of ``k``: ``val`` is the fold's share of the non-test cases, ``train`` the rest.

    The ``test`` split (``test_fraction`` of the cases) is the same for every fold and equals :func:`make_split`'s
    test split for the same seed, so folds are cross-validated on data the final test never sees.
    """
    if k < 2 or not 0 <= fold < k:
        raise ConfigError(f"k-fold needs k >= 2 and 0 <= fold < k, got k={k}, fold={fold}")
    test = make_split(cases, seed, 0.0, test_fraction)["test"] if test_fraction > 0 else []
    rest = _seeded_order([c for c in _check_cases(cases) if c not in set(test)], seed, "kfold")
    if len(rest) < k:
        raise DataError(f"{len(rest)} non-test case(s) are too few for {k} folds")
    bounds = [round(i * len(rest) / k) for i in range(k + 1)]
    val = rest[bounds[fold] : bounds[fold + 1]]
    return {"train": sorted(set(rest) - set(val)), "val": sorted(val), "test": sorted(test)}


def subset_train(split: Mapping[str, Sequence[str]], fraction: float, seed: int = 0) -> dict[str, list[str]]:
    """Keep ``fraction`` of the training cases (val and test untouched). Subsets are nested: for one seed the 10%
    subset lies inside the 30% subset, which lies inside the full training split."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"train_fraction must be in (0, 1], got {fraction}")
    train = list(split["train"])
    n = len(train) if fraction == 1 else max(1, math.ceil(fraction * len(train) - 1e-9))
    kept = _seeded_order(train, seed, "train_fraction")[:n]
    return {"train": sorted(kept), "val": list(split["val"]), "test": list(split["test"])}


def _validate_split(split: Any, where: str) -> dict[str, list[str]]:
    if not isinstance(split, Mapping) or any(not isinstance(split.get(s), list) for s in SPLITS):
        raise DataError(f"{where}: a split must have lists 'train', 'val' and 'test' of case ids")
    seen: dict[str, str] = {}
    for s in SPLITS:
        for case in split[s]:
            if not isinstance(case, str):
                raise DataError(f"{where}: case ids must be strings, found {case!r} in {s}")
            if case in seen:
                raise DataError(f"{where}: case {case!r} is in both {seen[case]} and {s}; splits must be disjoint")
            seen[case] = s
    return {s: list(split[s]) for s in SPLITS}


def save_split(split: Mapping[str, Sequence[str]], path: str | os.PathLike, **meta: Any) -> Path:
    """Write a split as JSON (``train``/``val``/``test`` lists and optional ``meta`` such as the seed)."""
    path = Path(path)
    data = {**_validate_split({s: list(split[s]) for s in SPLITS}, str(path)), "meta": meta}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def load_split(path: str | os.PathLike, cases: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Read a split JSON; with ``cases`` every listed case must be among them (a clear error names those missing)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"{path}: split file not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable split JSON ({exc})") from exc
    split = _validate_split(data, str(path))
    if cases is not None:
        available = set(cases)
        missing = sorted(c for s in SPLITS for c in split[s] if c not in available)
        if missing:
            shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
            raise DataError(f"{path}: {len(missing)} listed case(s) are missing or unusable in the data: {shown}")
    return split


def split_md5(split: Mapping[str, Sequence[str]]) -> str:
    """MD5 of the split's canonical JSON (sorted case lists): equal digests mean equal splits."""
    canonical = json.dumps({s: sorted(split[s]) for s in SPLITS}, sort_keys=True, separators=(",", ":"))
    return hashlib.md5(canonical.encode(), usedforsecurity=False).hexdigest()


# --------------------------------------------------------------------------------------------------- transforms


def _convert_2d_image(im: Image.Image) -> Image.Image:
    """Palette and alpha images to plain intensities (a palette index is not a brightness)."""
    target = _IMAGE_CONVERSIONS.get(im.mode)
    return im.convert(target) if target else im


class SelectChannelsd(MapTransform):
    """Keep the given channels (e.g. two of the four MSD brain-tumour modalities) of channel-first images."""

    def __init__(self, keys: Sequence[Hashable] | Hashable, channels: Sequence[int]):
        super().__init__(keys)
        self.channels = list(channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key][self.channels]
        return d


def _roi(roi_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    roi = (roi_size,) * spatial_dims if isinstance(roi_size, int) else tuple(int(r) for r in roi_size)
    if len(roi) != spatial_dims or min(roi) < 1:
        raise ConfigError(f"roi_size {roi_size} does not fit {spatial_dims}D data (one positive size per axis)")
    return roi


def _loaders(spatial_dims: int) -> list[MapTransform]:
    if spatial_dims == 3:
        return [LoadImaged(["image", "label"], reader=NibabelReader(), image_only=True)]
    # numpy (row, column) indexing, so arrays and predictions match the files as PIL shows them.
    return [
        LoadImaged("image", reader=PILReader(converter=_convert_2d_image, reverse_indexing=False), image_only=True),
        LoadImaged("label", reader=PILReader(reverse_indexing=False), image_only=True),
    ]


def _normalizer(normalize: str | None) -> list[MapTransform]:
    if normalize is None or normalize == "none":
        return []
    if normalize == "zscore":
        # Over nonzero voxels: the zero background of skull-stripped or cropped MRI would bias mean and std.
        return [NormalizeIntensityd("image", nonzero=True, channel_wise=True)]
    if normalize == "percentile":
        return [ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True, channel_wise=True)]
    raise ConfigError(f"normalize must be 'zscore', 'percentile' or None, got {normalize!r}")


def preprocessing_transforms(
    spatial_dims: int,
    roi_size: int | Sequence[int],
    *,
    channels: Sequence[int] | None = None,
    orientation: str | None = "RAS",
    spacing: Sequence[float] | None = None,
    normalize: str | None = "zscore",
    label_mapping: Mapping[int, int] | None = None,
) -> Compose:
    """The deterministic part (cached): load, channel first, select channels, map label values, orient, resample,
    normalise, pad to at least ``roi_size``. Validation and test use only this (whole images)."""
    roi = _roi(roi_size, spatial_dims)
    keys = ["image", "label"]
    steps: list[MapTransform] = [*_loaders(spatial_dims), EnsureChannelFirstd(keys)]
    if channels is not None:
        steps.append(SelectChannelsd("image", channels))
    if label_mapping:
        orig, target = zip(*sorted(label_mapping.items()))
        steps.append(MapLabelValued("label", list(orig), list(target)))
    # The geometric steps allow a missing key so that a prediction alone (under "label") can be inverted.
    if spatial_dims == 3 and orientation:
        # labels=None: axis names from the MetaTensor's space (RAS for NIfTI), MONAI's coming default.
        steps.append(Orientationd(keys, axcodes=orientation, labels=None, allow_missing_keys=True))
    if spacing is not None:
        if spatial_dims != 3:
            raise ConfigError("spacing applies to 3D volumes only (2D image files carry no spacing)")
        steps.append(Spacingd(keys, pixdim=tuple(spacing), mode=("bilinear", "nearest"), allow_missing_keys=True))
    steps += _normalizer(normalize)
    steps.append(SpatialPadd(keys, spatial_size=roi, mode="constant", allow_missing_keys=True))
    return Compose(steps)


def _rotations(spatial_dims: int, roi: tuple[int, ...], keys: list[str]) -> list[MapTransform]:
    # A 90-degree turn only where the two axes have the same ROI size (else crops of one batch differ in shape); a
    # small free rotation (+-15 degrees, size kept) everywhere.
    planes = [(a, b) for a in range(spatial_dims) for b in range(a + 1, spatial_dims) if roi[a] == roi[b]]
    steps: list[MapTransform] = [RandRotate90d(keys, prob=0.5, spatial_axes=p) for p in planes]
    angle = math.radians(15)
    ranges = {"range_x": angle} if spatial_dims == 2 else {"range_x": angle, "range_y": angle, "range_z": angle}
    steps.append(RandRotated(keys, **ranges, prob=0.2, mode=("bilinear", "nearest"), padding_mode="zeros"))
    return steps


def augmentation_transforms(
    spatial_dims: int, roi_size: int | Sequence[int], *, augment: bool = True, crop: str = "posneg"
) -> Compose:
    """The random part of training: a crop of ``roi_size`` (``"posneg"``: centred on foreground and background
    voxels half the time each; ``"random"``: uniform), then, with ``augment``, flips on every spatial axis,
    rotations, and intensity scale/shift."""
    roi = _roi(roi_size, spatial_dims)
    keys = ["image", "label"]
    if crop == "posneg":
        steps: list[MapTransform] = [RandCropByPosNegLabeld(keys, "label", roi, pos=1, neg=1, num_samples=1)]
    elif crop == "random":
        steps = [RandSpatialCropd(keys, roi, random_size=False)]
    else:
        raise ConfigError(f"crop must be 'posneg' or 'random', got {crop!r}")
    if augment:
        steps += [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)]
        steps += _rotations(spatial_dims, roi, keys)
        steps += [RandScaleIntensityd("image", factors=0.1, prob=0.5), RandShiftIntensityd("image", 0.1, prob=0.5)]
    return Compose(steps)


# --------------------------------------------------------------------------------------------------- datasets


def _plain(x: Any) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


class SegmentationDataset(Dataset):
    """Cases as ``(image, label)``: ``image`` float32 ``C x *spatial``, ``label`` int64 ``1 x *spatial``.

    ``preprocess`` (deterministic) results are cached in memory when ``cache`` is set (call :meth:`fill_cache` before
    handing the dataset to worker processes, so each worker inherits the filled cache). ``augment``, if given, runs
    on a copy of the cached item after being reseeded from torch's global generator, one draw per item.
    """

    def __init__(self, pairs: Sequence[CasePair], preprocess: Compose, augment: Compose | None = None, cache=True):
        self.pairs = list(pairs)
        self.preprocess = preprocess
        self.augment = augment
        self.cache = cache
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def preprocessed(self, index: int) -> dict[str, Any]:
        """The deterministic result for one case (MetaTensors with their metadata and applied operations)."""
        if index in self._cache:
            return self._cache[index]
        pair = self.pairs[index]
        try:
            item = self.preprocess({"image": str(pair.image), "label": str(pair.label)})
        except Exception as exc:  # MONAI wraps reader errors in RuntimeError; name the files either way
            raise DataError(f"{pair.image} / {pair.label}: preprocessing failed ({exc})") from exc
        if self.cache:
            self._cache[index] = item
        return item

    def fill_cache(self) -> None:
        for index in range(len(self)):
            self.preprocessed(index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.preprocessed(index)
        if self.augment is not None:
            # Reseed from the global torch generator: reproducible under torch.manual_seed and per-epoch reseeding.
            self.augment.set_random_state(seed=int(torch.randint(0, 2**31 - 1, ()).item()))
            item = self.augment({"image": item["image"].clone(), "label": item["label"].clone()})
            item = item[0] if isinstance(item, list) else item  # RandCropByPosNegLabeld returns a list of samples
        image = _plain(item["image"]).float()
        label = _plain(item["label"]).round().long()
        return image, label


@dataclass(frozen=True)
class CaseInfo:
    """Where a val/test item came from: for writing its prediction next to (and in the grid of) the source file."""

    case_id: str
    image: Path
    label: Path
    affine: np.ndarray  # original voxel -> world (identity for 2D)
    original_shape: tuple[int, ...]  # spatial shape of the file
    shape: tuple[int, ...]  # spatial shape the model sees (after orientation, spacing, padding)


class SegmentationDataModule(L.LightningDataModule):
    """An MSD task or paired 2D folder, checked, split by subject and served as tensors.

    Loaders yield ``(image, label, index)``: training batches of ROI crops ``(B, C, *roi)`` float32 and
    ``(B, 1, *roi)`` int64; val/test batches of one whole (padded to at least ``roi_size``) image, whose case id,
    files and geometry :meth:`case_info` gives and whose prediction :meth:`invert` maps back to the file's grid.

    ``split`` is a split JSON path (see :func:`save_split`), a split dict, or None for :func:`make_split` with
    ``seed``; ``k``/``fold`` make a k-fold split instead (the test split stays fixed). ``train_fraction`` keeps a
    nested, seeded subset of the training cases only.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        spatial_dims: int | None = None,
        roi_size: int | Sequence[int] = 64,
        split: str | os.PathLike | Mapping[str, Sequence[str]] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        train_fraction: float = 1.0,
        fold: int | None = None,
        k: int | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
        augment: bool = True,
        normalize: str | None = "zscore",
        spacing: Sequence[float] | None = None,
        orientation: str | None = "RAS",
        modality: Sequence[int | str] | int | str | None = None,
        crop: str = "posneg",
        cache: bool = True,
        seed: int = 0,
        strict: bool = True,
        label_names: Mapping[int, str] | None = None,
        pin_memory: bool = False,
    ):
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ConfigError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
        if (fold is None) != (k is None):
            raise ConfigError("k-fold needs both k and fold")
        if spatial_dims not in (None, 2, 3):
            raise ConfigError(f"spatial_dims must be 2, 3 or None, got {spatial_dims}")
        self.root = Path(root)
        self._spatial_dims = spatial_dims
        self._roi_arg = roi_size
        self.split_source = split
        self.val_fraction, self.test_fraction, self.train_fraction = val_fraction, test_fraction, train_fraction
        self.fold, self.k = fold, k
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.augment, self.normalize, self.spacing, self.orientation = augment, normalize, spacing, orientation
        self.modality, self.crop, self.cache, self.seed, self.strict = modality, crop, cache, seed, strict
        self.label_names_arg = label_names
        self._report: PairingReport | None = None
        self.split: dict[str, list[str]] | None = None
        self.split_file_md5: str | None = None
        self.datasets: dict[str, SegmentationDataset] = {}

    # -- discovery ------------------------------------------------------------------------------------------------
    @property
    def report(self) -> PairingReport:
        """Pairing and content checks (run once, on first use: properties below need them before ``setup``)."""
        if self._report is None:
            report = check_pairs(find_pairs(self.root, self.modality), self.strict, label_names=self.label_names_arg)
            if self._spatial_dims is not None and self._spatial_dims != report.spatial_dims:
                raise ConfigError(
                    f"{self.root}: spatial_dims={self._spatial_dims}, but the data is {report.spatial_dims}D"
                )
            self._report = report
        return self._report

    @property
    def spatial_dims(self) -> int:
        return self.report.spatial_dims

    @property
    def roi_size(self) -> tuple[int, ...]:
        return _roi(self._roi_arg, self.spatial_dims)

    @property
    def num_classes(self) -> int:
        """Classes including background (label values are 0 .. num_classes - 1)."""
        return max(self.report.label_names) + 1

    @property
    def label_names(self) -> list[str]:
        names = self.report.label_names
        return [names.get(i, f"class_{i}") for i in range(self.num_classes)]

    @property
    def in_channels(self) -> int:
        channels = self.report.channels
        return len(channels) if channels is not None else self.report.pairs[0].channels

    # -- splits and datasets ----------------------------------------------------------------------------------------
    def _make_split(self) -> dict[str, list[str]]:
        cases = self.report.case_ids
        source = self.split_source
        if isinstance(source, Mapping):
            split = _validate_split({s: list(source.get(s, [])) for s in SPLITS}, "split argument")
            missing = sorted(c for s in SPLITS for c in split[s] if c not in set(cases))
            if missing:
                raise DataError(f"split argument lists case(s) missing or unusable in {self.root}: {missing[:20]}")
        elif source is not None:
            split = load_split(source, cases)
            self.split_file_md5 = hashlib.md5(Path(source).read_bytes(), usedforsecurity=False).hexdigest()
        elif self.k is not None:
            split = kfold_split(cases, self.k, self.fold, self.seed, self.test_fraction)
        else:
            split = make_split(cases, self.seed, self.val_fraction, self.test_fraction)
        return subset_train(split, self.train_fraction, self.seed) if self.train_fraction < 1 else split

    def _preprocess(self) -> Compose:
        return preprocessing_transforms(
            self.spatial_dims,
            self.roi_size,
            channels=self.report.channels,
            orientation=self.orientation,
            spacing=self.spacing,
            normalize=self.normalize,
            label_mapping=self.report.label_mapping,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.split = self._make_split()
        random_part = augmentation_transforms(self.spatial_dims, self.roi_size, augment=self.augment, crop=self.crop)
        for name in SPLITS:
            pairs = [self.report.pair(c) for c in self.split[name]]
            dataset = SegmentationDataset(
                pairs, self._preprocess(), random_part if name == "train" else None, self.cache
            )
            if self.cache:
                dataset.fill_cache()  # before workers fork, so they share it
            self.datasets[name] = dataset

    def dataset(self, split: str) -> SegmentationDataset:
        if not self.datasets:
            raise DataError(f"{self.root}: call setup() before asking for the {split} split")
        if split not in self.datasets:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return self.datasets[split]

    def save_split(self, path: str | os.PathLike) -> Path:
        """Write the split in use (after ``setup``) so another run can reuse it."""
        if self.split is None:
            raise DataError(f"{self.root}: call setup() before saving the split")
        return save_split(self.split, path, root=str(self.root), seed=self.seed, train_fraction=self.train_fraction)

    # -- loaders ----------------------------------------------------------------------------------------------------
    def _loader(self, split: str, train: bool) -> DataLoader:
        # Samples carry their index (exact distributed metrics). Training shuffles by (seed, epoch) and its workers
        # are seeded from the sampler's generator; they are not persistent, so every epoch reseeds them.
        dataset = self.dataset(split)
        sampler = EpochSeededSampler(len(dataset), self.seed) if train else None
        return DataLoader(
            WithIndex(dataset),
            batch_size=self.batch_size if train else 1,  # whole images differ in size: one per batch
            sampler=sampler,
            generator=sampler.generator if sampler else torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            worker_init_fn=seed_worker,
            persistent_workers=self.num_workers > 0 and not train,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    # -- provenance and predictions ---------------------------------------------------------------------------------
    def case_info(self, split: str, index: int) -> CaseInfo:
        """Case id, source files, original affine and shapes of item ``index`` of ``split``."""
        dataset = self.dataset(split)
        pair = dataset.pairs[index]
        shape = tuple(dataset.preprocessed(index)["image"].shape[1:])
        return CaseInfo(pair.case_id, pair.image, pair.label, pair.affine, pair.spatial_shape, shape)

    def invert(self, split: str, index: int, prediction: torch.Tensor) -> torch.Tensor:
        """Map a prediction made on val/test item ``index`` (``C x *shape`` or ``*shape``, e.g. class indices) back
        to the source file's grid: undoes padding, resampling and reorientation (nearest-neighbour for labels)."""
        dataset = self.dataset(split)
        reference = dataset.preprocessed(index)["label"]
        squeeze = prediction.ndim == self.spatial_dims
        pred = prediction.unsqueeze(0) if squeeze else prediction
        if tuple(pred.shape[1:]) != tuple(reference.shape[1:]):
            raise DataError(
                f"{split} item {index}: prediction shape {tuple(pred.shape[1:])} differs from the "
                f"preprocessed shape {tuple(reference.shape[1:])}"
            )
        meta = MetaTensor(pred.detach().cpu().float(), meta=dict(reference.meta))
        meta.applied_operations = [dict(op) for op in reference.applied_operations]
        restored = _plain(dataset.preprocess.inverse({"label": meta})["label"])
        restored = restored.round().to(prediction.dtype) if not prediction.is_floating_point() else restored
        return restored[0] if squeeze else restored

    def record(self) -> dict[str, Any]:
        """What a result record should say about the data (call after ``setup``)."""
        report = self.report
        split = self.split or {s: [] for s in SPLITS}
        return {
            "dataset": self.root.name,
            "root": str(self.root),
            "layout": report.layout,
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "channels": list(report.channels) if report.channels is not None else None,
            "num_classes": self.num_classes,
            "label_names": self.label_names,
            "label_names_source": report.label_names_source,
            "label_mapping": {str(k): v for k, v in report.label_mapping.items()},
            "roi_size": list(self.roi_size),
            "n_cases": {s: len(split[s]) for s in SPLITS},
            "split": {s: list(split[s]) for s in SPLITS},
            "split_md5": split_md5(split) if self.split else None,
            "split_file": str(self.split_source) if isinstance(self.split_source, str | os.PathLike) else None,
            "split_file_md5": self.split_file_md5,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "train_fraction": self.train_fraction,
            "k": self.k,
            "fold": self.fold,
            "preprocessing": {
                "normalize": self.normalize,
                "orientation": self.orientation if self.spatial_dims == 3 else None,
                "spacing": list(self.spacing) if self.spacing else None,
                "augment": self.augment,
                "crop": self.crop,
            },
            "problems": [{"file": p.file, "reason": p.reason, "severity": p.severity} for p in report.problems],
        }
