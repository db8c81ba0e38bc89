"""Runs side by side (:mod:`medboost.pipelines.parallel`): each worker gets its share of the threads before the
OpenMP runtime loads (without it a worker kept a second spinning thread, 3x slower), a failure is raised and not
lost, and the MedMNIST benchmark's ``--jobs`` trains each pending run once and reuses finished ones."""

import json
import os
import sys
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
    with pytest.raises(SystemExit):
        medmnist_boost.main([*args, "--jobs", "0"])
