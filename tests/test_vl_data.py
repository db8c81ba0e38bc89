"""Vision-language manifests (strict checks), the IXI adapter on the real folder, the committed IXI split, and the
data module end to end on real IXI volumes at a tiny size."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from vl_fixtures import IXI, QUESTION, ROOT

from medboost.data.clinical_text import EHRTemplate
from medboost.data.splits import load_split, make_split, save_split
from medboost.data.vision_language import VisionLanguageDataModule, collate_vl
from medboost.data.vl_manifest import AGE_GROUPS, age_group, ixi_questions, read_manifest, write_ixi_manifest
from medboost.errors import DataError

IXI_SPLIT = ROOT / "benchmarks" / "splits" / "ixi_vl.json"


def _volume(path: Path, fill: float | None = None) -> str:
    data = np.random.default_rng(0).random((6, 7, 5)).astype(np.float32)
    if fill is not None:
        data[1, 1, 1] = fill
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path.name


def _manifest(tmp_path: Path, rows: list[dict], name: str = "m.csv") -> Path:
    path = tmp_path / name
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _rows(tmp_path: Path, n: int = 4) -> list[dict]:
    return [
        {
            "subject_id": f"s{i}",
            "image": _volume(tmp_path / f"v{i}.nii.gz"),
            "age": 60 + i,
            "label": ("CN", "AD")[i % 2],
        }
        for i in range(n)
    ]


def test_good_manifest_reads_relative_paths_and_jsonl(tmp_path):
    rows = _rows(tmp_path)
    m = read_manifest(_manifest(tmp_path, rows), [QUESTION])
    assert [r.scan_id for r in m.rows] == ["s0", "s1", "s2", "s3"] and m.rows[0].number == 2
    assert m.rows[0].image == tmp_path / "v0.nii.gz"
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r.fields["label"] for r in read_manifest(jsonl, [QUESTION]).rows] == ["CN", "AD", "CN", "AD"]


def test_missing_volume_names_row_and_file(tmp_path):
    rows = _rows(tmp_path)
    rows[2]["image"] = "gone.nii.gz"
    path = _manifest(tmp_path, rows)
    with pytest.raises(DataError, match=rf"^{path} row 4: volume {tmp_path / 'gone.nii.gz'} not found"):
        read_manifest(path, [QUESTION])


def test_unreadable_volume_names_row(tmp_path):
    rows = _rows(tmp_path)
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    rows[1]["image"] = "broken.nii.gz"
    path = _manifest(tmp_path, rows)
    with pytest.raises(DataError, match=rf"^{path} row 3: volume .*broken.nii.gz is not a readable NIfTI"):
        read_manifest(path, [QUESTION])


def test_missing_template_field_names_row_and_field(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "age"} for r in _rows(tmp_path)]
    path = _manifest(tmp_path, rows)
    with pytest.raises(DataError, match=rf"^{path} row 2: the EHR template needs field 'age'"):
        read_manifest(path, [QUESTION])


def test_unknown_or_absent_label_names_row(tmp_path):
    rows = _rows(tmp_path)
    rows[3]["label"] = "MCI"
    path = _manifest(tmp_path, rows)
    with pytest.raises(DataError, match=rf"^{path} row 5: unknown label 'MCI' for question 'diagnosis'"):
        read_manifest(path, [QUESTION])
    rows[3]["label"] = ""
    with pytest.raises(DataError, match=rf"^{path} row 5: no 'label' label"):
        read_manifest(_manifest(tmp_path, rows), [QUESTION])


def test_duplicate_rows_are_refused(tmp_path):
    rows = _rows(tmp_path)
    path = _manifest(tmp_path, [*rows, dict(rows[1])])
    with pytest.raises(DataError, match=rf"^{path} row 6: repeats scan s1 of row 3"):
        read_manifest(path, [QUESTION])
    other = {**rows[1], "subject_id": "s9"}  # another id, the same image file
    path = _manifest(tmp_path, [*rows, other])
    with pytest.raises(DataError, match=rf"^{path} row 6: repeats image .*v1.nii.gz of row 3"):
        read_manifest(path, [QUESTION])


def test_nan_volume_stops_setup_naming_row_and_file(tmp_path):
    rows = _rows(tmp_path, 6)
    rows[4]["image"] = _volume(tmp_path / "nan.nii.gz", fill=np.nan)
    path = _manifest(tmp_path, rows)
    dm = VisionLanguageDataModule(path, [QUESTION], size=8, batch_size=2, val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(DataError, match=rf"^{path} row 6: .*nan.nii.gz: the volume has 1 NaN"):
        dm.setup()


def test_subject_in_two_splits_names_rows(tmp_path):
    rows = _rows(tmp_path, 6)
    rows[5] = {**rows[5], "subject_id": "s0", "scan_id": "s0-visit2"}  # a second scan of subject s0
    path = _manifest(tmp_path, rows)
    ids = ["s0", "s1", "s2", "s3", "s4", "s0-visit2"]
    split = save_split({"train": ids[:3], "val": ids[3:5], "test": ids[5:]}, tmp_path / "split.json")
    dm = VisionLanguageDataModule(path, [QUESTION], size=8, split_file=split, batch_size=2)
    with pytest.raises(DataError, match=rf"^{path} row 7: subject 's0' is in test here and in train at row 2"):
        dm.setup()
    incomplete = save_split({"train": ids[:3], "val": ids[3:4], "test": ["s0-visit2"]}, tmp_path / "part.json")
    with pytest.raises(DataError, match=r"1 scan\(s\) of .* are in no split: row 6 \(s4\)"):
        VisionLanguageDataModule(path, [QUESTION], size=8, split_file=incomplete, batch_size=2).setup()


def test_made_split_keeps_scans_of_a_subject_together(tmp_path):
    rows = _rows(tmp_path, 10)
    for i in (7, 8, 9):
        rows[i] = {**rows[i], "subject_id": "s0", "scan_id": f"s0-visit{i}"}
    dm = VisionLanguageDataModule(_manifest(tmp_path, rows), [QUESTION], size=8, batch_size=2)
    dm.setup()
    holding = [s for s, ids in dm.split.items() if any(i.startswith("s0") for i in ids)]
    assert len(holding) == 1 and sum(i.startswith("s0") for i in dm.split[holding[0]]) == 4


def test_age_groups():
    assert [age_group(a) for a in (20, 39.99, 40, 60, 60.01, 82)] == [
        AGE_GROUPS[0], AGE_GROUPS[0], AGE_GROUPS[1], AGE_GROUPS[1], AGE_GROUPS[2], AGE_GROUPS[2],
    ]  # fmt: skip


@pytest.fixture(scope="module")
def ixi_manifest(tmp_path_factory):
    if not IXI.is_dir():
        pytest.skip(f"real data {IXI} is absent (shared data folder not mounted)")
    out = tmp_path_factory.mktemp("ixi") / "ixi_vl.csv"
    return out, write_ixi_manifest(IXI, out)


def test_ixi_adapter_accounts_for_every_volume(ixi_manifest):
    out, report = ixi_manifest
    volumes = {p.name[: -len("_T1.nii.gz")] for p in (IXI / "t1").glob("*_T1.nii.gz")}
    manifest = read_manifest(out, ixi_questions())
    kept = {r.subject_id for r in manifest.rows}
    excluded = {e["subject_id"]: e["reason"] for e in report["excluded"]}
    assert len(volumes) == report["n_volumes"] == 185 and len(kept) == report["n_kept"] == 181
    assert kept | set(excluded) == volumes and not kept & set(excluded)
    assert all(excluded.values())  # every exclusion carries its reason
    assert json.loads(out.with_name("ixi_vl.report.json").read_text())["excluded"] == report["excluded"]
    balance = report["label_balance"]
    print("IXI label balance:", json.dumps(balance))
    assert sum(balance["sex"].values()) == sum(balance["age_group"].values()) == 181
    assert balance["hippocampus_reduced"]["yes"] == 181 // 3  # the lowest third (no ties at 6 decimals here)


def test_ixi_texts_never_state_their_answer(ixi_manifest):
    manifest = read_manifest(ixi_manifest[0], ixi_questions())
    by_key = {q.key: q for q in manifest.questions}
    row = manifest.rows[0].fields  # IXI012-HH-1211, 38.78, M
    assert by_key["sex"].ehr_text(row) == "A 38-year-old subject."
    assert by_key["age_group"].ehr_text(row) == "A male subject."
    assert by_key["hippocampus"].ehr_text(row) == "A 38-year-old man."
    for r in manifest.rows:
        assert not {"man", "woman", "male", "female"} & set(by_key["sex"].ehr_text(r.fields).rstrip(".").split())
        assert not any(ch.isdigit() for ch in by_key["age_group"].ehr_text(r.fields))


def test_committed_ixi_split_is_reproducible(ixi_manifest):
    manifest = read_manifest(ixi_manifest[0], ixi_questions())
    ids = [r.scan_id for r in manifest.rows]
    committed = load_split(IXI_SPLIT, ids=ids, groups=manifest.groups)
    assert committed == make_split(ids, seed=0, val_fraction=0.1, test_fraction=0.2, groups=manifest.groups)
    assert [len(committed[s]) for s in ("train", "val", "test")] == [127, 18, 36]


def test_data_module_end_to_end_on_real_ixi(ixi_manifest, tmp_path):
    # Eight real subjects with the committed split's style (a split file), size 32, on-disk cache.
    source, _ = ixi_manifest
    with source.open() as f:
        rows = list(csv.DictReader(f))[:8]
    for r in rows:
        r["image"] = str((source.parent / r["image"]).resolve())
    path = _manifest(tmp_path, rows, "ixi8.csv")
    ids = [r["subject_id"] for r in rows]
    split = save_split({"train": ids[:5], "val": ids[5:6], "test": ids[6:]}, tmp_path / "split.json")
    dm = VisionLanguageDataModule(path, "ixi", size=32, split_file=split, cache_dir=tmp_path / "cache", batch_size=4)
    dm.setup()
    assert {s: len(d) for s, d in dm.datasets.items()} == {"train": 15, "val": 3, "test": 6}
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 8
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 32, 32, 32) and batch["image"].dtype == torch.float32
    assert torch.isfinite(batch["image"]).all() and 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert all(isinstance(batch[k], list) and len(batch[k]) == 4 for k in ("ehr_text", "question", "answer"))
    assert all(a in c for a, c in zip(batch["answer"], batch["candidates"]))
    test = dm.datasets["test"]
    volume, text, question, answer, candidates = test[0]
    row = next(r for r in rows if r["subject_id"] == ids[6])
    assert test.sample_ids[0] == f"{ids[6]}/sex" and question == "What is the sex of this subject?"
    assert answer == {"M": "Male", "F": "Female"}[row["sex"]] and candidates == ["Male", "Female"]
    assert text == f"A {int(float(row['age']))}-year-old subject."
    whole = [b for b in dm.test_dataloader()]
    assert torch.cat([b["index"] for b in whole]).tolist() == list(range(6))
    record = dm.record()
    assert record["n_subjects"] == {"train": 5, "val": 1, "test": 2} and record["size"] == 32


def test_collate_keeps_texts_and_candidate_lists():
    sample = (torch.zeros(1, 2, 2, 2), "text", "q?", "Yes", ["Yes", "No"])
    batch = collate_vl([(*sample, 0), (*sample, 1)])
    assert batch["candidates"] == [["Yes", "No"], ["Yes", "No"]] and batch["ehr_text"] == ["text", "text"]
    assert batch["index"].tolist() == [0, 1] and batch["image"].shape == (2, 1, 2, 2, 2)


def test_rows_own_question_answer_pairs(tmp_path):
    rows = _rows(tmp_path)
    rows[0].update(question_1="Is there a lesion?", answer_1="No")
    rows[1].update(question_1="Is there a lesion?", answer_1="Yes", question_2="Which side?", answer_2="Left")
    path = _manifest(tmp_path, rows)
    template = EHRTemplate(["Age {age}."], formats={"age": "years"})
    dm = VisionLanguageDataModule(
        path, [QUESTION], size=8, batch_size=2, val_fraction=0.25, test_fraction=0.25, qa_template=template
    )
    dm.setup()
    samples = {sid: ds.texts(i) for ds in dm.datasets.values() for i, sid in enumerate(ds.sample_ids) if "/qa" in sid}
    assert samples == {
        "s0/qa0": ("Age 60.", "Is there a lesion?", "No", ["No", "Yes"]),
        "s1/qa0": ("Age 61.", "Is there a lesion?", "Yes", ["No", "Yes"]),
        "s1/qa1": ("Age 61.", "Which side?", "Left", ["Left"]),
    }
    assert sum(len(ds) for ds in dm.datasets.values()) == 4 + 3


def test_unpaired_question_names_row(tmp_path):
    rows = _rows(tmp_path)
    rows[2].update(question="Is there a lesion?", answer="")
    path = _manifest(tmp_path, rows)
    with pytest.raises(DataError, match=rf"^{path} row 4: question/answer has a question without an answer"):
        read_manifest(path, [QUESTION])
    jsonl = tmp_path / "m.jsonl"
    records = [{k: v for k, v in r.items() if k not in ("question", "answer")} for r in rows]
    records[1]["qa"] = [{"question": "Lesion?", "answer": "No"}, {"answer": "Yes"}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match=rf"^{jsonl} row 2: qa\[1\] has a question without an answer"):
        read_manifest(jsonl, [QUESTION])
    records[1]["qa"] = records[1]["qa"][:1]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_manifest(jsonl, [QUESTION]).rows[1].qa == (("Lesion?", "No"),)


def test_manifest_of_dicom_series_with_demographics_from_headers(tmp_path):
    pytest.importorskip("pydicom")
    from medboost.data.volumes import dicom_demographics

    study = ROOT.parent / "shared" / "data" / "dicom" / "tcia_brain_mri" / "Study3"
    if not study.is_dir():
        pytest.skip(f"real data {study} is absent")
    series = ["11-T1post-18670", "37830-T2reg-78532", "36468-FLAIRreg-58706", "26401-T1prereg-52906"]
    rows = []
    for name in series:
        info = dicom_demographics(study / name)
        # One patient, four sequences: four scans of one subject, which must stay in one split.
        rows.append({"subject_id": "study3", "scan_id": name, "image": str(study / name), "age": info["age"],
                     "label": "CN"})  # fmt: skip
    rows += _rows(tmp_path, 4)
    dm = VisionLanguageDataModule(_manifest(tmp_path, rows), [QUESTION], size=16, batch_size=2, test_fraction=0.25)
    dm.setup()
    holding = [s for s, ids in dm.split.items() if set(series) & set(ids)]
    assert len(holding) == 1 and set(series) <= set(dm.split[holding[0]])
    ds = dm.datasets[holding[0]]
    i = ds.sample_ids.index("11-T1post-18670/diagnosis")
    volume, text, _, answer, _ = ds[i]
    assert volume.shape == (1, 16, 16, 16) and text == "A 41-year-old subject." and answer == "Not demented"


def test_disk_cache_is_reused_and_follows_file_changes(tmp_path):
    from medboost.data.vision_language import VolumeCache

    rows = _rows(tmp_path, 2)
    manifest = read_manifest(_manifest(tmp_path, rows), [QUESTION])
    cache = VolumeCache(manifest, 8, tmp_path / "cache")
    first = cache.get(manifest.rows[0])
    assert first.shape == (1, 8, 8, 8)

    def refuse(data):
        raise AssertionError("a cached volume was preprocessed again")

    again = VolumeCache(manifest, 8, tmp_path / "cache")
    again.preprocess = refuse
    assert torch.equal(again.get(manifest.rows[0]), first)
    # A rewritten volume gets a new key (size/mtime), so a stale cache entry is never served.
    data = np.random.default_rng(1).random((9, 7, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(manifest.rows[0].image))
    fresh = VolumeCache(manifest, 8, tmp_path / "cache")
    assert not torch.equal(fresh.get(manifest.rows[0]), first)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2


def test_loader_with_a_worker_process(tmp_path):
    dm = VisionLanguageDataModule(
        _manifest(tmp_path, _rows(tmp_path, 6)), [QUESTION], size=8, batch_size=3, num_workers=1, test_fraction=0.2
    )
    dm.setup()
    batches = list(dm.train_dataloader())
    assert sum(len(b["answer"]) for b in batches) == len(dm.datasets["train"])
    assert all(isinstance(b["candidates"][0], list) for b in batches)
