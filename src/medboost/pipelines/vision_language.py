"""One vision-language (MedBLIP) run end to end: manifest, subject-level split, model, training selected on
validation (mean accuracy over the questions, or the recipe's ``trainer.monitor``), test (scored and generated
answers), saved model, per-case predictions and report; and the evaluation of a saved model on its own or another
manifest.

Run folder: ``result.json`` (run record, test metrics, per-question tables), ``predictions.csv`` (one row per test
case, read back by :func:`read_predictions`), ``figures/confusion_<question>.png``, ``model/`` (the trainable
weights; the frozen parts are rebuilt from their sources) and, for an IXI-folder run, ``manifest/ixi_vl.csv`` with
its exclusion report."""

from __future__ import annotations

import csv
import dataclasses
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from medboost.data.sampling import WithIndex
from medboost.data.vision_language import (
    VisionLanguageDataModule,
    VisionLanguageDataset,
    VolumeCache,
    collate_vl,
    free_qa,
    resolve_questions,
)
from medboost.data.vl_manifest import read_manifest, write_ixi_manifest
from medboost.data.volumes import medblip_preprocessing
from medboost.engine.config import OptimConfig, RunConfig, VisionLanguageDataConfig, section_kwargs
from medboost.engine.records import run_record, write_json
from medboost.engine.trainer import fit_and_test, start_run
from medboost.errors import ConfigError, DataError
from medboost.models import create_model, load_pretrained, save_pretrained
from medboost.models.hub import read_model_config
from medboost.models.medblip import MODES
from medboost.report import plots
from medboost.tasks.vision_language import VisionLanguageTask

TASK = "vision_language"


def manifest_path(d: VisionLanguageDataConfig, folder: Path | None) -> Path:
    """The manifest a run reads: ``data.manifest``, or the IXI manifest written into ``folder`` (the run folder's
    ``manifest/``; None: a fresh temporary folder, so that a dry run writes nothing into the run folder)."""
    if (d.manifest is None) == (d.ixi_root is None):
        raise ConfigError("data: give exactly one of data.manifest (a manifest file) and data.ixi_root (an IXI folder)")
    if d.manifest is not None:
        return Path(d.manifest)
    out = (Path(tempfile.mkdtemp(prefix="medboost-ixi-")) if folder is None else folder) / "ixi_vl.csv"
    if not out.is_file():  # a resumed run keeps the manifest it started with
        write_ixi_manifest(d.ixi_root, out)
    return out


def build_datamodule(d: VisionLanguageDataConfig, manifest: Path, seed: int) -> VisionLanguageDataModule:
    return VisionLanguageDataModule(**section_kwargs(d, VisionLanguageDataModule, manifest=manifest, seed=seed))


def build_model(cfg: RunConfig):
    """MedBLIP from ``model.kwargs``; the image encoder's volume size is the data's unless the recipe gives it."""
    if cfg.model.name != "medblip":
        raise ConfigError(f"model.name: a vision_language run trains medblip, got {cfg.model.name!r}")
    kwargs = dict(cfg.model.kwargs)
    encoder = kwargs.get("image_encoder")
    if encoder is not None:
        size = encoder.get("img_size", cfg.data.size)
        if size != cfg.data.size:
            raise ConfigError(f"model.kwargs.image_encoder.img_size ({size}) differs from data.size ({cfg.data.size})")
        kwargs["image_encoder"] = {**encoder, "img_size": size}
    return create_model("medblip", **kwargs)


def max_candidates(dm: VisionLanguageDataModule) -> int:
    return max(len(d.texts(i)[3]) for d in dm.datasets.values() for i in range(len(d)))


def make_task(model, dm: VisionLanguageDataModule, optim: OptimConfig, seed: int, max_new_tokens: int):
    ids = {s: dm.dataset(s).sample_ids for s in ("val", "test")}
    return VisionLanguageTask(model, optim, ids, max_candidates(dm), seed, max_new_tokens)


def prepare(
    cfg: RunConfig, manifest_dir: Path | None = None
) -> tuple[VisionLanguageDataModule, Any, VisionLanguageTask]:
    """The checked data (every volume preprocessed), the model and the training task. An IXI manifest is written to
    ``manifest_dir`` (None: a temporary folder)."""
    if cfg.report_best_test_epoch:
        raise ConfigError("report_best_test_epoch: not available for vision_language runs")
    dm = build_datamodule(cfg.data, manifest_path(cfg.data, manifest_dir), cfg.seed)
    dm.setup()
    model = build_model(cfg)
    return dm, model, make_task(model, dm, cfg.optim, cfg.seed, cfg.data.max_new_tokens)


