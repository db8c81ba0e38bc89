"""Image + clinical-text manifests: the one table format a user writes for the vision-language data, strictly
checked, and an adapter that writes one from the IXI folder.

A manifest is a CSV file or a JSON-lines file (``.jsonl``), one row per scan: ``subject_id``, ``image`` (a NIfTI file
or a DICOM series folder, relative to the manifest's folder unless absolute), optionally ``scan_id`` (default: the
subject id; several scans of one subject share a subject id and always land in one split), any clinical fields and
the label fields the questions read, and optionally the row's own question/answer pairs: CSV columns ``question`` /
``answer`` or ``question_<k>`` / ``answer_<k>``, or in JSON lines a ``qa`` list of ``{"question", "answer"}``
objects. Every problem (a missing or unreadable volume, a field a template needs but the
row lacks, an unknown label, a repeated scan, a subject in two splits) is one :class:`~medboost.errors.DataError`
naming the file and the row; no case is ever silently dropped.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib

from medboost.data.clinical_text import EHRTemplate, Question, is_missing
from medboost.data.splits import SPLITS
from medboost.data.volumes import NIFTI_SUFFIXES
from medboost.errors import DataError

__all__ = [
    "IXI_QUESTIONS",
    "Manifest",
    "ManifestRow",
    "check_split",
    "ixi_questions",
    "read_manifest",
    "write_ixi_manifest",
]

REQUIRED = ("subject_id", "image")


@dataclass(frozen=True)
class ManifestRow:
    """One scan. ``number`` is its line in a CSV file (the header is line 1) or JSON-lines file."""

    number: int
    scan_id: str
    subject_id: str
    image: Path
    fields: Mapping[str, Any]
    qa: tuple[tuple[str, str], ...] = ()


@dataclass
class Manifest:
    path: Path
    rows: list[ManifestRow]
    questions: list[Question] = field(default_factory=list)

    def where(self, row: ManifestRow) -> str:
        return f"{self.path} row {row.number}"

    @property
    def groups(self) -> dict[str, str]:
        """Scan id -> subject id, for :mod:`medboost.data.splits`."""
        return {r.scan_id: r.subject_id for r in self.rows}


def _read_table(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the manifest ({exc})") from exc
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} row {number}: not valid JSON ({exc})") from exc
            if not isinstance(record, dict):
                raise DataError(f"{path} row {number}: a JSON-lines manifest row must be an object")
            rows.append((number, record))
        return rows
    if path.suffix != ".csv":
        raise DataError(f"{path}: a manifest must be a .csv or .jsonl file")
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: the manifest lacks column(s) {', '.join(missing)}")
    # Data rows start on line 2; a row with more cells than the header has a None key.
    rows = []
    for number, record in enumerate(reader, start=2):
        if None in record:
            raise DataError(f"{path} row {number}: more cells than the header has columns")
        rows.append((number, record))
    return rows


def _check_volume(image: Path, where: str) -> None:
    """Existence and a header read (cheap); voxel contents (NaN, constant) are checked when the volume is loaded."""
    if image.is_dir():
        if not any(p.is_file() and not p.name.startswith(".") for p in image.iterdir()):
            raise DataError(f"{where}: DICOM series folder {image} is empty")
        return
    if not image.is_file():
        raise DataError(f"{where}: volume {image} not found")
    if not image.name.endswith(NIFTI_SUFFIXES):
        raise DataError(f"{where}: volume {image} is neither a NIfTI file (.nii, .nii.gz) nor a DICOM folder")
    try:
        header = nib.load(str(image)).header
    except Exception as exc:  # nibabel raises many types for foreign or truncated files
        raise DataError(f"{where}: volume {image} is not a readable NIfTI file ({exc})") from exc
    if len(header.get_data_shape()) not in (3, 4):
        raise DataError(f"{where}: volume {image} is not 3D (shape {header.get_data_shape()})")


def _row(path: Path, number: int, record: Mapping[str, Any], check_volumes: bool) -> ManifestRow:
    where = f"{path} row {number}"
    for column in REQUIRED:
        if is_missing(record.get(column)):
            raise DataError(f"{where}: {column} is empty")
    subject = str(record["subject_id"]).strip()
    scan = subject if is_missing(record.get("scan_id")) else str(record["scan_id"]).strip()
    image = Path(str(record["image"]))
    image = image if image.is_absolute() else Path(os.path.normpath(path.parent / image))
    if check_volumes:
        _check_volume(image, where)
    return ManifestRow(number, scan, subject, image, dict(record), _qa_pairs(record, where))


def _qa_pairs(record: Mapping[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    """The row's own question/answer pairs; a question without its answer (or the reverse) is an error."""
    if "qa" in record:
        pairs = record["qa"]
        if not isinstance(pairs, list) or not all(isinstance(p, dict) for p in pairs):
            raise DataError(f'{where}: \'qa\' must be a list of {{"question": ..., "answer": ...}} objects')
        raw = [(p.get("question"), p.get("answer"), f"qa[{i}]") for i, p in enumerate(pairs)]
    else:
        suffixes = [k[len("question") :] for k in record if isinstance(k, str) and k.startswith("question")]
        suffixes += [k[len("answer") :] for k in record if isinstance(k, str) and k.startswith("answer")]
        suffixes = [x for x in dict.fromkeys(suffixes) if x == "" or x.startswith("_")]
        raw = [(record.get(f"question{x}"), record.get(f"answer{x}"), f"question{x}/answer{x}") for x in suffixes]
    qa = []
    for question, answer, name in raw:
        if is_missing(question) and is_missing(answer):
            continue  # this row has no pair in these columns
        if is_missing(question) or is_missing(answer):
            raise DataError(f"{where}: {name} has a question without an answer or an answer without a question")
        qa.append((str(question).strip(), str(answer).strip()))
    return tuple(qa)


