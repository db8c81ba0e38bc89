"""The run configuration on jsonargparse, the quiet command line, and a resumed run that keeps its whole history."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cli_args import cli_args
from synthetic_data import write_npz

from medboost.cli import main
from medboost.engine.config import (
    ClassificationRunConfig,
    SegmentationRunConfig,
    known_keys,
    load_config,
    parse_run_args,
)
from medboost.errors import ConfigError

REPO = Path(__file__).parents[1]
BREAST = REPO / "configs" / "r-llm" / "breastmnist.yaml"
HIPPOCAMPUS = REPO / "configs" / "medvisionllama" / "hippocampus.yaml"


def test_overrides_are_typed_and_nested():
    cfg = parse_run_args(
        ["-c", str(BREAST), "--optim.lr", "5e-4", "--trainer.devices=2", "--seed", "3", "--data.resize", "null"]
    )
    assert isinstance(cfg, ClassificationRunConfig)
    assert cfg.optim.lr == 5e-4 and cfg.trainer.devices == 2 and cfg.seed == 3 and cfg.data.resize is None
    assert cfg.model.kwargs["booster"]["block"]["source"] == "smollm2-135m"  # the recipe's value survives
    # An override reaches inside a dict section; limit_*_batches keep int (batches) apart from float (fraction).
    cfg = parse_run_args(["-c", str(BREAST), "--model.kwargs.booster", "null", "--trainer.limit_train_batches", "3"])
    assert cfg.model.kwargs["booster"] is None and cfg.model.kwargs["patch_size"] == 4
    assert cfg.trainer.limit_train_batches == 3 and isinstance(cfg.trainer.limit_train_batches, int)
    assert load_config(None, {"optim.lr": "5e-4", "data.resize": 224}).optim.lr == 5e-4


def test_the_task_decides_the_data_section():
    cfg = parse_run_args(["-c", str(HIPPOCAMPUS), "--data.roi_size", "[16, 16, 16]"])
    assert isinstance(cfg, SegmentationRunConfig) and cfg.data.roi_size == [16, 16, 16]
    with pytest.raises(ConfigError, match="unknown key data.dataset"):
        parse_run_args(["-c", str(HIPPOCAMPUS), "--data.dataset", "breastmnist"])
    with pytest.raises(ConfigError, match="unknown task 'detection'; known: classification, segmentation"):
        parse_run_args(["--task", "detection"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optim:\n  lrr: 1\n", r"bad.yaml: unknown key optim.lrr; did you mean optim.lr\?"),
        ("datta: {}\n", r"bad.yaml: unknown key datta; did you mean data\?"),
        ("trainer:\n  max_epochs: many\n", r"bad.yaml: trainer.max_epochs: Expected int. Got value: many"),
        ("data:\n  batch_size: [1, 2]\n", r"bad.yaml: data.batch_size: Expected int"),
        ("optim:\n  milestones: [0.5, soon]\n", r"bad.yaml: optim.milestones"),
        ("optim:\n  schedule: linear\n", r"bad.yaml: optim.schedule: .*cosine.*linear"),
        ("task: segmentation\ndata:\n  normalize: minmax\n", r"bad.yaml: data.normalize"),
        ("optim: [1, 2", "bad.yaml: invalid YAML"),
        ("- 1\n", "bad.yaml: a recipe is a mapping of sections, got list"),
    ],
)
def test_a_bad_recipe_names_the_file_and_the_key(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(bad)


def test_a_bad_override_names_the_command_line_and_the_closest_key():
    with pytest.raises(
        ConfigError, match=r"\+ command line: unknown key trainer.max_epoch; did you mean trainer.max_e"
    ):
        parse_run_args(["-c", str(BREAST), "--trainer.max_epoch", "3"])
    with pytest.raises(ConfigError, match=r"^command line: trainer.max_epochs: Expected int. Got value: many$"):
        parse_run_args(["--trainer.max_epochs", "many"])
    with pytest.raises(ConfigError, match="missing.yaml: recipe not found"):
        parse_run_args(["-c", "missing.yaml"])


def test_print_config_prints_a_recipe_that_loads_back_to_the_same_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "-c", str(BREAST), "--optim.lr", "1e-4", "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["optim"]["lr"] == 1e-4
    (tmp_path / "printed.yaml").write_text(printed)
    again = load_config(tmp_path / "printed.yaml")
    assert again == load_config(BREAST, {"optim.lr": 1e-4})


def test_help_lists_every_key_with_its_type_default_and_doc(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key in known_keys():
        assert f"--{key}" in text, key
    assert "--trainer.ema_decay EMA_DECAY exponential moving average of the weights" in text
    assert "(type: float | null, default: null)" in text
    assert "--no-resume" in text and "--verbose" in text


def _tiny_run(data: Path, out: Path, epochs: int) -> list[str]:
    values = {
        "data.dataset": "breastmnist",
        "data.data_dir": str(data),
        "data.batch_size": 8,
        "data.verify_md5": False,
        "model.name": "vit_tiny",
        "model.kwargs": {"patch_size": 7, "dim": 32, "depth": 2, "heads": 2},
        "optim.warmup_epochs": 1,
        "trainer.max_epochs": epochs,
        "trainer.progress": False,
        "output_dir": str(out),
    }
    return ["train", *cli_args(values)]


def _cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen(
        [sys.executable, "-m", "medboost.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kwargs,
    )


def _finish(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out
    return out


def test_a_run_killed_mid_epoch_resumes_with_its_whole_history(tmp_path):
    """A real ``kill -9`` of ``medboost train`` in its third epoch, then the same command: the result, the history
    in result.json and logs/metrics.csv equal those of an uninterrupted run, epoch by epoch."""
    data = tmp_path / "data"
    write_npz(data, "breastmnist", n_splits={"train": 4000, "val": 40, "test": 40})
    epochs = 3
    straight = _finish(_cli(_tiny_run(data, tmp_path / "straight", epochs)))
    assert "Tip" not in straight and "GPU available" not in straight and "eval mode" not in straight

    args = _tiny_run(data, tmp_path / "killed", epochs)
    run_dir = tmp_path / "killed" / "breastmnist" / "vit_tiny" / "seed0"
    proc = _cli(args)
    metrics = run_dir / "logs" / "metrics.csv"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) == 3):  # header + epochs 0 and 1
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.5)  # into the third epoch (an epoch takes seconds)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "result.json").exists(), "the kill came too late: the run had finished"
    _finish(_cli(args))

    a = json.loads((tmp_path / "straight" / "breastmnist" / "vit_tiny" / "seed0" / "result.json").read_text())
    b = json.loads((run_dir / "result.json").read_text())
    assert b["resumed_from"] and b["test"] == a["test"]
    assert [row["epoch"] for row in b["history"]] == list(range(epochs))
    assert b["history"] == a["history"]
    csv_a = (tmp_path / "straight" / "breastmnist" / "vit_tiny" / "seed0" / "logs" / "metrics.csv").read_text()
    assert metrics.read_text() == csv_a and len(csv_a.splitlines()) == epochs + 1


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path, capsys):
    data = tmp_path / "data"
    write_npz(data, "breastmnist")
    # A learning rate this large makes the loss non-finite in the first steps: the run stops with one message.
    args = _tiny_run(data, tmp_path / "runs", 2) + ["--optim.lr", "1e30", "--optim.warmup_epochs", "0"]
    assert main(args) == 2
    assert "non-finite training loss" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "breastmnist" / "vit_tiny" / "seed0").exists()
