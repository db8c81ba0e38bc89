"""Run configuration, learning-rate schedules, recipes in configs/, and the optimiser's parameter selection."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medboost.data.medmnist_info import get_info
from medboost.engine.config import OptimConfig, load_config
from medboost.engine.optim import build_optimizer, build_scheduler, lr_factor
from medboost.engine.records import write_json
from medboost.engine.trainer import finished_result
from medboost.errors import ConfigError
from medboost.llm import PRESETS
from medboost.models import create_model

RECIPES = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_recipe_loads_and_builds_its_model(recipe):
    cfg = load_config(recipe)
    booster = cfg.model.kwargs.get("booster")
    if booster and PRESETS.get(booster["block"]["source"]) and not PRESETS[booster["block"]["source"]].local_path():
        pytest.skip(f"{booster['block']['source']} weights are not installed (hub only)")
    if cfg.task == "vision_language":
        from medboost.pipelines import vision_language

        kw = cfg.model.kwargs
        hub_only = [s for s in (kw["image_encoder"]["source"], kw["qformer"], kw["llm"]) if s not in PRESETS]
        if hub_only:
            pytest.skip(f"{', '.join(hub_only)}: hub only (the recipe parsed)")
        model = vision_language.build_model(cfg)
        assert (
            0
            < sum(p.numel() for p in model.parameters() if p.requires_grad)
            < sum(p.numel() for p in model.parameters())
        )
        return
    if cfg.task == "segmentation":
        roi = cfg.data.roi_size
        kwargs = dict(spatial_dims=len(roi), num_classes=3, in_channels=1, img_size=roi)
    else:
        info = get_info(cfg.data.dataset)
        kwargs = dict(
            spatial_dims=info.spatial_dims,
            num_classes=info.num_classes,
            in_channels=3 if cfg.data.as_rgb else info.n_channels,
        )
        if cfg.model.name.startswith("vit"):
            kwargs["img_size"] = cfg.data.resize or cfg.data.size
    model = create_model(cfg.model.name, **{**kwargs, **cfg.model.kwargs})
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def test_config_differences_and_finished_run_reuse(tmp_path):
    cfg = load_config(None, {"output_dir": str(tmp_path), "trainer.max_epochs": 10, "model.kwargs": {"dim": 64}})
    assert finished_result(cfg) is None
    stored = cfg.to_dict()
    write_json(cfg.run_dir / "result.json", {"config": stored, "test": {"test_auc": 0.9}})
    assert finished_result(cfg)["test"] == {"test_auc": 0.9}
    # Cosmetic settings do not count; anything that changes training does, nested model kwargs included.
    assert (
        load_config(
            None,
            {
                "output_dir": str(tmp_path),
                "trainer.max_epochs": 10,
                "model.kwargs": {"dim": 64},
                "trainer.progress": False,
            },
        ).differences(stored)
        == []
    )
    other = load_config(None, {"output_dir": str(tmp_path), "trainer.max_epochs": 15, "model.kwargs": {"dim": 32}})
    assert other.differences(stored) == ["model.kwargs.dim", "trainer.max_epochs"]
    with pytest.raises(
        ConfigError,
        match=r"result.json: this run folder was made with a different config "
        r"\(model.kwargs.dim, trainer.max_epochs differ\)",
    ):
        finished_result(other)
    # A run stored before optim.lr_scale existed matches the default (no scaling), and only that.
    before = {**stored, "optim": {k: v for k, v in stored["optim"].items() if k != "lr_scale"}}
    assert cfg.differences(before) == []
    scaled = load_config(None, {"output_dir": str(tmp_path), "trainer.max_epochs": 10, "model.kwargs": {"dim": 64}})
    scaled.optim.lr_scale = {"head.*": 10}
    assert scaled.differences(before) == ["optim.lr_scale"]
    (cfg.run_dir / "result.json").write_text('{"config": ')  # truncated
    with pytest.raises(ConfigError, match="result.json: unreadable"):
        finished_result(cfg)


def test_warmup_then_cosine_and_multistep():
    cos = OptimConfig(lr=1.0, schedule="cosine", warmup_epochs=2)
    factors = [lr_factor(cos, s, steps_per_epoch=10, max_epochs=10) for s in range(100)]
    assert factors[0] == pytest.approx(0.05) and factors[19] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[20:], factors[21:])) and factors[-1] < 0.01
    step = OptimConfig(lr=1.0, schedule="multistep", milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_factor(step, e * 10, 10, 100) for e in (49, 50, 74, 75)] == pytest.approx([1, 0.1, 0.1, 0.01])


def test_frozen_parameters_never_reach_the_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    opt = build_optimizer(model, OptimConfig(name="adamw", weight_decay=0.05))
    params = [p for g in opt.param_groups for p in g["params"]]
    assert not any(p is model[0].weight for p in params) and len(params) == 4
    assert {g["weight_decay"] for g in opt.param_groups if g["params"]} == {0.05, 0.0}
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(model, OptimConfig())


def test_lr_scale_gives_matching_parameters_their_own_rate_through_the_schedule():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    cfg = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=1, lr_scale={"0.*": 10, "2.weight": 2})
    opt = build_optimizer(model, cfg)
    rate = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert rate[id(model[0].weight)] == pytest.approx((1e-2, 0.05))
    assert rate[id(model[0].bias)] == pytest.approx((1e-2, 0.0))
    assert rate[id(model[2].weight)] == pytest.approx((2e-3, 0.05))
    assert rate[id(model[1].weight)] == pytest.approx((1e-3, 0.0)) and rate[id(model[2].bias)] == pytest.approx(
        (1e-3, 0)
    )
    # The warm-up and schedule scale every group's own rate.
    build_scheduler(opt, cfg, steps_per_epoch=4, max_epochs=2)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([1e-3 / 4, 2e-3 / 4, 1e-2 / 4, 1e-2 / 4])


def test_lr_scale_refuses_a_pattern_that_matches_nothing_and_a_bad_factor():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[1].requires_grad_(False)
    with pytest.raises(ConfigError, match=r"\['1\.\*'\] match no trainable parameter"):
        build_optimizer(model, OptimConfig(lr_scale={"0.*": 2, "1.*": 2}))
    with pytest.raises(ConfigError, match="must be a positive number"):
        build_optimizer(model, OptimConfig(lr_scale={"0.*": 0}))
