"""Clinical (EHR) text from tabular fields, the questions asked about a subject, and their answers from labels.

An :class:`EHRTemplate` is a list of sentences with ``{field}`` slots. A field whose value is empty is said plainly
(``"MMSE not recorded."`` replaces its sentence); a field the row does not have at all is an error naming the row and
the field, because it means the table and the template do not match.

A :class:`Question` names the label field its answer comes from, the map from label values to answer strings, and
the fields that must NOT appear in its EHR text: text that states the answer (or the label) makes an image + text
result meaningless, so rendering a forbidden field is refused.

Diagnosis answers follow MedBLIP (AD/Demented -> "Dementia", CN/NC/Nondemented/control -> "Not demented", MCI ->
"mild cognitive impairment (MCI)"). OASIS-1 has no diagnosis column, only the Clinical Dementia Rating; see
:func:`cdr_answer` for the mapping used.
"""

from __future__ import annotations

import csv
import math
import os
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medboost.errors import ConfigError, DataError

__all__ = [
    "DEMENTIA",
    "DIAGNOSIS_ANSWERS",
    "DIAGNOSIS_QUESTION",
    "MCI",
    "NOT_DEMENTED",
    "OASIS1_TEMPLATE",
    "EHRTemplate",
    "Question",
    "cdr_answer",
    "diagnosis_question",
    "is_missing",
    "oasis1_ehr_rows",
]

DEMENTIA, NOT_DEMENTED, MCI = "Dementia", "Not demented", "mild cognitive impairment (MCI)"
# MedBLIP's label -> answer map; keys are compared case-insensitively.
DIAGNOSIS_ANSWERS: dict[str, str] = {
    "ad": DEMENTIA,
    "demented": DEMENTIA,
    "cn": NOT_DEMENTED,
    "nc": NOT_DEMENTED,
    "nondemented": NOT_DEMENTED,
    "control": NOT_DEMENTED,
    "mci": MCI,
}
DIAGNOSIS_QUESTION = "What will this subject be diagnosed with?"
_MISSING_STRINGS = {"", "na", "n/a", "nan", "none", "null"}


