"""``load_block``: say "layer L of model M" and get a frozen, ready ``nn.Module`` without loading the whole model."""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from medboost.errors import BlockLoadError
from medboost.llm.architectures import (
    Architecture,
    architecture_for,
    build_final_norm,
    build_layer,
    find_prefix,
    resolve_layer_index,
    text_config,
)
from medboost.llm.block import FrozenBlock, randomly_initialise
from medboost.llm.presets import PRESETS
from medboost.llm.readers import CheckpointReader

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def open_reader(source: str | Path | CheckpointReader) -> CheckpointReader:
    """Open any supported checkpoint: a preset name, a ``.gguf`` file, a Hugging Face folder, a Meta checkpoint
    (folder with ``params.json`` + ``consolidated.*.pth``, or one ``.pth`` beside ``params.json``) or a hub id.
    An already open reader is returned as it is."""
    if isinstance(source, CheckpointReader):
        return source
    # Imported here so that `import medboost.llm` stays cheap (gguf and huggingface_hub load on first use).
    from medboost.llm.readers.gguf_reader import GGUFReader
    from medboost.llm.readers.meta_reader import MetaReader
    from medboost.llm.readers.safetensors_reader import SafetensorsReader

    text = str(source)
    if text in PRESETS:
        return open_reader(PRESETS[text].resolve())
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return GGUFReader(path)
        if path.suffix == ".pth":
            return MetaReader(path)
        raise BlockLoadError(
            f"{path}: unknown checkpoint file type (expected .gguf, or a Meta .pth beside params.json)"
        )
    if path.is_dir():
        if (path / "params.json").is_file():
            return MetaReader(path)
        if (path / "config.json").is_file():
            return SafetensorsReader(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return GGUFReader(ggufs[0])
        raise BlockLoadError(
            f"{path}: not a checkpoint folder: expected config.json (+ safetensors), "
            f"params.json (+ consolidated.*.pth) or exactly one .gguf file"
        )
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return SafetensorsReader.from_hub(text)
    raise BlockLoadError(
        f"{text}: not a preset ({', '.join(PRESETS)}), an existing file or folder, or a hub id of the form 'org/name'"
    )


@dataclass
class LoadedLayer:
    """One layer's weights read from a checkpoint, before wrapping."""

    layer: nn.Module
    final_norm: nn.Module | None
    arch: Architecture
    index: int
    tensor_names: list[str]
    seconds: float


def _load_module(module: nn.Module, reader: CheckpointReader, prefix: str, what: str) -> list[str]:
    names = [n for n in reader.tensor_names() if n.startswith(prefix)]
    tensors = reader.read(names)
    state = {n[len(prefix) :]: t for n, t in tensors.items()}
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise BlockLoadError(f"{reader.source}: the {what} tensors do not fit {type(module).__name__}: {err}") from err
    return names


def meta_tensors(module: nn.Module) -> list[str]:
    """The parameters and buffers of ``module`` still on the meta device: declared, never given values."""
    return [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]


def _check_materialised(module: nn.Module, source: str) -> None:
    left = meta_tensors(module)
    if left:
        raise BlockLoadError(f"{source}: tensors missing from the checkpoint: {', '.join(left)}")


def read_layer(
    reader: CheckpointReader, layer: int = -1, *, final_norm: bool = False, random_init: bool = False, seed: int = 0
) -> LoadedLayer:
    """Build layer ``layer`` of ``reader``'s model and fill it with its pre-trained weights (or a random init)."""
    start = time.perf_counter()
    config = text_config(reader.config)
    arch = architecture_for(config, reader.source)
    index = resolve_layer_index(config, layer, reader.source)
    names = set(reader.tensor_names())
    if random_init:
        # Same shapes, fresh weights: the random-block control. Only the config is needed. Built on the current
        # default device: the CPU, or the meta device when load_pretrained only needs the shapes (no draws then).
        device = torch.get_default_device()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = build_layer(config, index, device=device)
            randomly_initialise(module, std=getattr(config, "initializer_range", 0.02))
        norm = build_final_norm(config, device=device) if final_norm else None
        return LoadedLayer(module, norm, arch, index, [], time.perf_counter() - start)

    prefix = find_prefix(names, arch.layer_prefixes, f".{index}.")
    if prefix is None:
        looked = ", ".join(arch.layer_prefixes)
        raise BlockLoadError(f"{reader.source}: no tensors for layer {index} (looked under {looked})")
    module = build_layer(config, index)
    read_names = _load_module(module, reader, f"{prefix}.{index}.", f"layer {index}")
    _check_materialised(module, reader.source)
    norm = None
    if final_norm:
        if not arch.norm_prefixes:
            raise BlockLoadError(f"{reader.source}: {arch.model_type} layers have no final norm (post-norm encoder)")
        norm_prefix = find_prefix(names, arch.norm_prefixes, ".weight")
        if norm_prefix is None:
            raise BlockLoadError(f"{reader.source}: the final norm tensor was not found")
        norm = build_final_norm(config)
        read_names += _load_module(norm, reader, f"{norm_prefix}.", "final norm")
    return LoadedLayer(module, norm, arch, index, read_names, time.perf_counter() - start)


@dataclass
class BlockSpec:
    """Everything that defines a block, as plain data (for YAML recipes and saved model configs).

    ``init``: ``"pretrained"`` (the paper), ``"random"`` (same-shape random frozen control) or ``"none"`` (identity).
    """

    source: str = "smollm2-135m"
    layer: int = -1
    rope: bool = False
    causal: bool = False
    final_norm: bool = False
    dtype: str = "float32"
    init: str = "pretrained"
    frozen: bool = True
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def load_block(
    source: str | Path | CheckpointReader = "smollm2-135m",
    layer: int = -1,
    *,
    rope: bool = False,
    causal: bool = False,
    final_norm: bool = False,
    dtype: str | torch.dtype = "float32",
    init: str = "pretrained",
    frozen: bool = True,
    seed: int = 0,
) -> FrozenBlock:
    """Layer ``layer`` (negative counts from the end) of the language model at ``source``, frozen and ready.

    ``source`` is a preset name (``medboost llm list``), a ``.gguf`` file, a Hugging Face folder or hub id (only the
    shard(s) holding the layer are read or downloaded), or a Meta checkpoint. Only the chosen layer's tensors are read.
    See :class:`FrozenBlock` for the other options; ``init="random"`` gives the same-shape random control.
    """
    if init not in ("pretrained", "random"):
        raise BlockLoadError(f"{source}: init must be 'pretrained' or 'random' here (use IdentityBlock for 'none')")
    torch_dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if torch_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise BlockLoadError(f"{source}: unsupported dtype {dtype!r}; use float32 or bfloat16")
    with open_reader(source) as reader:
        loaded = read_layer(reader, layer, final_norm=final_norm, random_init=init == "random", seed=seed)
        config = text_config(reader.config)
        config._attn_implementation = loaded.arch.attn_implementation
        kind = "random init" if init == "random" else "pre-trained"
        return FrozenBlock(
            loaded.layer,
            config,
            loaded.arch,
            layer_index=loaded.index,
            final_norm=loaded.final_norm,
            rope=rope,
            causal=causal,
            dtype=torch_dtype,
            frozen=frozen,
            description=f"{reader.source} layer {loaded.index} ({kind})",
        )


def build_block(spec: BlockSpec) -> nn.Module:
    """A block from a :class:`BlockSpec` (``init="none"`` gives the identity control)."""
    from medboost.llm.block import IdentityBlock

    if spec.init == "none":
        with open_reader(spec.source) as reader:
            return IdentityBlock(text_config(reader.config).hidden_size)
    return load_block(
        spec.source,
        spec.layer,
        rope=spec.rope,
        causal=spec.causal,
        final_norm=spec.final_norm,
        dtype=spec.dtype,
        init=spec.init,
        frozen=spec.frozen,
        seed=spec.seed,
    )


def inspect_source(source: str | Path, layer: int | None = None) -> dict:
    """Facts about a checkpoint and one of its layers (loaded, timed), for ``medboost llm inspect``."""
    start = time.perf_counter()
    with open_reader(source) as reader:
        opened = time.perf_counter() - start
        config = text_config(reader.config)
        arch = architecture_for(config, reader.source)
        loaded = read_layer(reader, -1 if layer is None else layer)
        n_params = sum(p.numel() for p in loaded.layer.parameters())
        return {
            "source": str(source),
            "resolved": reader.source,
            "format": reader.info.format,
            "files": [str(f) for f in reader.info.files],
            "architecture": config.model_type,
            "layer_class": arch.layer_class,
            "hidden_size": config.hidden_size,
            "num_layers": config.num_hidden_layers,
            "num_heads": config.num_attention_heads,
            "num_kv_heads": getattr(config, "num_key_value_heads", config.num_attention_heads),
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            "intermediate_size": config.intermediate_size,
            "layer": loaded.index,
            "layer_parameters": n_params,
            "layer_quantization": reader.info.quantization_summary(loaded.tensor_names),
            "open_seconds": round(opened, 4),
            "layer_load_seconds": round(loaded.seconds, 4),
        }
