"""ImageEncoder3D: every frozen tower kind on our 3D tokens, gradients through the frozen encoder, freezing."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM

from medboost.errors import ConfigError
from medboost.models.image_encoder3d import ImageEncoder3D, VisionTowerStack, inflate_kernel, load_vision_tower

WIDTH, PATCH, SIZE = 32, 8, 16  # 16^3 volume, 8^3 patches -> 8 tokens
TOWER = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16)
TOWERS = {
    "blip2": (T.Blip2VisionConfig, T.Blip2VisionModel),
    "clip": (T.CLIPVisionConfig, T.CLIPVisionModel),
    "siglip": (T.SiglipVisionConfig, T.SiglipVisionModel),
    "dinov2": (T.Dinov2Config, T.Dinov2Model),
    "vit": (T.ViTConfig, T.ViTModel),
}


def _save_tower(name: str, folder) -> T.PreTrainedModel:
    config_cls, model_cls = TOWERS[name]
    torch.manual_seed(0)
    tower = model_cls(config_cls(**TOWER, patch_size=PATCH)).eval()
    tower.save_pretrained(folder)
    return tower


def _check_frozen_and_trainable(encoder: ImageEncoder3D, out: torch.Tensor) -> None:
    encoder.train()
    assert not any(m.training for m in encoder.encoder.module.modules())
    assert not any(p.requires_grad for p in encoder.encoder.parameters())
    out.square().mean().backward()
    assert encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert encoder.pos_embed.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.encoder.parameters())


@pytest.mark.parametrize("name", list(TOWERS))
def test_vision_tower_kinds(name, tmp_path):
    _save_tower(name, tmp_path)
    encoder = ImageEncoder3D(tmp_path, kind="vision", img_size=SIZE, patch_size=PATCH).train()
    has_cls = name != "siglip"
    out = encoder(torch.randn(2, 1, SIZE, SIZE, SIZE))
    assert out.shape == (2, 8 + has_cls, WIDTH)
    assert (encoder.cls_token is not None) == has_cls
    _check_frozen_and_trainable(encoder, out)


@pytest.mark.parametrize("name", list(TOWERS))
def test_stack_reproduces_the_tower_on_its_own_tokens(name, tmp_path):
    """Fed the tower's own 2D embeddings, our block stack + final norm gives the tower's own output."""
    tower = _save_tower(name, tmp_path)
    stack = VisionTowerStack(tower).eval()
    base = getattr(tower, "vision_model", tower)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = tower(pixel_values=pixels)
        got = stack(base.embeddings(pixels))
    if name == "clip":  # CLIP's last_hidden_state skips post_layernorm; its pooled CLS output has it
        torch.testing.assert_close(got[:, 0], expected.pooler_output)
    else:
        torch.testing.assert_close(got, expected.last_hidden_state)


def test_inflated_kernel_reproduces_the_2d_response(tmp_path):
    tower = _save_tower("blip2", tmp_path)
    encoder = ImageEncoder3D(tmp_path, img_size=SIZE, patch_size=PATCH, inflate_patch=True)
    grey = torch.randn(1, 1, SIZE, SIZE)
    volume = grey.unsqueeze(2).expand(-1, -1, SIZE, -1, -1)  # constant along depth
    conv2d = tower.embeddings.patch_embedding
    with torch.no_grad():
        expected = conv2d(grey.expand(-1, 3, -1, -1)).flatten(2).transpose(1, 2)  # (1, 4, D): 2 x 2 patches
        got = encoder.patch_embed(volume).view(1, 2, 4, WIDTH)  # (depth blocks, in-plane patches)
    torch.testing.assert_close(got[:, 0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, 1], expected, atol=1e-5, rtol=1e-5)
    assert inflate_kernel(torch.randn(4, 3, 2, 2), in_channels=2).shape == (4, 2, 2, 2, 2)
    with pytest.raises(ConfigError, match="patch_size"):
        ImageEncoder3D(tmp_path, img_size=SIZE, patch_size=4, inflate_patch=True)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-enc")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dim", [None, 24])
def test_llm_layer_stack(llama_dir, dim):
    encoder = ImageEncoder3D(llama_dir, kind="llm", img_size=SIZE, patch_size=PATCH, layers=[0, -1], dim=dim)
    width = dim or 64
    assert encoder.width == width and len(encoder.encoder.module.layers) == 2
    assert encoder.encoder.module.layers[1].layer_index == 2
    assert isinstance(encoder.proj_in, torch.nn.Linear) == (dim is not None)
    out = encoder(torch.randn(2, 1, SIZE, SIZE, SIZE))
    assert out.shape == (2, 9, width)
    _check_frozen_and_trainable(encoder, out)
    if dim is not None:
        assert encoder.proj_in.weight.grad.abs().sum() > 0


def test_conv_stem_gives_the_same_token_grid_and_learns_through_the_frozen_stack(llama_dir):
    encoder = ImageEncoder3D(llama_dir, kind="llm", img_size=SIZE, patch_size=PATCH, stem="conv")
    assert encoder.num_patches == (SIZE // PATCH) ** 3
    out = encoder(torch.randn(2, 1, SIZE, SIZE, SIZE))
    assert out.shape == (2, 9, 64)
    encoder.train()
    out.square().mean().backward()
    first_conv = encoder.patch_embed.proj.layers[0]
    assert isinstance(first_conv, torch.nn.Conv3d) and first_conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.encoder.parameters())


def test_bad_options(tmp_path, llama_dir):
    with pytest.raises(ConfigError, match="kind"):
        ImageEncoder3D(llama_dir, kind="cnn", img_size=SIZE, patch_size=PATCH)
    with pytest.raises(ConfigError, match="inflate_patch"):
        ImageEncoder3D(llama_dir, kind="llm", img_size=SIZE, patch_size=PATCH, inflate_patch=True)
    with pytest.raises(ConfigError, match="needs stem='patch'"):
        ImageEncoder3D(llama_dir, kind="vision", img_size=SIZE, patch_size=PATCH, inflate_patch=True, stem="conv")
    T.BertModel(tiny_config("bert")).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="not supported"):
        ImageEncoder3D(tmp_path, img_size=SIZE, patch_size=PATCH)


def test_vision_tower_from_a_full_clip_checkpoint(tmp_path):
    """A whole CLIP (text + vision) checkpoint gives its vision tower with the stored weights."""
    text = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=50)
    config = T.CLIPConfig(text_config=text, vision_config=dict(TOWER, patch_size=PATCH))
    torch.manual_seed(0)
    full = T.CLIPModel(config).eval()
    full.save_pretrained(tmp_path)
    tower = load_vision_tower(tmp_path)
    assert isinstance(tower, T.CLIPVisionModel)
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(tower(pixel_values=pixels).pooler_output, full.vision_model(pixels).pooler_output)
