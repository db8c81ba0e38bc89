"""Which transformers layer classes medboost can host, and how to build one layer from a config.

One table maps a config's ``model_type`` to the transformers decoder-layer (or encoder-layer) class, its final norm and
rotary-embedding classes, and the state-dict prefixes under which its layers are stored. Adding a family is one row.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from medboost.errors import BlockLoadError


@dataclass(frozen=True)
class Architecture:
    """How one model family's layers are built and named."""

    model_type: str
    module: str  # transformers.models.<module>.modeling_<module>
    layer_class: str
    norm_class: str | None  # the LLM's final norm (None for post-norm encoders)
    rotary_class: str | None  # None for absolute-position encoders (BERT)
    layer_prefixes: tuple[str, ...]  # where "<prefix>.<L>.*" tensors live, tried in order
    norm_prefixes: tuple[str, ...] = ()
    kind: str = "decoder"  # "decoder" (causal LM) | "encoder" (BERT-style)
    # transformers has no SDPA path for some families (Gemma 2's attention soft-capping): they run eager.
    attn_implementation: str = "sdpa"

    def _import(self, name: str) -> type[nn.Module]:
        mod = importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")
        return getattr(mod, name)

    @property
    def layer_cls(self) -> type[nn.Module]:
        return self._import(self.layer_class)

    @property
    def norm_cls(self) -> type[nn.Module] | None:
        return self._import(self.norm_class) if self.norm_class else None

    @property
    def rotary_cls(self) -> type[nn.Module] | None:
        return self._import(self.rotary_class) if self.rotary_class else None


_DECODER_PREFIXES = ("model.layers", "model.language_model.layers", "language_model.model.layers", "layers")
_DECODER_NORMS = ("model.norm", "model.language_model.norm", "language_model.model.norm", "norm")


def _decoder(model_type: str, module: str, stem: str, attn_implementation: str = "sdpa") -> Architecture:
    return Architecture(
        model_type=model_type,
        module=module,
        layer_class=f"{stem}DecoderLayer",
        norm_class=f"{stem}RMSNorm",
        rotary_class=f"{stem}RotaryEmbedding",
        layer_prefixes=_DECODER_PREFIXES,
        norm_prefixes=_DECODER_NORMS,
        attn_implementation=attn_implementation,
    )


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in [
        _decoder("llama", "llama", "Llama"),
        _decoder("mistral", "mistral", "Mistral"),
        _decoder("qwen2", "qwen2", "Qwen2"),
        _decoder("qwen3", "qwen3", "Qwen3"),
        _decoder("gemma", "gemma", "Gemma"),
        _decoder("gemma2", "gemma2", "Gemma2", attn_implementation="eager"),
        _decoder("gemma3_text", "gemma3", "Gemma3"),
        _decoder("phi3", "phi3", "Phi3"),
        Architecture(
            model_type="bert",
            module="bert",
            layer_class="BertLayer",
            norm_class=None,
            rotary_class=None,
            layer_prefixes=("encoder.layer", "bert.encoder.layer"),
            kind="encoder",
        ),
    ]
}


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The language model's config: the config itself, or ``text_config`` of a multimodal wrapper (Gemma 3)."""
    if config.model_type not in ARCHITECTURES and getattr(config, "text_config", None) is not None:
        return config.text_config
    return config


def architecture_for(config: PretrainedConfig, source: str) -> Architecture:
    """The table row for ``config``; a clear error listing what is supported otherwise."""
    config = text_config(config)
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise BlockLoadError(
            f"{source}: architecture {config.model_type!r} is not supported; supported: "
            f"{', '.join(supported_model_types())}"
        )
    return arch


def resolve_layer_index(config: PretrainedConfig, layer: int, source: str) -> int:
    """Turn a possibly negative layer index into 0..n-1, or raise naming the valid range."""
    n = text_config(config).num_hidden_layers
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise BlockLoadError(f"{source}: layer index must be an integer, got {layer!r}")
    idx = layer + n if layer < 0 else layer
    if not 0 <= idx < n:
        raise BlockLoadError(
            f"{source}: layer {layer} is out of range: the model has {n} layers (0..{n - 1}, or -1..-{n})"
        )
    return idx


def build_layer(config: PretrainedConfig, layer_idx: int, device: str | torch.device = "meta") -> nn.Module:
    """Instantiate one layer (by default on the meta device, so no memory is allocated until weights are assigned)."""
    config = text_config(config)
    arch = ARCHITECTURES[config.model_type]
    with torch.device(device):
        if arch.kind == "encoder":
            return arch.layer_cls(config)
        return arch.layer_cls(config, layer_idx)


def build_final_norm(config: PretrainedConfig, device: str | torch.device = "meta") -> nn.Module | None:
    config = text_config(config)
    arch = ARCHITECTURES[config.model_type]
    if arch.norm_cls is None:
        return None
    with torch.device(device):
        return arch.norm_cls(config.hidden_size, eps=config.rms_norm_eps)


def find_prefix(names: set[str] | list[str], prefixes: tuple[str, ...], probe: str) -> str | None:
    """The first prefix ``p`` such that some tensor name starts with ``p + probe``."""
    for p in prefixes:
        start = f"{p}{probe}"
        if any(n.startswith(start) for n in names):
            return p
    return None
