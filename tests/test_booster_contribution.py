"""The booster's contribution: the model with its branch removed at test time, and the branch's relative size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from synthetic_data import write_npz

from medboost.engine.config import load_config
from medboost.errors import TrainingError
from medboost.metrics.classification import evaluate, scores_from_logits
from medboost.models import load_pretrained
from medboost.models.booster import RESIDUAL_MODES, BoosterNormProbe, booster_bypassed, boosters
from medboost.models.classifier import ViTClassifier
from medboost.models.vivit import ViViTClassifier
from medboost.pipelines.classification import build_datamodule, train_classifier
from medboost.pipelines.contribution import bypassed_test, classification_contribution, segmentation_contribution

TINY_VIT = {"patch_size": 7, "dim": 32, "depth": 2, "heads": 2, "drop_path": 0.0, "num_classes": 3}


def _boosted(tiny_llm: str, residual: str, zero_init: bool, seed: int = 0) -> ViTClassifier:
    torch.manual_seed(seed)
    booster = {"block": {"source": tiny_llm}, "residual": residual, "zero_init": zero_init}
    model = ViTClassifier(**TINY_VIT, booster=booster).eval()
    # The head starts at zero (every logit 0): give it weights so that the logits show any change in the tokens.
    torch.nn.init.normal_(model.head.weight)
    return model


def _without_insert(boosted: ViTClassifier) -> ViTClassifier:
    """The same ViT, head included, built without the insert."""
    plain = ViTClassifier(**TINY_VIT).eval()
    weights = {k: v for k, v in boosted.state_dict().items() if not k.startswith("encoder.inserts.")}
    plain.load_state_dict(weights)
    return plain


def _images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("residual", RESIDUAL_MODES)
@torch.inference_mode()
def test_bypass_gives_exactly_the_model_without_the_insert(tiny_llm, residual):
    model, x = _boosted(tiny_llm, residual, zero_init=False), _images()
    boosted = model(x)
    with booster_bypassed(model) as found:
        assert len(found) == 1
        bypassed = model(x)
    assert torch.equal(bypassed, _without_insert(model)(x))
    assert not torch.allclose(boosted, bypassed)  # a random M2 does change the logits
    assert torch.equal(model(x), boosted)  # the branch is back after the context


@torch.inference_mode()
def test_bypass_removes_a_vivit_booster_too(tiny_llm):
    torch.manual_seed(0)
    tiny = {"dim": 32, "spatial_depth": 1, "temporal_depth": 2, "heads": 2, "num_classes": 3}
    booster = {"block": {"source": tiny_llm}, "position": 0, "zero_init": False}
    model = ViViTClassifier(**tiny, booster=booster).eval()
    torch.nn.init.normal_(model.head.weight)
    plain = ViViTClassifier(**tiny).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("encoder.inserts.")})
    x = torch.randn(2, 1, 28, 28, 28, generator=torch.Generator().manual_seed(2))
    with booster_bypassed(model):
        bypassed = model(x)
    assert torch.equal(bypassed, plain(x)) and not torch.allclose(model(x), bypassed)


def test_bypass_is_undone_when_the_body_raises(tiny_llm):
    model = _boosted(tiny_llm, "outer", zero_init=False)
    with pytest.raises(RuntimeError), booster_bypassed(model):
        raise RuntimeError("evaluation failed")
    assert [b.bypassed for b in boosters(model)] == [False]


@pytest.mark.parametrize("residual", ["outer", "hybrid"])
@torch.inference_mode()
def test_a_zero_m2_has_norm_zero_and_the_same_metrics_without_the_branch(tiny_llm, residual):
    model, x = _boosted(tiny_llm, residual, zero_init=True), _images(12)
    with BoosterNormProbe(model) as probe:
        logits = model(x)
    norms = probe.summary()
    assert norms["relative_output_norm"] == 0.0
    assert norms["relative_block_norm"] > 0  # the block itself still runs and changes what it is given
    with booster_bypassed(model):
        bypassed_logits = model(x)
    assert torch.equal(logits, bypassed_logits)
    labels = np.arange(12).reshape(12, 1) % 3
    scores = {"labels": labels, "scores": scores_from_logits(logits, "multi-class").numpy()}
    bypassed = {"labels": labels, "scores": scores_from_logits(bypassed_logits, "multi-class").numpy()}
    record = classification_contribution("multi-class", scores, bypassed, norms)
    assert (record["test_auc"], record["test_acc"]) == (
        record["test_auc_without_branch"],
        record["test_acc_without_branch"],
    )
    assert (record["delta_auc"], record["delta_acc"], record["max_abs_score_change"]) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("residual", RESIDUAL_MODES)
@torch.inference_mode()
def test_a_nonzero_branch_has_the_norm_recomputed_by_hand_and_the_probe_changes_nothing(tiny_llm, residual):
    model, x = _boosted(tiny_llm, residual, zero_init=False), _images()
    booster = boosters(model)[0]
    seen = []
    handle = booster.register_forward_hook(lambda m, i, out: seen.append((i[0], out)))
    plain = model(x)
    with BoosterNormProbe(model) as probe:
        probed = model(x)
    handle.remove()
    assert torch.equal(plain, probed)
    (x_in, out), _ = seen
    expected = ((out - x_in).norm(dim=-1) / x_in.norm(dim=-1)).mean()
    z = booster.m1(x_in)
    expected_block = ((booster.block(z) - z).norm(dim=-1) / z.norm(dim=-1)).mean()
    norms = probe.summary()
    assert norms["relative_output_norm"] > 0
    assert norms["relative_output_norm"] == pytest.approx(float(expected), rel=1e-5)
    assert norms["relative_block_norm"] == pytest.approx(float(expected_block), rel=1e-5)
    with booster_bypassed(model), BoosterNormProbe(model) as skipped:
        model(x)
    assert skipped.summary() == {"relative_output_norm": None, "relative_block_norm": None}  # nothing to measure


def _config(data, out, model: str, kwargs: dict):
    return load_config(
        None,
        {
            "data.dataset": "retinamnist",
            "data.data_dir": str(data),
            "data.batch_size": 8,
            "data.verify_md5": False,
            "model.name": model,
            "model.kwargs": kwargs,
            "trainer.max_epochs": 1,
            "trainer.progress": False,
            "optim.warmup_epochs": 0,
            "output_dir": str(out),
        },
    )


def _recomputed_contribution(cfg) -> dict:
    """The saved model over the run's test split, with and without its branch, measured here directly."""
    model = load_pretrained(cfg.run_dir / "model")
    dm = build_datamodule(cfg)
    dm.setup()
    batches = list(dm.test_dataloader())
    labels = torch.cat([y for _, y, _ in batches]).numpy().reshape(-1, 1)
    with torch.inference_mode():
        with BoosterNormProbe(model) as probe:
            on = torch.cat([model(x) for x, _, _ in batches])
        with booster_bypassed(model):
            off = torch.cat([model(x) for x, _, _ in batches])
    return {
        "on": evaluate(labels, scores_from_logits(on, dm.task).numpy(), dm.task),
        "off": evaluate(labels, scores_from_logits(off, dm.task).numpy(), dm.task),
        "norms": probe.summary(),
        "max_abs_score_change": float((scores_from_logits(on, dm.task) - scores_from_logits(off, dm.task)).abs().max()),
    }


