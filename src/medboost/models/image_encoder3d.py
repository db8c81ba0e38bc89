"""MedBLIP's image path: a trainable 3D patch embedding in front of a FROZEN pre-trained encoder.

``volume (B, C, N, N, N) -> Conv3d(P, stride P) -> (N/P)^3 tokens [+ CLS] + trainable 3D position embedding ->
frozen encoder -> (B, tokens, width)``. The frozen encoder is one of

* ``kind="vision"``: a transformers vision tower (``Blip2VisionModel`` = EVA ViT-g, ``CLIPVisionModel``,
  ``SiglipVisionModel``, ``Dinov2Model``, ``ViTModel``) from a folder or hub id: its block stack and final norm run on
  our tokens, its own 2D patch embedding and position table are unused (its 2D kernel can seed the Conv3d);
* ``kind="llm"``: a stack of frozen pre-trained language-model layers (:func:`medboost.llm.load_block`: bidirectional,
  no RoPE), with trainable linear projections in and out when the token width differs from the LLM's.

Frozen means: no parameter requires grad (so optimisers built from ``requires_grad`` parameters skip it), eval mode
under ``.train()`` (no dropout, fixed function), and gradients still flow through it to the patch embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from medboost.errors import ConfigError
from medboost.llm import load_block
from medboost.llm.load import open_reader
from medboost.models.vit import PatchEmbed

#: model_type -> (pre-norm attribute or None, final-norm attribute, has a CLS token)
VISION_TOWERS = {
    "blip_2_vision_model": (None, "post_layernorm", True),
    "clip_vision_model": ("pre_layrnorm", "post_layernorm", True),
    "siglip_vision_model": (None, "post_layernorm", False),
    "dinov2": (None, "layernorm", True),
    "vit": (None, "layernorm", True),
}


class Frozen(nn.Module):
    """Holds a module frozen: no grads, and eval mode whatever mode the surrounding model is set to."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> Frozen:
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _tower_classes() -> dict[str, type[PreTrainedModel]]:
    import transformers as T

    return {
        "blip_2_vision_model": T.Blip2VisionModel,
        "clip_vision_model": T.CLIPVisionModel,
        "siglip_vision_model": T.SiglipVisionModel,
        "dinov2": T.Dinov2Model,
        "vit": T.ViTModel,
    }


def load_vision_tower(source: str | Path) -> PreTrainedModel:
    """A supported transformers vision tower from a folder or hub id. A full BLIP-2 / CLIP / SigLIP checkpoint gives
    its vision model, and only its ``vision_model.*`` tensors are read (not the LLM's gigabytes)."""
    config = AutoConfig.from_pretrained(str(source))
    vision = getattr(config, "vision_config", None)
    model_type = vision.model_type if vision is not None else config.model_type
    classes = _tower_classes()
    if model_type not in classes:
        raise ConfigError(f"{source}: vision tower {model_type!r} not supported; use one of {', '.join(classes)}")
    if vision is None:
        return classes[model_type].from_pretrained(str(source))
    return _tower_from_composite(source, classes[model_type], vision)


def _tower_from_composite(source, cls: type[PreTrainedModel], vision_config) -> PreTrainedModel:
    # Built on the CPU, not the meta device: non-persistent buffers (position ids) are not in the checkpoint.
    tower = cls(vision_config)
    prefix = "vision_model."
    with open_reader(source) as reader:
        names = [n for n in reader.tensor_names() if n.startswith(prefix)]
        state = {n[len(prefix) :]: t for n, t in reader.read(names).items()}
    # The tower classes keep their blocks under their own `vision_model.` (CLIP, SigLIP) or at the top (BLIP-2).
    own = {k.removeprefix(prefix) for k in tower.state_dict()}
    if not own <= set(state):
        raise ConfigError(
            f"{source}: the vision tensors do not fit {cls.__name__}: missing {sorted(own - set(state))[:5]}"
        )
    target = getattr(tower, "vision_model", tower)
    target.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
    return tower.eval()


