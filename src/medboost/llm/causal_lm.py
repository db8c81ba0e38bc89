"""A whole frozen causal language model (and its tokenizer) from any supported checkpoint, for vision-language use.

MedBLIP-style models feed projected image queries into a frozen LLM that generates text; they need every layer, the
embeddings and the LM head, not one block. This module builds that model from the same :class:`CheckpointReader`
interface the single-layer path uses, so every format (GGUF, safetensors folder or hub, Meta ``.pth``) works here too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from medboost.errors import BlockLoadError
from medboost.llm.architectures import architecture_for, text_config
from medboost.llm.load import meta_tensors, open_reader
from medboost.llm.readers import CheckpointReader


def freeze(model: nn.Module) -> nn.Module:
    """No parameter requires grad and the model is in eval mode (as LAVIS pins BLIP-2's frozen parts)."""
    model.requires_grad_(False)
    return model.eval()


def load_causal_lm(
    source: str | Path | CheckpointReader, dtype: torch.dtype = torch.float32, frozen: bool = True
) -> PreTrainedModel:
    """Every weight of a decoder LLM into its transformers ``*ForCausalLM`` class (built on the meta device, weights
    assigned once, so peak memory is one copy of the model)."""
    with open_reader(source) as reader:
        config = text_config(reader.config)
        arch = architecture_for(config, reader.source)
        if arch.kind != "decoder":
            raise BlockLoadError(f"{reader.source}: {config.model_type} is an encoder, not a causal language model")
        config._attn_implementation = arch.attn_implementation
        # The meta device is a thread-local context, not a patch of torch: parameters cost no memory (and their random
        # init no time) until the checkpoint's tensors are assigned below.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        names = reader.tensor_names()
        # Cast the weights, not the model: buffers the constructors computed (rotary frequencies, Gemma's embedding
        # scale) stay float32 as in transformers' own bf16 load; `model.to(bf16)` would round them.
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in reader.read(names).items()}
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if "lm_head.weight" not in state and tied:
            state["lm_head.weight"] = state[_embedding_name(state, reader.source)]
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            raise BlockLoadError(f"{reader.source}: the checkpoint does not fit {type(model).__name__}: {err}") from err
        if tied:
            model.tie_weights()
        _compute_buffers(model, reader.source)
    return freeze(model) if frozen else model


def _embedding_name(state: dict, source: str) -> str:
    for name in state:
        if name.endswith("embed_tokens.weight"):
            return name
    raise BlockLoadError(f"{source}: no token embedding found to tie the LM head to")


def _compute_buffers(model: PreTrainedModel, source: str) -> None:
    """Compute the buffers checkpoints do not hold (rotary frequencies, Gemma's embedding scale), left empty on the
    meta device, as transformers' own load does: with the model's ``_init_weights`` on the modules that own them.
    Their loaded parameters are flagged as initialised, which transformers' init functions honour, so they are kept.
    """
    for module in model.modules():
        empty = [name for name, buffer in module.named_buffers(recurse=False) if buffer.is_meta]
        if not empty:
            continue
        for name in empty:
            setattr(module, name, torch.empty_like(getattr(module, name), device="cpu"))
        for param in module.parameters(recurse=False):
            param._is_hf_initialized = True
        model._init_weights(module)
    left = meta_tensors(model)
    if left:
        raise BlockLoadError(f"{source}: tensors neither in the checkpoint nor computed: {', '.join(left)}")


def load_tokenizer(source: str | Path):
    """The tokenizer that goes with :func:`load_causal_lm`'s model: from the GGUF metadata for a ``.gguf`` file,
    else from the Hugging Face folder or hub id."""
    from transformers import AutoTokenizer

    from medboost.llm.presets import PRESETS

    resolved = PRESETS[str(source)].resolve() if str(source) in PRESETS else str(source)
    path = Path(resolved)
    try:
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as err:
        raise BlockLoadError(f"{resolved}: cannot load the tokenizer: {err}") from err
