"""Optimisers and learning-rate schedules for every task, built from :class:`OptimConfig`.

Only parameters that require grad are handed to the optimiser: a frozen LLM block never enters it. Norms, biases,
position embeddings and tokens get no weight decay (the DeiT convention); ``optim.lr_scale`` gives chosen parts their
own learning rate (each group's rate follows the same warm-up and schedule).
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from medboost.engine.config import OptimConfig
from medboost.errors import ConfigError


def parameter_groups(
    model: nn.Module, weight_decay: float, lr: float, lr_scale: dict[str, float] | None = None
) -> list[dict]:
    """The trainable parameters in groups of (weight decay, learning rate): no decay for norms, biases, position
    embeddings and tokens; ``lr`` times the first ``lr_scale`` pattern (``fnmatch`` on the parameter name) that
    matches, else ``lr``. A pattern that matches no trainable parameter is an error (a typo would silently train
    everything at the base rate)."""
    scales = dict(lr_scale or {})
    for pattern, scale in scales.items():
        if not scale > 0:
            raise ConfigError(f"optim.lr_scale[{pattern!r}] must be a positive number, got {scale!r}")
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    used: set[str] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        pattern = next((pat for pat in scales if fnmatch.fnmatchcase(name, pat)), None)
        if pattern is not None:
            used.add(pattern)
        decays = not (p.dim() <= 1 or name.endswith(("pos_embed", "cls_token")))
        groups.setdefault((decays, scales.get(pattern, 1.0)), []).append(p)
    unused = [pat for pat in scales if pat not in used]
    if unused:
        raise ConfigError(f"optim.lr_scale patterns {unused} match no trainable parameter of the model")
    return [
        {"params": params, "weight_decay": weight_decay if decays else 0.0, "lr": lr * scale}
        for (decays, scale), params in groups.items()
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay, cfg.lr, cfg.lr_scale)
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ConfigError(f"optim.name must be adam, adamw or sgd, got {cfg.name!r}")


def lr_factor(cfg: OptimConfig, step: int, steps_per_epoch: int, max_epochs: int) -> float:
    """The multiplier of the base learning rate at optimiser step ``step`` (linear warm-up, then the schedule)."""
    total = max(1, steps_per_epoch * max_epochs)
    warmup = steps_per_epoch * cfg.warmup_epochs
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "multistep":
        epoch = step // max(1, steps_per_epoch)
        passed = sum(epoch >= round(m * max_epochs) for m in cfg.milestones)
        return cfg.gamma**passed
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        floor = cfg.min_lr / cfg.lr if cfg.lr else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    raise ConfigError(f"optim.schedule must be cosine, multistep or constant, got {cfg.schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, max_epochs: int):
    """A per-step LambdaLR (Lightning config dict), so warm-up is smooth and resume restores it exactly."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch, max_epochs)
    )
    return {"scheduler": scheduler, "interval": "step"}
