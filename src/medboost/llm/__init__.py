"""Frozen blocks from pre-trained language models: sources, single-layer loading, the block wrapper, presets."""

from medboost.llm.architectures import ARCHITECTURES, supported_model_types
from medboost.llm.block import FrozenBlock, IdentityBlock
from medboost.llm.load import BlockSpec, build_block, inspect_source, load_block, open_reader, read_layer
from medboost.llm.presets import PRESETS, Preset

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "BlockSpec",
    "FrozenBlock",
    "IdentityBlock",
    "Preset",
    "build_block",
    "inspect_source",
    "load_block",
    "open_reader",
    "read_layer",
    "supported_model_types",
]
