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
    if name in VOLUMES_ONLY:  # 7 frames of 4 slices, 2 x 2 patches each; the booster after temporal block 1
        kwargs.update(dim=32, spatial_depth=1, temporal_depth=2, heads=2, img_size=28, patch_size=14)
    if name.endswith("_llm"):
        kwargs["booster"] = {"block": {"source": reader}}
    return kwargs


SEGMENTERS = {"vit_seg", "medvisionllama", "unetr", "unet"}  # covered in test_segmentation_pipeline.py
VISION_LANGUAGE = {"medblip"}  # covered in test_medblip.py
VOLUMES_ONLY = {n for n in list_models() if n.startswith("vivit")}  # refusing 2D is tested in test_vivit.py
CLASSIFIERS = [
    (name, dims)
    for name in sorted(set(list_models()) - SEGMENTERS - VISION_LANGUAGE)
    for dims in (2, 3)
    if dims == 3 or name not in VOLUMES_ONLY
]


def _randomise_zero_inits(model: torch.nn.Module) -> None:
    """Give the ViT head and the booster's ``M2`` non-zero values. Both start at zero (a boosted model starts as its
    baseline), which makes every gradient upstream of them exactly zero before the first step: a backward pass through
    the zero-initialised model passes whether or not the encoder and booster paths are intact."""
    generator = torch.Generator().manual_seed(1)
    booster = getattr(model, "booster", None)
    for module in (getattr(model, "head", None), booster.m2 if booster is not None else None):
        for p in module.parameters() if module is not None else ():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


def _input(name: str, dims: int) -> torch.Tensor:
    # ResNets take any size (adaptive pooling): 16 px instead of 28 keeps the 3D ones cheap.
    size = 28 if name.startswith(("vit", "vivit")) else 16
    return torch.randn(2, 1, *(size,) * dims, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize(("name", "dims"), CLASSIFIERS)
def test_every_registered_classifier_runs_forward_and_backward(name, dims, tiny_reader):
    torch.manual_seed(0)
    model = create_model(name, **_kwargs(name, dims, tiny_reader))
    _randomise_zero_inits(model)
    out = model(_input(name, dims))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.sum().backward()
    named = dict(model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    frozen = [n for n, p in named.items() if not p.requires_grad]
    assert trainable
    # Every trainable tensor is on the path from the input to the output: its gradient is non-zero.
    assert [n for n in trainable if named[n].grad is None or not named[n].grad.any()] == []
    # Only the LLM block is frozen, and it accumulates no gradient at all.
    assert all(n.startswith("encoder.inserts.1.block.") for n in frozen) and bool(frozen) == name.endswith("_llm")
    assert [n for n in frozen if named[n].grad is not None] == []


@pytest.mark.parametrize("dims", [2, 3])
def test_the_frozen_block_is_on_the_boosted_path_and_passes_gradients_through(dims, tiny_reader):
    torch.manual_seed(0)
    model = create_model("vit_tiny_llm", **_kwargs("vit_tiny_llm", dims, tiny_reader)).eval()
    _randomise_zero_inits(model)
    booster = model.booster
    assert booster.residual == "outer"  # x + M2(norm(L(M1 x))): M1 reaches the output through the block only
    x = _input("vit_tiny_llm", dims)
    out = model(x)
    out.sum().backward()
    named = dict(model.named_parameters())
    for prefix in (
        "encoder.patch_embed.proj.",
        "encoder.pos_embed",
        "encoder.cls_token",
        "encoder.blocks.0.",
        "encoder.blocks.1.",
        "encoder.inserts.1.m1.",
        "encoder.inserts.1.norm.",
        "encoder.inserts.1.m2.",
        "encoder.norm.",
        "head.",
    ):
        params = {n: p for n, p in named.items() if n.startswith(prefix)}
        assert params and all(p.grad is not None and p.grad.any() for p in params.values()), prefix
    block = dict(booster.block.named_parameters())
    assert block and all(not p.requires_grad and p.grad is None for p in block.values())
    m1_grad = booster.m1.weight.grad.clone()
    # The block is really used: the output moves with its weights, and so does the gradient that reaches M1.
    down = block["layer.mlp.down_proj.weight"]
    saved = down.detach().clone()
    with torch.no_grad():
        down.mul_(1.5)
    model.zero_grad()
    changed = model(x)
    changed.sum().backward()
    assert not torch.equal(changed, out) and not torch.equal(booster.m1.weight.grad, m1_grad)
    with torch.no_grad():
        down.copy_(saved)
        assert torch.equal(model(x), out)
        # With the identity in its place (the MLP-only control) the output differs as well.
        booster.block = IdentityBlock(booster.block.hidden_size)
        assert not torch.equal(model(x), out)


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


@pytest.mark.parametrize("dims", [2, 3])
def test_conv_stem_gives_the_patch_grid_and_a_seq_pooled_classifier_trains(dims, tmp_path):
    torch.manual_seed(0)
    size = (28,) * dims
    model = create_model("vit_tiny", spatial_dims=dims, img_size=28, patch_size=4, stem="conv", pool="seq")
    stem = model.encoder.patch_embed
    assert stem.grid == (7,) * dims and model.encoder.cls_token is None
    # Two stride-2 stages for patch 4, each a 3x3 convolution + BatchNorm + ReLU, then the 1x1 projection to dim.
    convs = [m for m in stem.proj.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d)]
    assert [c.stride for c in convs] == [(2,) * dims, (2,) * dims, (1,) * dims]
    x = torch.randn(3, 1, *size)
    torch.nn.init.normal_(model.head.weight)
    out = model(x)
    assert out.shape == (3, 2)
    out.sum().backward()
    assert convs[0].weight.grad.abs().sum() > 0 and model.attention_pool.weight.grad.abs().sum() > 0
    weights = model.pool_weights(model.encoder(x))
    torch.testing.assert_close(weights.sum(1), torch.ones(3))
    save_pretrained(model.eval(), tmp_path / "m", extra={"task": "multi-class"})  # BatchNorm statistics saved too
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "m")(x), model(x), rtol=0, atol=0)