def is_missing(value: Any) -> bool:
    """None, NaN, or an empty / "N/A" / "nan" string: a value the record does not have."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in _MISSING_STRINGS


def _number(value: Any) -> str:
    # "74.0" and 74.0 both read as "74"; non-integral numbers keep one decimal.
    x = float(value)
    return str(int(round(x))) if abs(x - round(x)) < 1e-9 else f"{x:.1f}"


def _years(value: Any) -> str:
    return str(int(math.floor(float(value))))


_SEX_WORDS = {"m": "man", "male": "man", "f": "woman", "female": "woman"}
_HAND_WORDS = {"r": "right-handed", "l": "left-handed", "a": "ambidextrous", "b": "ambidextrous"}
# OASIS-1 "Educ" is a code, not years: 1 < high school, 2 high-school graduate, 3 some college, 4 college graduate,
# 5 beyond college (OASIS fact sheet).
_OASIS_EDUCATION = {
    1: "less than high school",
    2: "high-school graduate",
    3: "some college",
    4: "college graduate",
    5: "beyond college",
}


def _word(words: Mapping[str, str], what: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        key = str(value).strip().lower()
        if key not in words:
            raise ValueError(f"unknown {what} {value!r} (expected one of {', '.join(sorted(words))})")
        return words[key]

    return convert


def _oasis_education(value: Any) -> str:
    code = int(float(value))
    if code not in _OASIS_EDUCATION:
        raise ValueError(f"unknown OASIS education code {value!r} (expected 1-5)")
    return _OASIS_EDUCATION[code]


FORMATTERS: dict[str, Callable[[Any], str]] = {
    "number": _number,
    "years": _years,
    "sex_word": _word(_SEX_WORDS, "sex"),
    "sex_adjective": _word({"m": "male", "male": "male", "f": "female", "female": "female"}, "sex"),
    "handedness": _word(_HAND_WORDS, "handedness"),
    "oasis_education": _oasis_education,
    "text": str,
}


@dataclass(frozen=True)
class EHRTemplate:
    """Sentences with ``{field}`` slots, each field shown through a named formatter (:data:`FORMATTERS`, default
    ``"text"``), and the plain words for a field in "<words> not recorded." (default: the field name)."""

    sentences: Sequence[str]
    formats: Mapping[str, str] = field(default_factory=dict)
    names: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.formats.values()) - set(FORMATTERS))
        if unknown:
            raise ConfigError(f"unknown formatter(s) {', '.join(unknown)}; expected one of {', '.join(FORMATTERS)}")

    @staticmethod
    def _fields_of(sentence: str) -> list[str]:
        return [name for _, name, _, _ in string.Formatter().parse(sentence) if name]

    @property
    def fields(self) -> list[str]:
        """Every field the template shows, in order of first use."""
        return list(dict.fromkeys(f for s in self.sentences for f in self._fields_of(s)))

    def check_allowed(self, forbidden: Sequence[str], where: str = "template") -> None:
        """Refuse a template that would show a forbidden field (one that states a question's answer)."""
        shown = sorted(set(self.fields) & set(forbidden))
        if shown:
            raise ConfigError(f"{where}: the EHR text would show {', '.join(shown)}, which this question forbids")

    def render(self, row: Mapping[str, Any], where: str = "row", forbidden: Sequence[str] = ()) -> str:
        """The text of one record. ``where`` names the row in errors (e.g. ``"manifest.csv row 12"``)."""
        self.check_allowed(forbidden, where)
        absent = [f for f in self.fields if f not in row]
        if absent:
            raise DataError(f"{where}: the EHR template needs field {absent[0]!r}, which the row does not have")
        return " ".join(self._sentence(s, row, where) for s in self.sentences)

    def _sentence(self, sentence: str, row: Mapping[str, Any], where: str) -> str:
        names = self._fields_of(sentence)
        missing = [n for n in names if is_missing(row[n])]
        if missing:
            words = [self.names.get(n, n) for n in missing]
            said = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
            return f"{said[:1].upper()}{said[1:]} not recorded."
        values = {}
        for n in names:
            try:
                values[n] = FORMATTERS[self.formats.get(n, "text")](row[n])
            except (TypeError, ValueError) as exc:
                raise DataError(f"{where}: field {n!r} = {row[n]!r} cannot be written as text ({exc})") from exc
        return sentence.format(**values)


@dataclass(frozen=True)
class Question:
    """A closed question about a subject: its text, the label field its answer comes from, the answer for each label
    value (keys compared case-insensitively), the EHR template shown with it and the fields that text must not
    show. ``key`` names the question in sample ids and reports."""

    key: str
    text: str
    label_field: str
    answers: Mapping[str, str]
    template: EHRTemplate
    forbidden: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not self.answers:
            raise ConfigError(f"question {self.key!r}: needs at least one label -> answer entry")
        # The label field itself always counts as forbidden: the text must never state the answer's source.
        self.template.check_allowed([*self.forbidden, self.label_field], f"question {self.key!r}")

    @property
    def candidates(self) -> list[str]:
        """The distinct answers, in first-listed order (the closed answer set for accuracy and zero-shot)."""
        return list(dict.fromkeys(self.answers.values()))

    def answer(self, label: Any, where: str = "row") -> str:
        """The answer for one label value; an unknown label is an error naming the row (never silently dropped)."""
        key = _label_key(label)
        table = {_label_key(k): v for k, v in self.answers.items()}
        if key not in table:
            raise DataError(
                f"{where}: unknown label {label!r} for question {self.key!r} "
                f"(field {self.label_field!r}); expected one of {', '.join(map(str, self.answers))}"
            )
        return table[key]

    def ehr_text(self, row: Mapping[str, Any], where: str = "row") -> str:
        return self.template.render(row, where, forbidden=[*self.forbidden, self.label_field])


def _label_key(label: Any) -> str:
    # 0.5, "0.5" and "0.50" are one label; strings compare case- and space-insensitively.
    text = str(label).strip().lower()
    try:
        return repr(float(text))
    except ValueError:
        return text


def cdr_answer(cdr: Any) -> str:
    """OASIS Clinical Dementia Rating -> diagnosis answer: 0 -> "Not demented", 0.5 -> MCI, >= 1 -> "Dementia".

    CDR 0.5 is "very mild" (questionable) dementia; it is the usual stand-in for MCI in OASIS studies, and mapping
    it to MCI keeps MedBLIP's three answers rather than inventing a fourth. Raises ValueError for other values.
    """
    value = float(cdr)
    if value == 0:
        return NOT_DEMENTED
    if value == 0.5:
        return MCI
    if value in (1, 2, 3):
        return DEMENTIA
    raise ValueError(f"CDR must be 0, 0.5, 1, 2 or 3, got {cdr!r}")


def diagnosis_question(
    template: EHRTemplate, label_field: str = "label", answers: Mapping[str, str] | None = None, **kw: Any
) -> Question:
    """MedBLIP's question ("What will this subject be diagnosed with?") with its label map (configurable)."""
    return Question("diagnosis", DIAGNOSIS_QUESTION, label_field, dict(answers or DIAGNOSIS_ANSWERS), template, **kw)


# MMSE is allowed (MedBLIP shows it) but leaks the diagnosis strongly: pair image + text runs with a text-only control.
OASIS1_TEMPLATE = EHRTemplate(
    sentences=[
        "A {age}-year-old {hand} {sex}.",
        "Education: {educ}.",
        "Socioeconomic status {ses} of 5.",
        "Mini-Mental State Examination score {mmse} of 30.",
    ],
    formats={"age": "years", "hand": "handedness", "sex": "sex_word", "educ": "oasis_education", "ses": "number",
             "mmse": "number"},
    names={"age": "age", "hand": "handedness", "sex": "sex", "educ": "education", "ses": "socioeconomic status",
           "mmse": "MMSE"},
)  # fmt: skip

_OASIS_COLUMNS = {"ID": "subject_id", "M/F": "sex", "Hand": "hand", "Age": "age", "Educ": "educ", "SES": "ses",
                  "MMSE": "mmse", "CDR": "cdr", "eTIV": "etiv", "nWBV": "nwbv"}  # fmt: skip


def oasis1_ehr_rows(path: str | os.PathLike, template: EHRTemplate = OASIS1_TEMPLATE) -> list[dict[str, Any]]:
    """The OASIS-1 clinical table as EHR records: each row's fields (lower-case names), ``text`` (rendered
    without CDR, the label) and ``answer`` from :func:`cdr_answer`, or None where CDR is not recorded (OASIS-1's
    young controls have no CDR; they are kept, not dropped, and the caller decides)."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            table = list(csv.DictReader(f))
    except OSError as exc:
        raise DataError(f"{path}: cannot read the OASIS-1 clinical table ({exc})") from exc
    if not table or any(c not in table[0] for c in _OASIS_COLUMNS):
        raise DataError(f"{path}: not the OASIS-1 table; expected columns {', '.join(_OASIS_COLUMNS)}")
    question = diagnosis_question(template, label_field="cdr")
    rows = []
    for number, raw in enumerate(table, start=2):  # row 1 is the header
        row: dict[str, Any] = {new: raw[old] for old, new in _OASIS_COLUMNS.items()}
        where = f"{path} row {number}"
        row["text"] = question.ehr_text(row, where)
        try:
            row["answer"] = None if is_missing(row["cdr"]) else cdr_answer(row["cdr"])
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from exc
        rows.append(row)
    return rows
