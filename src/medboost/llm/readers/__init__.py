"""Checkpoint readers: GGUF, safetensors (local folder or hub), Meta ``consolidated.*.pth``."""

from medboost.llm.readers.base import CheckpointInfo, CheckpointReader

__all__ = ["CheckpointInfo", "CheckpointReader"]
