"""The vision-language data module: a checked manifest, a subject-level split made before anything else, MedBLIP
preprocessing at size ``N`` (cached), and samples of (volume, EHR text, question, answer, candidate answers).

Each manifest row gives one sample per question, and one per question/answer pair of its own (free questions: their
candidate answers are the distinct answers that the manifest gives to the same question text; their EHR text comes
from ``qa_template``, empty without one). The split is over subjects (scan id -> subject id as ``groups``),
so every question about a subject, and every scan of it, lands in one split. Batches keep texts as lists (see
:func:`collate_vl`).

``leak_answer`` is a CONTROL only: it appends each sample's answer to its EHR text (:data:`LEAK_TEMPLATE`), so a
model that reads the text must answer ~100% correctly; a benchmark runs it to prove that the text path works.

The cache holds each preprocessed volume once (shared by that row's questions) as float16: values lie in [0, 1],
where float16 keeps ~3 significant digits, and a 224^3 volume takes 22 MB instead of 45 MB. With ``cache_dir`` the
volumes are kept on disk (``.npy``, keyed by the file's path, size, modification time and ``N``) and read per item.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medboost.data.base import SplitDataModule
from medboost.data.clinical_text import EHRTemplate, Question
from medboost.data.splits import SPLITS, load_split, make_split, split_md5
from medboost.data.vl_manifest import Manifest, ManifestRow, check_split, ixi_questions, read_manifest
from medboost.data.volumes import medblip_preprocessing
from medboost.errors import ConfigError, DataError

__all__ = [
    "LEAK_TEMPLATE",
    "FreeQA",
    "VisionLanguageDataModule",
    "VisionLanguageDataset",
    "VolumeCache",
    "collate_vl",
    "free_qa",
    "resolve_questions",
]

_QUESTION_PRESETS = {"ixi": ixi_questions}
#: How ``leak_answer`` (a control) writes the answer into the EHR text.
LEAK_TEMPLATE = "{ehr} The answer is {answer}."


def resolve_questions(questions: str | Sequence[Question]) -> list[Question]:
    """A preset name (``"ixi"``) or a list of :class:`~medboost.data.clinical_text.Question`."""
    if isinstance(questions, str):
        if questions not in _QUESTION_PRESETS:
            raise ConfigError(f"unknown question preset {questions!r}; expected one of {', '.join(_QUESTION_PRESETS)}")
        return _QUESTION_PRESETS[questions]()
    questions = list(questions)
    keys = [q.key for q in questions]
    if not questions or len(set(keys)) != len(keys):
        raise ConfigError(f"questions must be a non-empty list with distinct keys, got {keys}")
    return questions


def _file_key(image: Path, size: int) -> str:
    # A DICOM folder's own mtime changes when a slice is added or removed; its files' sizes cover rewrites.
    paths = sorted(p for p in image.iterdir() if p.is_file()) if image.is_dir() else [image]
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    return hashlib.sha1(f"{image.resolve()}|{size}|{stats}|v1".encode(), usedforsecurity=False).hexdigest()


class VolumeCache:
    """Preprocessed volumes by manifest row, in memory or as ``.npy`` files in ``cache_dir``."""

    def __init__(self, manifest: Manifest, size: int, cache_dir: str | os.PathLike | None = None):
        self.manifest = manifest
        self.size = size
        self.preprocess = medblip_preprocessing(size)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: dict[str, np.ndarray] = {}
        self._files: dict[str, Path] = {}

    def _compute(self, row: ManifestRow) -> np.ndarray:
        try:
            volume = self.preprocess({"image": row.image})["image"]
        except DataError as exc:
            raise DataError(f"{self.manifest.where(row)}: {exc}") from exc
        return volume.numpy().astype(np.float16)

    def fill(self, row: ManifestRow) -> None:
        """Preprocess one row now (errors name the manifest row), unless it is cached."""
        if row.scan_id in self._memory or row.scan_id in self._files:
            return
        if self.cache_dir is None:
            self._memory[row.scan_id] = self._compute(row)
            return
        path = self.cache_dir / f"{_file_key(row.image, self.size)}.npy"
        if not path.is_file():
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, self._compute(row))
            tmp.replace(path)  # atomic: a reader never sees half a file
        self._files[row.scan_id] = path

    def get(self, row: ManifestRow) -> torch.Tensor:
        self.fill(row)
        array = self._memory[row.scan_id] if self.cache_dir is None else np.load(self._files[row.scan_id])
        return torch.from_numpy(array.astype(np.float32))


@dataclass(frozen=True)
class FreeQA:
    """A manifest row's own question/answer pair (``k``: its place in the row) with the EHR template shown with it."""

    k: int
    question: str
    answer: str
    candidates: tuple[str, ...]
    template: EHRTemplate | None
    forbidden: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"qa{self.k}"

    def ehr_text(self, row: ManifestRow, where: str) -> str:
        return "" if self.template is None else self.template.render(row.fields, where, forbidden=self.forbidden)


