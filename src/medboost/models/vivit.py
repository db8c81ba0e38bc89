"""A factorised ViViT (Arnab et al., 2021, "model 2") for 3D volumes, R-LLM's 3D variant.

The depth axis is read as time: a volume ``(B, C, D, H, W)`` is cut into ``D / frame_depth`` frames of
``frame_depth`` slices. Each frame becomes ``(H / P) x (W / P)`` tubelet tokens (a Conv3d with kernel and stride
``(frame_depth, P, P)``); spatial blocks mix the tokens of one frame, with a per-frame CLS token; the frames' CLS
tokens then go through temporal blocks with a temporal CLS token, and the head reads that. The LLM booster sits on
the temporal tokens (R-LLM: "LLM on the 8 temporal tokens"), after a chosen temporal block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from medboost.errors import ConfigError
from medboost.models.booster import BoostedViT, BoosterConfig
from medboost.models.vit import Block, PatchEmbed, as_tuple, init_transformer_weights

if TYPE_CHECKING:
    from medboost.report.saliency import SaliencyTarget

VOLUMES_ONLY = "ViViT is for volumes (spatial_dims=3, img_size D x H x W); use a vit_* model for 2D images"


def _volume_size(img_size: int | Sequence[int], frame_depth: int) -> tuple[int, int, int]:
    if not isinstance(img_size, int) and len(img_size) == 2:
        raise ConfigError(f"{VOLUMES_ONLY}, got img_size {tuple(img_size)}")
    size = as_tuple(img_size, 3, "img_size")
    if frame_depth < 1 or size[0] % frame_depth:
        raise ConfigError(f"the depth {size[0]} is not divisible by frame_depth {frame_depth}")
    return size


class ViViT(nn.Module):
    """Tubelet embedding -> spatial blocks per frame -> per-frame CLS tokens -> temporal blocks -> final norm.

    Every argument is keyword-only (most are numbers). ``inserts`` are modules run on the temporal tokens right after
    temporal block ``i`` (``{i: module}``, negative ``i`` counts from the end), or right after the temporal CLS and
    position embedding (key ``"embed"``). ``drop_path`` rises linearly over the spatial then the temporal blocks.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        img_size: int | Sequence[int] = 28,
        frame_depth: int = 4,
        patch_size: int = 4,
        dim: int = 192,
        spatial_depth: int = 4,
        temporal_depth: int = 2,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        inserts: dict[int | str, nn.Module] | None = None,
    ):
        super().__init__()
        size = _volume_size(img_size, frame_depth)
        self.temporal_depth = temporal_depth
        self.patch_embed = PatchEmbed(3, in_channels, size, (frame_depth, patch_size, patch_size), dim)
        frames, *plane = self.patch_embed.grid
        self.frames, self.tokens_per_frame = frames, plane[0] * plane[1]
        self.spatial_cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.spatial_pos = nn.Parameter(torch.zeros(1, self.tokens_per_frame, dim))  # shared by every frame
        # Marks the embedded tokens, on the (frames, H/P, W/P) grid, before any mixing: Grad-CAM reads them here.
        self.embedded = nn.Identity()
        # On the CPU even when the model is built on the meta device (load_pretrained): rates are numbers, not weights.
        rates = torch.linspace(0, drop_path, spatial_depth + temporal_depth, device="cpu").tolist()
        self.spatial_blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, drop, r) for r in rates[:spatial_depth])
        self.spatial_norm = nn.LayerNorm(dim)
        self.temporal_cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.temporal_pos = nn.Parameter(torch.zeros(1, 1 + frames, dim))
        self.temporal_blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, drop, r) for r in rates[spatial_depth:])
        self.norm = nn.LayerNorm(dim)
        self.inserts = nn.ModuleDict({self._insert_key(i): m for i, m in (inserts or {}).items()})
        for p in (self.spatial_cls, self.spatial_pos, self.temporal_cls, self.temporal_pos):
            nn.init.trunc_normal_(p, std=0.02)
        init_transformer_weights(self)

    def _insert_key(self, index: int | str) -> str:
        if index == "embed":
            return index
        if not isinstance(index, int) or not -self.temporal_depth <= index < self.temporal_depth:
            raise ConfigError(
                f"booster position {index!r} is out of range for a ViViT of temporal depth {self.temporal_depth} "
                "(or 'embed')"
            )
        return str(index % self.temporal_depth)

    @property
    def grid(self) -> tuple[int, int, int]:
        """The token grid ``(frames, H / P, W / P)``."""
        return self.patch_embed.grid

    def frame_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Volumes ``(B, C, D, H, W)`` -> one token per frame ``(B, frames, dim)``, after the spatial blocks."""
        if x.dim() != 5:
            raise ConfigError(f"{VOLUMES_ONLY}, got an input of shape {tuple(x.shape)}")
        b = x.shape[0]
        tokens = self.patch_embed(x).reshape(b, self.frames, self.tokens_per_frame, -1) + self.spatial_pos[:, None]
        tokens = self.embedded(tokens.flatten(1, 2))  # (B, frames * tokens_per_frame, dim), row-major on the grid
        h = tokens.reshape(b * self.frames, self.tokens_per_frame, -1)
        h = torch.cat([self.spatial_cls.expand(h.shape[0], -1, -1), h], dim=1)
        for block in self.spatial_blocks:
            h = block(h)
        return self.spatial_norm(h[:, 0]).view(b, self.frames, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Final normalised temporal tokens ``(B, 1 + frames, dim)``; token 0 is the temporal CLS."""
        h = self.frame_tokens(x)
        h = torch.cat([self.temporal_cls.expand(h.shape[0], -1, -1), h], dim=1) + self.temporal_pos
        if "embed" in self.inserts:
            h = self.inserts["embed"](h)
        for i, block in enumerate(self.temporal_blocks):
            h = block(h)
            if str(i) in self.inserts:
                h = self.inserts[str(i)](h)
        return self.norm(h)


class ViViTClassifier(BoostedViT):
    """ViViT encoder -> temporal CLS token -> linear head (zero-initialised, as the ViT classifier's); with
    ``booster`` set, an :class:`LLMBooster` runs on the temporal tokens after temporal block ``booster.position``.

    ``spatial_dims`` is taken so that the pipelines' arguments fit every classifier; only 3 is accepted.
    """

    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        in_channels: int = 1,
        num_classes: int = 2,
        img_size: int | Sequence[int] = 28,
        frame_depth: int = 4,
        patch_size: int = 4,
        dim: int = 192,
        spatial_depth: int = 4,
        temporal_depth: int = 2,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.1,
        booster: BoosterConfig | dict | None = None,
    ):
        if spatial_dims != 3:
            raise ConfigError(f"{VOLUMES_ONLY}, got spatial_dims={spatial_dims}")
        super().__init__(locals(), encoder=ViViT)
        self.head = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def saliency_target(self) -> SaliencyTarget:
        """Grad-CAM reads the embedded tokens before any mixing (see medboost.report.saliency), on the
        ``(frames, H/P, W/P)`` grid; there is no CLS token among them."""
        from medboost.report.saliency import SaliencyTarget  # the report package imports the models: import late

        return SaliencyTarget(self.encoder.embedded, grid=self.encoder.grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)[:, 0])
