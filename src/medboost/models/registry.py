"""A timm-style registry of named model variants: ``create_model("vit_tiny_llm", num_classes=5)``.

Every model made here remembers its name and arguments, so it can be saved and rebuilt from a folder
(:mod:`medboost.models.hub`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from medboost.errors import ConfigError
from medboost.llm.readers import CheckpointReader
from medboost.models.booster import BoosterConfig
from medboost.models.classifier import ViTClassifier, resnet
from medboost.models.vivit import ViViTClassifier

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

#: ViT sizes. "tiny" suits 28 px MedMNIST on a CPU; "small"/"base" are the DeiT/ViT widths.
VIT_SIZES = {
    "tiny": dict(dim=192, depth=6, heads=3),
    "small": dict(dim=384, depth=12, heads=6),
    "base": dict(dim=768, depth=12, heads=12),
}


def register_model(name: str):
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; ``kwargs`` override the variant's defaults. The result carries
    ``medboost_config = {"name": ..., "kwargs": ...}`` for saving."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    model = _REGISTRY[name](**copy.deepcopy(kwargs))
    model.medboost_config = {"name": name, "kwargs": _plain(kwargs)}
    return model


def _plain(value):
    """Dataclasses -> dicts, recursively, so that model configs serialise to JSON."""
    if hasattr(value, "to_dict"):
        return _plain(value.to_dict())
    if isinstance(value, CheckpointReader):  # an in-memory or already-open source: record where it came from
        return value.source
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _sized(family: str, cls: type[nn.Module], sizes: dict[str, dict], size: str, boosted: bool):
    """The factory of ``{family}_{size}`` (no booster) or ``{family}_{size}_llm`` (a booster, the default one unless
    given)."""

    def factory(booster: BoosterConfig | dict | None = None, **kwargs) -> nn.Module:
        if boosted and booster is None:
            booster = BoosterConfig()
        if not boosted and booster is not None:
            raise ConfigError(
                f"{family}_{size} has no booster, but the model arguments give one: use {family}_{size}_llm, or "
                "drop the block with --model.kwargs.booster null"
            )
        return cls(**{**sizes[size], **kwargs}, booster=booster)

    return factory


#: ViViT sizes: the ViT's width and heads, its depth split into spatial (per frame) and temporal blocks.
VIVIT_SIZES = {
    "tiny": dict(dim=192, spatial_depth=4, temporal_depth=2, heads=3),
    "small": dict(dim=384, spatial_depth=8, temporal_depth=4, heads=6),
}


for _family, _cls, _sizes in (("vit", ViTClassifier, VIT_SIZES), ("vivit", ViViTClassifier, VIVIT_SIZES)):
    for _size in _sizes:
        register_model(f"{_family}_{_size}")(_sized(_family, _cls, _sizes, _size, boosted=False))
        register_model(f"{_family}_{_size}_llm")(_sized(_family, _cls, _sizes, _size, boosted=True))


@register_model("resnet18")
def _resnet18(**kwargs) -> nn.Module:
    return resnet(18, **kwargs)


@register_model("resnet50")
def _resnet50(**kwargs) -> nn.Module:
    return resnet(50, **kwargs)


# -- segmentation -------------------------------------------------------------------------------------------------
_SEG_DEFAULTS = dict(patch_size=8, dim=192, depth=6, heads=3)


@register_model("vit_seg")
def _vit_seg(**kwargs) -> nn.Module:
    """The segmentation ViT without LLM block, hybrid attention or fusion (each can be switched on)."""
    from medboost.models.segmenter import ViTSegmenter

    return ViTSegmenter(**{**_SEG_DEFAULTS, **kwargs})


@register_model("medvisionllama")
def _medvisionllama(booster: BoosterConfig | dict | None = None, **kwargs) -> nn.Module:
    """MedVisionLlama: frozen LLM block (SmolLM2 last layer by default) + hybrid attention + multi-scale fusion."""
    from medboost.models.segmenter import ViTSegmenter

    options = {**_SEG_DEFAULTS, "hybrid": True, "fusion": True, **kwargs}
    return ViTSegmenter(**options, booster=booster if booster is not None else BoosterConfig())


@register_model("unetr")
def _unetr(
    spatial_dims: int = 3,
    in_channels: int = 1,
    num_classes: int = 2,
    img_size=96,
    feature_size: int = 16,
    dim: int = 192,
    heads: int = 3,
    mlp_ratio: float = 4.0,
) -> nn.Module:
    """MONAI's UNETR (patch 16, 12 blocks); width and heads configurable to match the other arms."""
    from monai.networks.nets import UNETR

    return UNETR(
        in_channels,
        num_classes,
        img_size,
        feature_size=feature_size,
        hidden_size=dim,
        mlp_dim=int(dim * mlp_ratio),
        num_heads=heads,
        spatial_dims=spatial_dims,
    )


@register_model("unet")
def _unet(
    spatial_dims: int = 3,
    in_channels: int = 1,
    num_classes: int = 2,
    channels=(16, 32, 64, 128),
    strides=(2, 2, 2),
    num_res_units: int = 2,
    img_size=None,
) -> nn.Module:
    """MONAI's residual UNet. ``img_size`` is accepted (and ignored) so every arm takes the same arguments."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims, in_channels, num_classes, channels=channels, strides=strides, num_res_units=num_res_units)


# -- vision-language ----------------------------------------------------------------------------------------------
@register_model("medblip")
def _medblip(**kwargs) -> nn.Module:
    """MedBLIP: trainable 3D patch embedding + frozen encoder -> MedQFormer -> frozen causal LLM."""
    from medboost.models.medblip import MedBLIP

    return MedBLIP(**kwargs)
