"""What every task's LightningModule shares: the optimiser, per-epoch seeding, and exact distributed evaluation."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from medboost.engine.config import OptimConfig
from medboost.engine.optim import build_optimizer, build_scheduler
from medboost.errors import TrainingError


class TaskModule(L.LightningModule):
    """Base class: owns ``model``, builds the optimiser over trainable parameters only, reseeds every epoch.

    Evaluation outputs are collected per stage and gathered across processes with their sample indices, so padded
    duplicates from a distributed sampler are dropped and every sample counts exactly once.
    """

    def __init__(self, model: nn.Module, optim: OptimConfig, seed: int = 0):
        super().__init__()
        self.model = model
        self.optim_config = optim
        self.seed = seed
        self._collected: dict[str, list[tuple[torch.Tensor, ...]]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_train_epoch_start(self) -> None:
        # Augmentation, dropout and mixing draw from the global RNG: seeding it per (epoch, rank) makes epoch k
        # identical whether the run started at 0 or was resumed from a checkpoint at k.
        torch.manual_seed(self.seed * 1_000_003 + self.current_epoch * 1_009 + self.global_rank)

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop with a clear message at the first non-finite training loss (never train on silently)."""
        if not torch.isfinite(loss):
            raise TrainingError(
                f"non-finite training loss ({loss.item()}) at epoch {self.current_epoch}, step {self.global_step}: "
                "lower optim.lr, set optim.grad_clip, or check the data for extreme values"
            )

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.optim_config)
        steps = max(1, self.trainer.estimated_stepping_batches // max(1, self.trainer.max_epochs))
        return {
            "optimizer": optimizer,
            "lr_scheduler": build_scheduler(optimizer, self.optim_config, steps, self.trainer.max_epochs),
        }

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def _rebuilt_keys(self, names) -> list[str]:
        """The state keys of the frozen parts the model rebuilds from their sources (its ``frozen_prefixes``)."""
        prefixes = tuple(f"model.{p}" for p in getattr(self.model, "frozen_prefixes", ()))
        return [k for k in names if prefixes and k.startswith(prefixes)]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A frozen LLM and encoder are rebuilt from their sources: storing them would put ~1 GB (MedBLIP with
        # SmolLM2) into every checkpoint, twice per run (best and last), for tensors that cannot have changed.
        state = checkpoint["state_dict"]
        for key in self._rebuilt_keys(list(state)):
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Called before the state is loaded: put the rebuilt parts' own tensors back, so that loading stays strict
        # for every trained tensor (a missing one is still an error).
        state, own = checkpoint["state_dict"], self.state_dict()
        for key in self._rebuilt_keys(own):
            state.setdefault(key, own[key])

    # -- evaluation outputs ---------------------------------------------------------------------------------------
    def collect(self, stage: str, *tensors: torch.Tensor) -> None:
        self._collected.setdefault(stage, []).append(tuple(t.detach() for t in tensors))

    def gathered(self, stage: str) -> tuple[torch.Tensor, ...] | None:
        """Concatenate this stage's outputs over batches and processes, deduplicated by the last tensor (index)."""
        parts = self._collected.pop(stage, [])
        if not parts:
            return None
        tensors = [torch.cat(column) for column in zip(*parts)]
        if self.trainer.world_size > 1:
            tensors = [self.all_gather(t).flatten(0, 1) for t in tensors]
        index = tensors[-1]
        order = torch.argsort(index, stable=True)
        tensors = [t[order] for t in tensors]
        keep = torch.ones_like(tensors[-1], dtype=torch.bool)
        keep[1:] = tensors[-1][1:] != tensors[-1][:-1]
        return tuple(t[keep].cpu() for t in tensors)