def _check_duplicates(path: Path, rows: Sequence[ManifestRow]) -> None:
    first: dict[tuple[str, str], int] = {}
    for r in rows:
        for kind, key in (("scan", r.scan_id), ("image", str(r.image.resolve()))):
            seen = first.setdefault((kind, key), r.number)
            if seen != r.number:
                raise DataError(f"{path} row {r.number}: repeats {kind} {key} of row {seen}; each scan once")


def read_manifest(path: str | os.PathLike, questions: Sequence[Question] = (), check_volumes: bool = True) -> Manifest:
    """Read and check a manifest: required columns, volumes present and readable (headers), no repeated scan or
    image, and for every question its EHR text renders and its label is known, row by row."""
    path = Path(path)
    rows = [_row(path, n, record, check_volumes) for n, record in _read_table(path)]
    if not rows:
        raise DataError(f"{path}: the manifest has no rows")
    _check_duplicates(path, rows)
    manifest = Manifest(path, rows, list(questions))
    for r in rows:
        for q in manifest.questions:
            where = manifest.where(r)
            q.ehr_text(r.fields, where)
            if q.label_field not in r.fields or is_missing(r.fields[q.label_field]):
                raise DataError(f"{where}: no {q.label_field!r} label for question {q.key!r}")
            q.answer(r.fields[q.label_field], where)
    return manifest


def check_split(manifest: Manifest, split: Mapping[str, Sequence[str]], where: str) -> None:
    """A split (of scan ids) must cover every manifest row exactly once and keep each subject in one split; errors
    name the manifest rows."""
    by_scan = {r.scan_id: r for r in manifest.rows}
    split_of: dict[str, str] = {}
    for s in SPLITS:
        for scan in split[s]:
            if scan not in by_scan:
                raise DataError(f"{where}: {s} lists scan {scan!r}, which {manifest.path} does not have")
            split_of[scan] = s
    unassigned = [r for r in manifest.rows if r.scan_id not in split_of]
    if unassigned:
        shown = ", ".join(f"row {r.number} ({r.scan_id})" for r in unassigned[:10])
        raise DataError(f"{where}: {len(unassigned)} scan(s) of {manifest.path} are in no split: {shown}")
    first: dict[str, ManifestRow] = {}
    for r in manifest.rows:
        other = first.setdefault(r.subject_id, r)
        if split_of[other.scan_id] != split_of[r.scan_id]:
            raise DataError(
                f"{manifest.path} row {r.number}: subject {r.subject_id!r} is in {split_of[r.scan_id]} here and in "
                f"{split_of[other.scan_id]} at row {other.number} ({where}); all scans of a subject must share a split"
            )


# --- IXI -------------------------------------------------------------------------------------------------------

AGE_GROUPS = ("under 40", "40 to 60", "over 60")
_HIPPOCAMPUS_ROIS, _ICV_ROI = ("47", "48"), "702"  # MUSE: right and left hippocampus; intracranial volume


def age_group(age: float) -> str:
    """< 40, 40-60 (both ends included), > 60 years."""
    return AGE_GROUPS[0] if age < 40 else AGE_GROUPS[1] if age <= 60 else AGE_GROUPS[2]


def ixi_questions() -> list[Question]:
    """Three questions whose answers are in the image, not in the text shown with them: sex (text: age only), age
    group (text: sex only), reduced hippocampal volume (text: age and sex)."""
    age_only = EHRTemplate(["A {age}-year-old subject."], formats={"age": "years"})
    sex_only = EHRTemplate(["A {sex} subject."], formats={"sex": "sex_adjective"})
    age_sex = EHRTemplate(["A {age}-year-old {sex}."], formats={"age": "years", "sex": "sex_word"})
    return [
        Question("sex", "What is the sex of this subject?", "sex", {"M": "Male", "F": "Female"}, age_only),
        Question(
            "age_group",
            "Which age group is this subject in: under 40, 40 to 60, or over 60?",
            "age_group",
            {g: g for g in AGE_GROUPS},
            sex_only,
            forbidden=("age",),
        ),
        Question(
            "hippocampus",
            "Is the hippocampal volume of this subject reduced?",
            "hippocampus_reduced",
            {"yes": "Yes", "no": "No"},
            age_sex,
            forbidden=("hippocampal_fraction",),
        ),
    ]


