"""Writing segmentations: NIfTI on the reference image's grid, PNG label masks, image | truth | prediction overlays.

Label maps are integer class indices with 0 as background. Arrays are drawn as stored (first axis down the rows);
3-D volumes are indexed (X, Y, Z) as nibabel and MONAI's ``LoadImage`` give them, so the axial slices run along the
last axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import nibabel as nib
import numpy as np
import torch
from matplotlib.patches import Patch
from PIL import Image

from medboost.errors import DataError
from medboost.report.plots import new_figure, save_figure

__all__ = ["class_colour", "overlay_png", "write_nifti_like", "write_png_mask"]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
# tab20 reordered dark shades first, so the first ten classes get ten clearly different colours.
_PALETTE = [matplotlib.colormaps["tab20"](i)[:3] for i in (*range(0, 20, 2), *range(1, 20, 2))]


def class_colour(label: int) -> tuple[float, float, float]:
    """The RGB colour (0..1) of a foreground class in overlays; it depends only on the label, never on the slice."""
    return _PALETTE[(int(label) - 1) % len(_PALETTE)]


def write_nifti_like(labels: Any, reference_path: str | Path, out_path: str | Path) -> Path:
    """Write ``labels`` as a uint8 NIfTI with the affine and shape of the image at ``reference_path``.

    ``labels`` must already be on the reference's voxel grid (undo any resampling, cropping or reorientation first):
    its shape must equal the reference's, or its first three axes for a 4-D (multi-channel) reference. The reference's
    NIfTI header (units, qform/sform codes) is kept; the intent is set to "label" and intensity scaling is removed.
    """
    out_path = Path(out_path)
    if not str(out_path).endswith(_NIFTI_SUFFIXES):
        raise DataError(f"{out_path}: a NIfTI output needs a .nii or .nii.gz name")
    reference = _load_reference(reference_path)
    data = _uint8_labels(labels, "labels")
    ref_shape = tuple(reference.shape)
    if data.shape not in (ref_shape, ref_shape[:3]):
        raise DataError(
            f"labels have shape {data.shape} but the reference image {reference_path} has shape {ref_shape}; "
            "predictions must be on the reference's voxel grid (drop channel axes, undo resampling)"
        )
    image = nib.Nifti1Image(data, reference.affine, header=_label_header(reference))
    image.header.set_slope_inter(1.0, 0.0)  # stored values are the labels; a copied scl_slope would rescale them
    image.header["cal_min"], image.header["cal_max"] = 0, int(data.max())  # display range for viewers
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(out_path))
    return out_path


def write_png_mask(labels: Any, out_path: str | Path, num_classes: int | None = None, exact: bool = False) -> Path:
    """Write a 2-D label map as an 8-bit greyscale PNG.

    With ``exact=True`` the pixel values are the labels themselves (lossless; read back with ``np.asarray(Image.open
    (path))``). Otherwise labels are multiplied by ``255 // (num_classes - 1)`` so classes are visible;
    ``num_classes`` defaults to the largest label + 1.
    """
    data = _uint8_labels(labels, "labels")
    if data.ndim != 2:
        raise DataError(f"a PNG mask needs a 2-D label map, got shape {data.shape}")
    if not exact:
        n = int(data.max()) + 1 if num_classes is None else int(num_classes)
        if n <= int(data.max()):
            raise DataError(f"labels go up to {int(data.max())} but num_classes is {n}")
        data = data * np.uint8(255 // max(n - 1, 1))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data).save(out_path, format="PNG")  # a 2-D uint8 array becomes an 8-bit greyscale ("L") image
    return out_path


def overlay_png(
    image: Any,
    target: Any,
    pred: Any,
    out_path: str | Path,
    title: str = "",
    slice_index: int | None = None,
    axis: int = -1,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Save image | ground truth | prediction side by side, labels drawn in :func:`class_colour` over the image.

    2-D inputs are drawn whole. For 3-D inputs one slice along ``axis`` (default: the last, axial for (X, Y, Z)
    volumes) is drawn: ``slice_index`` if given, else the slice with the most ground-truth foreground (the most
    predicted foreground if the truth is empty, the middle slice if both are). ``class_names`` (background included)
    label the legend.
    """
    img = _as_array(image, "image").astype(float)
    truth, guess = _integer_labels(target, "target"), _integer_labels(pred, "pred")
    if not img.shape == truth.shape == guess.shape:
        raise DataError(f"image, target and pred shapes differ: {img.shape}, {truth.shape}, {guess.shape}")
    if img.ndim not in (2, 3):
        raise DataError(f"overlay_png needs 2-D images or 3-D volumes, got shape {img.shape}")
    if img.ndim == 3:
        if not -3 <= axis < 3:
            raise DataError(f"axis {axis} is not an axis of a 3-D volume")
        index = _pick_slice(truth, guess, axis) if slice_index is None else _check_slice(slice_index, img, axis)
        title = f"{title} (slice {index} along axis {axis % img.ndim})".strip()
        img, truth, guess = (np.take(a, index, axis=axis) for a in (img, truth, guess))
    fig = new_figure((9.5, 3.6))
    axes = fig.subplots(1, 3)
    low, high = _window(img)
    for ax, labels, name in zip(axes, (None, truth, guess), ("image", "ground truth", "prediction")):
        ax.imshow(img, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        if labels is not None:
            ax.imshow(_rgba(labels), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    present = sorted(int(c) for c in np.union1d(np.unique(truth), np.unique(guess)) if c != 0)
    _legend(axes[-1], present, class_names)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, out_path)


# -- helpers --------------------------------------------------------------------------------------------------------


def _as_array(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x.float() if x.is_floating_point() else x).numpy()  # half/bfloat16 have no NumPy dtype
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf" or arr.size == 0:
        raise DataError(f"{what} must be a non-empty numeric array, got dtype {arr.dtype} and shape {arr.shape}")
    return arr


def _integer_labels(x: Any, what: str) -> np.ndarray:
    arr = _as_array(x, what)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DataError(f"{what} contains NaN or infinite values; label maps must hold integer class labels")
    if arr.dtype.kind == "f" and (arr != np.round(arr)).any():
        raise DataError(f"{what} holds non-integer labels; pass class indices, not probabilities")
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise DataError(f"{what} holds negative labels (min {int(arr.min())})")
    return arr


def _uint8_labels(x: Any, what: str) -> np.ndarray:
    arr = _integer_labels(x, what)
    if arr.max() > 255:
        raise DataError(f"{what} go up to {int(arr.max())}; uint8 label files hold at most 255")
    return arr.astype(np.uint8)


def _load_reference(path: str | Path):
    try:
        return nib.load(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: reference image not found") from e
    except Exception as e:  # nibabel raises several types for unreadable or unknown files
        raise DataError(f"{path}: cannot read the reference image ({e})") from e


def _label_header(reference) -> nib.Nifti1Header:
    """The reference's NIfTI header (for units and orientation codes) marked as a label map, or a fresh one."""
    header = reference.header.copy() if isinstance(reference.header, nib.Nifti1Header) else nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_intent("label")
    header["descrip"] = b"medboost segmentation"
    return header


def _pick_slice(truth: np.ndarray, guess: np.ndarray, axis: int) -> int:
    other = tuple(a for a in range(truth.ndim) if a != axis % truth.ndim)
    for labels in (truth, guess):
        counts = (labels > 0).sum(axis=other)
        if counts.any():
            return int(np.argmax(counts))
    return truth.shape[axis] // 2


def _check_slice(index: int, volume: np.ndarray, axis: int) -> int:
    n = volume.shape[axis]
    if not -n <= index < n:
        raise DataError(f"slice_index {index} is outside the {n} slices along axis {axis}")
    return index % n


def _window(img: np.ndarray) -> tuple[float, float]:
    # Percentiles rather than min/max so that a few extreme voxels (metal in CT, for example) do not wash the image out.
    low, high = np.percentile(img, [1, 99])
    return float(low), float(max(high, low + 1e-6))


def _rgba(labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    rgba = np.zeros((*labels.shape, 4))
    for label in np.unique(labels):
        if label == 0:
            continue  # background stays transparent
        rgba[labels == label] = (*class_colour(label), alpha)
    return rgba


def _legend(ax, labels: list[int], class_names: Sequence[str] | None) -> None:
    if not labels:
        return
    names = [class_names[c] if class_names is not None and c < len(class_names) else f"class {c}" for c in labels]
    handles = [Patch(color=class_colour(c), label=str(n)[:20]) for c, n in zip(labels, names)]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)  # off the mask