def test_pooling_weights_match_forward():
    torch.manual_seed(0)
    for pool in ("cls", "mean", "seq"):
        model = create_model("vit_tiny", img_size=28, patch_size=4, pool=pool).eval()
        torch.nn.init.normal_(model.head.weight)
        x = torch.randn(2, 1, 28, 28)
        with torch.no_grad():
            tokens = model.encoder(x)
            pooled = torch.einsum("bt,btd->bd", model.pool_weights(tokens), tokens)
            torch.testing.assert_close(model.head(pooled), model(x))


def test_stem_and_pool_errors_are_clear():
    with pytest.raises(ConfigError, match="stem must be one of patch, conv, got 'resnet'"):
        ViT(img_size=28, patch_size=4, stem="resnet")
    with pytest.raises(ConfigError, match="conv stem needs power-of-two patch sizes"):
        ViT(img_size=27, patch_size=3, stem="conv")
    with pytest.raises(ConfigError, match="pool must be one of cls, mean, seq, got 'max'"):
        create_model("vit_tiny", pool="max")


def test_conv_stem_grid_is_the_ceiling_of_size_over_patch():
    # 28 -> 14 -> 7 -> 4: three padded stride-2 stages; the patch stem would refuse 28 / 8.
    vit = ViT(spatial_dims=3, img_size=28, patch_size=8, stem="conv", dim=32, depth=1, heads=2)
    assert vit.grid == (4, 4, 4) and vit(torch.randn(1, 1, 28, 28, 28)).shape == (1, 1 + 64, 32)
    with pytest.raises(ConfigError, match="not divisible by patch_size"):
        ViT(spatial_dims=3, img_size=28, patch_size=8)