def free_qa(manifest: Manifest, template: EHRTemplate | None, forbidden: Sequence[str] = ()) -> dict[str, list[FreeQA]]:
    """Every row's own question/answer pairs by scan id; candidates per question text over the whole manifest."""
    answers: dict[str, list[str]] = {}
    for r in manifest.rows:
        for question, answer in r.qa:
            answers.setdefault(question, [])
            if answer not in answers[question]:
                answers[question].append(answer)
    return {
        r.scan_id: [FreeQA(k, q, a, tuple(answers[q]), template, tuple(forbidden)) for k, (q, a) in enumerate(r.qa)]
        for r in manifest.rows
    }


class VisionLanguageDataset(Dataset):
    """Samples ``(volume (1, N, N, N) float32, EHR text, question, answer, candidate answers)``: every row with every
    question, then the row's own question/answer pairs, row by row. :attr:`sample_ids` names them
    ``"<scan_id>/<question key>"`` (``"<scan_id>/qa<k>"`` for a row's own pairs). ``leak_answer`` (a control)
    appends each sample's answer to its EHR text."""

    def __init__(
        self,
        manifest: Manifest,
        rows: Sequence[ManifestRow],
        questions: Sequence[Question],
        cache: VolumeCache,
        qa: dict[str, list[FreeQA]] | None = None,
        leak_answer: bool = False,
    ):
        self.manifest = manifest
        self.leak_answer = leak_answer
        qa = qa or {}
        self.items: list[tuple[ManifestRow, Question | FreeQA]] = [
            (r, q) for r in rows for q in [*questions, *qa.get(r.scan_id, [])]
        ]
        self.cache = cache

    def __len__(self) -> int:
        return len(self.items)

    @property
    def sample_ids(self) -> list[str]:
        return [f"{r.scan_id}/{q.key}" for r, q in self.items]

    def texts(self, index: int) -> tuple[str, str, str, list[str]]:
        """EHR text, question, answer and candidates of one sample (no volume read)."""
        row, q = self.items[index]
        where = self.manifest.where(row)
        if isinstance(q, FreeQA):
            ehr, question, answer, candidates = q.ehr_text(row, where), q.question, q.answer, list(q.candidates)
        else:
            ehr, question = q.ehr_text(row.fields, where), q.text
            answer, candidates = q.answer(row.fields[q.label_field], where), q.candidates
        if self.leak_answer:
            ehr = LEAK_TEMPLATE.format(ehr=ehr, answer=answer).strip()
        return ehr, question, answer, candidates

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, str, str, list[str]]:
        return (self.cache.get(self.items[index][0]), *self.texts(index))


