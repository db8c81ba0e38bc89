"""The frozen LLM block in bfloat16 on this CPU: step time and test metric against float32, side by side.

    python benchmarks/bf16_block.py              # step times (interleaved repeats) + one training run per variant
    python benchmarks/bf16_block.py --timing-only

Variants of the ViT + SmolLM2-135M last layer arm of the CPU recipe (``medboost.pipelines.demo``):

- ``fp32``: everything float32 (``trainer.precision: 32-true``), the benchmark default;
- ``block-bf16``: the frozen block stored and run in bfloat16 (``booster.block.dtype: bfloat16``), the trainable
  ViT and adapters in float32; the block's output is cast back to float32;
- ``bf16-mixed``: Lightning's ``bf16-mixed`` (CPU autocast) for the whole model, block in float32 storage.

Step time: forward + backward + AdamW step on one training batch, the variants interleaved over ``--repeats`` rounds
(this machine is noisy: each round times every variant once), median and min per variant, and the ratio to fp32 in
the same round. Metric: each variant trained with the same recipe and seed; validation-selected test ACC/AUC.
Results: ``benchmarks/results/bf16_block.{md,json}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from bench_io import RUNS, run, write_report

from medboost.engine.config import ModelConfig, RunConfig
from medboost.engine.records import environment
from medboost.engine.trainer import finished_result
from medboost.pipelines.classification import build_datamodule, build_model, train_classifier
from medboost.pipelines.demo import CPU_EPOCHS, cpu_recipe, vit_kwargs

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "medmnist"
VARIANTS = ("fp32", "block-bf16", "bf16-mixed")
#: Timed beside the variants (not trained): the ViT without the block, the floor any variant can approach.
NO_BLOCK = "no-block ViT (fp32)"


def variant_config(variant: str, epochs: int, data_dir: str, runs: Path) -> RunConfig:
    block = {"source": "smollm2-135m", "dtype": "bfloat16" if variant == "block-bf16" else "float32"}
    model = ModelConfig("vit_tiny_llm", dict(vit_kwargs(2), booster={"block": block}))
    if variant == NO_BLOCK:
        model = ModelConfig("vit_tiny", vit_kwargs(2))
    cfg = cpu_recipe("breastmnist", model, f"breastmnist/{variant}/seed0", 0, epochs, str(runs), data_dir)
    cfg.trainer.progress = False
    cfg.trainer.precision = "bf16-mixed" if variant == "bf16-mixed" else "32-true"
    return cfg


def step_timer(cfg: RunConfig):
    """A function that runs one training step of ``cfg``'s model on one batch and returns its seconds."""
    dm = build_datamodule(cfg)
    dm.setup()
    model = build_model(cfg, dm).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr)
    x, y = next(iter(dm.train_dataloader()))[:2]
    autocast = cfg.trainer.precision == "bf16-mixed"

    def step() -> float:
        start = time.perf_counter()
        # Lightning's bf16-mixed on CPU is this autocast context around forward (and the loss).
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    for _ in range(2):  # warm-up: oneDNN picks its kernels on the first calls
        step()
    return step


def time_variants(cfgs: dict[str, RunConfig], repeats: int) -> dict[str, dict]:
    timers = {v: step_timer(cfg) for v, cfg in cfgs.items()}
    times: dict[str, list[float]] = {v: [] for v in cfgs}
    for _ in range(repeats):
        for v, step in timers.items():
            times[v].append(step())
    ratios = {v: [t / f for t, f in zip(times[v], times["fp32"])] for v in cfgs}
    return {
        v: {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "median_ratio_to_fp32": statistics.median(ratios[v]),
            "batch": cfgs[v].data.batch_size,
        }
        for v, ts in times.items()
    }


def markdown(report: dict) -> str:
    lines = [
        f"`{report['command']}`",
        "",
        f"{report['date']} · torch {report['environment']['versions']['torch']} · "
        f"{report['environment']['cpu_threads']} CPU threads · ViT + SmolLM2-135M last layer on BreastMNIST",
        "",
        "| variant | step median (s) | step min (s) | ratio to fp32 (median of rounds) | test ACC | test AUC | "
        "best epoch | s/epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, t in report["timing"].items():
        r = report.get("runs", {}).get(v)
        metric = (
            f"{r['test_acc']:.3f} | {r['test_auc']:.3f} | {r['best_epoch']} | {r['seconds_per_epoch']:.1f}"
            if r
            else "| | |"
        )
        lines.append(f"| {v} | {t['median_s']:.3f} | {t['min_s']:.3f} | {t['median_ratio_to_fp32']:.2f} | {metric} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--timing-only", action="store_true")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--epochs", type=int, default=CPU_EPOCHS["breastmnist"])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--runs-dir", default=str(RUNS / "bf16"))
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    variants = ["fp32", *[v for v in args.variants if v != "fp32"]]  # fp32 is every ratio's reference
    cfgs = {v: variant_config(v, args.epochs, args.data_dir, Path(args.runs_dir)) for v in [*variants, NO_BLOCK]}
    report = {
        "command": "python " + " ".join(["benchmarks/bf16_block.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "cpu_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None,
        "timing": time_variants(cfgs, args.repeats),
        "configs": {v: cfg.to_dict() for v, cfg in cfgs.items()},
    }
    out = Path(args.results) / "bf16_block"
    if not args.timing_only:
        report["runs"] = {}
        for v, cfg in cfgs.items():
            if v == NO_BLOCK:
                continue
            print(f"training {v}", flush=True)
            r = finished_result(cfg) or train_classifier(cfg, make_plots=False)
            report["runs"][v] = {k: r["test"][f"test_{k[5:]}"] for k in ("test_acc", "test_auc")} | {
                "best_epoch": r["best_epoch"],
                "val_auc": r["best_val"],
                "seconds_per_epoch": r["seconds_per_epoch"],
            }
            write_report(out, report, markdown)  # keep finished variants
    print(write_report(out, report, markdown).read_text())
    return 0


if __name__ == "__main__":
    run(main)
