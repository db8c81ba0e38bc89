"""Image classifiers: the ViT (optionally LLM-boosted) and the MedMNIST v2 ResNet baselines, 2D and 3D."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medboost.errors import ConfigError
from medboost.models.booster import BoostedViT, BoosterConfig

POOLS = ("cls", "mean", "seq")


class ViTClassifier(BoostedViT):
    """ViT encoder -> pooled token -> linear head; with ``booster`` set, an :class:`LLMBooster` runs after the ViT
    block at ``booster.position`` (R-LLM: after the last block, before the final norm). Arguments are keyword-only.

    ``pool``: ``"cls"`` (a CLS token), ``"mean"`` (mean of the patch tokens) or ``"seq"`` (sequence pooling of the
    Compact Convolutional Transformer, Hassani et al. 2021: a learned softmax weighting of the patch tokens).
    ``stem``: ``"patch"`` or ``"conv"`` (see :class:`~medboost.models.vit.PatchEmbed`)."""

    def __init__(
        self,
        *,
        spatial_dims: int = 2,
        in_channels: int = 1,
        num_classes: int = 2,
        img_size: int | Sequence[int] = 28,
        patch_size: int | Sequence[int] = 4,
        stem: str = "patch",
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.1,
        pool: str = "cls",
        booster: BoosterConfig | dict | None = None,
    ):
        if pool not in POOLS:
            raise ConfigError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        super().__init__(locals(), cls_token=pool == "cls")
        self.pool = pool
        self.attention_pool = nn.Linear(dim, 1) if pool == "seq" else None
        self.head = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def pool_weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """How much each final token ``(B, T, D)`` counts in the pooled one: ``(B, T)``, rows summing to 1."""
        if self.pool == "seq":
            return self.attention_pool(tokens).squeeze(-1).softmax(dim=-1)
        if self.pool == "cls":
            return F.one_hot(torch.zeros_like(tokens[:, 0, 0], dtype=torch.long), tokens.shape[1]).to(tokens.dtype)
        return torch.full_like(tokens[..., 0], 1.0 / tokens.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(x)
        if self.pool == "cls":
            pooled = tokens[:, 0]
        elif self.pool == "mean":
            pooled = tokens.mean(dim=1)
        else:
            pooled = torch.einsum("bt,btd->bd", self.pool_weights(tokens), tokens)
        return self.head(pooled)


def resnet(
    depth: int = 18, spatial_dims: int = 2, in_channels: int = 1, num_classes: int = 2, small_input: bool = True
) -> nn.Module:
    """MONAI's ResNet-18/50 for 2D or 3D. ``small_input`` is the MedMNIST v2 (28 px) stem: a 3x3 stride-1 first
    convolution and no max-pool, so a 28 px input is not reduced to 7 px before the first stage. In 3D that stem costs
    ~19 GFLOPs per 28^3 volume forward (hours per epoch on a CPU); ``small_input=False`` is the standard stem."""
    from monai.networks.nets import resnet18, resnet50

    factories = {18: resnet18, 50: resnet50}
    if depth not in factories:
        raise ConfigError(f"ResNet depth must be 18 or 50, got {depth}")
    if small_input:
        stem = dict(conv1_t_size=3, conv1_t_stride=1, no_max_pool=True)
    else:  # the standard ImageNet stem (MONAI's own default keeps stride 1, 4x the cost in 2D, 8x in 3D)
        stem = dict(conv1_t_size=7, conv1_t_stride=2, no_max_pool=False)
    return factories[depth](spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=num_classes, **stem)
