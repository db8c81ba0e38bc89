"""MedVisionLlama: a ViT segmentation network with a frozen LLM block, hybrid attention and multi-scale fusion.

The paper (v1) publishes the idea but not the internals of its two extra blocks; medboost's design, each part
switchable for ablations:

- **LLM block**: an :class:`LLMBooster` (adapters + residual around a frozen LLM layer) placed between encoder and
  decoder (``booster.position=-1``, the paper's figure) or right after the patch embedding (``"embed"``, as its code).
- **Hybrid attention** (``hybrid=True``): every ViT block mixes global self-attention with a local depth-wise
  convolution over the token grid through a learned per-channel gate (:class:`medboost.models.vit.Block`).
- **Multi-scale fusion** (``fusion=True``): the decoder's bottleneck is not just the last block's tokens but a fusion
  of the tokens from several encoder depths (the same depths that feed the skips): each is projected, weighted by a
  learned softmax over depths, summed and recalibrated by squeeze-and-excitation channel gating.
- **Decoder**: UNETR-style: a convolutional stem at full resolution, skips from evenly spaced encoder depths brought
  to 2x, 4x, ... the token grid by transposed convolutions, and up-blocks back to full resolution. Classes are kept
  (softmax over ``num_classes`` including background).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from medboost.errors import ConfigError
from medboost.models.booster import BoostedViT, BoosterConfig


class MultiScaleFusion(nn.Module):
    """Fuse token maps from several encoder depths: per-depth projection, softmax depth weights, SE gating."""

    def __init__(self, dim: int, n_inputs: int, reduction: int = 4):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_inputs))
        self.depth_logits = nn.Parameter(torch.zeros(n_inputs))
        self.se = nn.Sequential(
            nn.Linear(dim, max(1, dim // reduction)), nn.GELU(), nn.Linear(max(1, dim // reduction), dim), nn.Sigmoid()
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        weights = torch.softmax(self.depth_logits, dim=0)
        fused = sum(w * proj(t) for w, proj, t in zip(weights, self.proj, tokens))
        gate = self.se(fused.mean(dim=1, keepdim=True))
        return self.norm(fused * gate)


class ViTSegmenter(BoostedViT):
    """ViT encoder (optionally hybrid, optionally LLM-boosted) + UNETR-style decoder (optionally multi-scale fused).

    Args:
        spatial_dims, in_channels, num_classes: 2D/3D, input channels, output classes including background.
        img_size: training ROI size; inference on larger images uses sliding windows of this size.
        patch_size: a power of two (2, 4, 8 or 16); the decoder has log2(patch_size) upsampling stages.
        dim, depth, heads, mlp_ratio, drop_path: the ViT.
        booster: an LLM booster config (``None``: no LLM block).
        hybrid: hybrid (global + local) attention in every block.
        fusion: multi-scale fusion of encoder depths for the bottleneck.
        feature_size: decoder width at full resolution (doubles per stage).

    Arguments are keyword-only.
    """

    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        in_channels: int = 1,
        num_classes: int = 2,
        img_size: int | Sequence[int] = 32,
        patch_size: int = 8,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        booster: BoosterConfig | dict | None = None,
        hybrid: bool = False,
        fusion: bool = False,
        feature_size: int = 16,
    ):
        if patch_size not in (2, 4, 8, 16):
            raise ConfigError(f"patch_size must be 2, 4, 8 or 16 for the segmentation decoder, got {patch_size}")
        stages = int(math.log2(patch_size))
        if depth < stages:
            raise ConfigError(f"depth {depth} is too shallow for patch_size {patch_size}: need >= {stages} blocks")
        super().__init__(locals(), cls_token=False)
        self.img_size = self.encoder.patch_embed.img_size
        # Skip depths evenly spaced before the last block, deepest last (UNETR: blocks 3, 6, 9 of 12).
        self.skip_depths = [round(depth * (k + 1) / stages) - 1 for k in range(stages - 1)]
        self.fusion = MultiScaleFusion(dim, len(self.skip_depths) + 1) if fusion else None
        f = feature_size
        norm = "instance"
        self.stem = UnetrBasicBlock(spatial_dims, in_channels, f, 3, 1, norm, res_block=True)
        # skip k (k = 1 .. stages-1, shallow to deep) is brought up by 2^(stages - k) to the matching decoder level.
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(
                spatial_dims,
                dim,
                f * 2 ** (k),
                num_layer=stages - k - 1,
                kernel_size=3,
                stride=1,
                upsample_kernel_size=2,
                norm_name=norm,
                res_block=True,
            )
            for k in range(1, stages)
        )
        channels = [f * 2**k for k in range(stages)]  # full res ... grid/2
        self.ups = nn.ModuleList()
        in_ch = dim
        for level in reversed(range(stages)):
            self.ups.append(UnetrUpBlock(spatial_dims, in_ch, channels[level], 3, 2, norm, res_block=True))
            in_ch = channels[level]
        self.head = UnetOutBlock(spatial_dims, f, num_classes)

    def _grid(self, tokens: torch.Tensor) -> torch.Tensor:
        b, _, d = tokens.shape
        return tokens.transpose(1, 2).reshape(b, d, *self.encoder.grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        final, hidden = self.encoder.forward_tokens(x)
        if self.fusion is not None:
            bottleneck = self.fusion([hidden[i] for i in self.skip_depths] + [final])
        else:
            bottleneck = final
        skips = [skip(self._grid(hidden[i])) for skip, i in zip(self.skips, self.skip_depths)]
        features = [self.stem(x), *skips]  # full resolution first, then 1/2, 1/4, ...
        h = self._grid(bottleneck)
        for up, skip in zip(self.ups, reversed(features)):
            h = up(h, skip)
        return self.head(h)
