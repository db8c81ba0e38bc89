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


def _vit(size: str, boosted: bool):
    def factory(booster: BoosterConfig | dict | None = None, **kwargs) -> nn.Module:
        if boosted and booster is None:
            booster = BoosterConfig()
        if not boosted and booster is not None:
            raise ConfigError(f"vit_{size} has no booster; use vit_{size}_llm")
        return ViTClassifier(**{**VIT_SIZES[size], **kwargs}, booster=booster)

    return factory


for _size in VIT_SIZES:
    register_model(f"vit_{_size}")(_vit(_size, boosted=False))
    register_model(f"vit_{_size}_llm")(_vit(_size, boosted=True))


@register_model("resnet18")
def _resnet18(**kwargs) -> nn.Module:
    return resnet(18, **kwargs)


@register_model("resnet50")
def _resnet50(**kwargs) -> nn.Module:
    return resnet(50, **kwargs)
