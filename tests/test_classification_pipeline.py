"""End to end: the real CLI and pipeline on tiny synthetic MedMNIST files, resume, DDP, predict, save/load."""

from __future__ import annotations

import itertools
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_args import cli_args
from lightning.pytorch.callbacks import Callback
from synthetic_data import EASY_SPLITS, write_easy_npz, write_npz

from medboost.cli import main
from medboost.data.medmnist_info import get_info
from medboost.engine.config import load_config
from medboost.metrics.classification import evaluate, scores_from_logits
from medboost.models import load_pretrained
from medboost.pipelines.classification import build_datamodule, train_classifier

TINY_VIT = {"patch_size": 7, "dim": 32, "depth": 2, "heads": 2, "drop_path": 0.0}


def _overrides(data_dir, out, dataset="breastmnist", model="vit_tiny", epochs=1, **extra):
    values = {
        "data.dataset": dataset,
        "data.data_dir": str(data_dir),
        "data.batch_size": 8,
        "data.augment": True,
        "data.verify_md5": False,
        "model.name": model,
        "model.kwargs": dict(TINY_VIT),
        "trainer.max_epochs": epochs,
        "trainer.progress": False,
        "output_dir": str(out),
        "optim.warmup_epochs": 1,
    }
    values.update(extra)
    return values


def _float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


def _assert_reloaded_model_reproduces_the_run(cfg, result: dict) -> torch.Tensor:
    """Reload ``run_dir/model`` with ``load_pretrained``, run it over the run's test split (same loader, same batches)
    and check that it scores exactly what the run recorded. Returns its test logits, in loader order."""
    model = load_pretrained(cfg.run_dir / "model")
    assert not any(m.training for m in model.modules())
    dm = build_datamodule(cfg)
    dm.setup()
    with torch.inference_mode():
        outputs = [(model(x), y) for x, y, _ in dm.test_dataloader()]
    logits = torch.cat([o for o, _ in outputs]).float()
    labels = torch.cat([y for _, y in outputs]).numpy().reshape(len(logits), -1)
    assert logits.shape[0] == result["test_report"]["n"]
    assert not torch.equal(logits, logits[:1].expand_as(logits))  # a constant model would make the check empty
    metrics = evaluate(labels, scores_from_logits(logits, dm.task).numpy(), dm.task)
    # test_report holds the float64 ACC/AUC the run computed from its test logits: the same code, so bit-equal.
    assert (metrics["acc"], metrics["auc"]) == (result["test_report"]["acc"], result["test_report"]["auc"])
    # result["test"] holds what Lightning logged: self.log turns each float into a float32 tensor, so the recorded test
    # scores are those values rounded to float32 (the one rounding between the two records, not a tolerance).
    recorded = (result["test"]["test_acc"], result["test"]["test_auc"])
    assert recorded == (_float32(metrics["acc"]), _float32(metrics["auc"]))
    return logits


class LogitRecorder(Callback):
    """The logits the run's test metrics are computed from, batch by batch in test-loader order: the first test only
    (a boosted run then tests again with the booster's branch removed, for result["booster_contribution"])."""

    def __init__(self):
        self.batches: list[torch.Tensor] = []
        self._hook = None

    def on_test_start(self, trainer, pl_module):
        if not self.batches:
            self._hook = pl_module.model.register_forward_hook(self._record)

    def _record(self, module, inputs, out):
        self.batches.append(out.detach().clone())

    def on_test_end(self, trainer, pl_module):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


# The easy task's test AUC after the 3-epoch runs below, seeds 0/1/2: breastmnist 1.0/1.0/1.0, chestmnist
# 0.68/0.75/0.73, retinamnist 1.0/0.95/1.0, nodulemnist3d 1.0/1.0/1.0. Chance is 0.5 (chestmnist's mean over 14 labels
# and 16 test samples: 0.5 +- 0.04); its 14-label texture is the slowest to learn.
MIN_TEST_AUC = {"breastmnist": 0.9, "chestmnist": 0.65, "retinamnist": 0.9, "nodulemnist3d": 0.9}


