"""What the vision-language tests share: the real IXI folder and a dementia-style question on a tiny manifest."""

from __future__ import annotations

from pathlib import Path

from medboost.data.clinical_text import EHRTemplate, Question

ROOT = Path(__file__).parents[1]
IXI = ROOT.parent / "shared" / "data" / "brain" / "ixi_2mm"

QUESTION = Question(
    "diagnosis",
    "What will this subject be diagnosed with?",
    "label",
    {"CN": "Not demented", "AD": "Dementia"},
    EHRTemplate(["A {age}-year-old subject."], formats={"age": "years"}),
)