IXI_QUESTIONS = ("sex", "age_group", "hippocampus")


def _csv_by_id(path: Path, id_column: str) -> dict[str, dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path}: not found (expected in the IXI folder)")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and id_column not in rows[0]:
        raise DataError(f"{path}: no {id_column} column")
    return {r[id_column].strip(): r for r in rows}


def _hippocampal_fraction(roi: Mapping[str, str] | None) -> float | None:
    if roi is None:
        return None
    try:
        hippocampus = sum(float(roi[c]) for c in _HIPPOCAMPUS_ROIS)
        icv = float(roi[_ICV_ROI])
    except (KeyError, ValueError):
        return None
    return hippocampus / icv if icv > 0 else None


def _ixi_subject(mrid: str, person: Mapping[str, str] | None, roi: Mapping[str, str] | None) -> tuple[dict, str]:
    """(fields, "") for a usable subject, ({}, reason) for an excluded one."""
    if person is None:
        return {}, "not in participants.csv"
    age, sex = person.get("Age", ""), person.get("Sex", "").strip().upper()
    if is_missing(age):
        return {}, "age not recorded in participants.csv"
    if sex not in ("M", "F"):
        return {}, f"sex not recorded in participants.csv ({sex!r})"
    fraction = _hippocampal_fraction(roi)
    if fraction is None:
        return {}, "no usable hippocampus/ICV ROI volumes (47, 48, 702) in dlmuse_roi_volumes.csv"
    return {"age": f"{float(age):.2f}", "sex": sex, "age_group": age_group(float(age)),
            "hippocampal_fraction": f"{fraction:.6f}"}, ""  # fmt: skip


def write_ixi_manifest(root: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write a manifest CSV at ``out`` from the IXI 2 mm folder (``t1/<MRID>_T1.nii.gz``, ``participants.csv``,
    ``dlmuse_roi_volumes.csv``) and its report ``<out stem>.report.json``: every T1 volume is either a manifest row
    or an exclusion with its reason. Returns the report.

    ``hippocampus_reduced`` is an AUTOMATIC PSEUDO-LABEL, not a diagnosis: "yes" for the lowest third of the cohort's
    (ROI 47 + ROI 48) / ROI 702 (hippocampi over intracranial volume, from DLMUSE's automatic parcellation), over
    the subjects kept. In a healthy cohort it mostly tracks age, which is why its text shows age and sex.
    """
    root, out = Path(root), Path(out)
    images = sorted((root / "t1").glob("*_T1.nii.gz"))
    if not images:
        raise DataError(f"{root / 't1'}: no IXI T1 volumes (*_T1.nii.gz)")
    people = _csv_by_id(root / "participants.csv", "MRID")
    rois = _csv_by_id(root / "dlmuse_roi_volumes.csv", "MRID")
    kept, excluded = [], []
    for image in images:
        mrid = image.name[: -len("_T1.nii.gz")]
        fields, reason = _ixi_subject(mrid, people.get(mrid), rois.get(mrid))
        if reason:
            excluded.append({"subject_id": mrid, "image": str(image), "reason": reason})
        else:
            kept.append({"subject_id": mrid, "image": os.path.relpath(image, out.parent.resolve()), **fields})
    with_image = {e["subject_id"] for e in excluded} | {k["subject_id"] for k in kept}
    no_image = sorted(set(people) - with_image)
    fractions = sorted(float(k["hippocampal_fraction"]) for k in kept)
    threshold = fractions[len(fractions) // 3 - 1] if len(fractions) >= 3 else float("nan")  # top of lowest third
    for k in kept:
        k["hippocampus_reduced"] = "yes" if float(k["hippocampal_fraction"]) <= threshold else "no"
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = ["subject_id", "image", "age", "sex", "age_group", "hippocampal_fraction", "hippocampus_reduced"]
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(kept)
    report = {
        "manifest": str(out),
        "source": str(root),
        "n_volumes": len(images),
        "n_kept": len(kept),
        "excluded": excluded,
        "participants_without_volume": no_image,
        "hippocampus_threshold": threshold,
        "hippocampus_rule": "yes if (ROI47 + ROI48) / ROI702 <= threshold (lowest third of the kept cohort); "
        "automatic DLMUSE pseudo-label",
        "label_balance": {
            "sex": dict(Counter(k["sex"] for k in kept)),
            "age_group": dict(Counter(k["age_group"] for k in kept)),
            "hippocampus_reduced": dict(Counter(k["hippocampus_reduced"] for k in kept)),
        },
    }
    out.with_name(out.stem + ".report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