@pytest.mark.parametrize("dataset", ["breastmnist", "chestmnist", "retinamnist", "nodulemnist3d"])
def test_cli_train_writes_a_complete_run(tmp_path, tiny_llm, dataset, capsys):
    data = tmp_path / "data"
    write_easy_npz(data, dataset)
    info = get_info(dataset)
    kwargs = dict(TINY_VIT, booster={"block": {"source": tiny_llm, "layer": -1}, "residual": "hybrid"})
    if info.is_3d:
        kwargs["patch_size"] = 14
    extra = {
        "model.kwargs": kwargs,
        "data.batch_size": 4,
        "optim.lr": 5e-3,
        "optim.warmup_epochs": 0,
        # The binary classes are light and dark (augmentation keeps them); the others a texture a crop would shift.
        "data.augment": info.task == "binary-class",
    }
    values = _overrides(data, tmp_path / "runs", dataset, "vit_tiny_llm", epochs=3, **extra)
    assert main(["train", *cli_args(values)]) == 0
    run = tmp_path / "runs" / dataset / "vit_tiny_llm" / "seed0"
    result = json.loads((run / "result.json").read_text())
    assert result["test"]["test_auc"] >= MIN_TEST_AUC[dataset]
    assert result["test_report"]["n"] == EASY_SPLITS["test"]
    assert result["data"]["md5"] and result["environment"]["versions"]["torch"]
    assert result["model"]["trainable_parameters"] < result["model"]["parameters"]  # the block is frozen
    for figure in ("roc_test.png", "training_curves.png"):
        assert (run / "figures" / figure).stat().st_size > 1000
    printed = capsys.readouterr().out
    assert f"{result['test']['test_acc']:.4f}" in printed and f"{result['test']['test_auc']:.4f}" in printed
    # A saved model is usable without the training code and reproduces the run's test scores.
    _assert_reloaded_model_reproduces_the_run(load_config(None, values), result)


@pytest.mark.parametrize("model", ["vit_tiny", "vit_tiny_llm", "resnet18"])
def test_a_reloaded_model_reproduces_the_runs_test_logits_and_scores(tmp_path, tiny_llm, model):
    data = tmp_path / "data"
    write_npz(data, "retinamnist")  # random images: mid-range scores, so that any change in the logits shows
    kwargs = {
        "vit_tiny": dict(TINY_VIT),
        "vit_tiny_llm": dict(TINY_VIT, booster={"block": {"source": tiny_llm, "layer": -1}, "residual": "hybrid"}),
        "resnet18": {},
    }[model]
    cfg = load_config(None, _overrides(data, tmp_path / "runs", "retinamnist", model, **{"model.kwargs": kwargs}))
    seen = LogitRecorder()
    train_classifier(cfg, make_plots=False, callbacks=[seen])
    result = json.loads((cfg.run_dir / "result.json").read_text())
    logits = _assert_reloaded_model_reproduces_the_run(cfg, result)
    assert torch.equal(logits, torch.cat(seen.batches).float())  # bit for bit the logits the run was scored on


