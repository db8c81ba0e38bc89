"""MedBLIP on IXI against its controls and a 3D CNN: one fixed subject split, the same seeds and budget for every arm.

    python benchmarks/vision_language.py            # full: 3 seeds x 8 epochs (~3.6 h at one thread; 118 min
                                                    # measured as two one-thread processes splitting --arms)
    python benchmarks/vision_language.py --quick    # 1 seed, 2 short epochs (10.5 min on 2 free cores)
    python benchmarks/vision_language.py --smoke --runs-dir /tmp/vl-runs --results /tmp/vl-results  # path check

Data: IXI T1 at 2 mm (``../shared/data/brain/ixi_2mm``), the committed subject split
``benchmarks/splits/ixi_vl.json`` (127 / 18 / 36 subjects), volumes preprocessed once at 32^3 and cached; three
questions per subject whose text does not state their answer (sex: the text gives age; age group: sex;
reduced hippocampal volume, an automatic DLMUSE pseudo-label: age and sex).

Arms (test split, checkpoint selected on the recipe's ``trainer.monitor``, the mean validation log-loss of the
candidate answers over the questions; mean +- std over seeds):

* ``medblip``: ``configs/medblip/ixi-cpu.yaml`` unchanged (the offline-default encoder: the last SmolLM2-135M layer,
  frozen; MiniLM Q-Former; frozen SmolLM2-135M), one model answering all three questions as a VQA model does,
  scored zero-shot by candidate log-likelihood (the free generated answer is reported beside it).
* ``text-only``: the same recipe with ``model.kwargs.mode: text`` and no image encoder (no image tokens; the learned
  queries as a soft prompt, so it trains as many soft tokens).
* ``cnn3d``: MONAI's ResNet-18 (3D, standard stride-2 stem) trained directly on the same cached volumes and split,
  one model per question, through the same engine (``fit_and_test``) and with the same epochs and share of batches.
* ``majority``: the most frequent training answer of each question.

Controls beside them: ``image-only`` (each trained ``medblip`` model evaluated with the EHR left out of every prompt:
``evaluate_saved(mode="image")``; it was trained with the text, so this measures what its image path carries, not
what an image-only model could learn; ``--arms image-trained`` adds a model trained in mode ``image``) and
``leakage`` (``data.leak_answer``: the answer written into the EHR text; must reach ~100%, proving the text path
works; one seed).

Finished runs are reused when the command is repeated (a run folder whose stored config differs is an error naming the
keys; an interrupted run resumes from its last checkpoint), so a long run can be completed in pieces. Results
(markdown + JSON with the command, date, versions, threads, data and split MD5 and every arm's config) go to
``benchmarks/results/vision_language[_quick].{md,json}``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from bench_io import run, write_report
from segmentation_boost import mean_std
from torch.utils.data import Dataset

from medboost.data.base import SplitDataModule
from medboost.data.splits import SPLITS, load_split, save_split
from medboost.data.vision_language import VisionLanguageDataModule, VisionLanguageDataset
from medboost.data.vl_manifest import write_ixi_manifest
from medboost.engine.config import LossConfig, ModelConfig, OptimConfig, RunConfig, load_config
from medboost.engine.records import environment, run_record, write_json
from medboost.engine.trainer import finished_result, fit_and_test, start_run
from medboost.errors import MedboostError
from medboost.metrics.paired import paired_difference
from medboost.pipelines.vision_language import (
    build_datamodule,
    evaluate_saved,
    manifest_path,
    read_predictions,
    train_vision_language,
)
from medboost.tasks.classification import ClassificationTask
from medboost.tasks.vision_language import UNPARSEABLE, candidate_auc, candidate_probabilities, question_metrics

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "medblip" / "ixi-cpu.yaml"
IXI_ROOT = REPO.parent / "shared" / "data" / "brain" / "ixi_2mm"
SPLIT_FILE = REPO / "benchmarks" / "splits" / "ixi_vl.json"
METRICS = ("acc", "balanced_acc", "auc")
# The paired comparison the target is about: does the image add anything beyond the text? Seed-paired test
# differences with a bootstrap interval over the test subjects (each question asks every subject once).
PAIRED = ("medblip", "text-only")
RESAMPLES = 1000


@dataclass(frozen=True)
class Budget:
    """The budget every trained arm gets: epochs and the share (float) or number (int) of training batches per
    epoch (a share gives every arm the same number of passes over its training samples), at ``size``^3."""

    seeds: tuple[int, ...]
    epochs: int
    train_batches: float | int
    size: int = 32
    subjects: int | None = None  # a subset of the split (smoke only): train/val/test subjects, about 6:2:4
    cnn_epochs: int | None = None  # the 3D CNN's epochs over every batch (None: ``epochs`` x ``train_batches``)


# How the budgets were sized: measured on this project's 2-core CPU machine with ONE thread (OMP_NUM_THREADS=1, another
# job running), batch 8 at 32^3, the recipe's precision 32-true (bf16-mixed in brackets):
#   MedBLIP image+text training step 3.1 s (2.55 s), text-only 2.2 s (1.63 s); validation step (candidate scoring)
#   3.2 s (2.0 s) in either mode; free generation at test 3.9 s per batch (4.2 s); model build ~15 s;
#   ResNet-18 3D step 0.7-1.0 s (DenseNet-121 0.73 s; MONAI's default stride-1 stem 2.1 s).
#   Per epoch (381 training samples = 48 batches, 54 validation samples = 7 batches): MedBLIP ~171 s, text-only
#   ~128 s, one CNN (127 samples, 16 batches) ~13 s; test (108 samples, 14 batches, scored + generated) ~100 s.
# bf16-mixed would save ~20% of a training step but quantises the candidate scores the AUC is computed from; every arm
# keeps the recipe's 32-true. Full: the recipe's own 4 epochs over every batch: predicted 99 min at one thread
# (MedBLIP 3 x 13.3 min, text-only 3 x 10.2, leakage 13.3, image-only 3 x 1.9, CNN 9 x 1.0), ~60-70 min with both
# cores free (assumed 1.4-1.6x from the second thread; not measured here). Quick: 1 seed, 2 epochs over 20% of the
# batches: predicted 13 min at one thread. Smoke (12 subjects, 16^3, one batch): measured 2.0 min at one thread.
# The recipe's conv stem (64 image tokens instead of 8) made a MedBLIP epoch ~211 s (measured, one thread, the other
# core busy): a MedBLIP run ~16 min. With the tuning's 8 epochs (benchmarks/results/medblip_tuning.md, m6) the full
# run would be ~3.6 h at one thread (MedBLIP 3 x 30 min, text-only 3 x ~20, leakage 30, CNN and image-only ~35):
# the full budget uses them (the val AUC of m6 still rose after epoch 4), run as two one-thread processes (~2 h).
# The CNN's budget is counted in compute, not epochs: one of its epochs (one question, 16 batches, ~13 s) costs ~1/13
# of a MedBLIP epoch (three questions), and at MedBLIP's 4 epochs (64 steps) it predicted one class on every
# question. It gets 12 epochs over every batch: per question less compute than MedBLIP's 4 epochs, and its test AUC is
# level with or above MedBLIP's 8-epoch one on every question (benchmarks/results/vision_language.md): not starved.
BUDGETS = {
    "full": Budget(seeds=(0, 1, 2), epochs=8, train_batches=1.0, cnn_epochs=12),
    "quick": Budget(seeds=(0,), epochs=2, train_batches=0.2, cnn_epochs=4),
    "smoke": Budget(seeds=(0,), epochs=1, train_batches=1, size=16, subjects=12),
}
LEAKAGE_SEEDS = 1  # the leakage control proves a path works; one seed suffices
ARMS = ("medblip", "text-only", "image-only", "leakage", "cnn3d", "majority")
OPTIONAL_ARMS = ("image-trained",)
# The CNN trains from scratch: AdamW at 10x the MedBLIP recipe's lr (its 1e-4 suits the pre-trained Q-Former);
# the same weight decay, warm-up + cosine schedule, clipping, epochs, batch size and share of batches.
CNN_OPTIM = OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-4, schedule="cosine", warmup_epochs=1, grad_clip=1.0)


# -- configs ----------------------------------------------------------------------------------------------------------
def medblip_config(arm: str, seed: int, budget: Budget, data: dict[str, Any], runs: Path) -> RunConfig:
    """The CPU recipe for one MedBLIP arm and seed: only the data paths, budget, mode and leakage switch differ."""
    cfg = load_config(RECIPE)
    cfg.data = dataclasses.replace(cfg.data, **data, size=budget.size, leak_answer=arm == "leakage")
    mode = {"text-only": "text", "image-trained": "image"}.get(arm, "image+text")
    cfg.model.kwargs = {**cfg.model.kwargs, "mode": mode}
    if mode == "text":  # no image path at all, so that its parameter counts are the ones it uses
        cfg.model.kwargs["image_encoder"] = None
        # ... and no learning rates for the image-path parts it does not have (the rest of the recipe is kept).
        image_parts = ("image_encoder.", "ln_vision.")
        cfg.optim.lr_scale = {k: v for k, v in cfg.optim.lr_scale.items() if not k.startswith(image_parts)}
    _set_budget(cfg, budget, seed, runs, arm)
    return cfg


def cnn_config(question: str, classes: int, seed: int, budget: Budget, data: dict[str, Any], runs: Path) -> RunConfig:
    """A 3D CNN for one question on the same data section (volumes, split, cache) as the MedBLIP arms."""
    cfg = load_config(RECIPE)
    cfg.data = dataclasses.replace(cfg.data, **data, size=budget.size)
    cfg.model = ModelConfig("monai_resnet18_3d", {"num_classes": classes, "question": question})
    cfg.optim = dataclasses.replace(CNN_OPTIM)
    _set_budget(cfg, budget, seed, runs, f"cnn3d-{question}")
    if budget.cnn_epochs is not None:
        cfg.trainer.max_epochs, cfg.trainer.limit_train_batches = budget.cnn_epochs, 1.0
    return cfg


def _set_budget(cfg: RunConfig, budget: Budget, seed: int, runs: Path, arm: str) -> None:
    cfg.trainer.max_epochs = budget.epochs
    cfg.trainer.limit_train_batches = budget.train_batches
    cfg.trainer.accelerator = "cpu"
    cfg.trainer.progress = False
    cfg.seed = seed
    cfg.output_dir = str(runs)
    cfg.name = f"ixi/{arm}/seed{seed}"


def data_section(budget: Budget, runs: Path) -> dict[str, Any]:
    """The data keys every arm shares: the IXI folder (or, for the smoke run, a subset manifest), the committed
    split and one volume cache."""
    shared = {"cache_dir": str(runs / "cache"), "split_file": str(SPLIT_FILE), "ixi_root": str(IXI_ROOT)}
    if budget.subjects is None:
        return shared
    manifest, split = subset_manifest(runs / "subset", budget.subjects)
    return {**shared, "ixi_root": None, "manifest": str(manifest), "split_file": str(split)}


def subset_manifest(folder: Path, subjects: int) -> tuple[Path, Path]:
    """The first subjects of each committed split (about 6:2:4 of ``subjects``) as a manifest with absolute image
    paths and its split file: the smoke run's data."""
    full = folder / "ixi_full.csv"
    if not full.is_file():
        write_ixi_manifest(IXI_ROOT, full)
    with full.open(newline="") as f:
        rows = {r["subject_id"]: r for r in csv.DictReader(f)}
    committed = load_split(SPLIT_FILE)
    counts = {
        "train": subjects // 2,
        "val": max(1, subjects // 6),
        "test": subjects - subjects // 2 - max(1, subjects // 6),
    }
    split = {s: [i for i in committed[s] if i in rows][: counts[s]] for s in SPLITS}
    out = folder / "ixi_subset.csv"
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(next(iter(rows.values()))))
        writer.writeheader()
        for s in SPLITS:
            writer.writerows({**rows[i], "image": str((folder / rows[i]["image"]).resolve())} for i in split[s])
    return out, save_split(split, folder / "split.json")