def test_a_boosted_run_records_its_contribution_and_a_plain_run_none(tmp_path, tiny_llm):
    data = tmp_path / "data"
    write_npz(data, "retinamnist")  # random images: mid-range scores, so that the branch's effect shows
    vit = {k: v for k, v in TINY_VIT.items() if k != "num_classes"}
    booster = {"block": {"source": tiny_llm}, "residual": "outer", "zero_init": False}
    cfg = _config(data, tmp_path / "runs", "vit_tiny_llm", dict(vit, booster=booster))
    train_classifier(cfg, make_plots=False)
    result = json.loads((cfg.run_dir / "result.json").read_text())
    recorded, direct = result["booster_contribution"], _recomputed_contribution(cfg)
    # The run's own test report and the contribution's "with branch" numbers come from the same test outputs.
    assert (recorded["test_acc"], recorded["test_auc"]) == (result["test_report"]["acc"], result["test_report"]["auc"])
    assert (recorded["test_acc"], recorded["test_auc"]) == (direct["on"]["acc"], direct["on"]["auc"])
    without = (recorded["test_acc_without_branch"], recorded["test_auc_without_branch"])
    assert without == (direct["off"]["acc"], direct["off"]["auc"])
    assert recorded["delta_auc"] == recorded["test_auc"] - recorded["test_auc_without_branch"]
    assert recorded["delta_auc"] != 0  # this run's branch moves its AUC (0.735 vs 0.4): the check above has teeth
    assert recorded["max_abs_score_change"] == pytest.approx(direct["max_abs_score_change"], rel=1e-6)
    assert recorded["max_abs_score_change"] > 0
    for key in BoosterNormProbe.KEYS:
        assert recorded[key] > 0
        assert recorded[key] == pytest.approx(direct["norms"][key], rel=1e-6)
    plain = _config(data, tmp_path / "runs", "vit_tiny", vit)
    train_classifier(plain, make_plots=False)
    assert "booster_contribution" not in json.loads((plain.run_dir / "result.json").read_text())


