"""``medboost predict``: classify image files with a saved model, optionally writing Grad-CAM overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medboost.errors import ConfigError, DataError
from medboost.metrics.classification import scores_from_logits
from medboost.models.hub import load_pretrained, read_model_config


def read_image(path: str | Path) -> np.ndarray:
    """A PNG/JPG (H x W or H x W x C), NIfTI (D x H x W...) or .npy array as float, with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            return np.asarray(nib.load(str(path)).get_fdata(), dtype=np.float32)
        if name.endswith(".npy"):
            return np.load(path).astype(np.float32)
        if name.endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")):
            from PIL import Image

            with Image.open(path) as img:
                return np.asarray(img.convert("RGB") if img.mode not in ("L", "RGB") else img, dtype=np.float32)
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad file for the user
        raise DataError(f"{path}: cannot read image: {err}") from err
    raise DataError(f"{path}: unsupported file type (PNG, JPG, TIF, NIfTI .nii/.nii.gz or .npy)")


def to_model_input(array: np.ndarray, spec: dict, where: str) -> torch.Tensor:
    """Scale to [0, 1] (uint8 range or min-max), fix channels, resize to the model's input size, normalise."""
    dims, channels, size = spec["spatial_dims"], spec["in_channels"], spec["img_size"]
    if not np.isfinite(array).all():
        raise DataError(f"{where}: image contains NaN or infinite values")
    x = torch.from_numpy(np.ascontiguousarray(array))
    if dims == 2 and x.dim() == 3 and x.shape[-1] in (3, 4):
        x = x[..., :3].permute(2, 0, 1)  # H x W x C -> C x H x W
    elif x.dim() == dims:
        x = x.unsqueeze(0)
    if x.dim() != dims + 1:
        raise DataError(f"{where}: expected a {dims}D image, got an array of shape {tuple(array.shape)}")
    x = x / 255.0 if array.max() > 1.0 and array.min() >= 0 and array.max() <= 255 else x
    if x.max() > 1.0 or x.min() < 0.0:
        x = (x - x.min()) / (x.max() - x.min() + 1e-12)
    if x.shape[0] != channels:
        x = x.mean(0, keepdim=True).expand(channels, *x.shape[1:]) if channels in (1, 3) else x
    if x.shape[0] != channels:
        raise DataError(f"{where}: image has {x.shape[0]} channels, the model expects {channels}")
    target = (size,) * dims if isinstance(size, int) else tuple(size)
    if tuple(x.shape[1:]) != target:
        mode = "bilinear" if dims == 2 else "trilinear"
        x = F.interpolate(x[None].float(), size=target, mode=mode, align_corners=False)[0]
    norm = spec.get("normalize")
    if norm:
        x = (x - norm[0]) / norm[1]
    return x.float()[None]


def predict_files(
    model_dir: str | Path, files: list[str], saliency_dir: str | Path | None = None, saliency_method: str = "gradcam"
) -> list[dict]:
    """Score each file with the saved model. With ``saliency_dir``, also write each file's saliency map there
    (``saliency_method``: ``"gradcam"`` or ``"rollout"``, see :mod:`medboost.report.saliency`): an overlay PNG
    ``<name>_<method>.png`` and the raw map ``<name>_<method>.npy`` (float32, the model's input size, in [0, 1]; a 3D
    model's whole volume, where the PNG shows its strongest axial slice)."""
    from medboost.report.saliency import METHODS

    if saliency_dir is not None and saliency_method not in METHODS:
        raise ConfigError(f"saliency method must be one of {', '.join(METHODS)}, got {saliency_method!r}")
    record = read_model_config(model_dir)
    spec = record.get("input")
    if spec is None:
        raise DataError(f"{model_dir}: the saved model does not record its input format (retrain with this version)")
    model = load_pretrained(model_dir)
    names = record.get("label_names") or [str(i) for i in range(spec.get("num_classes", 0))]
    task = record.get("task", "multi-class")
    rows = []
    for file in files:
        x = to_model_input(read_image(file), spec, str(file))
        with torch.no_grad():
            scores = scores_from_logits(model(x), task)[0]
        row = {"file": str(file), "scores": {n: round(float(s), 6) for n, s in zip(names, scores)}}
        if task != "multi-label":
            row["prediction"] = (
                names[int(scores.argmax())]
                if task != "binary-class" or len(scores) > 1
                else (names[int(scores[0] > 0.5)])
            )
        if saliency_dir is not None:
            png, raw = _write_saliency(model, x, file, Path(saliency_dir), saliency_method)
            row["saliency"], row["saliency_map"] = str(png), str(raw)
        rows.append(row)
    return rows


def _write_saliency(model, x: torch.Tensor, file: str, folder: Path, method: str) -> tuple[Path, Path]:
    from medboost.report.plots import overlay
    from medboost.report.saliency import saliency_map

    cam, cls = saliency_map(model, x, method)
    name = f"{Path(file).name.split('.')[0]}_{method}"
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / f"{name}.npy"
    np.save(raw, cam.numpy().astype(np.float32))
    image = x[0].mean(0)
    if image.dim() == 3:  # 3D: the axial slice where the map is strongest
        k = int(cam.flatten(1).amax(1).argmax())
        image, cam = image[k], cam[k]
    title = f"Grad-CAM for class {cls}" if method == "gradcam" else f"attention rollout (predicted class {cls})"
    return overlay(image.numpy(), cam.numpy(), folder / f"{name}.png", title=title), raw