# -- the 3D CNN -------------------------------------------------------------------------------------------------------
class QuestionVolumes(Dataset):
    """One question's ``(volume, answer index)`` pairs out of a vision-language dataset (same rows and cache)."""

    def __init__(self, dataset: VisionLanguageDataset, question: str):
        self.dataset = dataset
        self.indices = [i for i, (_, q) in enumerate(dataset.items) if q.key == question]
        self.candidates = dataset.texts(self.indices[0])[3]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        row, _ = self.dataset.items[self.indices[j]]
        answer = self.dataset.texts(self.indices[j])[2]
        return self.dataset.cache.get(row), self.candidates.index(answer)


class QuestionDataModule(SplitDataModule[QuestionVolumes]):
    """The MedBLIP arms' data module (manifest, committed split, cached volumes) served as one question's volumes and
    labels, as the engine's classification task expects them."""

    def __init__(self, vl: VisionLanguageDataModule, question: str):
        super().__init__(vl.batch_size, vl.num_workers, vl.seed)
        self.vl, self.question = vl, question

    def build_datasets(self) -> dict[str, QuestionVolumes]:
        self.vl.setup()
        return {s: QuestionVolumes(self.vl.dataset(s), self.question) for s in SPLITS}

    def record(self) -> dict[str, Any]:
        return {**self.vl.record(), **super().record(), "question": self.question}