class VisionTowerStack(nn.Module):
    """A vision tower's block stack and final norm, fed with externally built tokens."""

    def __init__(self, tower: PreTrainedModel):
        super().__init__()
        model_type = tower.config.model_type
        if model_type not in VISION_TOWERS:
            raise ConfigError(f"vision tower {model_type!r} not supported; use one of {', '.join(VISION_TOWERS)}")
        pre, post, self.has_cls = VISION_TOWERS[model_type]
        base = getattr(tower, "vision_model", tower)
        self.pre_norm = getattr(base, pre) if pre else nn.Identity()
        # ViTModel (transformers 5) keeps its blocks in `layers`; the others in `encoder`.
        self.blocks = base.encoder if hasattr(base, "encoder") else base.layers
        self.norm = getattr(base, post)
        self.hidden_size = tower.config.hidden_size
        self.cls = self._cls_token(base)
        self.patch_kernel = self._patch_kernel(base)

    @staticmethod
    def _cls_token(base: nn.Module) -> torch.Tensor | None:
        emb = base.embeddings
        token = getattr(emb, "class_embedding", getattr(emb, "cls_token", None))
        return None if token is None else token.detach().reshape(1, 1, -1)

    @staticmethod
    def _patch_kernel(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The 2D patch convolution's weight and bias (None when the tower has none)."""
        for module in base.embeddings.modules():
            if isinstance(module, nn.Conv2d):
                bias = module.bias.detach() if module.bias is not None else None
                return module.weight.detach(), bias
        return None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.pre_norm(tokens)
        if isinstance(self.blocks, nn.ModuleList):
            for block in self.blocks:
                h = block(h)
                h = h[0] if isinstance(h, tuple) else h
        else:
            h = self.blocks(h).last_hidden_state
        return self.norm(h)


class LLMStack(nn.Module):
    """Frozen language-model layers in sequence (each a :class:`~medboost.llm.FrozenBlock`)."""

    def __init__(self, source: str | Path, layers: list[int], dtype: str = "float32"):
        super().__init__()
        self.layers = nn.ModuleList(load_block(source, i, rope=False, causal=False, dtype=dtype) for i in layers)
        self.hidden_size = self.layers[0].hidden_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            tokens = layer(tokens)
        return tokens


def inflate_kernel(kernel_2d: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A 2D patch kernel ``(D, 3, P, P)`` as a 3D one ``(D, in_channels, P, P, P)``, I3D-style: repeated over depth
    and divided by ``P``, and averaged over RGB then spread over the input channels (``3 / in_channels``), so that a
    grey volume constant along depth gives exactly the tower's response to that grey slice replicated to RGB (the
    input scale its blocks were trained on)."""
    patch = kernel_2d.shape[-1]
    k = kernel_2d.mean(dim=1, keepdim=True) * (kernel_2d.shape[1] / in_channels)
    return k.expand(-1, in_channels, -1, -1).unsqueeze(2).expand(-1, -1, patch, -1, -1) / patch


class ImageEncoder3D(nn.Module):
    """Volume -> tokens through a trainable 3D patch embedding and a frozen encoder.

    Args:
        source: the frozen encoder's weights: a vision-tower folder/hub id (``kind="vision"``) or an LLM source such
            as ``"smollm2-135m"`` (``kind="llm"``).
        kind: ``"vision"`` or ``"llm"``.
        img_size, patch_size, in_channels: the volume (cube) and its patches (MedBLIP: 224, 32, 1 -> 343 tokens).
        layers: for ``kind="llm"``, which LLM layers, in order (negative counts from the end).
        dim: for ``kind="llm"``, the token width (default: the LLM's width; otherwise trainable projections in/out).
        inflate_patch: seed the Conv3d with the tower's 2D patch kernel (``kind="vision"`` only).
        llm_dtype: compute dtype of the LLM layers.
        stem: ``"patch"`` (MedBLIP's one strided Conv3d) or ``"conv"`` (a small convolutional tokenizer with the same
            token grid, :class:`~medboost.models.vit.ConvStem`): when the frozen encoder has no visual pre-training
            (``kind="llm"``) every visual feature must be learned in front of it, which one linear patch projection
            does poorly.
    """

    def __init__(
        self,
        source: str | Path,
        kind: str = "vision",
        img_size: int = 224,
        patch_size: int = 32,
        in_channels: int = 1,
        layers: list[int] | None = None,
        dim: int | None = None,
        inflate_patch: bool = False,
        llm_dtype: str = "float32",
        stem: str = "patch",
    ):
        super().__init__()
        if inflate_patch and stem != "patch":
            raise ConfigError(f"inflate_patch seeds a single patch convolution; it needs stem='patch', got {stem!r}")
        encoder, has_cls = self._build_encoder(source, kind, layers, inflate_patch, llm_dtype)
        if kind == "vision" and dim not in (None, encoder.hidden_size):
            raise ConfigError(f"a vision tower's tokens have its width {encoder.hidden_size}; got dim={dim}")
        width = dim or encoder.hidden_size
        self.width = width
        # A tower's own CLS token is a good start (MedBLIP uses EVA's); LLM stacks get a fresh one.
        cls = encoder.cls if kind == "vision" else nn.init.trunc_normal_(torch.empty(1, 1, width), std=0.02)
        cls = cls if has_cls else None
        self.patch_embed = PatchEmbed(3, in_channels, img_size, patch_size, width, stem=stem)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(cls.clone()) if cls is not None else None
        tokens = self.num_patches + (cls is not None)
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, tokens, width), std=0.02))
        self.proj_in = nn.Linear(width, encoder.hidden_size) if width != encoder.hidden_size else nn.Identity()
        self.proj_out = nn.Linear(encoder.hidden_size, width) if width != encoder.hidden_size else nn.Identity()
        if inflate_patch:
            self._inflate(encoder, in_channels, patch_size)
        self.encoder = Frozen(encoder)

    @staticmethod
    def _build_encoder(source, kind, layers, inflate_patch, llm_dtype) -> tuple[nn.Module, bool]:
        if kind == "vision":
            stack = VisionTowerStack(load_vision_tower(source))
            return stack, stack.has_cls
        if kind == "llm":
            if inflate_patch:
                raise ConfigError("inflate_patch needs a vision tower (kind='vision'); LLM layers have no patch kernel")
            return LLMStack(source, list(layers) if layers else [-1], llm_dtype), True
        raise ConfigError(f"image encoder kind must be 'vision' or 'llm', got {kind!r}")

    def _inflate(self, encoder: VisionTowerStack, in_channels: int, patch: int) -> None:
        if encoder.patch_kernel is None:
            raise ConfigError("the vision tower has no 2D patch convolution to inflate")
        kernel, bias = encoder.patch_kernel
        if kernel.shape[-1] != patch:
            raise ConfigError(f"inflate_patch needs patch_size {kernel.shape[-1]} (the tower's 2D patch), got {patch}")
        with torch.no_grad():
            self.patch_embed.proj.weight.copy_(inflate_kernel(kernel, in_channels))
            if bias is not None:
                self.patch_embed.proj.bias.copy_(bias)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """``(B, C, N, N, N) -> (B, [1 +] (N/P)^3, width)``."""
        x = self.patch_embed(volume)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed
        return self.proj_out(self.encoder(self.proj_in(x)))
