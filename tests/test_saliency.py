"""Saliency maps: on models trained to find a bright square their peak is the square; they vary; predict saves them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.networks.nets import ResNet
from torch import nn

from medboost.cli import main
from medboost.errors import ConfigError
from medboost.llm import BlockSpec
from medboost.models import BoosterConfig, ViTClassifier, create_model, load_pretrained, save_pretrained
from medboost.models.vit import Attention
from medboost.pipelines.predict import predict_files, read_image, to_model_input
from medboost.report.saliency import SaliencyTarget, attention_rollout, grad_cam, saliency_map

# Images of SIZE px (voxels) per axis; class 1 has a bright square (cube) at BOX. ResNet maps come from layer4, at 1/8
# of the input, whose cell j is centred on pixel 8 j: the 2D square (16 px, off-centre, clear of the border) holds
# two whole cells per axis; the 3D volume has two cells per axis, and the cube is the one octant whose cell centre
# touches it.
SIZE = {2: 32, 3: 16}
BOX = {2: (slice(4, 20), slice(8, 24)), 3: (slice(8, 16),) * 3}


def _vit(dims: int, **kwargs) -> ViTClassifier:
    return ViTClassifier(
        spatial_dims=dims, img_size=SIZE[dims], patch_size=4, dim=32, depth=2, heads=2, drop_path=0.0, **kwargs
    )


def _booster(tiny_llm: str, position: int | str = -1) -> BoosterConfig:
    # zero_init=False: the frozen block's path carries signal from the first step, so the map's gradient crosses it.
    return BoosterConfig(block=BlockSpec(source=tiny_llm), position=position, zero_init=False)


def _resnet(dims: int) -> ResNet:
    """MONAI's ResNet at a width a CPU trains in seconds, with the MedMNIST small-input stem (layer4 keeps a grid)."""
    return ResNet(
        "basic", [1, 1, 1, 1], [8, 16, 16, 32], spatial_dims=dims, n_input_channels=1, conv1_t_size=3,
        conv1_t_stride=1, no_max_pool=True, num_classes=2,
    )  # fmt: skip


