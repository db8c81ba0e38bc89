"""Strict image/label pairing of a segmentation dataset, from file headers only.

Two layouts are read:

* a Medical Segmentation Decathlon task folder (``imagesTr/`` + ``labelsTr/`` NIfTI, with or without
  ``dataset.json``; 4D multi-modal images keep their modalities as channels, a subset can be selected), and
* a plain paired 2D folder (``images/`` + ``masks/`` or ``labels/``, matched by file stem; PNG, TIF, GIF or JPEG).

Nothing is paired silently. An image without a label, a label without an image, several files with one stem, a pair
whose shapes or geometry (affine, to a tolerance) disagree, an unreadable header and an image with an unexpected
channel count are each reported by file name in a :class:`PairingReport` and never used; the voxel contents are
checked next (:mod:`medboost.data.content_checks`). One file pair is one case, its id the file stem.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image

from medboost.errors import ConfigError, DataError

__all__ = [
    "IMAGE_2D_SUFFIXES",
    "MSD_TASKS",
    "NIFTI_SUFFIXES",
    "CasePair",
    "PairingProblem",
    "PairingReport",
    "convert_2d_image",
    "find_msd_pairs",
    "find_paired_2d",
    "find_pairs",
]

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

# What reading a broken or truncated file raises (headers here, voxels in the content checks).
NIFTI_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)
PIL_ERRORS = (OSError, EOFError, ValueError, SyntaxError, Image.DecompressionBombError)
# Image modes read as intensities as they are, and those converted first (palette and alpha carry no intensity).
_GRAY_MODES = {"1", "L", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_IMAGE_CONVERSIONS = {"P": "RGB", "PA": "RGB", "RGBA": "RGB", "CMYK": "RGB", "YCbCr": "RGB", "LA": "L", "LAB": "RGB"}
_MASK_MODES = _GRAY_MODES | {"P"}


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
    except NIFTI_ERRORS as exc:
        return PairingProblem(str(image), f"unreadable image: {exc}")
    try:
        label_shape, label_affine = _nifti_header(label)
    except NIFTI_ERRORS as exc:
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
    except PIL_ERRORS as exc:
        return PairingProblem(str(image), f"unreadable image: {exc}")
    try:
        mask_shape, mask_mode, mask_frames = _pil_header(mask)
    except PIL_ERRORS as exc:
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


def convert_2d_image(im: Image.Image) -> Image.Image:
    """Palette and alpha images to plain intensities (a palette index is not a brightness)."""
    target = _IMAGE_CONVERSIONS.get(im.mode)
    return im.convert(target) if target else im
