"""Seeded augmentations for MedMNIST tensors, written with plain torch ops (torchvision is not a dependency).

Every transform is a callable on one image tensor, ``C x H x W`` (2D) or ``C x D x H x W`` (3D), float in [0, 1].
Random choices come from torch's global generator, so ``torch.manual_seed`` (main process) or the per-worker seeds a
``DataLoader`` derives from its ``generator`` make them reproducible; nothing here touches ``random`` or NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from medboost.errors import DataError

__all__ = [
    "Compose",
    "IntensityJitter",
    "Normalize",
    "RandomFlip",
    "RandomResizedCrop2d",
    "RandomRotation2d",
    "Resize",
    "eval_transform_2d",
    "eval_transform_3d",
    "train_transform_2d",
    "train_transform_3d",
]

Transform = Callable[[torch.Tensor], torch.Tensor]


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


def _coin(p: float) -> bool:
    return bool(torch.rand(()) < p)


def _check_image(x: torch.Tensor, spatial_dims: int, who: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != spatial_dims + 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        axes = "C x H x W" if spatial_dims == 2 else "C x D x H x W"
        raise DataError(f"{who} expects one {spatial_dims}D image tensor ({axes}), got {shape}")


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class Resize:
    """Deterministic resize of a 2D (``C x H x W``) or 3D (``C x D x H x W``) image to ``size``.

    2D uses bilinear interpolation with antialiasing (so 224 -> 28 does not alias); 3D uses trilinear. Upsampling 28 ->
    224 is what the R-LLM 2D recipe does to feed a ViT-S/16.
    """

    def __init__(self, size: int | Sequence[int]):
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.ndim - 1
        if spatial not in (2, 3):
            raise DataError(f"Resize expects C x H x W or C x D x H x W, got shape {tuple(x.shape)}")
        size = (self.size,) * spatial if isinstance(self.size, int) else tuple(self.size)
        if tuple(x.shape[1:]) == size:
            return x
        if spatial == 2:
            out = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)
        else:
            out = F.interpolate(x[None], size=size, mode="trilinear", align_corners=False)
        return out[0]

    def __repr__(self) -> str:
        return f"Resize({self.size!r})"


class RandomResizedCrop2d:
    """Crop a random area and aspect ratio, then resize to ``size`` (the torchvision / DeiT sampling scheme).

    ``size=None`` resizes the crop back to the input's own size.
    """

    def __init__(
        self,
        size: int | Sequence[int] | None = None,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ):
        self.size = None if size is None else _pair(size)
        self.scale = scale
        self.ratio = ratio

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Sample ``(top, left, h, w)``: ten tries inside the image, then the central crop of clamped aspect ratio."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * _uniform(*self.scale)
            aspect = math.exp(_uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, ()))
                left = int(torch.randint(0, width - w + 1, ()))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            h, w = height, round(height * max(self.ratio))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, 2, "RandomResizedCrop2d")
        top, left, h, w = self.crop_box(x.shape[-2], x.shape[-1])
        crop = x[:, top : top + h, left : left + w]
        size = self.size if self.size is not None else tuple(x.shape[-2:])
        return Resize(size)(crop)

    def __repr__(self) -> str:
        return f"RandomResizedCrop2d(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomFlip:
    """Flip each listed spatial axis independently with probability ``p``.

    ``axes`` count spatial axes only (0 = first after the channel axis). 2D default: horizontal flip only (axis 1),
    since a vertical flip changes the meaning of e.g. a chest X-ray; 3D: use ``axes=(0, 1, 2)``.
    """

    def __init__(self, p: float = 0.5, axes: Sequence[int] = (1,)):
        self.p = p
        self.axes = tuple(axes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # One draw per axis, always made, so the random stream does not depend on earlier outcomes.
        flips = [ax + 1 for ax in self.axes if _coin(self.p)]
        return torch.flip(x, dims=flips) if flips else x

    def __repr__(self) -> str:
        return f"RandomFlip(p={self.p}, axes={self.axes})"


class RandomRotation2d:
    """Rotate by an angle drawn uniformly from ``[-degrees, degrees]`` about the centre; outside pixels get ``fill``."""

    def __init__(self, degrees: float = 15.0, fill: float = 0.0):
        self.degrees = degrees
        self.fill = fill

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, 2, "RandomRotation2d")
        angle = math.radians(_uniform(-self.degrees, self.degrees))
        cos, sin = math.cos(angle), math.sin(angle)
        theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype)[None]
        grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
        # Sample image - fill and add fill back: grid_sample pads with zeros, this makes the padding equal ``fill``.
        out = F.grid_sample(x[None] - self.fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out[0] + self.fill

    def __repr__(self) -> str:
        return f"RandomRotation2d(degrees={self.degrees}, fill={self.fill})"


class IntensityJitter:
    """Random contrast and brightness: ``x * (1 + a) + b``, ``a ~ U(-scale, scale)``, ``b ~ U(-shift, shift)``.

    The result is clamped to [0, 1] so that later normalisation sees the range the model was designed for.
    """

    def __init__(self, scale: float = 0.1, shift: float = 0.1, clamp: bool = True):
        self.scale = scale
        self.shift = shift
        self.clamp = clamp

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a = _uniform(-self.scale, self.scale)
        b = _uniform(-self.shift, self.shift)
        out = x * (1.0 + a) + b
        return out.clamp(0.0, 1.0) if self.clamp else out

    def __repr__(self) -> str:
        return f"IntensityJitter(scale={self.scale}, shift={self.shift}, clamp={self.clamp})"


class Normalize:
    """Per-channel ``(x - mean) / std``; a single number applies to every channel."""

    def __init__(self, mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if bool((self.std <= 0).any()):
            raise DataError(f"Normalize: std must be positive, got {std!r}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[0]
        if self.mean.numel() not in (1, channels) or self.std.numel() not in (1, channels):
            raise DataError(
                f"Normalize has {self.mean.numel()} mean / {self.std.numel()} std values for an image of {channels} "
                "channels"
            )
        view = (-1,) + (1,) * (x.ndim - 1)
        return (x - self.mean.to(x).view(view)) / self.std.to(x).view(view)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()})"


def train_transform_2d(
    size: int | None = None,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    degrees: float = 10.0,
    mean: float | Sequence[float] | None = 0.5,
    std: float | Sequence[float] | None = 0.5,
) -> Compose:
    """Random resized crop (to ``size``, or the input size when None), horizontal flip, small rotation, normalise.

    ``crop_scale`` defaults to (0.5, 1.0) rather than DeiT's (0.08, 1.0): at 28 x 28 an 8% crop keeps ~8 pixels a side.
    """
    steps: list[Transform] = [RandomResizedCrop2d(size, scale=crop_scale), RandomFlip(0.5, axes=(1,))]
    if degrees > 0:
        steps.append(RandomRotation2d(degrees))
    if mean is not None and std is not None:
        steps.append(Normalize(mean, std))
    return Compose(steps)


def eval_transform_2d(
    size: int | None = None,
    mean: float | Sequence[float] | None = 0.5,
    std: float | Sequence[float] | None = 0.5,
) -> Compose:
    """The deterministic counterpart of :func:`train_transform_2d`: optional resize, then normalise."""
    steps: list[Transform] = []
    if size is not None:
        steps.append(Resize(size))
    if mean is not None and std is not None:
        steps.append(Normalize(mean, std))
    return Compose(steps)


def train_transform_3d(
    flip_p: float = 0.5,
    scale: float = 0.1,
    shift: float = 0.1,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
) -> Compose:
    """Random flips along each of the three spatial axes and a small intensity jitter (optionally normalise).

    The published R-LLM 3D recipe uses no augmentation: pass ``train_transform=None`` to reproduce it.
    """
    steps: list[Transform] = [RandomFlip(flip_p, axes=(0, 1, 2)), IntensityJitter(scale, shift)]
    if mean is not None and std is not None:
        steps.append(Normalize(mean, std))
    return Compose(steps)


def eval_transform_3d(
    mean: float | Sequence[float] | None = None, std: float | Sequence[float] | None = None
) -> Compose:
    steps: list[Transform] = []
    if mean is not None and std is not None:
        steps.append(Normalize(mean, std))
    return Compose(steps)
