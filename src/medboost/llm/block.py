"""The frozen block: one transformers layer wrapped to act as a visual encoder layer.

Input and output are ``(batch, tokens, hidden)``. The wrapper owns the choices the papers make about how a language
layer sees visual tokens (rotary embedding off or on, bidirectional or causal attention, the LLM's final norm or not,
compute dtype) and the freezing contract: no parameter requires grad, the layer stays in eval mode under ``.train()``,
and gradients still flow through it to whatever comes before.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import PretrainedConfig

from medboost.llm.architectures import Architecture


class IdentityBlock(nn.Module):
    """The "no block" control with the same interface: returns its input unchanged."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FrozenBlock(nn.Module):
    """One language-model layer as a token mixer for visual tokens.

    Args:
        layer: a transformers decoder layer (e.g. ``LlamaDecoderLayer``) or BERT-style ``BertLayer``, weights loaded.
        config: the language model's config (text config).
        arch: its row in :data:`medboost.llm.architectures.ARCHITECTURES`.
        layer_index: which layer of the model this is (Gemma 3 picks its rotary theta by layer).
        final_norm: the LLM's final norm to apply after the layer, or None.
        rope: apply the model's rotary position embedding (positions 0..T-1). The papers run without it.
        causal: causal attention as in the LLM; the papers use bidirectional attention on visual tokens.
        dtype: compute and storage dtype of the block (float32 or bfloat16); output returns in the input's dtype.
        frozen: freeze the weights (the papers' setting); ``False`` is the unfrozen-LLM ablation.
        description: where the weights came from, for reports.
    """

    def __init__(
        self,
        layer: nn.Module,
        config: PretrainedConfig,
        arch: Architecture,
        *,
        layer_index: int,
        final_norm: nn.Module | None = None,
        rope: bool = False,
        causal: bool = False,
        dtype: torch.dtype = torch.float32,
        frozen: bool = True,
        description: str = "",
    ):
        super().__init__()
        self.config = config
        self.arch = arch
        self.layer_index = layer_index
        self.hidden_size = config.hidden_size
        self.rope = rope
        self.causal = causal
        self.description = description
        self.layer = layer
        self.final_norm = final_norm
        # transformers' SDPA path makes a layer CAUSAL whenever no mask is passed and `is_causal` is set: clear it,
        # and express causality (when wanted) as an explicit mask, which every attention implementation honours.
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "is_causal"):
            attn.is_causal = False
        self.rotary = self._build_rotary(layer, config, arch) if rope and arch.rotary_cls is not None else None
        self._rotary_takes_layer_type = self.rotary is not None and (
            "layer_type" in inspect.signature(self.rotary.forward).parameters
        )
        # Only the weights take the compute dtype: rotary inverse frequencies stay float32 for exact angles.
        layer.to(dtype)
        if final_norm is not None:
            final_norm.to(dtype)
        self.frozen = False
        self.set_frozen(frozen)

    @staticmethod
    def _build_rotary(layer: nn.Module, config: PretrainedConfig, arch: Architecture) -> nn.Module:
        # The frequencies are computed from the config, never loaded: on a layer built on the meta device (weights to
        # be assigned, as load_pretrained does) they are made on the CPU, so that they exist once the weights arrive.
        device = next(layer.parameters()).device
        with torch.device("cpu" if device.type == "meta" else device):
            return arch.rotary_cls(config)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.layer.parameters()).dtype

    @property
    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    # -- freezing -----------------------------------------------------------------------------------------------
    def set_frozen(self, frozen: bool = True) -> FrozenBlock:
        """Freeze (default) or unfreeze the block's weights; a frozen block stays in eval mode."""
        self.frozen = frozen
        for p in self.parameters():
            p.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> FrozenBlock:
        super().train(mode)
        if self.frozen:
            # Frozen means a fixed function: no dropout, whatever the surrounding model's mode.
            for m in self.children():
                m.eval()
        return self

    # -- forward ------------------------------------------------------------------------------------------------
    def _position_embeddings(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, tokens, _ = h.shape
        if self.rotary is None:
            # "No RoPE" is the identity rotation: cos = 1, sin = 0.
            shape = (batch, tokens, self.head_dim)
            return torch.ones(shape, dtype=h.dtype, device=h.device), torch.zeros(shape, dtype=h.dtype, device=h.device)
        positions = torch.arange(tokens, device=h.device).unsqueeze(0).expand(batch, -1)
        if self._rotary_takes_layer_type:
            return self.rotary(h, positions, self.config.layer_types[self.layer_index])
        return self.rotary(h, positions)

    def _causal_mask(self, h: torch.Tensor) -> torch.Tensor:
        tokens = h.shape[1]
        blocked = torch.ones(tokens, tokens, dtype=torch.bool, device=h.device).triu(1)
        mask = torch.zeros(tokens, tokens, dtype=h.dtype, device=h.device)
        return mask.masked_fill(blocked, torch.finfo(h.dtype).min)[None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"FrozenBlock expects (batch, tokens, {self.hidden_size}), got {tuple(x.shape)}")
        h = x.to(self.dtype)
        mask = self._causal_mask(h) if self.causal else None
        if self.arch.kind == "encoder":
            out = self.layer(h, attention_mask=mask)
        else:
            out = self.layer(h, attention_mask=mask, position_embeddings=self._position_embeddings(h))
        if isinstance(out, tuple):  # older transformers layers return (hidden_states, ...)
            out = out[0]
        if self.final_norm is not None:
            out = self.final_norm(out)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.description}, layer={self.layer_index}, rope={self.rope}, causal={self.causal}, "
            f"final_norm={self.final_norm is not None}, frozen={self.frozen}"
        )


def randomly_initialise(module: nn.Module, std: float) -> None:
    """The random-block control's init: linear weights ~ N(0, std) (transformers' ``initializer_range``), zero bias.

    Norm weights keep their constructor values (ones, or zeros for Gemma's ``1 + w`` norms).
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
