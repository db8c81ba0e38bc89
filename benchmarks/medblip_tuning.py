"""Tuning MedBLIP's image path on IXI, on VALIDATION only.

    python benchmarks/medblip_tuning.py                        # every candidate, seed 0
    python benchmarks/medblip_tuning.py --candidates m1 m2     # some of them (rows of earlier calls are kept)

Each candidate is the benchmark's ``medblip`` arm (``configs/medblip/ixi-cpu.yaml`` with the data and budget of
``benchmarks/vision_language.py``, seed 0) set back to the first CPU recipe (:data:`BASE`), with a few changes;
``m0`` is that first recipe itself (the first full benchmark's seed-0 run). The table lists the best mean validation
accuracy over the three questions; each question's validation accuracy (beside its majority share) and AUC at that
epoch; and the last epoch's training losses: the two contrastive losses sit at ln(8) = 2.079 (batch 8, label
smoothing 0.1) when the image features tell the samples apart no better than chance. Test scores are written by
every run (the pipeline always tests the selected checkpoint) but are NOT read here; the test split is looked at
once, by ``benchmarks/vision_language.py``. Results go to ``benchmarks/results/medblip_tuning.{md,json}``.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import vision_language as vl
from bench_io import add_row, growing_report, run

from medboost.engine.config import RunConfig
from medboost.engine.trainer import finished_result
from medboost.pipelines.vision_language import build_datamodule, manifest_path, train_vision_language

RUNS = Path.home() / ".cache" / "medboost" / "bench-runs" / "vision_language"
QUESTIONS = ("sex", "age_group", "hippocampus")

#: The parts that start from random weights: the 3D patch embedding and its tokens, the norm in front of the
#: Q-Former, the queries, the Q-Former's cross-attention (BERT has none) and the projections.
NEW_PARTS = (
    "image_encoder.*",
    "ln_vision.*",
    "qformer.query_tokens",
    "*.crossattention.*",
    "vision_proj.*",
    "text_proj.*",
    "qa_proj.*",
    "llm_proj.*",
)
CONV8 = {"stem": "conv", "patch_size": 8}  # a 3-stage convolutional tokenizer, 4^3 = 64 tokens at 32^3


def _change(encoder: dict | None = None, new_lr: float | None = None, epochs: int | None = None, **kwargs):
    """A candidate's edit of the benchmark's config: image-encoder keys, a learning-rate multiplier for
    :data:`NEW_PARTS`, epochs, other MedBLIP keyword arguments."""

    def apply(cfg: RunConfig) -> None:
        model = dict(cfg.model.kwargs)
        if encoder:
            model["image_encoder"] = {**model["image_encoder"], **encoder}
        cfg.model.kwargs = {**model, **kwargs}
        if new_lr is not None:
            cfg.optim.lr_scale = dict.fromkeys(NEW_PARTS, new_lr)
        if epochs is not None:
            cfg.trainer.max_epochs = epochs

    return apply


#: name -> (what changes, edit of the benchmark's medblip config).
CANDIDATES: dict[str, tuple[str, Callable[[RunConfig], None]]] = {
    "m0": ("the first recipe: one 16^3 patch Conv3d (8 tokens), lr 1e-4 everywhere", _change()),
    "m1": ("conv stem, patch 8 (64 tokens)", _change(CONV8)),
    "m2": ("m1 + the new parts at 10x lr (1e-3)", _change(CONV8, new_lr=10)),
    "m3": ("m0's patch Conv3d + the new parts at 10x lr", _change(new_lr=10)),
    "m4": ("m2, 8 epochs", _change(CONV8, new_lr=10, epochs=8)),
    "m5": ("m2 + 32 queries (BLIP-2's)", _change(CONV8, new_lr=10, num_query_tokens=32)),
    "m6": ("m1, 8 epochs", _change(CONV8, epochs=8)),
    "m7": ("m1, the LLM loss only (no contrastive losses)", _change(CONV8, loss_weights={"itc_ehr": 0, "itc_qa": 0})),
}


#: Where every candidate starts: the first CPU recipe (the one the first full benchmark ran), whatever the recipe
#: file says now.
def BASE(cfg: RunConfig) -> None:
    encoder = {k: v for k, v in cfg.model.kwargs["image_encoder"].items() if k != "stem"}  # the patch stem
    cfg.model.kwargs = {**cfg.model.kwargs, "image_encoder": {**encoder, "patch_size": 16}, "num_query_tokens": 8}
    cfg.optim.lr_scale = {}
    cfg.trainer.max_epochs = 4
    cfg.trainer.monitor = None  # selection on validation accuracy (the table reads every epoch's AUC as well)


def candidate_config(name: str, runs: Path) -> RunConfig:
    budget = vl.BUDGETS["full"]
    cfg = vl.medblip_config("medblip", 0, budget, vl.data_section(budget, runs), runs)
    BASE(cfg)
    CANDIDATES[name][1](cfg)
    cfg.name = f"tuning/{name}/seed0"
    return cfg


def val_majority_shares(cfg: RunConfig) -> dict[str, float]:
    """Per question, the share of the validation split's most frequent answer."""
    dm = build_datamodule(cfg.data, manifest_path(cfg.data, None), cfg.seed)
    dm.setup()
    val = dm.dataset("val")
    answers: dict[str, list[str]] = {}
    for i, (_, question) in enumerate(val.items):
        answers.setdefault(question.key, []).append(val.texts(i)[2])
    return {k: Counter(v).most_common(1)[0][1] / len(v) for k, v in answers.items()}


