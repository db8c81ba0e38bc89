"""The factorised ViViT: shapes, gradient paths, the booster on the temporal tokens, registry, save/load, and a
tiny training run on bright-cube volumes whose Grad-CAM peak falls inside the cube."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medboost.errors import ConfigError
from medboost.llm import IdentityBlock
from medboost.models import create_model, list_models, load_pretrained, save_pretrained
from medboost.models.vivit import ViViT, ViViTClassifier
from medboost.report.saliency import grad_cam, saliency_target

TINY = {"dim": 32, "spatial_depth": 2, "temporal_depth": 2, "heads": 2, "num_classes": 3}


def _booster(tiny_llm: str, **overrides) -> dict:
    return {"block": {"source": tiny_llm}, **overrides}


def _volumes(n: int, size: int = 28, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 1, size, size, size, generator=torch.Generator().manual_seed(seed))


def _randomise_zero_inits(model: ViViTClassifier) -> None:
    """The head and ``M2`` start at zero, which zeroes every gradient upstream of them (see tests/test_models.py)."""
    generator = torch.Generator().manual_seed(1)
    modules = [model.head] + ([model.booster.m2] if model.booster is not None else [])
    with torch.no_grad():
        for p in (p for m in modules for p in m.parameters()):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


def _boosted(tiny_llm: str, **kwargs) -> ViViTClassifier:
    torch.manual_seed(0)
    model = create_model("vivit_tiny_llm", **TINY, booster=_booster(tiny_llm), **kwargs)
    _randomise_zero_inits(model)
    return model


@pytest.mark.parametrize(
    ("size", "patch_size", "grid"),
    [(28, 4, (7, 7, 7)), (64, 8, (16, 8, 8))],
)
def test_logits_and_token_grid_shapes(size, patch_size, grid):
    model = ViViTClassifier(img_size=size, patch_size=patch_size, **TINY)
    assert model.encoder.grid == grid
    tokens = model.encoder(_volumes(2, size))
    assert tokens.shape == (2, 1 + grid[0], 32)  # temporal CLS + one token per frame
    out = model(_volumes(2, size))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("boosted", [False, True])
def test_every_trainable_tensor_gets_a_gradient_and_the_frozen_block_none(boosted, tiny_llm):
    torch.manual_seed(0)
    name = "vivit_tiny_llm" if boosted else "vivit_tiny"
    model = create_model(name, **TINY, **({"booster": _booster(tiny_llm)} if boosted else {}))
    _randomise_zero_inits(model)
    model(_volumes(2)).sum().backward()
    named = dict(model.named_parameters())
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    frozen = {n: p for n, p in named.items() if not p.requires_grad}
    assert [n for n, p in trainable.items() if p.grad is None or not p.grad.any()] == []
    prefixes = ["encoder.patch_embed.proj.", "encoder.spatial_blocks.0.", "encoder.spatial_blocks.1."]
    prefixes += ["encoder.temporal_blocks.0.", "encoder.temporal_blocks.1.", "head."]
    prefixes += ["encoder.inserts.1.m1.", "encoder.inserts.1.m2."] if boosted else []
    assert all(any(n.startswith(prefix) for n in trainable) for prefix in prefixes)
    # Only the LLM block (after the last temporal block, by default) is frozen, and it holds no gradient.
    assert bool(frozen) == boosted and all(n.startswith("encoder.inserts.1.block.") for n in frozen)
    assert [n for n, p in frozen.items() if p.grad is not None] == []


def test_the_frozen_block_is_on_the_path(tiny_llm):
    model = _boosted(tiny_llm).eval()
    x = _volumes(2)
    with torch.no_grad():
        out = model(x)
        down = dict(model.booster.block.named_parameters())["layer.mlp.down_proj.weight"]
        saved = down.clone()
        down.mul_(1.5)
        assert not torch.equal(model(x), out)
        down.copy_(saved)
        assert torch.equal(model(x), out)
        model.booster.block = IdentityBlock(model.booster.block.hidden_size)  # the MLP-only control
        assert not torch.equal(model(x), out)


def test_the_booster_sees_the_temporal_tokens(tiny_llm):
    model = _boosted(tiny_llm).eval()
    seen = []
    model.booster.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].shape))
    with torch.no_grad():
        model(_volumes(2))
    assert seen == [torch.Size([2, 1 + 7, 32])]  # temporal CLS + 7 frames of 4 slices


def test_booster_position_is_validated(tiny_llm):
    for position, key in ((0, "0"), (-2, "0"), ("embed", "embed")):
        model = create_model("vivit_tiny_llm", **TINY, booster=_booster(tiny_llm, position=position))
        assert list(model.encoder.inserts) == [key]
    for position in (2, -3, "middle"):
        with pytest.raises(ConfigError, match="booster position .* is out of range for a ViViT of temporal depth 2"):
            create_model("vivit_tiny_llm", **TINY, booster=_booster(tiny_llm, position=position))


def test_registry_variants(tiny_llm):
    assert {"vivit_tiny", "vivit_tiny_llm", "vivit_small", "vivit_small_llm"} <= set(list_models())
    model = create_model("vivit_tiny", num_classes=4)
    encoder = model.encoder
    assert isinstance(model, ViViTClassifier) and model.booster is None and model.head.out_features == 4
    assert (len(encoder.spatial_blocks), len(encoder.temporal_blocks), encoder.norm.normalized_shape) == (4, 2, (192,))
    assert model.medboost_config == {"name": "vivit_tiny", "kwargs": {"num_classes": 4}}
    small = create_model("vivit_small", dim=48, heads=4)  # sizes are defaults: kwargs override them
    assert (len(small.encoder.spatial_blocks), len(small.encoder.temporal_blocks)) == (8, 4)
    boosted = create_model("vivit_tiny_llm", **TINY, booster=_booster(tiny_llm))
    assert boosted.booster is not None and boosted.booster.residual == "outer"
    with pytest.raises(ConfigError, match="use vivit_tiny_llm, or drop the block with --model.kwargs.booster null"):
        create_model("vivit_tiny", booster=_booster(tiny_llm))


def test_volumes_only_and_whole_frames():
    with pytest.raises(ConfigError, match="ViViT is for volumes"):
        create_model("vivit_tiny", spatial_dims=2)
    with pytest.raises(ConfigError, match="ViViT is for volumes"):
        ViViT(img_size=(28, 28))
    with pytest.raises(ConfigError, match="ViViT is for volumes"):
        ViViTClassifier(**TINY)(torch.zeros(1, 1, 28, 28))
    with pytest.raises(ConfigError, match="the depth 30 is not divisible by frame_depth 4"):
        ViViT(img_size=(30, 28, 28))
    with pytest.raises(ConfigError, match="not divisible by patch_size"):
        ViViT(img_size=28, patch_size=5)


def test_saved_model_reloads_with_identical_logits(tmp_path, tiny_llm):
    model = _boosted(tiny_llm).eval()
    save_pretrained(model, tmp_path / "m", extra={"task": "multi-class"})
    loaded = load_pretrained(tmp_path / "m")
    assert isinstance(loaded, ViViTClassifier) and not loaded.training
    x = _volumes(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert all(not p.requires_grad for p in loaded.booster.block.parameters())


# -- a tiny training run: class 1 has a bright cube in one octant of a noise volume -----------------------------------
SIZE, CUBE = 16, (slice(8, 16),) * 3


def _cube_batch(n: int, gen: torch.Generator, positive: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, 2, (n,), generator=gen) if positive is None else torch.full((n,), int(positive))
    cube = torch.zeros(SIZE, SIZE, SIZE)
    cube[CUBE] = 1.5
    return 0.3 * torch.randn(n, 1, SIZE, SIZE, SIZE, generator=gen) + y.view(-1, 1, 1, 1, 1) * cube, y


def _train(model: nn.Module, steps: int = 150) -> float:
    """Train on fresh cube batches; return the held-out accuracy."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(steps):
        x, y = _cube_batch(32, gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = _cube_batch(64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("boosted", [False, True])
def test_trained_vivit_learns_the_cube_and_its_grad_cam_peaks_inside_it(boosted, tiny_llm):
    torch.manual_seed(0)
    # zero_init=False: the frozen block's path carries signal from the first step (as in tests/test_saliency.py).
    booster = _booster(tiny_llm, zero_init=False) if boosted else None
    model = ViViTClassifier(
        img_size=SIZE, frame_depth=4, patch_size=4, dim=32, spatial_depth=1, temporal_depth=1, heads=2,
        drop_path=0.0, booster=booster,
    )  # fmt: skip
    accuracy = _train(model)
    assert accuracy >= 0.95, f"the model did not learn the task (accuracy {accuracy:.2f}), so its maps mean nothing"
    assert saliency_target(model).module is model.encoder.embedded
    inside = torch.zeros(SIZE, SIZE, SIZE, dtype=torch.bool)
    inside[CUBE] = True
    x, _ = _cube_batch(20, torch.Generator().manual_seed(2), positive=True)
    hits = 0
    for volume in x:
        cam, cls = grad_cam(model, volume[None])
        assert cls == 1 and cam.shape == inside.shape
        hits += bool(inside.flatten()[cam.argmax()])
    assert hits / len(x) >= 0.8
