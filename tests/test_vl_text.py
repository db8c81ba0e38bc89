"""EHR text templates, forbidden fields, answer maps (MedBLIP's, CDR) and the OASIS-1 table as EHR records."""

from __future__ import annotations

from pathlib import Path

import pytest

from medboost.data.clinical_text import (
    DEMENTIA,
    MCI,
    NOT_DEMENTED,
    OASIS1_TEMPLATE,
    EHRTemplate,
    Question,
    cdr_answer,
    diagnosis_question,
    oasis1_ehr_rows,
)
from medboost.errors import ConfigError, DataError

OASIS = Path(__file__).parents[1].parent / "shared" / "data" / "brain" / "oasis1_clinical.csv"

TEMPLATE = EHRTemplate(
    ["A {age}-year-old {hand} {sex} with {educ} years of education.", "MMSE {mmse}."],
    formats={"age": "years", "hand": "handedness", "sex": "sex_word", "educ": "number", "mmse": "number"},
    names={"mmse": "MMSE", "educ": "education"},
)
ROW = {"age": "74.6", "hand": "R", "sex": "F", "educ": "12", "mmse": "29.0", "label": "CN"}


def test_template_renders_fields_through_formatters():
    assert TEMPLATE.render(ROW) == "A 74-year-old right-handed woman with 12 years of education. MMSE 29."


@pytest.mark.parametrize("empty", ["", "N/A", None, float("nan")])
def test_missing_value_is_said_plainly(empty):
    text = TEMPLATE.render({**ROW, "mmse": empty})
    assert text.endswith("MMSE not recorded.") and "nan" not in text.lower()
    both = TEMPLATE.render({**ROW, "educ": empty, "age": empty})
    assert both.startswith("Age and education not recorded.")


def test_field_the_row_lacks_is_one_error_naming_row_and_field():
    row = {k: v for k, v in ROW.items() if k != "mmse"}
    with pytest.raises(DataError, match=r"^m.csv row 7: the EHR template needs field 'mmse'"):
        TEMPLATE.render(row, "m.csv row 7")


def test_unconvertible_value_names_row_and_field():
    with pytest.raises(DataError, match=r"row 3: field 'hand' = 'X' cannot be written"):
        TEMPLATE.render({**ROW, "hand": "X"}, "row 3")


def test_forbidden_field_is_refused_by_renderer_and_question():
    with pytest.raises(ConfigError, match="would show mmse"):
        TEMPLATE.render(ROW, forbidden=("mmse",))
    with pytest.raises(ConfigError, match="question 'q'.*would show sex"):
        Question("q", "Sex?", "sex", {"M": "Male", "F": "Female"}, TEMPLATE)  # the label field itself
    with pytest.raises(ConfigError, match="would show age"):
        Question("q", "Old?", "label", {"cn": "x"}, TEMPLATE, forbidden=("age",))


def test_medblip_answer_map_is_the_default_and_configurable():
    q = diagnosis_question(TEMPLATE)
    assert [q.answer(x) for x in ("AD", "Demented", "cn", " NC ", "Nondemented", "control", "MCI")] == [
        DEMENTIA, DEMENTIA, NOT_DEMENTED, NOT_DEMENTED, NOT_DEMENTED, NOT_DEMENTED, MCI,
    ]  # fmt: skip
    assert q.candidates == [DEMENTIA, NOT_DEMENTED, MCI]
    assert q.ehr_text(ROW).startswith("A 74-year-old")
    with pytest.raises(DataError, match=r"m.csv row 4: unknown label 'SMC' for question 'diagnosis'"):
        q.answer("SMC", "m.csv row 4")
    custom = diagnosis_question(TEMPLATE, answers={"AD": "Alzheimer's disease", "CN": "Healthy"})
    assert custom.answer("ad") == "Alzheimer's disease" and custom.candidates == ["Alzheimer's disease", "Healthy"]


def test_cdr_mapping():
    assert [cdr_answer(x) for x in (0, "0.5", 1, "2", 3.0)] == [NOT_DEMENTED, MCI, DEMENTIA, DEMENTIA, DEMENTIA]
    with pytest.raises(ValueError, match="CDR must be"):
        cdr_answer(0.7)


def test_oasis1_table_as_ehr_rows():
    if not OASIS.is_file():
        pytest.skip(f"real data {OASIS} is absent")
    rows = oasis1_ehr_rows(OASIS)
    assert len(rows) == 436
    first = rows[0]  # OAS1_0001_MR1,F,R,74,2,3,29,0
    assert first["text"] == (
        "A 74-year-old right-handed woman. Education: high-school graduate. Socioeconomic status 3 of 5. "
        "Mini-Mental State Examination score 29 of 30."
    )
    assert first["answer"] == NOT_DEMENTED
    # Young controls without CDR are kept with no answer; 235 rows have a CDR (the table's documented count).
    assert sum(r["answer"] is not None for r in rows) == 235
    assert rows[3]["text"].endswith("MMSE not recorded.") and rows[3]["answer"] is None
    assert not any("CDR" in r["text"] or "Clinical Dementia" in r["text"] for r in rows)
    assert "cdr" not in OASIS1_TEMPLATE.fields
