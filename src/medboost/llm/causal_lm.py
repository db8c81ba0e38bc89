"""A whole frozen causal language model (and its tokenizer) from any supported checkpoint, for vision-language use.

MedBLIP-style models feed projected image queries into a frozen LLM that generates text; they need every layer, the
embeddings and the LM head, not one block. This module builds that model from the same :class:`CheckpointReader`
interface the single-layer path uses, so every format (GGUF, safetensors folder or hub, Meta ``.pth``) works here too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from medboost.errors import BlockLoadError
from medboost.llm.architectures import ARCHITECTURES, Architecture, text_config
from medboost.llm.load import meta_tensors, open_reader
from medboost.llm.readers import CheckpointReader


@dataclass(frozen=True)
class WholeModelFamily:
    """A causal LM family :func:`load_causal_lm` loads whole although medboost cannot host its layers one at a time
    (:data:`medboost.llm.architectures.ARCHITECTURES` drives single-layer extraction; these rows are not in it)."""

    model_type: str
    # The *ForCausalLM's base-model attribute: save_pretrained writes "transformer.h.0...", original checkpoints
    # (OpenAI's GPT-2 and its conversions) store the same tensors without it ("h.0...", "wte.weight").
    base_prefix: str
    embedding: str  # the token embedding (under base_prefix) that a tied LM head shares
    attn_implementation: str = "sdpa"
    # Checkpoint tensors the model no longer declares: GPT-2's causal-mask buffers, stored by old transformers
    # releases; transformers ignores them on load, and so does medboost (only when the model has no such tensor).
    obsolete_suffixes: tuple[str, ...] = ()


WHOLE_MODEL_ONLY: dict[str, WholeModelFamily] = {
    f.model_type: f
    for f in [
        # GPT-2 (and BioMedLM, a GPT-2): absolute position embeddings, LM head tied to transformer.wte. In
        # transformers >= 5 its attention holds no buffers (masks come from masking_utils), so none are computed.
        WholeModelFamily(
            "gpt2",
            base_prefix="transformer.",
            embedding="wte.weight",
            obsolete_suffixes=(
                ".attn.bias",
                ".attn.masked_bias",
                ".crossattention.bias",
                ".crossattention.masked_bias",
            ),
        ),
    ]
}


def causal_model_types() -> list[str]:
    """Every ``model_type`` :func:`load_causal_lm` loads: the decoder families, then the whole-model-only ones."""
    decoders = sorted(t for t, a in ARCHITECTURES.items() if a.kind == "decoder")
    return decoders + sorted(WHOLE_MODEL_ONLY)


def freeze(model: nn.Module) -> nn.Module:
    """No parameter requires grad and the model is in eval mode (as LAVIS pins BLIP-2's frozen parts)."""
    model.requires_grad_(False)
    return model.eval()


def load_causal_lm(
    source: str | Path | CheckpointReader, dtype: torch.dtype = torch.float32, frozen: bool = True
) -> PreTrainedModel:
    """Every weight of a decoder LLM into its transformers ``*ForCausalLM`` class (built on the meta device, weights
    assigned once, so peak memory is one copy of the model). The families of
    :data:`~medboost.llm.architectures.ARCHITECTURES` load this way, and so do those of :data:`WHOLE_MODEL_ONLY`
    (GPT-2), whose layers cannot be extracted one at a time."""
    with open_reader(source) as reader:
        config = text_config(reader.config)
        family = WHOLE_MODEL_ONLY.get(config.model_type)
        config._attn_implementation = (family or _decoder_architecture(config, reader.source)).attn_implementation
        # The meta device is a thread-local context, not a patch of torch: parameters cost no memory (and their random
        # init no time) until the checkpoint's tensors are assigned below.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        names = reader.tensor_names()
        renamed = dict(zip(names, names))
        if family is not None:
            renamed = _whole_model_names(family, names, set(model.state_dict()), reader.source)
        # Cast the weights, not the model: buffers the constructors computed (rotary frequencies, Gemma's embedding
        # scale) stay float32 as in transformers' own bf16 load; `model.to(bf16)` would round them.
        state = {renamed[k]: v.to(dtype) if v.is_floating_point() else v for k, v in reader.read(list(renamed)).items()}
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if "lm_head.weight" not in state and tied:
            embedding = (family.base_prefix + family.embedding,) if family else ("embed_tokens.weight",)
            state["lm_head.weight"] = state[_embedding_name(state, reader.source, embedding)]
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            raise BlockLoadError(f"{reader.source}: the checkpoint does not fit {type(model).__name__}: {err}") from err
        if tied:
            model.tie_weights()
        if family is None:
            _compute_buffers(model, reader.source)
        else:
            # No row of WHOLE_MODEL_ONLY computes buffers: a transformers release whose model declares some (an old
            # GPT-2's attention masks) must fail here, not run on memory nobody filled.
            left = meta_tensors(model)
            if left:
                raise BlockLoadError(
                    f"{reader.source}: tensors neither in the checkpoint nor computed by medboost for "
                    f"{family.model_type}: {', '.join(left)}"
                )
    return freeze(model) if frozen else model


def _decoder_architecture(config, source: str) -> Architecture:
    """The :data:`ARCHITECTURES` row of a decoder; an encoder, or a family in neither table, is a clear error."""
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        decoders = [t for t in causal_model_types() if t not in WHOLE_MODEL_ONLY]
        raise BlockLoadError(
            f"{source}: architecture {config.model_type!r} is not supported; supported: {', '.join(decoders)} "
            f"(whole model or single layers), {', '.join(sorted(WHOLE_MODEL_ONLY))} (whole model only)"
        )
    if arch.kind != "decoder":
        raise BlockLoadError(f"{source}: {config.model_type} is an encoder, not a causal language model")
    return arch


def _whole_model_names(family: WholeModelFamily, names: list[str], expected: set[str], source: str) -> dict[str, str]:
    """Checkpoint name -> model name for the tensors to read: the base prefix added where the checkpoint lacks it,
    the obsolete mask buffers left out (only those the model does not declare)."""
    renamed = {}
    for name in names:
        target = name
        if name not in expected and f"{family.base_prefix}{name}" in expected:
            target = f"{family.base_prefix}{name}"
        if target not in expected and target.endswith(family.obsolete_suffixes):
            continue
        renamed[name] = target
    clashes = sorted(t for t, n in Counter(renamed.values()).items() if n > 1)
    if clashes:
        raise BlockLoadError(
            f"{source}: the checkpoint holds these tensors both with and without the {family.base_prefix!r} "
            f"prefix: {', '.join(clashes)}"
        )
    return renamed


def _embedding_name(state: dict, source: str, suffixes: tuple[str, ...] = ("embed_tokens.weight",)) -> str:
    for name in state:
        if name.endswith(suffixes):
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
