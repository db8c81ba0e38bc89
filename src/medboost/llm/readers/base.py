"""The one interface every checkpoint format implements: a config plus lazy access to named tensors.

A reader opens a checkpoint cheaply (headers, tensor tables, config) and reads tensor DATA only when asked, by
Hugging Face ``transformers`` parameter names (e.g. ``model.layers.29.self_attn.q_proj.weight``). Format quirks
(GGUF's names, llama.cpp's q/k row permutation and Gemma's ``1 + w`` norms, Meta's ``wq``/``wk`` layout) are undone
inside the reader, so everything above it (single-layer extraction, whole-model loading for vision-language models)
is format-agnostic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PretrainedConfig


@dataclass
class CheckpointInfo:
    """What a reader can tell about its checkpoint without reading tensor data."""

    format: str  # "gguf" | "safetensors" | "meta" | ...
    files: list[Path] = field(default_factory=list)
    # Storage type of each tensor by transformers name, e.g. {"model.layers.0.mlp.up_proj.weight": "Q4_1"}.
    tensor_types: dict[str, str] = field(default_factory=dict)

    def quantization_summary(self, names: Iterable[str] | None = None) -> str:
        """Counts of storage types, e.g. ``"Q4_1 x7, F32 x2"`` (over ``names`` if given)."""
        selected = self.tensor_types if names is None else {n: self.tensor_types[n] for n in names}
        counts: dict[str, int] = {}
        for kind in selected.values():
            counts[kind] = counts.get(kind, 0) + 1
        return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "unknown"


class CheckpointReader(ABC):
    """A checkpoint opened for lazy, by-name tensor reads. Use as a context manager to release files."""

    #: Human-readable description of where the weights come from (a path or hub id), used in error messages.
    source: str
    #: The model's transformers config (for multimodal checkpoints: the text model's config).
    config: PretrainedConfig
    info: CheckpointInfo

    @abstractmethod
    def tensor_names(self) -> list[str]:
        """All tensor names this checkpoint holds, in transformers naming."""

    @abstractmethod
    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read only the named tensors (transformers naming), as float32 CPU tensors unless stored otherwise.

        Raises :class:`medboost.errors.BlockLoadError` naming the file when a tensor is missing or its data is
        truncated or corrupt.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, most readers hold nothing open
        """Release open files or memory maps."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