def _data_record(cfg: RunConfig, dm: VisionLanguageDataModule) -> dict[str, Any]:
    """What a saved model needs to evaluate itself again: the data settings with the manifest it was tested on."""
    d = {**dataclasses.asdict(cfg.data), "manifest": str(dm.manifest_path.resolve()), "ixi_root": None}
    for key in ("split_file", "cache_dir"):  # the saved model may be evaluated from another working folder
        if d[key] is not None:
            d[key] = str(Path(d[key]).resolve())
    return {
        "task": TASK,
        "data": d,
        "seed": cfg.seed,
        "eval_batch_size": dm.eval_batch_size,
        "precision": cfg.trainer.precision,
    }


def train_vision_language(cfg: RunConfig, resume: bool = True, make_plots: bool = True, callbacks=()) -> dict:
    """Train ``cfg`` and write ``result.json``, ``predictions.csv``, confusion matrices and ``model/`` to the run
    folder. Returns the result record."""
    started = start_run(cfg)
    dm, model, task = prepare(cfg, cfg.run_dir / "manifest")
    outcome = fit_and_test(cfg, task, dm, monitor="val_acc", mode="max", resume=resume, callbacks=list(callbacks))
    trainer = outcome.pop("trainer")
    result: dict[str, Any] = run_record(cfg, dm.record(), model, outcome)
    if trainer.is_global_zero and hasattr(task, "test_outputs"):
        run_dir = cfg.run_dir
        result["test_report"] = task.test_outputs["questions"]
        save_pretrained(model, run_dir / "model", extra=_data_record(cfg, dm))
        write_outputs(run_dir, task.test_outputs, make_plots)
        result["wall_seconds"] = time.perf_counter() - started
        write_json(run_dir / "result.json", result)
    return result


def write_outputs(folder: Path, outputs: dict, make_plots: bool = True) -> None:
    """``predictions.csv`` (scores as one JSON column) and a confusion-matrix PNG per question."""
    cases = outputs["cases"]
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "predictions.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(cases[0]))
        writer.writeheader()
        writer.writerows({**c, "scores": json.dumps(c["scores"])} for c in cases)
    if make_plots:
        for key, table in outputs["questions"].items():
            path = folder / "figures" / f"confusion_{key}.png"
            plots.confusion_matrix_plot(table["confusion_matrix"], table["candidates"], path)


@dataclasses.dataclass(frozen=True)
class QuestionPredictions:
    """One question's test cases as ``predictions.csv`` holds them, ordered by sample id (so that two runs on the
    same split line up case by case): the answer's index among the candidates and the candidate scores."""

    sample_ids: list[str]
    target: np.ndarray  # (n,) index of the answer in ``candidates``
    scores: np.ndarray  # (n, len(candidates)) the candidates' scores, in ``candidates`` order
    candidates: list[str]


def read_predictions(folder: str | Path) -> dict[str, QuestionPredictions]:
    """``{question key: QuestionPredictions}`` from a run's (or an evaluation's) ``predictions.csv``; a missing file,
    a missing column, unreadable scores or an answer that is not one of its candidates is one DataError naming the
    file (and the row)."""
    path = Path(folder) / "predictions.csv"
    if not path.is_file():
        raise DataError(f"{path}: no predictions file (has the run finished its test stage?)")
    rows: dict[str, list[tuple[str, int, list[float], list[str]]]] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"sample_id", "question_key", "answer", "scores"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            try:
                scores = json.loads(row["scores"])
                candidates, values = list(scores), [float(v) for v in scores.values()]
                target = candidates.index(row["answer"])
            except (json.JSONDecodeError, TypeError, AttributeError, ValueError) as exc:
                raise DataError(f"{path} line {line}: unreadable scores or an answer not among them ({exc})") from exc
            if not np.isfinite(values).all():  # json reads NaN / Infinity; a NaN score would rank silently
                raise DataError(f"{path} line {line}: non-finite candidate score in {row['scores']}")
            rows.setdefault(row["question_key"], []).append((row["sample_id"], target, values, candidates))
    if not rows:
        raise DataError(f"{path}: no test cases (only a header)")
    out = {}
    for key, cases in rows.items():
        cases.sort(key=lambda c: c[0])
        if any(c[3] != cases[0][3] for c in cases):
            raise DataError(f"{path}: question {key!r} has rows with different candidate lists")
        out[key] = QuestionPredictions(
            [c[0] for c in cases], np.array([c[1] for c in cases]), np.array([c[2] for c in cases]), cases[0][3]
        )
    return out


