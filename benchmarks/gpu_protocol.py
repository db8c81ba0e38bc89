"""The MedMNIST boost benchmark at GPU budgets, prepared here and run as one command on a lent GPU machine.

    python benchmarks/gpu_protocol.py prepare                      # here: blocks, data, wheels into .gpu-protocol/
    python benchmarks/gpu_protocol.py command                      # prints the device command and what to carry
    python benchmarks/gpu_protocol.py run --out OUT                # there (what `command` prints runs this)
    python benchmarks/gpu_protocol.py unpack OUT                   # here: result.json files into benchmarks/runs/
    python benchmarks/gpu_protocol.py report                       # here: both reports from the runs that came back

Two parts, in this order, each under a start budget (no run starts after it; the runs already started finish), so
one call of ~10 minutes returns whatever finished instead of nothing; a part still running shortly before the call's
end is killed with its workers (``PACK_MARGIN_MIN``), so the archive of finished runs is always written, and
``report`` assembles a killed part's report here:

1. ``protocol100``: the MedMNIST v2 protocol's 100 epochs for the six arms (ViT, + SmolLM2, + Gemma-3, + random block,
   MLP-only, ResNet-18) on BreastMNIST, RetinaMNIST and AdrenalMNIST3D, 3 seeds, with the tuned recipe otherwise
   (``medmnist_boost.py --epochs 100``);
2. ``deit224``: R-LLM's own 224 px recipe (ViT-S/16, DeiT training, bf16-mixed; ``--recipe deit224``) with the real
   SmolLM2 and Gemma-3 blocks on BreastMNIST, 3 seeds, at ``--deit-epochs`` (default 100: the paper's 400 would not
   fit one call beside part 1; a run folder is reused only under the same epochs).

Runs train a dozen at a time (``--jobs``: small models leave the GPU mostly idle; one CPU thread each). The GPU
machine has no network and no PyPI weight packages: ``prepare`` exports the SmolLM2 and Gemma-3 last layers as
one-layer safetensors folders, copies the three MedMNIST files and downloads the wheels medboost needs beyond that
machine's image. Paths are relative to the repository root, so a later call finds the same configs and reuses the
runs that finished before (their committed ``result.json`` files travel with the working tree).

Outputs (at most 8 files come back from the device): ``OUT/medmnist_boost_gpu100.{md,json}``,
``OUT/medmnist_boost_gpu_deit224.{md,json}``, their Grad-CAM figures under ``OUT/figures/``, and
``OUT/gpu_protocol_runs.tar.gz`` with every finished run's ``result.json`` and the call's status (each part's
budget, minutes and error if any).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
INPUTS = ".gpu-protocol"  # relative to the repository root, as every path a run's config stores
RUNS_DIR = "benchmarks/runs/gpu"
DATASETS = ("breastmnist", "retinamnist", "adrenalmnist3d")
PRESETS = {"smollm2-135m": "smollm2-last-layer", "gemma3-270m": "gemma3-last-layer"}

#: What medboost needs beyond the GPU machine's image (``.library/device/KINDS.md``: it has torch, lightning,
#: transformers, safetensors, einops, rich, scikit-learn, matplotlib, ...), as pure-Python wheels.
WHEELS = ("monai", "nibabel", "jsonargparse", "docstring_parser", "typeshed_client", "importlib_resources", "gguf")

#: The parts in order, each with the share of the call's minutes it may start runs in (None: what is left). The
#: 100-epoch protocol comes first and gets most: it answers the issue's question on all three sets.
PARTS = {"protocol100": 0.7, "deit224": None}
#: Minutes kept after the last start budget for the runs still training, the reports and the archive.
FINISH_MARGIN_MIN = 2.5
#: Minutes before the call's end at which a part still running is killed (its finished runs are kept), so that the
#: archive is always written: per-run times on the device are not known in advance, and a call cut off by the
#: device tool's limit would bring back nothing.
PACK_MARGIN_MIN = 0.4
#: How a part runs: the benchmark script in its own process group, so a deadline can stop its workers too.
BENCHMARK = [sys.executable, str(REPO / "benchmarks" / "medmnist_boost.py")]


def prepare(dest: Path) -> None:
    """Write everything the GPU machine cannot fetch into ``dest`` (~45 MB)."""
    from gpu_check import export_last_layer

    dest.mkdir(parents=True, exist_ok=True)
    for preset, folder in PRESETS.items():
        export_last_layer(preset, dest / folder)
    (dest / "medmnist").mkdir(exist_ok=True)
    for name in DATASETS:
        shutil.copy2(SHARED / "medmnist" / f"{name}.npz", dest / "medmnist" / f"{name}.npz")
    wheels = dest / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    pinned = [f"{name}=={metadata.version(name)}" for name in WHEELS]  # the versions the test suite ran with here
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(wheels)]
        + ["--python-version", "3.12", "--implementation", "py", "--platform", "any", *pinned],
        check=True,
    )
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) / 2**20
    print(f"prepared {dest} ({size:.0f} MiB): {', '.join(sorted(p.name for p in dest.iterdir()))}")


def device_command(minutes: float, jobs: int) -> str:
    """The one shell command for the device tool (run from the repository root, ``OUT`` set there)."""
    return (
        f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "
        f"{INPUTS}/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 && "
        f"python3 benchmarks/gpu_protocol.py run --out $OUT --minutes {minutes:g} --jobs {jobs}"
    )


def part_args(
    part: str, inputs: str, out: Path, jobs: int, budget_min: float | None, deit_epochs: int, note: str | None = None
) -> list[str]:
    """``medmnist_boost.py`` arguments of one part (``budget_min`` None: no budget, as ``report`` needs)."""
    sources = [f"{preset}={inputs}/{folder}" for preset, folder in PRESETS.items()]
    common = ["--accelerator", "gpu", "--jobs", str(jobs), "--no-ablations"]
    common += ["--budget-min", f"{budget_min:.2f}"] if budget_min else []
    common += ["--data-dir", f"{inputs}/medmnist", "--runs-dir", RUNS_DIR, "--results", str(out), "--source", *sources]
    note = note or f"GPU protocol ({part}): {jobs} runs at a time on one GPU, one CPU thread each; gpu_protocol.py"
    if part == "protocol100":
        # The 3D set first: its runs are the longest, and short ones started last fit the end of the budget.
        return [
            *common,
            "--datasets",
            *reversed(DATASETS),
            "--epochs",
            "100",
            "--tag",
            "medmnist_boost_gpu100",
            "--note",
            note,
        ]
    return [*common, "--recipe", "deit224", "--datasets", "breastmnist", "--epochs", str(deit_epochs)] + [
        "--tag",
        "medmnist_boost_gpu_deit224",
        "--note",
        note,
    ]


def require_inputs(command: str, inputs: str, remedy: str) -> None:
    """Exit with one message naming what ``prepare`` writes and ``command`` lacks."""
    missing = [p for p in [f"{inputs}/{f}" for f in PRESETS.values()] + [f"{inputs}/medmnist"] if not Path(p).exists()]
    if missing:
        sys.exit(f"gpu_protocol {command}: {', '.join(missing)} missing: {remedy}")


def run_part(argv: list[str], deadline: float) -> dict:
    """One part as its own process, killed with its workers at ``deadline`` (a ``time.perf_counter()`` value)."""
    process = subprocess.Popen([*BENCHMARK, *argv], start_new_session=True)
    try:
        code = process.wait(timeout=max(deadline - time.perf_counter(), 0))
    except subprocess.TimeoutExpired:
        # The group may have ended between the timeout and the kill: that must not cost the archive either.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return {
            "ok": False,
            "error": "killed at the call's deadline: its finished runs are in the archive "
            "(`gpu_protocol.py report` assembles them here)",
        }
    return {"ok": True} if code == 0 else {"ok": False, "error": f"medmnist_boost.py exited with code {code}"}


def run(out: Path, minutes: float, jobs: int, deit_epochs: int, inputs: str = INPUTS) -> dict:
    """Both parts within ``minutes`` of wall time; returns the status (also packed into the archive)."""
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_protocol run: no CUDA device (this is the GPU part; `prepare` runs here)")
    require_inputs("run", inputs, f"run `prepare` here and carry {inputs}")
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(REPO)  # the configs store paths relative to the repository root
    started = time.perf_counter()
    deadline = started + 60 * (minutes - PACK_MARGIN_MIN)
    status: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "minutes": minutes, "parts": {}}
    # The first part may start runs for up to PARTS' share of the time; the second has what is left.
    for part, share in PARTS.items():
        left = minutes - (time.perf_counter() - started) / 60 - FINISH_MARGIN_MIN
        budget = min(left, share * minutes) if share else left
        if budget < 0.5:
            status["parts"][part] = {"skipped": f"{left:.1f} min left"}
            continue
        part_start = time.perf_counter()
        # One part failing or overrunning must not lose the other's results.
        status["parts"][part] = run_part(part_args(part, inputs, out, jobs, budget, deit_epochs), deadline)
        status["parts"][part].update(budget_min=budget, minutes=(time.perf_counter() - part_start) / 60)
        print(part, json.dumps(status["parts"][part], indent=1), flush=True)
    status["wall_minutes"] = (time.perf_counter() - started) / 60
    pack_runs(Path(RUNS_DIR), out / "gpu_protocol_runs.tar.gz", status)
    return status


def pack_runs(runs: Path, archive: Path, status: dict) -> None:
    """Every finished run's result.json (paths relative to the repository root) and the status, as one archive."""
    with tarfile.open(archive, "w:gz") as tar:
        for result in sorted(runs.rglob("result.json")):
            tar.add(result, arcname=str(result))
        data = json.dumps(status, indent=1).encode()
        info = tarfile.TarInfo("gpu_protocol_status.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def report(results: Path, deit_epochs: int, inputs: str = INPUTS) -> None:
    """Here, after ``unpack``: both parts' reports assembled from the runs that came back (``--report-only``: for a
    part the deadline killed, whose report the device could not write)."""
    import medmnist_boost

    os.chdir(REPO)
    # The reports read the data files the runs were configured with (class shares, FLOP counts).
    require_inputs("report", inputs, "run `python benchmarks/gpu_protocol.py prepare` first")
    for part in PARTS:
        note = (
            f"GPU protocol ({part}): the runs trained on the GPU machine (`gpu_protocol.py run`), this report "
            "assembled here from the result.json files that came back (`gpu_protocol.py report`)"
        )
        argv = [*part_args(part, inputs, results, 1, None, deit_epochs, note), "--report-only"]
        if medmnist_boost.trained_environment(medmnist_boost.planned_runs(medmnist_boost.parse_args(argv))) is None:
            print(f"{part}: no run of it finished, no report")
            continue
        medmnist_boost.main(argv)


def unpack(out: Path) -> list[str]:
    """Extract the archive a device call brought back into the repository (result.json files only)."""
    archive = out / "gpu_protocol_runs.tar.gz"
    if not archive.is_file():
        sys.exit(f"gpu_protocol unpack: {archive} not found")
    names = []
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            target = REPO / member.name
            inside = target.resolve().is_relative_to((REPO / RUNS_DIR).resolve())
            if member.name == "gpu_protocol_status.json":
                print(tar.extractfile(member).read().decode())
            elif inside and member.name.endswith("/result.json"):
                tar.extract(member, REPO, filter="data")
                names.append(member.name)
    print(f"unpacked {len(names)} result.json file(s) from {archive} into {RUNS_DIR}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="here: blocks, data and wheels into .gpu-protocol/")
    p.add_argument("--dest", default=str(REPO / INPUTS))
    c = sub.add_parser("command", help="print the device command")
    r = sub.add_parser("run", help="on the GPU machine")
    r.add_argument("--out", required=True)
    for q in (c, r):
        q.add_argument("--minutes", type=float, default=9.0, help="wall time of the whole call (the limit is 10)")
        q.add_argument("--jobs", type=int, default=12, help="runs at a time (16 CPU cores there)")
    u = sub.add_parser("unpack", help="here: the returned result.json files into benchmarks/runs/gpu")
    u.add_argument("out")
    a = sub.add_parser("report", help="here, after unpack: both reports from the returned runs (nothing trains)")
    a.add_argument("--results", default="benchmarks/results", help="relative to the repository root")
    for q in (r, a):
        q.add_argument("--deit-epochs", type=int, default=100, help="epochs of the 224 px recipe (the paper's: 400)")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(Path(args.dest))
    elif args.command == "command":
        print(device_command(args.minutes, args.jobs))
        print(f'carry: ["{INPUTS}"]; timeout_s: {int(args.minutes * 60) + 30}')
    elif args.command == "run":
        status = run(Path(args.out), args.minutes, args.jobs, args.deit_epochs)
        return 0 if all(part.get("ok") for part in status["parts"].values()) else 1
    elif args.command == "report":
        report(Path(args.results), args.deit_epochs)
    else:
        unpack(Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
