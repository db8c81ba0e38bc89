"""Does a frozen LLM block (with hybrid attention and multi-scale fusion) boost ViT segmentation? Same recipe,
budget, split and seeds for every arm.

    python benchmarks/segmentation_boost.py             # full: Hippocampus + ISBI 2012, 8 arms x 3 seeds
    python benchmarks/segmentation_boost.py --quick     # smoke-sized (< 15 min)

Arms: ViT-seg without block; + pre-trained SmolLM2 last layer; + random frozen block; + MLP-only control; ViT-seg
with hybrid attention and multi-scale fusion but no block; the full MedVisionLlama (block + hybrid + fusion); MONAI
UNETR; MONAI UNet. The subject splits are fixed and committed (benchmarks/splits/*.json). Selection on validation Dice
(mean over foreground classes), test on every test case by sliding windows. Prints mean +- std Dice per class and
HD95, parameters, seconds per epoch and each arm's epoch-time ratio to the no-block ViT measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench_io import run, write_report

from medboost.engine.config import ModelConfig, OptimConfig, RunConfig, SegmentationDataConfig, TrainerConfig
from medboost.engine.records import environment
from medboost.engine.trainer import finished_result
from medboost.pipelines.parallel import train_unfinished
from medboost.pipelines.segmentation import train_segmenter

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DATASETS = {
    "hippocampus": dict(
        root=SHARED / "msd" / "Task04_Hippocampus", roi=[32, 48, 32], split="hippocampus.json", batch_size=4
    ),
    "isbi2012": dict(root=SHARED / "em" / "isbi2012", roi=[128, 128], split="isbi2012.json", batch_size=4),
}
# Published nnU-Net level on Hippocampus (mean Dice over anterior and posterior), for reference.
NNUNET_HIPPOCAMPUS_DICE = 0.89
VIT = dict(patch_size=8, dim=192, depth=6, heads=3, feature_size=16)


def arms() -> dict[str, ModelConfig]:
    def seg(name: str, booster: dict | None = None, **extra) -> ModelConfig:
        kwargs = dict(VIT, **extra)
        if booster is not None:
            kwargs["booster"] = booster
        return ModelConfig(name, kwargs)

    block = {"block": {"source": "smollm2-135m"}}
    return {
        "vit-seg": seg("vit_seg"),
        "vit-seg+smollm2": seg("vit_seg", block),
        "vit-seg+random-block": seg("vit_seg", {"block": {"source": "smollm2-135m", "init": "random"}}),
        "vit-seg+mlp-only": seg("vit_seg", {"block": {"source": "smollm2-135m", "init": "none"}}),
        "vit-seg+hybrid+fusion": seg("vit_seg", hybrid=True, fusion=True),
        "medvisionllama": seg("medvisionllama", block),
        "unetr": ModelConfig("unetr", {"dim": VIT["dim"], "heads": VIT["heads"], "feature_size": 16}),
        "unet": ModelConfig("unet", {}),
    }


def recipe(
    dataset: str, model: ModelConfig, arm: str, seed: int, epochs: int, out: Path, train_fraction: float = 1.0
) -> RunConfig:
    d = DATASETS[dataset]
    data = SegmentationDataConfig(
        root=str(d["root"]),
        roi_size=d["roi"],
        split=str(REPO / "benchmarks" / "splits" / d["split"]),
        batch_size=d["batch_size"],
        train_fraction=train_fraction,
        write_predictions=False,
    )
    return RunConfig(
        task="segmentation",
        data=data,
        model=model,
        optim=OptimConfig(
            name="adamw", lr=5e-4, weight_decay=0.01, schedule="cosine", warmup_epochs=max(1, epochs // 10)
        ),
        trainer=TrainerConfig(max_epochs=epochs, progress=False),
        seed=seed,
        output_dir=str(out),
        name=f"{dataset}/{arm}/seed{seed}",
    )


def run_one(cfg: RunConfig) -> dict:
    # A finished run is reused (an interrupted one resumes from its last checkpoint instead).
    return finished_result(cfg) or train_segmenter(cfg)


def mean_std(values: list[float]) -> list[float]:
    values = [v for v in values if v is not None]
    if not values:
        return [float("nan"), float("nan")]
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def arm_summary(results: list[dict]) -> dict:
    per_class = {}
    for name in results[0]["test_metrics"]["per_class"]:
        per_class[name] = {
            m: mean_std([r["test_metrics"]["per_class"][name][m]["mean"] for r in results]) for m in ("dice", "hd95")
        }
    contributions = [r.get("booster_contribution") for r in results]
    return {
        "dice": mean_std([r["test_metrics"]["mean_foreground"]["dice"]["mean"] for r in results]),
        # The booster's contribution (boosted arms): the same checkpoints tested with the branch removed, and the
        # branch's output change relative to its input (0: the block's branch never grew).
        "dice_without_branch": mean_std([c["test_dice_without_branch"] for c in contributions])
        if all(contributions)
        else None,
        "relative_output_norm": mean_std([c["relative_output_norm"] for c in contributions])
        if all(contributions)
        else None,
        "hd95": mean_std([r["test_metrics"]["mean_foreground"]["hd95"]["mean"] for r in results]),
        "per_class": per_class,
        "seconds_per_epoch": statistics.fmean(r["seconds_per_epoch"] for r in results),
        "parameters": results[0]["model"]["parameters"],
        "trainable_parameters": results[0]["model"]["trainable_parameters"],
        "per_seed": [
            {
                "seed": r["config"]["seed"],
                "best_epoch": r["best_epoch"],
                "val_dice": r["best_val"],
                "test_dice": r["test_metrics"]["mean_foreground"]["dice"]["mean"],
                "booster_contribution": r.get("booster_contribution"),
            }
            for r in results
        ],
        "split_md5": results[0]["data"].get("split_md5"),
        "config": results[0]["config"],
    }


def _pm(pair) -> str:
    return f"{pair[0]:.3f} ± {pair[1]:.3f}" if pair else ""


def markdown(report: dict) -> str:
    lines = [
        f"`{report['command']}`",
        "",
        f"{report['date']} · torch {report['environment']['versions']['torch']} · wall time "
        f"{report['wall_seconds'] / 60:.1f} min",
        "",
        "Test split (every test case, sliding windows) at the checkpoint selected on validation Dice; mean ± std "
        'over seeds; HD95 in mm (voxels for 2D). Epoch-time ratio relative to the no-block ViT, same run. "Dice '
        'without branch": the same checkpoints tested with every booster\'s branch removed; "branch norm": the '
        "booster's output change relative to its input (0 = the booster does nothing).",
        "",
    ]
    for dataset, entry in report["datasets"].items():
        arms_ = entry["arms"]
        base = arms_.get("vit-seg")
        classes = list(next(iter(arms_.values()))["per_class"]) if arms_ else []
        head = "| arm | mean Dice | " + " | ".join(f"Dice {c}" for c in classes) + " | HD95 | Dice without branch | "
        head += "branch norm | params | trainable | s/epoch | epoch-time ratio |"
        share = entry.get("train_fraction", 1.0)
        cases = f", {share:.0%} of the training cases" if share < 1 else ""
        title = f"### {dataset} ({entry['epochs']} epochs{cases})"
        lines += [title, "", head, "|" + "---|" * (9 + len(classes))]
        for arm, a in arms_.items():
            ratio = a["seconds_per_epoch"] / base["seconds_per_epoch"] if base else float("nan")
            cells = " | ".join(
                f"{a['per_class'][c]['dice'][0]:.3f} ± {a['per_class'][c]['dice'][1]:.3f}" for c in classes
            )
            lines.append(
                f"| {arm} | {a['dice'][0]:.3f} ± {a['dice'][1]:.3f} | {cells} | {a['hd95'][0]:.2f} ± "
                f"{a['hd95'][1]:.2f} | {_pm(a.get('dice_without_branch'))} | {_pm(a.get('relative_output_norm'))} | "
                f"{a['parameters'] / 1e6:.2f} M | {a['trainable_parameters'] / 1e6:.2f} M"
                f" | {a['seconds_per_epoch']:.1f} | {ratio:.2f} |"
            )
        if dataset == "hippocampus":
            lines.append(f"| nnU-Net (published level) | ~{NNUNET_HIPPOCAMPUS_DICE} |" + " |" * (7 + len(classes)))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, Hippocampus only, 2 epochs on half the training cases"
    )
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--arms", nargs="+", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None)
    # Outside the work tree, so that a long run interrupted here can be completed by a later session on this machine.
    parser.add_argument(
        "--runs-dir",
        default=str(Path.home() / ".cache" / "medboost" / "bench-runs" / "segmentation"),
        help="run folders (--quick uses its quick/ subfolder, apart from the full runs)",
    )
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--tag", default=None, help="results file name (default segmentation_boost[_quick])")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train this many runs at once, one process each, the CPU threads shared equally; the report is then "
        "assembled from their result.json files",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    unknown = sorted(set(args.arms or ()) - set(arms()))
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; arms: {sorted(arms())}")
    # Sized so that the full run (2 datasets x 8 arms x 3 seeds = 48 runs) fits 3 hours on 2 CPU cores: measured
    # 172 min, ~69 s per Hippocampus epoch (182 crops + Dice on 26 validation volumes), ~5 min per Hippocampus run.
    epochs_for, train_fraction = {"hippocampus": 4, "isbi2012": 8}, 1.0
    if args.quick:  # a smoke run within 15 minutes: it shows the pipeline works, not which arm is better
        args.runs_dir = str(Path(args.runs_dir) / "quick")
        args.seeds, args.datasets, epochs_for, train_fraction = args.seeds[:1], ["hippocampus"], {"hippocampus": 2}, 0.5
    tag = args.tag or ("segmentation_boost_quick" if args.quick else "segmentation_boost")
    started = time.perf_counter()
    report = {
        "command": "python "
        + " ".join(["benchmarks/segmentation_boost.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "datasets": {},
    }
    plan = {
        dataset: {
            arm: [
                recipe(
                    dataset, model, arm, seed, args.epochs or epochs_for[dataset], Path(args.runs_dir), train_fraction
                )
                for seed in args.seeds
            ]
            for arm, model in arms().items()
            if not args.arms or arm in args.arms
        }
        for dataset in args.datasets
    }
    if args.jobs > 1:
        train_unfinished({(d, a, c.seed): c for d, p in plan.items() for a, cs in p.items() for c in cs}, args.jobs)
    for dataset, planned in plan.items():
        epochs = args.epochs or epochs_for[dataset]
        entry = report["datasets"].setdefault(dataset, {"epochs": epochs, "train_fraction": train_fraction, "arms": {}})
        for arm, cfgs in planned.items():
            results = []
            for cfg in cfgs:
                print(f"[{time.perf_counter() - started:7.0f} s] {dataset} {arm} seed {cfg.seed}", flush=True)
                results.append(run_one(cfg))
            entry["arms"][arm] = arm_summary(results)
            report["wall_seconds"] = time.perf_counter() - started
            write_report(Path(args.results) / tag, report, markdown)
    print((Path(args.results) / f"{tag}.md").read_text())
    return 0


if __name__ == "__main__":
    run(main)