# -- a saved model ----------------------------------------------------------------------------------------------------
def model_folder(path: str | Path) -> Path:
    """A run folder's ``model/``, or the model folder itself."""
    path = Path(path)
    folder = path / "model" if (path / "model").is_dir() else path
    record = read_model_config(folder)
    if record.get("task") != TASK:
        raise ConfigError(f"{folder}: not a saved vision_language (MedBLIP) model")
    return folder


def evaluate_saved(
    path: str | Path,
    manifest: str | Path | None = None,
    split: str = "test",
    out_dir: str | Path | None = None,
    mode: str | None = None,
) -> dict[str, Any]:
    """Evaluate a saved MedBLIP model as the run's test stage does: on ``split`` of the data it was trained on, or
    on EVERY row of another ``manifest`` (an external set, no split). ``mode`` evaluates it in another input mode
    than it was trained in (``"image"``: the EHR left out of every prompt, the image-only control of a model trained
    on image + text; None: its own). Writes ``predictions.csv`` and confusion matrices to ``out_dir`` when given.
    Returns ``{"test": metrics, "test_report": per-question tables}``."""
    if mode is not None and mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    folder = model_folder(path)
    record = read_model_config(folder)
    d = VisionLanguageDataConfig(**record["data"])
    dataset = _eval_dataset(d, record["seed"], manifest, split)
    loader = DataLoader(WithIndex(dataset), batch_size=record["eval_batch_size"], collate_fn=collate_vl)
    model = load_pretrained(folder)
    if mode is not None:
        if mode != "text" and getattr(model, "image_encoder", None) is None:
            raise ConfigError(f"{folder}: a model without an image encoder cannot be evaluated in mode {mode!r}")
        model.mode = mode
    width = max(len(dataset.texts(i)[3]) for i in range(len(dataset)))
    task = VisionLanguageTask(
        model, OptimConfig(), {"test": dataset.sample_ids}, width, max_new_tokens=d.max_new_tokens
    )
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        precision=record["precision"],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    metrics = trainer.test(task, dataloaders=loader, verbose=False)[0]
    if out_dir is not None:
        write_outputs(Path(out_dir), task.test_outputs)
    return {"test": {k: float(v) for k, v in metrics.items()}, "test_report": task.test_outputs["questions"]}


def _eval_dataset(d: VisionLanguageDataConfig, seed: int, manifest: str | Path | None, split: str):
    """``split`` of the run's own data, or every row of another manifest."""
    if manifest is None:
        dm = build_datamodule(d, Path(d.manifest), seed)
        dm.setup()
        return dm.dataset(split)
    questions = resolve_questions(d.questions)
    table = read_manifest(manifest, questions)
    cache = VolumeCache(table, d.size, d.cache_dir)
    return VisionLanguageDataset(table, table.rows, questions, cache, free_qa(table, None), d.leak_answer)


def ask(path: str | Path, image: str | Path, ehr: str, question: str, candidates: Sequence[str] = ()) -> dict:
    """One question about one volume: every candidate's score (mean answer-token log-likelihood), the best one, and
    the freely generated answer."""
    folder = model_folder(path)
    record = read_model_config(folder)
    size = record["data"]["size"]
    volume = medblip_preprocessing(size)({"image": str(image)})["image"]
    model = load_pretrained(folder)
    device = next(p.device for p in model.parameters())
    volumes = torch.as_tensor(volume, dtype=torch.float32)[None].to(device)
    generated = model.generate(volumes, [ehr], [question], record["data"]["max_new_tokens"])[0]
    out: dict[str, Any] = {"generated": generated}
    if candidates:
        scores = model.score_candidates(volumes, [ehr], [question], list(candidates))["mean"][0].tolist()
        out["scores"] = dict(zip(candidates, scores))
        out["answer"] = candidates[max(range(len(scores)), key=scores.__getitem__)]
    return out