def collate_vl(batch: Sequence[tuple]) -> dict[str, Any]:
    """A batch as a dict: ``image`` (B, 1, N, N, N), ``ehr_text``, ``question``, ``answer`` (lists of str),
    ``candidates`` (a list of answer lists, one per sample, untransposed) and ``index`` (B,)."""
    images, texts, questions, answers, candidates, indices = zip(*batch)
    return {
        "image": torch.stack(images),
        "ehr_text": list(texts),
        "question": list(questions),
        "answer": list(answers),
        "candidates": [list(c) for c in candidates],
        "index": torch.as_tensor(indices, dtype=torch.long),
    }


class VisionLanguageDataModule(SplitDataModule[VisionLanguageDataset]):
    """A manifest served as train/val/test loaders of vision-language samples.

    The split is read from ``split_file`` (scan ids; it must cover every row and keep subjects whole) or made by
    :func:`~medboost.data.splits.make_split` over subjects with ``seed``; it is fixed before any volume is read.
    All volumes are then preprocessed once at :meth:`setup`, so a bad volume stops the run there, naming its row.
    ``leak_answer`` is the leakage CONTROL (each answer appended to its EHR text); never a real setting.
    """

    def __init__(
        self,
        manifest: str | os.PathLike,
        questions: str | Sequence[Question] = "ixi",
        size: int = 224,
        split_file: str | os.PathLike | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        cache_dir: str | os.PathLike | None = None,
        qa_template: EHRTemplate | None = None,
        qa_forbidden: Sequence[str] = (),
        batch_size: int = 7,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        leak_answer: bool = False,
    ):
        super().__init__(batch_size, num_workers, seed, pin_memory, drop_last)
        if size < 1:
            raise ConfigError(f"size must be >= 1, got {size}")
        self.manifest_path = Path(manifest)
        self.questions = resolve_questions(questions)
        self.size = size
        self.split_file = Path(split_file) if split_file is not None else None
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.cache_dir = cache_dir
        self.qa_template, self.qa_forbidden = qa_template, tuple(qa_forbidden)
        self.leak_answer = leak_answer
        self.manifest: Manifest | None = None
        self.split: dict[str, list[str]] = {}

    @property
    def source(self) -> str:
        return str(self.manifest_path)

    def collate_fn(self):
        return collate_vl

    def _make_split(self, manifest: Manifest) -> dict[str, list[str]]:
        if self.split_file is not None:
            split = load_split(self.split_file)
            check_split(manifest, split, str(self.split_file))
            return split
        ids = [r.scan_id for r in manifest.rows]
        return make_split(ids, self.seed, self.val_fraction, self.test_fraction, groups=manifest.groups)

    def build_datasets(self) -> dict[str, VisionLanguageDataset]:
        manifest = read_manifest(self.manifest_path, self.questions)
        self.manifest = manifest
        self.split = self._make_split(manifest)
        qa = free_qa(manifest, self.qa_template, self.qa_forbidden)
        cache = VolumeCache(manifest, self.size, self.cache_dir)
        by_scan = {r.scan_id: r for r in manifest.rows}
        datasets = {}
        for s in SPLITS:
            rows = [by_scan[i] for i in self.split[s]]
            datasets[s] = VisionLanguageDataset(manifest, rows, self.questions, cache, qa, self.leak_answer)
            for i in range(len(datasets[s])):
                datasets[s].texts(i)  # every text renders (free-question templates too) before any volume is read
        for r in manifest.rows:
            cache.fill(r)
        return datasets

    def record(self) -> dict[str, Any]:
        manifest_md5 = hashlib.md5(self.manifest_path.read_bytes(), usedforsecurity=False).hexdigest()
        return {
            **super().record(),
            "manifest": str(self.manifest_path),
            "manifest_md5": manifest_md5,
            "split_file": str(self.split_file) if self.split_file else None,
            "split_md5": split_md5(self.split),
            "n_subjects": {s: len({self.manifest.groups[i] for i in self.split[s]}) for s in SPLITS},
            "questions": [q.key for q in self.questions],
            "size": self.size,
            "leak_answer": self.leak_answer,
        }
