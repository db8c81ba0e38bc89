"""The R-LLM booster: trainable adapters around a frozen language-model block, with a residual connection.

    none:   x = M2(L(M1 x))
    inner:  x = M2(L(M1 x) + M1 x)
    outer:  x = x + M2(L(M1 x))            (R-LLM's "optimal" mode; the default)
    hybrid: x = x + M2(L(M1 x) + M1 x)

The controls keep this exact shape and swap only ``L``: a same-shape random frozen block (``init="random"``), the
identity (``init="none"``: the MLP-only control ``x + M2(M1 x)``), or the unfrozen pre-trained block (``frozen=False``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from medboost.errors import ConfigError
from medboost.llm import BlockSpec, build_block
from medboost.models.vit import ViT

RESIDUAL_MODES = ("none", "inner", "outer", "hybrid")


@dataclass
class BoosterConfig:
    """Plain-data description of a booster (saved with trained models, set from YAML recipes).

    ``block_norm``: LayerNorm on the block's output before ``M2``. Pre-trained LLM layers return activations one or
    two orders of magnitude larger than their input (SmolLM2's last layer: RMS ~10 on unit input; Gemma 3's ~390), so
    without it ``M2`` sees wildly scaled features. ``zero_init``: ``M2`` starts at zero, so an ``outer``/``hybrid``
    booster starts as the identity and the boosted model starts as its baseline.
    """

    block: BlockSpec = field(default_factory=BlockSpec)
    residual: str = "outer"
    position: int | str = -1  # after which ViT block (negative counts from the end), or "embed" (before block 0)
    block_norm: bool = True
    zero_init: bool = True
    lora_rank: int | None = None  # MedVisionLlama v3: adapters frozen at init, trained through rank-r LoRA updates

    def __post_init__(self):
        if isinstance(self.block, dict):
            self.block = BlockSpec(**self.block)
        if self.residual not in RESIDUAL_MODES:
            raise ConfigError(f"residual must be one of {', '.join(RESIDUAL_MODES)}, got {self.residual!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * B(A(x))``, ``base`` frozen, ``A`` random, ``B`` zero: it starts equal to ``base``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.a = nn.Linear(base.in_features, rank, bias=False)
        self.b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.a.weight, a=5**0.5)
        nn.init.zeros_(self.b.weight)
        self.scale = (alpha or rank) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.b(self.a(x))


class LLMBooster(nn.Module):
    """``x (B, T, dim) -> (B, T, dim)`` through ``M1``, the block ``L`` and ``M2`` with the chosen residual."""

    def __init__(
        self,
        dim: int,
        block: nn.Module,
        residual: str = "outer",
        block_norm: bool = True,
        zero_init: bool = True,
        lora_rank: int | None = None,
    ):
        super().__init__()
        if residual not in RESIDUAL_MODES:
            raise ConfigError(f"residual must be one of {', '.join(RESIDUAL_MODES)}, got {residual!r}")
        width = block.hidden_size
        self.residual = residual
        self.bypassed = False  # set only by booster_bypassed(): a plain attribute, never saved with the weights
        self.m1 = nn.Linear(dim, width, bias=False)
        self.block = block
        self.norm = nn.LayerNorm(width) if block_norm else nn.Identity()
        self.m2 = nn.Linear(width, dim, bias=False)
        nn.init.trunc_normal_(self.m1.weight, std=dim**-0.5)
        if zero_init and residual in ("outer", "hybrid"):
            nn.init.zeros_(self.m2.weight)
        else:
            nn.init.trunc_normal_(self.m2.weight, std=width**-0.5)
        if lora_rank is not None:
            self.m1, self.m2 = LoRALinear(self.m1, lora_rank), LoRALinear(self.m2, lora_rank)

    @classmethod
    def from_config(cls, dim: int, config: BoosterConfig) -> LLMBooster:
        return cls(
            dim, build_block(config.block), config.residual, config.block_norm, config.zero_init, config.lora_rank
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypassed:
            return x
        z = self.m1(x)
        h = self.norm(self.block(z))
        if self.residual in ("inner", "hybrid"):
            h = h + z
        out = self.m2(h)
        return x + out if self.residual in ("outer", "hybrid") else out


def boosters(model: nn.Module) -> list[LLMBooster]:
    """Every :class:`LLMBooster` inside ``model`` (none for a plain ViT or a ResNet)."""
    return [m for m in model.modules() if isinstance(m, LLMBooster)]


@contextmanager
def booster_bypassed(model: nn.Module) -> Iterator[list[LLMBooster]]:
    """Run ``model`` with each booster's branch removed: every :class:`LLMBooster` returns its input unchanged.

    What "branch removed" means, per residual mode:

    - ``outer``/``hybrid``: ``x + M2(...) -> x``, the outer skip alone: the booster's added term is dropped.
    - ``none``/``inner``: there is no outer skip, so the branch *is* the booster's whole path; removing it leaves the
      identity ``x -> x`` as well. The model is then exactly the same model with the insert deleted.

    Either way the bypassed model equals the model built without the insert, with the same other weights. The
    branch is skipped, not computed and discarded. The flags are restored on exit, also on error.
    """
    found = boosters(model)
    previous = [b.bypassed for b in found]
    for b in found:
        b.bypassed = True
    try:
        yield found
    finally:
        for b, state in zip(found, previous):
            b.bypassed = state


def _token_ratio_sum(change: torch.Tensor, reference: torch.Tensor) -> tuple[float, int]:
    """Sum over tokens of ``||change|| / ||reference||`` (norms over the feature axis) and the token count.

    Computed in float32 so that a bfloat16 run does not round small branches to zero; a zero reference token
    (never seen in practice) counts as ratio 0 rather than NaN, so one padding token cannot poison the mean."""
    num = change.detach().float().flatten(0, -2).norm(dim=-1)
    den = reference.detach().float().flatten(0, -2).norm(dim=-1)
    ratio = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(num))
    return float(ratio.sum()), ratio.numel()


class BoosterNormProbe:
    """Measures, with forward hooks and without changing any output, how large the boosters' branches are:

    - ``relative_output_norm``: mean over tokens and samples of ``||booster(x) - x|| / ||x||`` at the booster's
      input ``x``: the relative size of what :func:`booster_bypassed` removes (0 for a zero ``M2`` in ``outer`` /
      ``hybrid`` mode).
    - ``relative_block_norm``: mean of ``||L(h) - h|| / ||h||`` at the frozen block's input ``h = M1 x``: how much
      the block itself changes what it is given (0 for the identity block of the MLP-only control).

    Use as a context manager (hooks attached on entry, removed on exit); with several boosters the means pool all
    their tokens. Bypassed boosters are skipped: they have no branch to measure. ``sums``/``counts`` are exposed
    so that distributed callers can add them over processes before :meth:`summary`.
    """

    KEYS = ("relative_output_norm", "relative_block_norm")

    def __init__(self, model: nn.Module):
        self.model = model
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.counts = dict.fromkeys(self.KEYS, 0)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> BoosterNormProbe:
        for booster in boosters(self.model):
            self._handles.append(booster.register_forward_hook(self._hook("relative_output_norm", booster)))
            self._handles.append(booster.block.register_forward_hook(self._hook("relative_block_norm", booster)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, key: str, booster: LLMBooster):
        def hook(module, inputs, output):
            if booster.bypassed:
                return
            total, count = _token_ratio_sum(output - inputs[0], inputs[0])
            self.sums[key] += total
            self.counts[key] += count

        return hook

    def summary(self) -> dict[str, float | None]:
        """The means (None for a key that saw no token: no booster ran)."""
        return {k: (self.sums[k] / self.counts[k] if self.counts[k] else None) for k in self.KEYS}


class BoostedViT(nn.Module):
    """What the ViT-family classifiers and the segmenter share: ``self.encoder``, an ``encoder`` (:class:`ViT` by
    default, or a ViViT) with an :class:`LLMBooster` (when ``arguments["booster"]`` is set) at ``booster.position``.

    ``arguments`` are the subclass's own (its ``locals()``): the encoder's options are picked from them by name, so
    each is declared once, with its default, in the subclass's signature, and wired to the encoder here for all of
    them. ``fixed`` are encoder options the subclass derives itself (``cls_token``).
    """

    def __init__(self, arguments: dict[str, Any], encoder: type[nn.Module] = ViT, **fixed: Any):
        super().__init__()
        booster = arguments["booster"]
        if isinstance(booster, dict):
            booster = BoosterConfig(**booster)
        inserts = {booster.position: LLMBooster.from_config(arguments["dim"], booster)} if booster else None
        accepted = set(inspect.signature(encoder).parameters) - {"inserts"}
        options = {name: value for name, value in arguments.items() if name in accepted}
        self.encoder = encoder(**options, **fixed, inserts=inserts)

    @property
    def booster(self) -> LLMBooster | None:
        return next(iter(self.encoder.inserts.values()), None)
