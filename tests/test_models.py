"""Models: every registered variant in 2D and 3D, the booster's residual modes and controls, save/load."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM

from medboost.errors import ConfigError
from medboost.llm import IdentityBlock, load_block
from medboost.llm.readers.memory import StateDictReader
from medboost.models import LLMBooster, create_model, list_models, load_pretrained, save_pretrained
from medboost.models.vit import ViT

SMALL = {"dim": 32, "depth": 2, "heads": 2}


@pytest.fixture(scope="module")
def tiny_reader():
    torch.manual_seed(0)
    return StateDictReader.from_model(AutoModelForCausalLM.from_config(tiny_config("llama")), source="tiny-llama")


def _kwargs(name: str, dims: int, reader) -> dict:
    kwargs = {"spatial_dims": dims, "in_channels": 1, "num_classes": 3}
    if name.startswith("vit"):
        kwargs.update(SMALL, img_size=28, patch_size=7 if dims == 2 else 14)
    if name.endswith("_llm"):
        kwargs["booster"] = {"block": {"source": reader}}
    return kwargs


SEGMENTERS = {"vit_seg", "medvisionllama", "unetr", "unet"}  # covered in test_segmentation_pipeline.py


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", sorted(set(list_models()) - SEGMENTERS))
def test_every_registered_classifier_runs_forward_and_backward(name, dims, tiny_reader):
    torch.manual_seed(0)
    model = create_model(name, **_kwargs(name, dims, tiny_reader))
    x = torch.randn(2, 1, *(28,) * dims)
    out = model(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable if p.dim() > 1)


@pytest.mark.parametrize("mode", ["none", "inner", "outer", "hybrid"])
def test_booster_residual_modes_compute_the_published_formulas(mode, tiny_reader):
    block = load_block(tiny_reader, layer=-1)
    booster = LLMBooster(16, block, residual=mode, block_norm=False, zero_init=False)
    x = torch.randn(2, 5, 16)
    z = booster.m1(x)
    inner = block(z) + z if mode in ("inner", "hybrid") else block(z)
    expected = booster.m2(inner) + (x if mode in ("outer", "hybrid") else 0)
    torch.testing.assert_close(booster(x), expected)


def test_zero_initialised_outer_booster_starts_as_the_identity(tiny_reader):
    booster = LLMBooster(16, load_block(tiny_reader), residual="outer")
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(booster(x), x)


def test_mlp_only_control_is_the_booster_without_a_block():
    booster = LLMBooster(16, IdentityBlock(64), residual="outer", block_norm=False, zero_init=False)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(booster(x), x + booster.m2(booster.m1(x)))


def test_frozen_block_is_not_trained_and_stays_in_eval(tiny_reader):
    model = create_model("vit_tiny_llm", **_kwargs("vit_tiny_llm", 2, tiny_reader))
    model.train()
    block = model.booster.block
    assert not block.layer.training and all(not p.requires_grad for p in block.parameters())
    assert model.booster.m1.weight.requires_grad and model.booster.m2.weight.requires_grad


def test_booster_can_sit_after_any_block(tiny_reader):
    kwargs = _kwargs("vit_tiny_llm", 2, tiny_reader)
    kwargs["booster"]["position"] = 0
    model = create_model("vit_tiny_llm", **kwargs)
    assert list(model.encoder.inserts) == ["0"]
    kwargs["booster"]["position"] = 5
    with pytest.raises(ConfigError, match="insert position 5 is out of range"):
        create_model("vit_tiny_llm", **kwargs)


def test_saved_model_reloads_without_the_llm_checkpoint(tmp_path, tiny_reader):
    torch.manual_seed(0)
    model = create_model("vit_tiny_llm", **_kwargs("vit_tiny_llm", 3, tiny_reader)).eval()
    torch.nn.init.normal_(model.booster.m2.weight)  # make the booster matter
    save_pretrained(model, tmp_path / "m", extra={"task": "multi-class"})
    loaded = load_pretrained(tmp_path / "m")
    x = torch.randn(2, 1, 28, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert all(not p.requires_grad for p in loaded.booster.block.parameters())


def test_model_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown model 'vit_giant'; available: .*vit_tiny"):
        create_model("vit_giant")
    with pytest.raises(ConfigError, match="not divisible by patch_size"):
        ViT(img_size=28, patch_size=5)
    with pytest.raises(ConfigError, match="residual must be one of none, inner, outer, hybrid"):
        create_model("vit_tiny_llm", booster={"residual": "sideways"})
    with pytest.raises(ConfigError, match="config.json: not found"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"medboost_model": "vit_tiny", "kwargs": {}}')
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="model.safetensors: cannot read the model weights"):
        load_pretrained(tmp_path)