class QuestionCNNTask(ClassificationTask):
    """The engine's classification task with the MedBLIP task's metrics (:func:`question_metrics`: the same
    accuracy, balanced accuracy and AUC definitions for every arm; a one-class split gives NaN AUC, not an error)."""

    def __init__(self, model, candidates: list[str], optim: OptimConfig, seed: int):
        super().__init__(model, "multi-class" if len(candidates) > 2 else "binary-class", optim, LossConfig(), seed)
        self.candidates = candidates

    def _metrics(self, stage: str):
        gathered = self.gathered(stage)
        if gathered is None:
            return None
        logits, y, _ = gathered
        target, scores = y.numpy(), logits.numpy()
        table = question_metrics(target, scores, np.full(len(target), UNPARSEABLE), self.candidates)
        # log_loss: the recipe's selection metric, the same definition as the MedBLIP arms' (val_log_loss)
        metrics = {m: table[m] for m in (*METRICS, "log_loss")}
        return {"loss": float(self._loss(logits, y)), **metrics}, (target, scores)


def build_cnn(num_classes: int):
    """MONAI's ResNet-18 in 3D with the standard stem (7^3 stride-2 convolution + max-pool), one input channel."""
    from monai.networks.nets import resnet18

    return resnet18(
        spatial_dims=3, n_input_channels=1, num_classes=num_classes, conv1_t_size=7, conv1_t_stride=2, no_max_pool=False
    )


