"""Runs side by side (:mod:`medboost.pipelines.parallel`): each worker gets its share of the threads before the
OpenMP runtime loads (without it a worker kept a second spinning thread, 3x slower), a failure is raised and not
lost, and the MedMNIST benchmark's ``--jobs`` trains each pending run once and reuses finished ones."""

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from medboost.pipelines.parallel import run_in_processes, threads_per_job

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import medmnist_boost  # noqa: E402

REAL = Path(__file__).parents[1].parent / "shared" / "data" / "medmnist"


def test_threads_per_job_shares_the_cores_and_refuses_zero_jobs():
    assert threads_per_job(2, total=2) == 1
    assert threads_per_job(3, total=2) == 1  # never zero
    assert threads_per_job(4, total=16) == 4
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        threads_per_job(0)


def test_workers_start_with_their_thread_share_and_the_parent_environment_is_restored():
    before = os.environ.get("OMP_NUM_THREADS")
    calls = {"a": ("OMP_NUM_THREADS",), "b": ("OMP_NUM_THREADS",)}
    assert run_in_processes(os.getenv, calls, jobs=2, threads=1) == {"a": "1", "b": "1"}
    assert run_in_processes(torch.get_num_threads, {"a": (), "b": ()}, jobs=2, threads=1) == {"a": 1, "b": 1}
    assert os.environ.get("OMP_NUM_THREADS") == before


def test_a_failed_call_is_raised_after_the_others_finish():
    finished = {}
    with pytest.raises(ValueError, match="invalid literal"):
        run_in_processes(int, {"ok": ("3",), "bad": ("x",)}, jobs=2, on_done=finished.__setitem__)
    assert finished == {"ok": 3}


def test_benchmark_jobs_trains_pending_runs_side_by_side_then_reuses_them(tmp_path, capsys):
    if not (REAL / "breastmnist.npz").is_file():
        pytest.skip(f"real BreastMNIST file is absent from {REAL}")
    args = ["--datasets", "breastmnist", "--arms", "vit", "resnet18", "--seeds", "0", "--epochs", "1"]
    args += ["--data-dir", str(REAL), "--runs-dir", str(tmp_path / "runs"), "--results", str(tmp_path)]
    args += ["--resamples", "20", "--jobs", "2"]
    assert medmnist_boost.main(args) == 0
    printed = capsys.readouterr().out
    assert "2 run(s) to train, 2 at a time" in printed
    report = json.loads((tmp_path / "medmnist_boost.json").read_text())
    assert list(report["datasets"]["breastmnist"]["arms"]) == ["vit", "resnet18"]
    for arm in ("vit", "resnet18"):
        result = json.loads((tmp_path / "runs" / "breastmnist" / arm / "seed0" / "result.json").read_text())
        assert result["environment"]["cpu_threads"] == threads_per_job(2)  # trained in a worker, not here
    assert medmnist_boost.main(args) == 0  # everything finished: nothing trains again
    assert "0 run(s) to train" in capsys.readouterr().out
    # --report-only (the runs a GPU call brought back): nothing trains, an arm with an unfinished seed is named, and
    # the report states the environment the runs trained in, not this one.
    partial = [*args[:5], "vit+mlp-only", *args[5:], "--report-only", "--tag", "assembled"]
    assert medmnist_boost.main(partial) == 0
    assembled = json.loads((tmp_path / "assembled.json").read_text())
    assert list(assembled["datasets"]["breastmnist"]["arms"]) == ["vit", "resnet18"]
    assert assembled["datasets"]["breastmnist"]["unfinished"] == ["vit+mlp-only"]
    assert assembled["environment"]["cpu_threads"] == threads_per_job(2) and assembled["environment"]["report_only"]
    assert "nothing trained in this invocation" in (tmp_path / "assembled.md").read_text()
    assert not (tmp_path / "runs" / "breastmnist" / "vit+mlp-only").exists()
    with pytest.raises(SystemExit):
        medmnist_boost.main([*args, "--jobs", "0"])


