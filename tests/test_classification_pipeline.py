"""End to end: the real CLI and pipeline on tiny synthetic MedMNIST files, resume, DDP, predict, save/load."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from synthetic_data import write_npz

from medboost.cli import main
from medboost.engine.config import load_config
from medboost.models import load_pretrained
from medboost.pipelines.classification import train_classifier

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


def _args(values: dict) -> list[str]:
    return [token for key, value in values.items() for token in (f"--{key}", json.dumps(value))]


@pytest.mark.parametrize("dataset", ["breastmnist", "chestmnist", "retinamnist", "nodulemnist3d"])
def test_cli_train_writes_a_complete_run(tmp_path, tiny_llm, dataset, capsys):
    data = tmp_path / "data"
    write_npz(data, dataset)
    kwargs = dict(TINY_VIT, booster={"block": {"source": tiny_llm, "layer": -1}, "residual": "hybrid"})
    values = _overrides(data, tmp_path / "runs", dataset, "vit_tiny_llm", **{"model.kwargs": kwargs})
    assert main(["train", *_args(values)]) == 0
    run = tmp_path / "runs" / dataset / "vit_tiny_llm" / "seed0"
    result = json.loads((run / "result.json").read_text())
    assert 0.0 <= result["test"]["test_auc"] <= 1.0 and 0.0 <= result["test"]["test_acc"] <= 1.0
    assert result["test_report"]["n"] == 6
    assert result["data"]["md5"] and result["environment"]["versions"]["torch"]
    assert result["model"]["trainable_parameters"] < result["model"]["parameters"]  # the block is frozen
    for figure in ("roc_test.png", "training_curves.png"):
        assert (run / "figures" / figure).stat().st_size > 1000
    assert "test ACC" in capsys.readouterr().out
    # A saved model is usable without the training code and reproduces the run's test scores.
    model = load_pretrained(run / "model")
    assert sum(p.numel() for p in model.parameters()) == result["model"]["parameters"]


def test_predict_and_saliency_from_image_files(tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "data"
    write_npz(data, "breastmnist")
    assert main(["train", *_args(_overrides(data, tmp_path / "runs"))]) == 0
    image = tmp_path / "case.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)).save(image)
    np.save(tmp_path / "case.npy", np.random.default_rng(1).random((28, 28)))
    model_dir = tmp_path / "runs" / "breastmnist" / "vit_tiny" / "seed0" / "model"
    capsys.readouterr()
    files = [str(image), str(tmp_path / "case.npy")]
    assert main(["predict", str(model_dir), *files, "--saliency", str(tmp_path / "cam")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prediction"] in ("malignant", "normal, benign") for r in rows] == [True, True]
    assert all(abs(sum(r["scores"].values()) - 1) < 1e-5 for r in rows)
    assert (tmp_path / "cam" / "case_gradcam.png").stat().st_size > 1000
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
    assert main(["train", *_args({**values, "trainer.max_epochs": 3, "optim.lr": 0.01})]) == 2
    err = capsys.readouterr().err
    assert str(cfg.run_dir) in err and "optim.lr" in err and "trainer.max_epochs" in err
    # Cosmetic settings do not count: the same run with progress bars on resumes.
    again = load_config(None, {**values, "trainer.progress": True})
    assert train_classifier(again, make_plots=False)["resumed_from"]
    # --no-resume starts over, and the new config becomes the folder's.
    assert main(["train", "--no-resume", *_args({**values, "trainer.max_epochs": 2})]) == 0
    assert json.loads((cfg.run_dir / "run_config.json").read_text())["trainer"]["max_epochs"] == 2


def test_demo_compares_both_arms_and_names_its_runs_by_what_they_trained(tmp_path, tiny_llm, capsys):
    real = Path(__file__).parents[1].parent / "shared" / "data" / "medmnist"
    if not (real / "breastmnist.npz").is_file():
        pytest.skip(f"real BreastMNIST file is absent from {real}")
    out = tmp_path / "demo"
    args = ["demo", "--epochs", "1", "--output-dir", str(out), "--data-dir", str(real), "--no-download"]
    assert main([*args, "--block", tiny_llm]) == 0
    printed = capsys.readouterr().out
    assert "vit+llm" in printed and "AUC" in printed
    summary = json.loads((out / "breastmnist" / "summary.json").read_text())
    assert [r["model"] for r in summary["rows"]] == ["vit", "vit+llm"]
    assert all(0 <= r["test_auc"] <= 1 and r["trainable_parameters"] > 0 for r in summary["rows"])
    runs = {str(Path(r["run_dir"]).relative_to(out)) for r in summary["rows"]}
    assert runs == {"breastmnist/vit/1ep-seed0", f"breastmnist/vit_{Path(tiny_llm).name}/1ep-seed0"}
    for run in runs:
        assert (out / run / "result.json").is_file() and (out / run / "model" / "config.json").is_file()


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
    assert main(["train", *_args(_overrides(data, tmp_path / "runs"))]) == 2
    err = capsys.readouterr().err
    assert "breastmnist.npz" in err and "train_images" in err
    assert main(["train", "--optim.lrr", "0.1"]) == 2
    assert "unknown key(s) lrr" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: recipe not found" in capsys.readouterr().err
    write_npz(data, "breastmnist")
    assert main(["train", *_args(_overrides(data, tmp_path / "runs", **{"model.name": "vit_huge"}))]) == 2
    assert "unknown model 'vit_huge'" in capsys.readouterr().err


def test_bf16_mixed_precision_with_ema_and_early_stopping(tmp_path):
    data = tmp_path / "data"
    write_npz(data, "nodulemnist3d")
    values = _overrides(
        data,
        tmp_path / "runs",
        "nodulemnist3d",
        epochs=3,
        **{"trainer.precision": "bf16-mixed", "trainer.ema_decay": 0.9, "trainer.patience": 1, "loss.cutmix": 1.0},
    )
    values["model.kwargs"] = dict(TINY_VIT, patch_size=14)
    result = train_classifier(load_config(None, values), make_plots=False)
    assert 0.0 <= result["test"]["test_auc"] <= 1.0 and len(result["history"]) >= 2