def test_predict_from_image_files(tmp_path, capsys):
    # Saliency maps are tested in test_saliency.py, on models that learned where the evidence is.
    from PIL import Image

    data = tmp_path / "data"
    write_npz(data, "breastmnist")
    assert main(["train", *cli_args(_overrides(data, tmp_path / "runs"))]) == 0
    image = tmp_path / "case.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)).save(image)
    np.save(tmp_path / "case.npy", np.random.default_rng(1).random((28, 28)))
    model_dir = tmp_path / "runs" / "breastmnist" / "vit_tiny" / "seed0" / "model"
    capsys.readouterr()
    files = [str(image), str(tmp_path / "case.npy")]
    assert main(["predict", str(model_dir), *files]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prediction"] in ("malignant", "normal, benign") for r in rows] == [True, True]
    assert all(abs(sum(r["scores"].values()) - 1) < 1e-5 for r in rows)
    assert main(["predict", str(model_dir), str(tmp_path / "missing.png")]) == 2
    assert "missing.png: file not found" in capsys.readouterr().err


class StopAfterFirstEpoch(Callback):
    """Stands in for a killed run: training ends after epoch 0, with its last.ckpt written."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            trainer.should_stop = True


def _last_state(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    data = tmp_path / "data"
    write_npz(data, "breastmnist")
    straight = load_config(None, _overrides(data, tmp_path / "a", epochs=2, **{"loss.mixup": 0.2}))
    train_classifier(straight, make_plots=False)
    resumed = load_config(None, _overrides(data, tmp_path / "b", epochs=2, **{"loss.mixup": 0.2}))
    train_classifier(resumed, make_plots=False, callbacks=[StopAfterFirstEpoch()])
    result = train_classifier(resumed, make_plots=False)
    assert result["resumed_from"] and result["resumed_from"].endswith("last.ckpt")
    a, b = _last_state(straight.run_dir), _last_state(resumed.run_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_run_folder_is_never_resumed_under_another_config(tmp_path, capsys):
    data = tmp_path / "data"
    write_npz(data, "breastmnist")
    values = _overrides(data, tmp_path / "runs", epochs=1)
    cfg = load_config(None, values)
    train_classifier(cfg, make_plots=False, callbacks=[StopAfterFirstEpoch()])
    stored = json.loads((cfg.run_dir / "run_config.json").read_text())
    assert stored["trainer"]["max_epochs"] == 1
    # A longer run in the same folder would otherwise continue the 1-epoch run's cosine schedule from its checkpoint.
    assert main(["train", *cli_args({**values, "trainer.max_epochs": 3, "optim.lr": 0.01})]) == 2
    err = capsys.readouterr().err
    assert str(cfg.run_dir) in err and "optim.lr" in err and "trainer.max_epochs" in err
    # Cosmetic settings do not count: the same run with progress bars on resumes.
    again = load_config(None, {**values, "trainer.progress": True})
    assert train_classifier(again, make_plots=False)["resumed_from"]
    # --no-resume starts over, and the new config becomes the folder's.
    assert main(["train", "--no-resume", *cli_args({**values, "trainer.max_epochs": 2})]) == 0
    assert json.loads((cfg.run_dir / "run_config.json").read_text())["trainer"]["max_epochs"] == 2


@pytest.mark.parametrize("bf16_cpu", [False, True], ids=["sequential-fp32", "side-by-side-bf16"])
def test_demo_compares_the_three_arms_and_names_its_runs_by_what_they_trained(
    tmp_path, tiny_llm, capsys, monkeypatch, bf16_cpu
):
    real = Path(__file__).parents[1].parent / "shared" / "data" / "medmnist"
    if not (real / "breastmnist.npz").is_file():
        pytest.skip(f"real BreastMNIST file is absent from {real}")
    # Both paths, whatever this CPU is: bf16 autocast also runs (slower) where the CPU emulates it.
    monkeypatch.setattr("medboost.pipelines.demo.native_cpu_bf16", lambda: bf16_cpu)
    out = tmp_path / "demo"
    args = ["demo", "--epochs", "1", "--output-dir", str(out), "--data-dir", str(real), "--no-download"]
    assert main([*args, "--block", tiny_llm]) == 0
    printed = capsys.readouterr().out
    assert "vit+llm" in printed and "vit+random-block" in printed and "AUC" in printed
    assert ("side by side" in printed) == bf16_cpu
    summary = json.loads((out / "breastmnist" / "summary.json").read_text())
    assert [r["model"] for r in summary["rows"]] == ["vit", "vit+llm", "vit+random-block"]
    block = "bf16-mixed" if bf16_cpu else "32-true"
    assert [r["precision"] for r in summary["rows"]] == ["32-true", block, block]
    runs = {str(Path(r["run_dir"]).relative_to(out)) for r in summary["rows"]}
    name = Path(tiny_llm).name
    tag = "-bf16-mixed" if bf16_cpu else ""
    assert runs == {
        "breastmnist/vit/1ep-seed0",
        f"breastmnist/vit_{name}/1ep-seed0{tag}",
        f"breastmnist/vit_random_{name}/1ep-seed0{tag}",
    }
    for run in runs:
        assert (out / run / "result.json").is_file() and (out / run / "model" / "config.json").is_file()
    # One epoch of warm-up learns nothing on real BreastMNIST (test AUC ~0.45, ACC the majority rate): no score
    # threshold holds, but the table must report each arm's own run exactly.
    for row in summary["rows"]:
        result = json.loads((Path(row["run_dir"]) / "result.json").read_text())
        assert (row["test_acc"], row["test_auc"]) == (result["test"]["test_acc"], result["test"]["test_auc"])
        assert (row["best_epoch"], row["val_auc"]) == (result["best_epoch"], result["best_val"])
        assert (row["parameters"], row["trainable_parameters"]) == (
            result["model"]["parameters"],
            result["model"]["trainable_parameters"],
        )
    for row in summary["rows"]:  # each run was trained in the precision its row names
        stored = json.loads((Path(row["run_dir"]) / "result.json").read_text())["config"]
        assert stored["trainer"]["precision"] == row["precision"]
    vit, boosted, random_block = summary["rows"]
    assert vit["trainable_parameters"] == vit["parameters"]
    assert vit["trainable_parameters"] < boosted["trainable_parameters"] < boosted["parameters"]  # adapters; frozen L
    # The control has the same shape: same parameter counts, other (random) frozen weights.
    assert (random_block["parameters"], random_block["trainable_parameters"]) == (
        boosted["parameters"],
        boosted["trainable_parameters"],
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, values: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)
    cfg = load_config(None, values)
    train_classifier(cfg, make_plots=False)


@pytest.mark.slow
def test_ddp_two_processes_counts_every_test_sample_once(tmp_path):
    # 7 test samples over 2 processes: the distributed sampler pads to 8; metrics must see exactly 7.
    data = tmp_path / "data"
    write_npz(data, "breastmnist", n_splits={"train": 16, "val": 5, "test": 7})
    values = _overrides(
        data, tmp_path / "runs", **{"trainer.strategy": "ddp", "trainer.devices": 2, "trainer.accelerator": "cpu"}
    )
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), values), nprocs=2, join=True)
    result = json.loads((tmp_path / "runs" / "breastmnist" / "vit_tiny" / "seed0" / "result.json").read_text())
    assert result["test_report"]["n"] == 7
    assert sum(sum(row) for row in result["test_report"]["confusion_matrix"]) == 7


def test_bad_inputs_exit_non_zero_with_one_message(tmp_path, capsys):
    data = tmp_path / "data"
    write_npz(data, "breastmnist", train_images=np.zeros((20, 27, 28), dtype=np.uint8))
    assert main(["train", *cli_args(_overrides(data, tmp_path / "runs"))]) == 2
    err = capsys.readouterr().err
    assert "breastmnist.npz" in err and "train_images" in err
    assert main(["train", "--optim.lrr", "0.1"]) == 2
    assert "unknown key optim.lrr; did you mean optim.lr?" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: recipe not found" in capsys.readouterr().err
    write_npz(data, "breastmnist")
    assert main(["train", *cli_args(_overrides(data, tmp_path / "runs", **{"model.name": "vit_huge"}))]) == 2
    assert "unknown model 'vit_huge'" in capsys.readouterr().err


def _weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in itertools.chain(module.parameters(), module.buffers())]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


class WeightRecorder(Callback):
    """Follows a run's weights: the raw weights after every optimizer step and, computed here independently, their EMA
    (``torch.optim.swa_utils.get_ema_avg_fn``: a copy at the first step, then ``decay * ema + (1 - decay) * w``);
    the weights validation and test evaluate (at their first batch, after every callback's epoch-start hook); and the
    dtype of the classifier head's output per stage."""

    def __init__(self, decay: float):
        self.decay = decay
        self.ema: list[torch.Tensor] | None = None
        self.raw_at: dict[int, list[torch.Tensor]] = {}
        self.ema_at: dict[int, list[torch.Tensor]] = {}
        self.validated_at: dict[int, list[torch.Tensor]] = {}
        self.tested: list[torch.Tensor] | None = None
        self.head_dtypes: dict[str, set[torch.dtype]] = {}

    def on_fit_start(self, trainer, pl_module):
        def hook(module, inputs, out):
            self.head_dtypes.setdefault(trainer.state.stage.value, set()).add(out.dtype)

        pl_module.model.head.register_forward_hook(hook)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        raw = _weights(pl_module)
        self.ema = raw if self.ema is None else [self.decay * e + (1 - self.decay) * w for e, w in zip(self.ema, raw)]
        self.raw_at[trainer.global_step], self.ema_at[trainer.global_step] = raw, self.ema

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.validated_at[trainer.global_step] = _weights(pl_module)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.tested = _weights(pl_module)


def test_bf16_mixed_precision_with_ema_and_early_stopping(tmp_path):
    data = tmp_path / "data"
    write_easy_npz(data, "nodulemnist3d")
    decay = 0.9
    values = _overrides(
        data,
        tmp_path / "runs",
        "nodulemnist3d",
        epochs=3,
        **{"trainer.precision": "bf16-mixed", "trainer.ema_decay": decay, "trainer.patience": 1, "loss.cutmix": 1.0},
    )
    values["model.kwargs"] = dict(TINY_VIT, patch_size=14)
    cfg = load_config(None, values)
    recorder = WeightRecorder(decay)
    result = train_classifier(cfg, make_plots=False, callbacks=[recorder])
    # bf16 is really used: autocast runs the Linear layers in bfloat16 in every stage, over float32 weights.
    assert recorder.head_dtypes == {"train": {torch.bfloat16}, "validate": {torch.bfloat16}, "test": {torch.bfloat16}}
    assert {w.dtype for w in recorder.tested} == {torch.float32}
    # The easy task: the validation AUC is 1.0 after epoch 0 and cannot improve, so patience 1 stops after epoch 1 of 3.
    assert [(e["epoch"], e["val_auc"]) for e in result["history"]] == [(0, 1.0), (1, 1.0)]
    assert result["best_epoch"] == 0 and result["test"]["test_auc"] >= 0.9
    # Validation evaluates the EMA weights (Lightning swaps them in), and they are not the raw weights.
    assert sorted(recorder.validated_at) == [6, 12]  # 48 training samples in batches of 8, twice
    for step, weights in recorder.validated_at.items():
        assert (_same(weights, recorder.ema_at[step]), _same(weights, recorder.raw_at[step])) == (True, False), step
    # Test evaluates the EMA weights of the selected checkpoint too, and they are what the run saves as its model.
    best_step = torch.load(result["best_checkpoint"], weights_only=False)["global_step"]
    assert best_step == 6
    tested = (_same(recorder.tested, recorder.ema_at[best_step]), _same(recorder.tested, recorder.raw_at[best_step]))
    assert tested == (True, False), "(tested == EMA, tested == raw): test must evaluate the EMA weights"
    assert _same(_weights(load_pretrained(cfg.run_dir / "model")), recorder.ema_at[best_step])


def test_trainer_monitor_chooses_the_selection_metric_and_minimises_a_loss(tmp_path):
    data = tmp_path / "data"
    write_npz(data, "breastmnist")
    cfg = load_config(None, _overrides(data, tmp_path / "runs", epochs=3, **{"trainer.monitor": "val_loss"}))
    result = train_classifier(cfg, make_plots=False)
    losses = {e["epoch"]: e["val_loss"] for e in result["history"]}
    assert result["monitor"] == "val_loss" and len(losses) == 3
    assert result["best_epoch"] == min(losses, key=losses.get)
    assert result["best_val"] == pytest.approx(min(losses.values()))


def test_a_monitor_the_task_never_logs_is_one_message_and_leaves_no_folder(tmp_path, capsys):
    data = tmp_path / "data"
    write_npz(data, "breastmnist")
    values = _overrides(data, tmp_path / "runs", epochs=1, **{"trainer.monitor": "val_nope"})
    assert main(["train", *cli_args(values)]) == 2
    err = capsys.readouterr().err
    assert "trainer.monitor 'val_nope'" in err and "val_auc" in err and "Traceback" not in err
    assert not load_config(None, values).run_dir.exists()


def test_native_cpu_bf16_reads_the_cpu_flags(tmp_path):
    from medboost.pipelines.demo import native_cpu_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert native_cpu_bf16(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert native_cpu_bf16(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert not native_cpu_bf16(cpuinfo)
    assert not native_cpu_bf16(tmp_path / "absent")  # not Linux: no flags, no bf16 path
