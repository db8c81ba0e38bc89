"""The leakage control (``data.leak_answer``): with it on, every sample's EHR text states its answer (the benchmark's
proof that the text path works); off (the default), no question's EHR text contains its answer."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from vl_fixtures import IXI, QUESTION, ROOT

from medboost.data.vision_language import (
    LEAK_TEMPLATE,
    VisionLanguageDataModule,
    VisionLanguageDataset,
    VolumeCache,
)
from medboost.data.vl_manifest import ixi_questions, read_manifest, write_ixi_manifest
from medboost.engine.config import VisionLanguageDataConfig, load_config, section_kwargs


def _manifest(tmp_path: Path, n: int = 10) -> Path:
    rows = []
    for i in range(n):
        image = tmp_path / f"v{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.random.default_rng(i).random((6, 7, 5)).astype(np.float32), np.eye(4)), image)
        rows.append({"subject_id": f"s{i}", "image": image.name, "age": 60 + i, "label": ("CN", "AD")[i % 2]})
        rows[-1].update({"question": "Is the scan sharp?", "answer": ("yes", "no")[i % 2]})  # a row's own pair
    path = tmp_path / "m.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _texts(dm: VisionLanguageDataModule) -> list[tuple[str, str, str, list[str]]]:
    dm.setup()
    return [d.texts(i) for d in dm.datasets.values() for i in range(len(d))]


@pytest.mark.parametrize("leak", [False, True])
def test_leak_answer_puts_the_answer_into_the_ehr_text_only_when_on(tmp_path, leak):
    manifest = _manifest(tmp_path)
    dm = VisionLanguageDataModule(manifest, questions=[QUESTION], size=4, batch_size=2, leak_answer=leak)
    texts = _texts(dm)
    assert len(texts) == 20 and {t[1] for t in texts} == {QUESTION.text, "Is the scan sharp?"}
    for ehr, _, answer, candidates in texts:
        assert answer in candidates
        if leak:
            assert ehr.endswith(f"The answer is {answer}.") and answer in ehr
        else:
            assert "The answer is" not in ehr and all(c.lower() not in ehr.lower() for c in candidates)
    assert dm.record()["leak_answer"] is leak
    # The batches the model sees carry the same texts.
    batch = next(iter(dm.train_dataloader()))
    assert all((f"The answer is {a}." in e) is leak for e, a in zip(batch["ehr_text"], batch["answer"]))


def test_leak_answer_is_off_by_default_and_wired_from_the_run_config(tmp_path):
    assert VisionLanguageDataConfig().leak_answer is False
    cfg = load_config(ROOT / "configs" / "medblip" / "ixi-cpu.yaml", {"data.leak_answer": True})
    assert cfg.data.leak_answer is True
    kwargs = section_kwargs(cfg.data, VisionLanguageDataModule, manifest=_manifest(tmp_path), seed=0)
    assert kwargs["leak_answer"] is True
    kwargs.update(questions=[QUESTION], size=4, split_file=None, cache_dir=None)
    ehr, _, answer, _ = _texts(VisionLanguageDataModule(**kwargs))[0]
    assert ehr == LEAK_TEMPLATE.format(ehr="A 60-year-old subject.", answer=answer)


@pytest.mark.skipif(not IXI.is_dir(), reason="the IXI folder is absent")
def test_ixi_questions_never_state_their_answer_unless_leaked(tmp_path):
    """On the real IXI manifest (texts only, no volume read): no question's EHR text names any of its candidates;
    with the control on, each names exactly its own answer."""
    write_ixi_manifest(IXI, tmp_path / "ixi.csv")
    questions = ixi_questions()
    table = read_manifest(tmp_path / "ixi.csv", questions)
    for leak in (False, True):
        dataset = VisionLanguageDataset(table, table.rows, questions, VolumeCache(table, 4), leak_answer=leak)
        for i in range(len(dataset)):
            ehr, _, answer, candidates = dataset.texts(i)
            words = " " + " ".join(ehr.lower().replace(".", " ").split()) + " "
            named = [c for c in candidates if f" {c.lower()} " in words]
            assert named == ([answer] if leak else []), (ehr, candidates)


def test_evaluate_saved_refuses_an_unknown_mode_before_loading_anything(tmp_path):
    from medboost.errors import ConfigError
    from medboost.pipelines.vision_language import evaluate_saved

    with pytest.raises(ConfigError, match="mode must be one of image\\+text, text, image"):
        evaluate_saved(tmp_path / "no-model", mode="ehr")
