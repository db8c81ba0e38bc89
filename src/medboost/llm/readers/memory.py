"""A reader over tensors already in memory (a transformers model object or a state dict)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from medboost.errors import BlockLoadError
from medboost.llm.readers.base import CheckpointInfo, CheckpointReader


class StateDictReader(CheckpointReader):
    """Serve a state dict under the reader interface, e.g. to take a block from a model that is already loaded."""

    def __init__(self, config: PretrainedConfig, state_dict: dict[str, torch.Tensor], source: str = "in-memory model"):
        self.config = config
        self.source = source
        self._state = state_dict
        self.info = CheckpointInfo(
            format="memory", tensor_types={n: str(t.dtype).removeprefix("torch.") for n, t in state_dict.items()}
        )

    @classmethod
    def from_model(cls, model: nn.Module, source: str | None = None) -> StateDictReader:
        return cls(model.config, model.state_dict(), source or f"in-memory {type(model).__name__}")

    def tensor_names(self) -> list[str]:
        return list(self._state)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self._state]
        if missing:
            raise BlockLoadError(f"{self.source}: tensors not found: {', '.join(missing[:5])}")
        return {n: self._state[n].detach().clone().float() for n in names}