def train_cnn(cfg: RunConfig) -> dict[str, Any]:
    """Train one question's CNN through the engine (selection on the recipe's metric, test at that checkpoint) and
    write ``result.json`` (with the per-question table MedBLIP runs have) into its run folder."""
    started = start_run(cfg)
    question = cfg.model.kwargs["question"]
    vl = build_datamodule(cfg.data, manifest_path(cfg.data, cfg.run_dir / "manifest"), cfg.seed)
    dm = QuestionDataModule(vl, question)
    dm.setup()
    candidates = dm.dataset("train").candidates
    model = build_cnn(cfg.model.kwargs["num_classes"])
    task = QuestionCNNTask(model, candidates, cfg.optim, cfg.seed)
    outcome = fit_and_test(cfg, task, dm, monitor="val_log_loss", mode="min")  # the recipe's trainer.monitor wins
    outcome.pop("trainer")
    result = run_record(cfg, dm.record(), model, outcome)
    target, scores = task.test_outputs["labels"].reshape(-1), task.test_outputs["scores"]
    result["test_report"] = {question: question_metrics(target, scores, np.full(len(target), UNPARSEABLE), candidates)}
    result["wall_seconds"] = time.perf_counter() - started
    write_json(cfg.run_dir / "result.json", result)
    return result


# -- the controls -----------------------------------------------------------------------------------------------------
def image_only(run_dir: Path) -> dict[str, Any]:
    """A trained MedBLIP model evaluated on the test split with the EHR left out of every prompt; reused while the
    run's ``result.json`` is the one it was made from."""
    out = run_dir / "image_only.json"
    source = _md5(run_dir / "result.json")
    if out.is_file():
        stored = json.loads(out.read_text())
        if stored.get("source_result_md5") == source:
            return stored
    started = time.perf_counter()
    evaluated = evaluate_saved(run_dir, mode="image")
    record = {"source_result_md5": source, "mode": "image", **evaluated, "wall_seconds": time.perf_counter() - started}
    write_json(out, record)
    return record


def majority(cfg: RunConfig) -> dict[str, dict]:
    """Each question's most frequent training answer, predicted for every test sample."""
    dm = build_datamodule(cfg.data, manifest_path(cfg.data, Path(cfg.output_dir) / "majority"), cfg.seed)
    dm.setup()
    tables = {}
    for key in dict.fromkeys(q.key for _, q in dm.dataset("train").items):
        train = [dm.dataset("train").texts(i)[2] for i, (_, q) in enumerate(dm.dataset("train").items) if q.key == key]
        test = [dm.dataset("test").texts(i) for i, (_, q) in enumerate(dm.dataset("test").items) if q.key == key]
        candidates = test[0][3]
        answer = Counter(train).most_common(1)[0][0]
        target = np.array([candidates.index(t[2]) for t in test])
        scores = np.tile(np.where(np.array(candidates) == answer, 0.0, -1.0), (len(target), 1))
        tables[key] = question_metrics(target, scores, np.full(len(target), UNPARSEABLE), candidates)
        tables[key]["train_answer"] = answer
        # For reading only (never a baseline: it is chosen on test): a constant answer's best test accuracy, which
        # is above the majority arm's where the training and test splits' most frequent answers differ.
        test_answer, count = Counter(t[2] for t in test).most_common(1)[0]
        tables[key]["test_answer"], tables[key]["test_answer_share"] = test_answer, count / len(test)
    return {"tables": tables, "data": dm.record()}


