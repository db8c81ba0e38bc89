"""The frozen-block wrapper against transformers' own full models, for every supported family."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_OVERRIDES, tiny_config
from transformers import AutoModel, AutoModelForCausalLM

from medboost.errors import BlockLoadError
from medboost.llm import ARCHITECTURES, FrozenBlock, load_block, read_layer
from medboost.llm.readers.memory import StateDictReader

DECODERS = [t for t in TINY_OVERRIDES if t != "bert"]


def tiny_model(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    config._attn_implementation = ARCHITECTURES[model_type].attn_implementation
    model = AutoModel.from_config(config) if model_type == "bert" else AutoModelForCausalLM.from_config(config)
    return model.eval()


def hidden_states(model, tokens: int = 6, seed: int = 1):
    """Every layer's input and output, as the full model computes them (causal, with RoPE)."""
    torch.manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, tokens))
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("model_type", DECODERS)
def test_block_weights_equal_the_full_models_layer(model_type):
    model = tiny_model(model_type)
    block = load_block(StateDictReader.from_model(model), layer=1)
    reference = model.model.layers[1].state_dict()
    ours = block.layer.state_dict()
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("model_type", DECODERS)
def test_causal_rope_block_reproduces_the_full_models_layer(model_type):
    # With the LLM's own settings (RoPE, causal mask) the block must compute what the layer computes inside its model.
    model = tiny_model(model_type)
    hs = hidden_states(model)
    for index in range(model.config.num_hidden_layers - 1):
        block = load_block(StateDictReader.from_model(model), layer=index, rope=True, causal=True)
        with torch.no_grad():
            out = block(hs[index])
        torch.testing.assert_close(out, hs[index + 1], rtol=1e-5, atol=1e-5)
    # The last hidden state has the final norm applied by the model.
    last = load_block(StateDictReader.from_model(model), layer=-1, rope=True, causal=True, final_norm=True)
    with torch.no_grad():
        torch.testing.assert_close(last(hs[-2]), hs[-1], rtol=1e-5, atol=1e-5)


def test_bert_layer_reproduces_the_full_model():
    model = tiny_model("bert")
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        block = load_block(StateDictReader.from_model(model), layer=2)
        torch.testing.assert_close(block(hs[2]), hs[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "bert"])
def test_default_block_is_bidirectional(model_type):
    # The SDPA pitfall: a layer called without a mask is silently causal. Ours must let token 0 see the last token.
    block = load_block(StateDictReader.from_model(tiny_model(model_type)), layer=0)
    torch.manual_seed(0)
    x = torch.randn(1, 5, 64)
    y = x.clone()
    y[:, -1] += 1.0
    with torch.no_grad():
        assert not torch.allclose(block(x)[:, 0], block(y)[:, 0])
    causal = load_block(StateDictReader.from_model(tiny_model(model_type)), layer=0, causal=True, rope=False)
    with torch.no_grad():
        torch.testing.assert_close(causal(x)[:, 0], causal(y)[:, 0], rtol=0, atol=0)


def test_no_rope_is_position_independent():
    # Without RoPE and without a mask, the block is permutation-equivariant over tokens.
    block = load_block(StateDictReader.from_model(tiny_model("llama")), layer=0)
    torch.manual_seed(0)
    x = torch.randn(2, 7, 64)
    perm = torch.randperm(7)
    with torch.no_grad():
        torch.testing.assert_close(block(x)[:, perm], block(x[:, perm]), rtol=1e-5, atol=1e-5)
    with_rope = load_block(StateDictReader.from_model(tiny_model("llama")), layer=0, rope=True)
    with torch.no_grad():
        assert not torch.allclose(with_rope(x)[:, perm], with_rope(x[:, perm]), atol=1e-4)


def test_frozen_block_passes_gradients_but_takes_none():
    block = load_block(StateDictReader.from_model(tiny_model("llama")), layer=-1)
    assert all(not p.requires_grad for p in block.parameters())
    block.train()
    assert not block.layer.training, "a frozen block must stay in eval mode under .train()"
    x = torch.randn(2, 5, 64, requires_grad=True)
    block(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in block.parameters())


def test_unfrozen_block_trains():
    block = load_block(StateDictReader.from_model(tiny_model("llama")), layer=0, frozen=False)
    block.train()
    assert block.layer.training
    block(torch.randn(2, 5, 64)).sum().backward()
    assert all(p.grad is not None for p in block.parameters())


def test_bfloat16_block_keeps_the_callers_dtype():
    reader = StateDictReader.from_model(tiny_model("llama"))
    fp32 = load_block(reader, layer=0)
    bf16 = load_block(reader, layer=0, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        out = bf16(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, fp32(x), rtol=0.05, atol=0.05)


def test_random_block_has_same_shapes_and_fresh_weights():
    reader = StateDictReader.from_model(tiny_model("llama"))
    pre = load_block(reader, layer=0)
    rnd = load_block(reader, layer=0, init="random", seed=3)
    again = load_block(reader, layer=0, init="random", seed=3)
    for (name, a), b, c in zip(pre.named_parameters(), rnd.parameters(), again.parameters()):
        assert a.shape == b.shape, name
        assert torch.equal(b, c), f"random init must be seeded: {name}"
        if a.dim() == 2:
            assert not torch.equal(a, b), name
    assert all(not p.requires_grad for p in rnd.parameters())


def test_layer_index_errors_name_the_range():
    reader = StateDictReader.from_model(tiny_model("llama"), source="tiny-llama")
    with pytest.raises(BlockLoadError, match=r"tiny-llama: layer 3 is out of range: the model has 3 layers"):
        load_block(reader, layer=3)
    with pytest.raises(BlockLoadError, match="out of range"):
        load_block(reader, layer=-4)
    assert read_layer(reader, -3).index == 0


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import GPT2Config

    reader = StateDictReader(GPT2Config(n_layer=2, n_embd=32, n_head=2), {}, source="tiny-gpt2")
    with pytest.raises(BlockLoadError, match=r"tiny-gpt2: architecture 'gpt2' is not supported; supported: .*llama"):
        load_block(reader)


def test_final_norm_on_an_encoder_is_refused():
    reader = StateDictReader.from_model(tiny_model("bert"), source="tiny-bert")
    with pytest.raises(BlockLoadError, match="no final norm"):
        load_block(reader, final_norm=True)


def test_wrong_input_width_is_a_clear_error():
    block = load_block(StateDictReader.from_model(tiny_model("llama")), layer=0)
    assert isinstance(block, FrozenBlock)
    with pytest.raises(ValueError, match=r"expects \(batch, tokens, 64\)"):
        block(torch.randn(2, 5, 32))


def test_missing_layer_tensor_is_reported():
    model = tiny_model("llama")
    state = {k: v for k, v in model.state_dict().items() if k != "model.layers.0.mlp.up_proj.weight"}
    with pytest.raises(BlockLoadError, match="up_proj"):
        load_block(StateDictReader(model.config, state, source="broken"), layer=0)
