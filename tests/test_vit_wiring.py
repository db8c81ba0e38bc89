"""The ViT and its two wrappers take keyword arguments only, and every ViT option of a wrapper reaches its encoder."""

from __future__ import annotations

import inspect

import pytest

from medboost.models.classifier import ViTClassifier
from medboost.models.segmenter import ViTSegmenter
from medboost.models.vit import ViT


@pytest.mark.parametrize("cls", [ViT, ViTClassifier, ViTSegmenter])
def test_arguments_are_keyword_only(cls):
    kinds = {p.kind for p in inspect.signature(cls).parameters.values()}
    assert kinds == {inspect.Parameter.KEYWORD_ONLY}
    with pytest.raises(TypeError):
        cls(2, 1)


def test_classifier_options_reach_the_encoder():
    model = ViTClassifier(
        spatial_dims=3, in_channels=2, img_size=(8, 16, 8), patch_size=4, dim=16, depth=3, heads=4, mlp_ratio=2.0,
        drop=0.25, drop_path=0.5, pool="mean",
    )  # fmt: skip
    vit = model.encoder
    assert vit.patch_embed.proj.in_channels == 2 and vit.patch_embed.img_size == (8, 16, 8) and vit.grid == (2, 4, 2)
    assert vit.dim == 16 and len(vit.blocks) == 3 and vit.blocks[0].attn.heads == 4
    assert vit.blocks[0].mlp.fc1.out_features == 32 and vit.blocks[0].attn.attn_drop == 0.25
    assert [b.drop_path.p for b in vit.blocks] == [0.0, 0.25, 0.5]
    assert vit.cls_token is None and vit.blocks[0].local is None


def test_segmenter_options_reach_the_encoder():
    model = ViTSegmenter(
        spatial_dims=2, img_size=16, patch_size=4, dim=16, depth=2, heads=2, drop_path=0.2, hybrid=True
    )
    vit = model.encoder
    assert vit.spatial_dims == 2 and vit.grid == (4, 4) and model.img_size == (16, 16)
    assert vit.cls_token is None and all(b.local is not None for b in vit.blocks)
    assert vit.blocks[-1].drop_path.p == pytest.approx(0.2) and vit.blocks[0].attn.attn_drop == 0.0