# -- summaries --------------------------------------------------------------------------------------------------------
def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def data_md5(root: Path) -> str:
    """MD5 over the IXI inputs the manifest and volumes come from: every T1 volume, participants.csv and the ROI
    volumes, in name order."""
    digest = hashlib.md5(usedforsecurity=False)
    for path in [
        *sorted((root / "t1").glob("*_T1.nii.gz")),
        root / "participants.csv",
        root / "dlmuse_roi_volumes.csv",
    ]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def summarise_questions(tables: list[dict[str, dict]], generated: bool = True) -> dict[str, dict]:
    """Per question: mean +- std over runs of each metric (and of the generated-answer accuracy for the arms that
    generate answers), the candidates and the test size."""
    out = {}
    for key in tables[0]:
        rows = [t[key] for t in tables]
        entry = {m: mean_std([r[m] for r in rows]) for m in METRICS}
        if generated:
            entry["gen_acc"] = mean_std([r["gen_acc"] for r in rows])
        out[key] = {**entry, "n": rows[0]["n"], "candidates": rows[0]["candidates"]}
    return out


def run_summary(results: list[dict]) -> dict[str, Any]:
    """What the report keeps of a trained arm's runs: per-seed tables, sizes, timing, data MD5 and the config."""
    first = results[0]
    return {
        "seeds": [r["config"]["seed"] for r in results],
        "per_seed": [
            {
                "seed": r["config"]["seed"],
                "best_epoch": r["best_epoch"],
                "monitor": r.get("monitor"),
                "best_val": r["best_val"],
                "test": {k: {m: t[m] for m in (*METRICS, "gen_acc")} for k, t in r["test_report"].items()},
                "run_dir": str(Path(r["config"]["output_dir"]) / r["config"]["name"]),
            }
            for r in results
        ],
        "parameters": first["model"]["parameters"],
        "trainable_parameters": first["model"]["trainable_parameters"],
        "seconds_per_epoch": statistics.fmean(r["seconds_per_epoch"] for r in results),
        "run_seconds": statistics.fmean(r.get("wall_seconds", r["fit_seconds"]) for r in results),
        "data": {k: first["data"].get(k) for k in ("manifest_md5", "split_md5", "n_samples", "n_subjects")},
        "config": first["config"],
    }


def medblip_arm(arm: str, budget: Budget, data: dict, runs: Path, log) -> dict[str, Any]:
    seeds = budget.seeds[:LEAKAGE_SEEDS] if arm == "leakage" else budget.seeds
    results = []
    for seed in seeds:
        cfg = medblip_config(arm, seed, budget, data, runs)
        log(f"{arm} seed {seed}")
        results.append(finished_result(cfg) or train_vision_language(cfg, make_plots=False))
    summary = run_summary(results)
    return {**summary, "questions": summarise_questions([r["test_report"] for r in results])}


def cnn_arm(budget: Budget, data: dict, runs: Path, log) -> dict[str, Any]:
    from medboost.data.vision_language import resolve_questions

    questions, per_question = resolve_questions("ixi"), {}
    for q in questions:
        results = []
        for seed in budget.seeds:
            cfg = cnn_config(q.key, len(q.candidates), seed, budget, data, runs)
            log(f"cnn3d {q.key} seed {seed}")
            results.append(finished_result(cfg) or train_cnn(cfg))
        per_question[q.key] = run_summary(results)
        per_question[q.key]["questions"] = summarise_questions([r["test_report"] for r in results], generated=False)
    first = next(iter(per_question.values()))
    return {
        "questions": {k: v["questions"][k] for k, v in per_question.items()},
        "per_question_runs": per_question,
        "seeds": first["seeds"],
        "parameters": first["parameters"],  # per question's model (the age-group head has one more output row)
        "trainable_parameters": first["trainable_parameters"],
        "seconds_per_epoch": statistics.fmean(v["seconds_per_epoch"] for v in per_question.values()),
        "run_seconds": statistics.fmean(v["run_seconds"] for v in per_question.values()),
        "models": len(per_question),
        "config": {k: v["config"] for k, v in per_question.items()},
    }


def image_only_arm(budget: Budget, data: dict, runs: Path, log) -> dict[str, Any]:
    records = []
    for seed in budget.seeds:
        cfg = medblip_config("medblip", seed, budget, data, runs)
        if finished_result(cfg) is None:
            raise MedboostError(f"image-only needs the finished medblip run {cfg.run_dir} (run the medblip arm first)")
        log(f"image-only (EHR removed) seed {seed}")
        records.append(image_only(cfg.run_dir))
    return {
        "seeds": list(budget.seeds),
        "questions": summarise_questions([r["test_report"] for r in records]),
        "eval_seconds": statistics.fmean(r["wall_seconds"] for r in records),
        "config": "each medblip seed's saved model, evaluated with evaluate_saved(mode='image')",
    }