def test_no_call_starts_after_stop_at_and_the_left_out_ones_are_not_in_the_result():
    # One call per free worker, never queued ahead (a queued call would start after the time is up: that let two
    # one-hour runs start past a benchmark's budget): the first `jobs` calls run, no later one.
    calls = {i: (1.0,) for i in range(6)}
    for jobs in (1, 2):
        out = run_in_processes(time.sleep, calls, jobs=jobs, threads=1, stop_at=time.perf_counter() + 0.5)
        assert out == {i: None for i in range(jobs)}


def test_budget_reports_only_the_arms_whose_seeds_all_finished(tmp_path, monkeypatch):
    monkeypatch.setattr(medmnist_boost, "train_unfinished", lambda *a, **k: {})  # the budget ran out at once
    args = ["--datasets", "breastmnist", "--arms", "vit", "resnet18", "--seeds", "0", "--epochs", "1"]
    args += ["--runs-dir", str(tmp_path / "runs"), "--results", str(tmp_path), "--budget-min", "0.01"]
    assert medmnist_boost.main(args) == 0
    report = json.loads((tmp_path / "medmnist_boost.json").read_text())["datasets"]["breastmnist"]
    assert report["arms"] == {} and report["unfinished"] == ["vit", "resnet18"]
    assert "Not finished within the budget" in (tmp_path / "medmnist_boost.md").read_text()
    assert not (tmp_path / "runs").exists()  # nothing trained in this process either


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budget-min", "0"], "--budget-min must be > 0"),
        (["--recipe", "deit224", "--datasets", "adrenalmnist3d"], "2D datasets only"),
        (["--recipe", "deit224", "--quick"], "2D datasets only"),
    ],
)
def test_bad_budget_or_recipe_is_a_usage_error(extra, message, capsys):
    with pytest.raises(SystemExit) as stop:
        medmnist_boost.main(extra)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_deit224_recipe_is_the_papers_config_with_the_arms_model(tiny_llm):
    if not (REAL / "breastmnist.npz").is_file():
        pytest.skip(f"real BreastMNIST file is absent from {REAL}")
    from medboost.pipelines.classification import build_datamodule, build_model

    arm = medmnist_boost.arms(2, {"smollm2-135m": tiny_llm}, "deit224")
    assert arm["vit"].name == "vit_small" and arm["vit+smollm2"].name == "vit_small_llm"
    assert arm["resnet18"].kwargs == {"small_input": False}
    cfg = medmnist_boost.recipe(
        "breastmnist", arm["vit+smollm2"], "vit+smollm2", 1, 3, str(REAL), Path("r"), "cpu", "deit224"
    )
    assert (cfg.data.resize, cfg.data.batch_size, cfg.trainer.precision) == (224, 256, "bf16-mixed")
    assert (cfg.loss.mixup, cfg.loss.cutmix, cfg.trainer.max_epochs, cfg.seed) == (0.8, 1.0, 3, 1)
    assert cfg.run_dir == Path("r/deit224/breastmnist/vit+smollm2/seed1")
    dm = build_datamodule(cfg)
    dm.setup()
    x = dm.dataset("test")[0][0]
    assert x.shape == (3, 224, 224)
    assert build_model(cfg, dm).eval()(x[None]).shape == (1, 2)


def test_segmentation_runs_train_in_workers_too_and_other_tasks_are_refused(tmp_path):
    from synthetic_data import make_2d

    from medboost.engine.config import load_config
    from medboost.pipelines.parallel import train_in_processes

    values = {
        "task": "segmentation",
        "data.root": str(make_2d(tmp_path / "em", n=8)),
        "data.roi_size": [32, 32],
        "data.batch_size": 2,
        "data.val_fraction": 0.25,
        "data.test_fraction": 0.25,
        "data.write_predictions": False,
        "model.name": "unet",
        "model.kwargs": {"channels": [4, 8], "strides": [2]},
        "trainer.max_epochs": 1,
        "optim.warmup_epochs": 0,
        "output_dir": str(tmp_path / "runs"),
    }
    cfg = load_config(None, values)
    (result,) = train_in_processes({"unet": cfg}, jobs=1).values()
    assert result["test_metrics"]["n_volumes"] == 2 and (cfg.run_dir / "result.json").is_file()
    other = load_config(None, {k: v for k, v in values.items() if not k.startswith(("data.", "task"))})
    other.task = "vision_language"
    with pytest.raises(ValueError, match="task 'vision_language' is not supported"):
        train_in_processes({"vl": other}, jobs=1)