class _Repeatable:
    """A trainer whose test records what a real test would depend on: whether the branch is removed, and whether
    the task's prediction writer is called."""

    def __init__(self, task):
        self.task, self.written = task, []

    def test(self, task, datamodule=None, verbose=False):
        bypassed = [b.bypassed for b in boosters(task.model)]
        task.test_metrics = {"bypassed": bypassed}
        if task.on_prediction is not None:
            task.on_prediction("test", 0)


def test_bypassed_test_removes_the_branch_keeps_the_runs_value_and_writes_no_predictions(tiny_llm):
    task = torch.nn.Module()
    task.model = _boosted(tiny_llm, "outer", zero_init=False)
    written = []
    task.on_prediction, task.test_metrics = (lambda *a: written.append(a)), {"the": "run's own"}
    trainer = _Repeatable(task)
    assert bypassed_test(trainer, task, None, "test_metrics") == {"bypassed": [True]}
    assert task.test_metrics == {"the": "run's own"} and written == []
    assert [b.bypassed for b in boosters(task.model)] == [False]
    trainer.test(task)  # the writer is back for later tests
    assert written == [("test", 0)]


def test_segmentation_contribution_compares_the_two_tests_class_by_class():
    def metrics(anterior: float, posterior: float) -> dict:
        per_class = {"anterior": {"dice": {"mean": anterior}}, "posterior": {"dice": {"mean": posterior}}}
        mean = (anterior + posterior) / 2
        return {
            "n_volumes": 4,
            "per_class": per_class,
            "mean_foreground": {"dice": {"mean": mean}, "hd95": {"mean": 3.0}},
        }

    record = segmentation_contribution(metrics(0.8, 0.6), metrics(0.7, 0.6), {"relative_output_norm": 0.3})
    assert record["test_dice"] == pytest.approx(0.7) and record["test_dice_without_branch"] == pytest.approx(0.65)
    assert record["delta_dice"] == pytest.approx(0.05)
    assert record["per_class_dice"] == {
        "anterior": {"with": 0.8, "without": 0.7},
        "posterior": {"with": 0.6, "without": 0.6},
    }
    assert record["relative_output_norm"] == 0.3
    other = metrics(0.7, 0.6)
    other["n_volumes"] = 3
    with pytest.raises(TrainingError, match="other volumes"):
        segmentation_contribution(metrics(0.8, 0.6), other, None)