def row(name: str, result: dict[str, Any]) -> dict[str, Any]:
    history = result["history"]
    best = next(e for e in history if e["epoch"] == result["best_epoch"])
    last = history[-1]
    return {
        "candidate": name,
        "what": CANDIDATES[name][0],
        "epochs": result["config"]["trainer"]["max_epochs"],
        "val_acc": result["best_val"],
        "val_question_acc": {q: best.get(f"val_{q}_acc") for q in QUESTIONS},
        "val_auc": best.get("val_auc"),
        "val_question_auc": {q: best.get(f"val_{q}_auc") for q in QUESTIONS},
        "best_epoch": result["best_epoch"],
        "val_auc_by_epoch": [e.get("val_auc") for e in history],
        "last_train_losses": {k: last.get(f"train_loss_{k}") for k in ("lm", "itc_ehr", "itc_qa")},
        "seconds_per_epoch": result["seconds_per_epoch"],
        "wall_minutes": result.get("wall_seconds", float("nan")) / 60,
        "trainable": result["model"].get("trainable_parameters"),
        "config": result["config"],
    }


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(report: dict) -> str:
    shares = report["val_majority_share"]
    lines = [
        *[f"`{c}`  " for c in report["commands"]],
        "",
        f"{report['date']} · torch {report['environment']['versions']['torch']} · "
        f"{report['environment']['cpu_threads']} CPU threads · seed 0 · validation split only (18 subjects, 54 "
        "samples) · " + report.get("note", ""),
        "",
        "Validation accuracy per question at the selected epoch (majority share of val: "
        + ", ".join(f"{q} {shares[q]:.3f}" for q in QUESTIONS)
        + "); last epoch's training losses (contrastive at chance: ln 8 = 2.079).",
        "",
        "| candidate | what | epochs | best val acc (mean) | sex | age group | hippocampus | val AUC there (mean) | "
        "sex | age group | hippocampus | best epoch | val AUC (mean) by epoch | train LM | train ITC ehr | "
        "train ITC qa | s/epoch | wall min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        q, auc, loss = r["val_question_acc"], r["val_question_auc"], r["last_train_losses"]
        lines.append(
            f"| {r['candidate']} | {r['what']} | {r['epochs']} | {r['val_acc']:.3f} | "
            + " | ".join(_num(q[k]) for k in QUESTIONS)
            + f" | {_num(r['val_auc'])} | "
            + " | ".join(_num(auc[k]) for k in QUESTIONS)
            + f" | {r['best_epoch']} | {' '.join(_num(a) for a in r.get('val_auc_by_epoch', []))} | "
            + " | ".join(_num(loss[k]) for k in ("lm", "itc_ehr", "itc_qa"))
            + f" | {r['seconds_per_epoch']:.0f} | {r['wall_minutes']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--runs-dir", default=str(RUNS))
    parser.add_argument("--results", default=str(vl.REPO / "benchmarks" / "results"))
    parser.add_argument("--note", default="", help="how the runs were made (threads, other jobs), for the report")
    args = parser.parse_args(argv)
    out = Path(args.results) / "medblip_tuning"
    report, rows = growing_report(out, "benchmarks/medblip_tuning.py", args.note)
    for name in args.candidates:
        cfg = candidate_config(name, Path(args.runs_dir))
        report.setdefault("val_majority_share", val_majority_shares(cfg))
        started = time.perf_counter()
        print(f"{name}: {CANDIDATES[name][0]}", flush=True)
        result = finished_result(cfg) or train_vision_language(cfg, make_plots=False)
        add_row(out, report, rows, row(name, result), CANDIDATES, markdown)
        print(f"  val acc {rows[name]['val_acc']:.3f} in {time.perf_counter() - started:.0f} s", flush=True)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    run(main)