# -- paired differences -----------------------------------------------------------------------------------------------
def _accuracy(target: np.ndarray, scores: np.ndarray) -> float:
    return float((scores.argmax(axis=1) == target).mean())


def _auc(target: np.ndarray, scores: np.ndarray) -> float:
    value = candidate_auc(target, candidate_probabilities(scores), scores.shape[1])
    if math.isnan(value):  # paired_difference skips (and counts) such a resample
        raise ValueError("a resample in which no candidate has both outcomes has no AUC")
    return value


def paired_questions(arms: dict[str, dict], a: str, b: str, resamples: int = RESAMPLES) -> dict[str, dict]:
    """Per question: test accuracy and AUC of arm ``a`` minus arm ``b`` over the seeds both have, each seed's runs
    read back from their ``predictions.csv`` (the same definitions as the tables: argmax and softmax of the candidate
    scores), with the percentile bootstrap interval of :func:`~medboost.metrics.paired.paired_difference`."""
    dirs = [{r["seed"]: r["run_dir"] for r in arms[arm]["per_seed"]} for arm in (a, b)]
    seeds = sorted(dirs[0].keys() & dirs[1].keys())
    if not seeds:
        return {}
    preds = [[read_predictions(d[s]) for s in seeds] for d in dirs]
    out = {}
    for key in preds[0][0]:
        runs = [p[key] for p in (*preds[0], *preds[1])]
        if any(r.sample_ids != runs[0].sample_ids or r.candidates != runs[0].candidates for r in runs):
            raise MedboostError(f"{a} and {b} runs do not hold the same test cases of question {key!r}")
        scores_a, scores_b = [p[key].scores for p in preds[0]], [p[key].scores for p in preds[1]]
        out[key] = {
            "seeds": seeds,
            **{
                name: paired_difference(runs[0].target, scores_a, scores_b, metric, resamples=resamples)
                for name, metric in (("acc", _accuracy), ("auc", _auc))
            },
        }
    return out