def _batch(n: int, dims: int, gen: torch.Generator, positive: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images; class 1 has the bright square (cube) at BOX, class 0 has none."""
    y = torch.randint(0, 2, (n,), generator=gen) if positive is None else torch.full((n,), int(positive))
    square = torch.zeros((SIZE[dims],) * dims)
    square[BOX[dims]] = 1.5
    return 0.3 * torch.randn(n, 1, *(SIZE[dims],) * dims, generator=gen) + y.view(-1, *[1] * (dims + 1)) * square, y


def _train(model: nn.Module, dims: int, steps: int) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(steps):
        x, y = _batch(32, dims, gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = _batch(64, dims, torch.Generator().manual_seed(1))
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean()
    assert accuracy >= 0.95, f"the model did not learn the task (accuracy {accuracy:.2f}), so its maps mean nothing"
    return model


def _hit_rate(model: nn.Module, dims: int, explain, n: int = 20) -> float:
    """Share of held-out positive images whose map (by ``explain``) peaks inside the square."""
    inside = torch.zeros((SIZE[dims],) * dims, dtype=torch.bool)
    inside[BOX[dims]] = True
    x, _ = _batch(n, dims, torch.Generator().manual_seed(2), positive=True)
    hits = 0
    for image in x:
        cam, cls = explain(model, image[None])
        assert cls == 1 and cam.shape == inside.shape
        hits += bool(inside.flatten()[cam.argmax()])
    return hits / n


@pytest.mark.parametrize(
    ("name", "dims", "steps"),
    [
        ("vit", 2, 150),
        ("vit_booster", 2, 150),
        ("vit_mean_pool", 2, 150),
        ("vit_conv_stem_seq_pool", 2, 150),
        ("resnet", 2, 60),
        ("vit", 3, 150),
        ("resnet", 3, 40),
    ],
)
def test_saliency_peak_is_inside_the_bright_square(name, dims, steps, tiny_llm):
    torch.manual_seed(0)
    if name == "resnet":
        model = _resnet(dims)
    else:
        booster = _booster(tiny_llm) if name == "vit_booster" else None
        options = {"vit_mean_pool": dict(pool="mean"), "vit_conv_stem_seq_pool": dict(pool="seq", stem="conv")}
        model = _vit(dims, booster=booster, **options.get(name, {}))
    model = _train(model, dims, steps)
    assert _hit_rate(model, dims, grad_cam) >= 0.8
    if name != "resnet":
        assert _hit_rate(model, dims, attention_rollout) >= 0.8


def _random_head(model: ViTClassifier) -> ViTClassifier:
    """The head starts at zero (every gradient is zero); a random head stands in for a trained one."""
    torch.manual_seed(0)
    nn.init.normal_(model.head.weight)
    return model


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("booster_at", [None, -1, "embed"])
def test_vit_grad_cam_is_not_constant(dims, booster_at, tiny_llm):
    torch.manual_seed(0)
    model = _random_head(_vit(dims, booster=None if booster_at is None else _booster(tiny_llm, position=booster_at)))
    x = torch.randn(1, 1, *(SIZE[dims],) * dims, generator=torch.Generator().manual_seed(0))
    cam, _ = grad_cam(model, x)
    assert cam.shape == x.shape[2:] and cam.dtype == torch.float32
    assert float(cam.max()) == pytest.approx(1.0) and float(cam.min()) == 0.0  # scaled to [0, 1], not all zeros


def test_grad_cam_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = _random_head(_vit(2)).train()
    x = torch.randn(1, 1, SIZE[2], SIZE[2])
    expected, _ = grad_cam(model, x)
    assert model.training and all(p.grad is None for p in model.parameters())
    # The LayerNorms' hooks are gone: a plain forward's gradient is the usual one again.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model.requires_grad_(False)  # a frozen model has nothing requiring grad before the target
    frozen, _ = grad_cam(model, x)
    assert torch.allclose(frozen, expected, atol=1e-6)


def test_attention_weights_are_those_forward_applies():
    torch.manual_seed(0)
    attn = Attention(dim=16, heads=4).eval()
    x = torch.randn(2, 5, 16)
    out, weights = attn.forward_with_weights(x)
    assert weights.shape == (2, 4, 5, 5) and torch.allclose(weights.sum(-1), torch.ones(2, 4, 5))
    assert torch.allclose(out, attn(x), atol=1e-6)


class _DeclaresItsTarget(nn.Module):
    """The class score is the sum of ``features``' output (the input itself): its Grad-CAM is relu(input), scaled."""

    def __init__(self):
        super().__init__()
        self.features = nn.Identity()

    def saliency_target(self) -> SaliencyTarget:
        return SaliencyTarget(self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.features(x).flatten(1).sum(1, keepdim=True)
        return torch.cat([score, -score], dim=1)


def test_a_model_can_declare_its_saliency_target():
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 2, 3], x[0, 0, 4, 1] = 2.0, 1.0
    cam, cls = grad_cam(_DeclaresItsTarget(), x)
    assert cls == 0 and torch.allclose(cam, x[0, 0] / 2)


def test_unsupported_models_and_methods_are_named():
    with pytest.raises(TypeError, match="no saliency target known for Sequential"):
        grad_cam(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.zeros(1, 1, 2, 2))
    with pytest.raises(TypeError, match="rollout needs a ViT classifier, got ResNet"):
        attention_rollout(_resnet(2), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="rollout is the same for every class"):
        saliency_map(_vit(2), torch.zeros(1, 1, SIZE[2], SIZE[2]), method="rollout", target=1)
    with pytest.raises(ValueError, match="must be one of gradcam, rollout"):
        saliency_map(_vit(2), torch.zeros(1, 1, SIZE[2], SIZE[2]), method="lime")
    with pytest.raises(ValueError, match="one input"):
        grad_cam(_vit(2), torch.zeros(2, 1, SIZE[2], SIZE[2]))


def _saved_vit(folder, dims: int, size: int):
    torch.manual_seed(0)
    model = create_model("vit_tiny", spatial_dims=dims, img_size=size, patch_size=4, dim=16, depth=1, heads=2)
    _random_head(model)
    spec = {"spatial_dims": dims, "in_channels": 1, "img_size": size, "num_classes": 2, "normalize": None}
    save_pretrained(model, folder, extra={"task": "multi-class", "label_names": ["no", "yes"], "input": spec})
    return spec


def test_predict_writes_the_raw_map_beside_the_overlay(tmp_path, capsys):
    from PIL import Image

    spec = _saved_vit(tmp_path / "model", dims=2, size=16)
    image = tmp_path / "case.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)).save(image)
    assert main(["predict", str(tmp_path / "model"), str(image), "--saliency", str(tmp_path / "cams")]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["saliency"] == str(tmp_path / "cams" / "case_gradcam.png")
    assert (tmp_path / "cams" / "case_gradcam.png").stat().st_size > 1000
    raw = np.load(row["saliency_map"])
    assert row["saliency_map"] == str(tmp_path / "cams" / "case_gradcam.npy")
    expected, _ = grad_cam(load_pretrained(tmp_path / "model"), to_model_input(read_image(image), spec, "case"))
    assert raw.dtype == np.float32 and raw.shape == (16, 16) and raw.std() > 0
    np.testing.assert_allclose(raw, expected.numpy(), atol=1e-6)


def test_predict_saves_a_3d_map_whole(tmp_path):
    _saved_vit(tmp_path / "model", dims=3, size=8)
    volume = tmp_path / "scan.npy"
    np.save(volume, np.random.default_rng(0).random((12, 12, 12)).astype(np.float32))
    (row,) = predict_files(tmp_path / "model", [str(volume)], tmp_path / "cams", saliency_method="rollout")
    raw = np.load(row["saliency_map"])
    assert row["saliency_map"].endswith("scan_rollout.npy") and raw.shape == (8, 8, 8) and raw.std() > 0
    assert (tmp_path / "cams" / "scan_rollout.png").stat().st_size > 1000
    with pytest.raises(ConfigError, match="saliency method must be one of"):
        predict_files(tmp_path / "model", [str(volume)], tmp_path / "cams", saliency_method="lime")
