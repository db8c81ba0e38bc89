"""A Vision Transformer for 2D images and 3D volumes from one implementation (``spatial_dims`` as in MONAI).

Blocks are nanoGPT-style pre-norm: ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``. ``forward_tokens`` returns
every block's hidden states so that segmentation decoders can take skips, and an optional hook runs a module (the LLM
booster) right after a chosen block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medboost.errors import ConfigError


def as_tuple(value: int | Sequence[int], dims: int, what: str) -> tuple[int, ...]:
    out = (value,) * dims if isinstance(value, int) else tuple(value)
    if len(out) != dims:
        raise ConfigError(f"{what} must have {dims} entries for spatial_dims={dims}, got {value!r}")
    return out


STEMS = ("patch", "conv")


class ConvStem(nn.Module):
    """A convolutional tokenizer ("Early Convolutions Help Transformers See Better", Xiao et al. 2021): one 3x3
    stride-2 convolution + BatchNorm + ReLU per halving of the patch size, widening towards ``dim``, then a 1x1
    projection to ``dim``. It gives the same token grid as a ``patch``-strided convolution, with overlapping receptive
    fields and a convolution's locality prior, which is what lets a ViT train from scratch on a few hundred images.
    A patch size of 1 on an axis keeps stride 1 on it."""

    def __init__(self, spatial_dims: int, in_channels: int, patch_size: tuple[int, ...], dim: int):
        super().__init__()
        if any(p & (p - 1) for p in patch_size):
            raise ConfigError(
                f"the conv stem needs power-of-two patch sizes (one stride-2 stage each), got {patch_size}"
            )
        stages = max(p.bit_length() - 1 for p in patch_size)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(stages):
            # Stride 2 on an axis until that axis has been reduced by its own patch size.
            stride = tuple(2 if p >> i > 1 else 1 for p in patch_size)
            width = max(dim // 2 ** (stages - i), 16)
            layers += [
                conv(channels, width, 3, stride=stride, padding=1, bias=False),
                norm(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        layers.append(conv(channels, dim, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PatchEmbed(nn.Module):
    """Image -> one token per ``patch_size`` patch: a strided convolution (``stem="patch"``, the ViT's) or a
    convolutional tokenizer (``stem="conv"``, :class:`ConvStem`), 2D or 3D."""

    def __init__(self, spatial_dims: int, in_channels: int, img_size, patch_size, dim: int, stem: str = "patch"):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if stem not in STEMS:
            raise ConfigError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
        self.img_size = as_tuple(img_size, spatial_dims, "img_size")
        self.patch_size = as_tuple(patch_size, spatial_dims, "patch_size")
        if stem == "conv":
            # Each padded stride-2 convolution maps n to ceil(n / 2): any size works, the grid is ceil(size / patch)
            # (28 px with patch 8 -> 4 x 4: the border patches see zero padding).
            self.grid = tuple(-(-s // p) for s, p in zip(self.img_size, self.patch_size))
            self.proj = ConvStem(spatial_dims, in_channels, self.patch_size, dim)
        else:
            for s, p in zip(self.img_size, self.patch_size):
                if s % p:
                    raise ConfigError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
            self.grid = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
            conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
            self.proj = conv(in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.num_patches = math.prod(self.grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"expected input of spatial size {self.img_size}, got {tuple(x.shape[2:])}")
        tokens = self.proj(x)
        if tuple(tokens.shape[2:]) != self.grid:  # a broken invariant, not a user error: say what was computed
            raise ValueError(f"the stem gave a {tuple(tokens.shape[2:])} grid for {self.img_size}, not {self.grid}")
        return tokens.flatten(2).transpose(1, 2)  # (B, N, D)


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """Queries, keys and values, stacked: ``(3, B, heads, T, head_dim)``."""
        b, n, d = x.shape
        return self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        """Per-head outputs ``(B, heads, T, head_dim)`` -> ``(B, T, dim)`` through the output projection."""
        b, h, n, hd = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, n, h * hd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        return self._merge(F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0))

    def forward_with_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(x)`` in eval mode (no attention dropout), computed with the attention probabilities formed
        explicitly, and those probabilities ``(B, heads, T, T)``, inside the autograd graph. For saliency maps only:
        ``forward``'s fused kernel never forms the weights, and stays as fast as it was."""
        q, k, v = self._qkv(x)
        weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
        return self._merge(weights @ v), weights


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class LocalMixer(nn.Module):
    """The local branch of hybrid attention: a depth-wise convolution over the token grid (3 x 3 or 3 x 3 x 3), so
    each token mixes with its spatial neighbours. Tokens before ``skip`` (a CLS token) pass through as zeros."""

    def __init__(self, dim: int, grid: tuple[int, ...], skip: int = 0, kernel_size: int = 3):
        super().__init__()
        conv = nn.Conv2d if len(grid) == 2 else nn.Conv3d
        self.grid = grid
        self.skip = skip
        self.conv = conv(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d = x.shape
        grid_tokens = x[:, self.skip :].transpose(1, 2).reshape(b, d, *self.grid)
        local = self.proj(F.gelu(self.conv(grid_tokens)).flatten(2).transpose(1, 2))
        return torch.cat([torch.zeros_like(x[:, : self.skip]), local], dim=1)


class Block(nn.Module):
    """Pre-norm transformer block. With ``local`` it is a hybrid-attention block: global self-attention and the local
    branch see the same normalised tokens and are mixed per channel by a learned gate, ``(1 - g) * global + g *
    local`` with ``g = sigmoid(w)``, ``w`` starting at 0 (an even mix)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        local: nn.Module | None = None,
    ):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, attn_drop=drop)
        self.local = local
        self.gate = nn.Parameter(torch.zeros(dim)) if local is not None else None
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path)

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        if self.local is None:
            return self.attn(h)
        g = torch.sigmoid(self.gate)
        return (1 - g) * self.attn(h) + g * self.local(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mix(self.ln_1(x)))
        return x + self.drop_path(self.mlp(self.ln_2(x)))


def init_transformer_weights(module: nn.Module) -> None:
    """The ViT initialisation (truncated normal 0.02 linear layers, unit LayerNorms) of every layer of ``module``
    outside its ``inserts``: inserted modules own their initialisation (and may hold frozen pre-trained weights)."""
    for name, m in module.named_modules():
        if name.startswith("inserts"):
            continue
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ViT(nn.Module):
    """Patch embedding, optional CLS token, learned position embedding, ``depth`` pre-norm blocks, final LayerNorm.

    Every argument is keyword-only: ten of them are numbers, and a positional call reads as a row of unnamed values.

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        in_channels: input channels.
        img_size: input size (int or per-axis).
        patch_size: patch size (int or per-axis).
        stem: ``"patch"`` (one strided convolution, the ViT's) or ``"conv"`` (a convolutional tokenizer,
            :class:`ConvStem`; power-of-two patch sizes, a ``ceil(img_size / patch_size)`` grid).
        dim, depth, heads, mlp_ratio: transformer width, number of blocks, attention heads, MLP expansion.
        drop, drop_path: dropout and stochastic-depth rate (linearly increasing over depth, as in DeiT).
        cls_token: prepend a learned CLS token (classification); segmentation uses patch tokens only.
        inserts: modules run right after block ``i`` (``{i: module}``, negative ``i`` counts from the end), or right
            after the patch and position embedding (key ``"embed"``); this is where an LLM booster sits.
        hybrid: hybrid attention (MedVisionLlama): every block adds a local depth-wise-convolution branch, gated.
    """

    def __init__(
        self,
        *,
        spatial_dims: int = 2,
        in_channels: int = 1,
        img_size: int | Sequence[int] = 28,
        patch_size: int | Sequence[int] = 4,
        stem: str = "patch",
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        cls_token: bool = True,
        inserts: dict[int | str, nn.Module] | None = None,
        hybrid: bool = False,
    ):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.dim = dim
        self.depth = depth
        self.patch_embed = PatchEmbed(spatial_dims, in_channels, img_size, patch_size, dim, stem)
        n_tokens = self.patch_embed.num_patches + int(cls_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, dim))
        # On the CPU even when the model is built on the meta device (load_pretrained): rates are numbers, not weights.
        rates = torch.linspace(0, drop_path, depth, device="cpu").tolist()
        grid = self.patch_embed.grid
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, drop, r, LocalMixer(dim, grid, skip=int(cls_token)) if hybrid else None)
            for r in rates
        )
        self.norm = nn.LayerNorm(dim)
        self.inserts = nn.ModuleDict()
        for index, module in (inserts or {}).items():
            self.inserts[self._insert_key(index)] = module
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        init_transformer_weights(self)

    def _insert_key(self, index: int | str) -> str:
        if index == "embed":
            return index
        if not isinstance(index, int) or not -self.depth <= index < self.depth:
            raise ConfigError(f"insert position {index} is out of range for a ViT of depth {self.depth} (or 'embed')")
        return str(index % self.depth)

    @property
    def grid(self) -> tuple[int, ...]:
        return self.patch_embed.grid

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final normalised tokens ``(B, T, D)`` and the hidden states after every block (before the final norm)."""
        h = self.patch_embed(x)
        if self.cls_token is not None:
            h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        h = h + self.pos_embed
        if "embed" in self.inserts:
            h = self.inserts["embed"](h)
        hidden = []
        for i, block in enumerate(self.blocks):
            h = block(h)
            if str(i) in self.inserts:
                h = self.inserts[str(i)](h)
            hidden.append(h)
        return self.norm(h), hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)[0]