# -- report -----------------------------------------------------------------------------------------------------------
def _without_note(argv: list[str]) -> list[str]:
    """The command line as recorded: the ``--note`` text is shown under the header, not repeated in the command."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--note":
            skip = True
        elif not item.startswith("--note="):
            out.append(item)
    return out


def _share(batches: float | int) -> str:
    return f"{batches:.0%}" if isinstance(batches, float) else f"{batches} batch(es)"


def _cell(pair) -> str:
    return "—" if pair is None else f"{pair[0]:.3f} ± {pair[1]:.3f}"


def targets(arms: dict[str, dict], paired: dict[str, dict] | None = None) -> list[str]:
    """The issue's targets, read off the means (a difference within one standard deviation is said to be so) and,
    against text-only, off the paired intervals."""
    lines = []
    if "medblip" not in arms:
        return lines
    mb = arms["medblip"]["questions"]

    def compare(other: str, label: str) -> None:
        if other not in arms:
            return
        parts, above = [], []
        for key, entry in mb.items():
            o = arms[other]["questions"][key]
            diff = entry["acc"][0] - o["acc"][0]
            noise = max(entry["acc"][1], o["acc"][1])
            above.append(diff > 0)
            within = " (within one std)" if abs(diff) <= noise else ""
            parts.append(f"{key} {diff:+.3f}{within}")
        verdict = "met" if all(above) else "not met"
        lines.append(f"- MedBLIP above {label} on every question (mean accuracy): **{verdict}** — " + ", ".join(parts))

    compare("text-only", "text-only")
    if paired:
        above = [k for k, d in paired.items() if d["acc"]["ci"][0] > 0]
        lines.append(
            "- MedBLIP above text-only with the paired 95% interval of the accuracy difference above 0: "
            + (", ".join(above) if above else "**on no question**")
            + f" (of {len(paired)}; intervals in the paired table)"
        )
    compare("majority", "majority")
    if "cnn3d" in arms:
        parts = [
            f"{k} acc {e['acc'][0] - arms['cnn3d']['questions'][k]['acc'][0]:+.3f}, "
            f"AUC {e['auc'][0] - arms['cnn3d']['questions'][k]['auc'][0]:+.3f}"
            for k, e in mb.items()
        ]
        lines.append("- MedBLIP against the 3D CNN (MedBLIP minus CNN): " + "; ".join(parts))
    if "leakage" in arms:
        accs = {k: e["acc"][0] for k, e in arms["leakage"]["questions"].items()}
        works = all(a >= 0.95 for a in accs.values())
        lines.append(
            f"- Leakage control (answer in the EHR): {', '.join(f'{k} {a:.3f}' for k, a in accs.items())} — the text "
            f"path {'works (>= 0.95 on every question)' if works else '**does not reach ~100%**: check the text path'}"
        )
    return lines


def markdown(report: dict) -> str:
    env, budget, arms = report["environment"], report["budget"], report["arms"]
    lines = [
        f"`{report['command']}`",
        "",
        f"{report['date']} · torch {env['versions']['torch']} · {env['cpu_threads']} CPU threads "
        f"(OMP_NUM_THREADS={report['omp_num_threads']}) · {env['cuda'] or 'no GPU'} · wall time "
        f"{report['wall_seconds'] / 60:.1f} min (runs reused from earlier invocations are not counted)",
        "",
        *([report["note"], ""] if report.get("note") else []),
        f"IXI T1 2 mm, data MD5 `{report['data_md5']}`; split `{report['split_file']}` (MD5 of the file "
        f"`{report['split_file_md5']}`, of its ids `{report['split_md5']}`), subjects {report['n_subjects']}; "
        f"manifest MD5 `{report['manifest_md5']}`. Budget for every trained arm: {budget['epochs']} epoch(s) x "
        f"{_share(budget['train_batches'])} of the training batches, batch 8, {budget['size']}^3, seeds "
        f"{list(budget['seeds'])} (leakage: {LEAKAGE_SEEDS} seed; the 3D CNN: {budget.get('cnn_epochs')} epoch(s) "
        "over every batch, less compute per question than MedBLIP's budget). Test split at the checkpoint selected on "
        f"`{report.get('selection', 'val_acc')}` (validation); mean ± std over seeds; AUC from the candidate scores "
        "(softmax over candidates).",
        "",
    ]
    for key, info in report["questions"].items():
        lines += [
            f"### {key} ({' / '.join(info['candidates'])}; {info['n']} test subjects; training majority "
            f"'{info['train_answer']}')",
            "",
            *(
                [
                    f"The most frequent test answer, '{info['test_answer']}', is {info['test_answer_share']:.3f} of "
                    "the test subjects: a model answering it always would score that (chosen on test, so not a "
                    "baseline; for reading).",
                    "",
                ]
                if info.get("test_answer_share", 0) > info.get("train_answer_share", 1)
                else []
            ),
            "| arm | accuracy | balanced accuracy | AUC | generated-answer accuracy |",
            "|---|---|---|---|---|",
        ]
        for arm, a in arms.items():
            q = a["questions"].get(key)
            if q is not None:
                lines.append(
                    f"| {arm} | {_cell(q['acc'])} | {_cell(q['balanced_acc'])} | {_cell(q['auc'])} | "
                    f"{_cell(q.get('gen_acc'))} |"
                )
        lines.append("")
    lines += [
        "### Cost",
        "",
        "| arm | models | parameters | trainable | s/epoch | s/run |",
        "|---|---|---|---|---|---|",
    ]
    for arm, a in arms.items():
        if "parameters" in a:
            lines.append(
                f"| {arm} | {a.get('models', 1)} x {len(a['seeds'])} seed(s) | {a['parameters'] / 1e6:.2f} M | "
                f"{a['trainable_parameters'] / 1e6:.2f} M | {a['seconds_per_epoch']:.1f} | {a['run_seconds']:.0f} |"
            )
        elif "eval_seconds" in a:
            lines.append(f"| {arm} | (evaluation only) | | | | {a['eval_seconds']:.0f} |")
    lines += [
        "",
        "Parameters count everything the arm builds (frozen encoder and LLM included); trainable = requires_grad. The "
        "text-only arm builds no image path; of its trainable parameters only the query tokens (its soft prompt) and "
        "the projection into the LLM get gradients (the Q-Former and the contrastive heads are not run in text mode).",
        "",
        *paired_lines(report.get("paired")),
        "### Targets",
        "",
        *targets(arms, (report.get("paired") or {}).get(" - ".join(PAIRED))),
        "",
    ]
    return "\n".join(lines)


def _interval(d: dict) -> str:
    skipped = f" ({d['skipped_resamples']} resamples skipped)" if d["skipped_resamples"] else ""
    return f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]{skipped}"


def paired_lines(paired: dict[str, dict] | None) -> list[str]:
    """The paired-difference table(s): per question and metric, the per-seed differences, their mean ± std and the
    bootstrap interval."""
    lines = []
    for pair, questions in (paired or {}).items():
        if not questions:
            continue
        seeds = next(iter(questions.values()))["seeds"]
        lines += [
            f"### Paired differences: {pair} (seeds {seeds}; test subjects resampled {RESAMPLES} times)",
            "",
            "| question | metric | per seed | mean ± std | 95% bootstrap interval of the mean |",
            "|---|---|---|---|---|",
        ]
        for key, entry in questions.items():
            for metric in ("acc", "auc"):
                d = entry[metric]
                per_seed = " / ".join(f"{v:+.3f}" for v in d["per_seed"])
                lines.append(f"| {key} | {metric} | {per_seed} | {d['mean']:+.3f} ± {d['std']:.3f} | {_interval(d)} |")
        lines += [
            "",
            "Each bootstrap replicate resamples the test subjects once and scores both arms and every seed on it, so "
            "the interval is of the paired difference of the seed means; it covers the test split's sampling, the "
            "per-seed column the training randomness.",
            "",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1 seed, 2 epochs over 20%% of the batches (< 15 min)")
    mode.add_argument(
        "--smoke", action="store_true", help="path check: 12 subjects, 16^3, 1 epoch of 1 batch, 1 seed (~3 min)"
    )
    parser.add_argument("--arms", nargs="+", default=None, choices=[*ARMS, *OPTIONAL_ARMS], help="default: all")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="override the budget's seeds")
    # Outside the work tree, so that a long run interrupted here can be completed by a later session on this machine.
    parser.add_argument(
        "--runs-dir",
        default=str(Path.home() / ".cache" / "medboost" / "bench-runs" / "vision_language"),
        help="run folders and the volume cache (--quick / --smoke use their own subfolder)",
    )
    parser.add_argument("--results", default=None, help="results folder (default benchmarks/results; smoke: runs dir)")
    parser.add_argument(
        "--note", default=None, help="how the runs were made, written under the header (e.g. when they were reused)"
    )
    args = parser.parse_args(argv)
    kind = "smoke" if args.smoke else "quick" if args.quick else "full"
    budget = BUDGETS[kind]
    if args.seeds:
        budget = dataclasses.replace(budget, seeds=tuple(args.seeds))
    runs = Path(args.runs_dir) / ("" if kind == "full" else kind)
    results_dir = Path(args.results or (runs if kind == "smoke" else REPO / "benchmarks" / "results"))
    tag = {"full": "vision_language", "quick": "vision_language_quick", "smoke": "vision_language_smoke"}[kind]
    chosen = [a for a in (*ARMS, *OPTIONAL_ARMS) if (a in ARMS if args.arms is None else a in args.arms)]
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f} s] {message}", flush=True)

    data = data_section(budget, runs)
    majority_result = majority(medblip_config("medblip", budget.seeds[0], budget, data, runs))
    split_path = Path(data["split_file"])
    d = majority_result["data"]
    report: dict[str, Any] = {
        "command": "python "
        + " ".join(["benchmarks/vision_language.py", *_without_note(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "note": args.note,
        "budget": dataclasses.asdict(budget),
        # The recipe's selection metric, every trained arm's (the CNN's included: its config comes from the recipe).
        "selection": load_config(RECIPE).trainer.monitor or "val_acc",
        "data_md5": data_md5(IXI_ROOT),
        "split_file": str(split_path.relative_to(REPO) if split_path.is_relative_to(REPO) else split_path),
        "split_file_md5": _md5(split_path),
        "split_md5": d["split_md5"],
        "manifest_md5": d["manifest_md5"],
        "n_subjects": d["n_subjects"],
        "questions": {
            k: {
                **{m: t[m] for m in ("candidates", "n", "train_answer", "test_answer", "test_answer_share")},
                "train_answer_share": t["acc"],  # on test: the majority arm's accuracy
            }
            for k, t in majority_result["tables"].items()
        },
        "arms": {},
    }

    def write() -> None:
        report["environment"] = environment()  # after the first run has set the thread count
        report["wall_seconds"] = time.perf_counter() - started
        write_report(results_dir / tag, report, markdown)

    for arm in chosen:
        if arm == "majority":
            tables = majority_result["tables"]
            report["arms"][arm] = {
                "seeds": [],
                "questions": summarise_questions([tables], generated=False),
                "config": "the most frequent training answer of each question, for every test sample",
            }
        elif arm == "cnn3d":
            report["arms"][arm] = cnn_arm(budget, data, runs, log)
        elif arm == "image-only":
            report["arms"][arm] = image_only_arm(budget, data, runs, log)
        else:
            report["arms"][arm] = medblip_arm(arm, budget, data, runs, log)
        write()  # keep partial results
    if all(arm in report["arms"] for arm in PAIRED):
        report["paired"] = {" - ".join(PAIRED): paired_questions(report["arms"], *PAIRED)}
    write()
    print((results_dir / f"{tag}.md").read_text())
    return 0


if __name__ == "__main__":
    run(main)
