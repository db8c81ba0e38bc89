"""Tiny random transformers models of every supported family, for format and equality tests (no network)."""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

# Small but structurally faithful: grouped-query attention (kv heads < heads), >= 3 layers, head_dim a multiple of 2.
_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)

TINY_OVERRIDES: dict[str, dict] = {
    "llama": dict(_COMMON, rms_norm_eps=1e-5, rope_theta=10000.0),
    "mistral": dict(_COMMON, sliding_window=None),
    "qwen2": dict(_COMMON),
    "qwen3": dict(_COMMON, head_dim=16),
    "gemma": dict(_COMMON, head_dim=16),
    "gemma2": dict(_COMMON, head_dim=16, query_pre_attn_scalar=16),
    "gemma3_text": dict(_COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, sliding_window_pattern=2),
    "phi3": dict(_COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "bert": dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
    ),
}


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    kwargs = dict(TINY_OVERRIDES[model_type])
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)
