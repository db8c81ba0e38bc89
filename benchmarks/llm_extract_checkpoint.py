"""The llm_extract benchmark's synthetic checkpoint: a random LLaMA-style model written as sharded safetensors, one
shard at a time (never the whole model in memory), cached and reused while its spec is unchanged."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

SHARD_BYTES = 1_000_000_000  # save_pretrained's max_shard_size="1GB" means 10**9 bytes
STORED_DTYPE = "bfloat16"  # half the disk and write time of float32; load_block returns float32 either way
SEED = 0
INIT_STD = 0.02  # LlamaConfig.initializer_range: the scale of a freshly initialised model

# ~1.57 B parameters: LLaMA-1 style full multi-head attention at TinyLlama/Llama-3.2-1B width, untied head.
FULL_MODEL = {
    "name": "llama-1.5b-random",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 28,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
}
# ~0.33 B parameters for --quick: the same code path in a fraction of the time.
QUICK_MODEL = {
    "name": "llama-300m-random",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
}


def llama_config(spec: dict):
    from transformers import LlamaConfig

    kwargs = {k: v for k, v in spec.items() if k != "name"}
    return LlamaConfig(**kwargs, tie_word_embeddings=False, max_position_embeddings=4096, dtype=STORED_DTYPE)


def parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every saved tensor, from a model built on the meta device (no memory, exact names)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def plan_shards(shapes: dict[str, tuple[int, ...]], item_bytes: int, limit: int) -> list[list[str]]:
    """Group tensors, in model order, into shards of at most ``limit`` bytes (save_pretrained's greedy rule)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = item_bytes
        for d in shape:
            nbytes *= d
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def random_tensor(name: str, shape: tuple[int, ...], generator):
    """Norm weights are ones (as initialised); everything else N(0, 0.02), generated directly in the stored dtype."""
    import torch

    dtype = getattr(torch, STORED_DTYPE)
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, INIT_STD, generator=generator)


def write_checkpoint(folder: Path, spec: dict) -> dict:
    """Write config.json, the shards and the index one shard at a time (at most ~1 GB in memory, never the model)."""
    import torch
    from safetensors.torch import save_file

    config = llama_config(spec)
    shapes = parameter_shapes(config)
    shards = plan_shards(shapes, torch.finfo(getattr(torch, STORED_DTYPE)).bits // 8, SHARD_BYTES)
    generator = torch.Generator().manual_seed(SEED)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    weight_map, total = {}, 0
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: random_tensor(n, shapes[n], generator) for n in names}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
        print(f"  wrote {file} ({len(names)} tensors)", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"shards": len(shards), "bytes": total, "params": sum(_numel(s) for s in shapes.values())}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _marker(spec: dict) -> dict:
    return {"spec": spec, "dtype": STORED_DTYPE, "seed": SEED, "shard_bytes": SHARD_BYTES}


def ensure_checkpoint(folder: Path, spec: dict) -> dict:
    """Reuse ``folder`` when its completion marker matches ``spec``; otherwise build it (in a temporary sibling,
    renamed at the end, so an interrupted build never looks complete)."""
    marker_file = folder / "medboost_bench.json"
    if marker_file.is_file():
        saved = json.loads(marker_file.read_text())
        if saved.get("marker") != _marker(spec):
            sys.exit(f"{folder} holds a different benchmark model; remove it or pass another --cache-dir")
        return {**saved["facts"], "reused": True}
    if folder.exists() and any(folder.iterdir()):
        sys.exit(f"{folder} exists but is not a complete benchmark checkpoint; remove it or pass another --cache-dir")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # leftovers of an interrupted build: ours to remove
    print(f"building the random checkpoint in {folder} (once; later runs reuse it)", flush=True)
    start = time.perf_counter()
    facts = write_checkpoint(partial, spec)
    facts["build_s"] = round(time.perf_counter() - start, 1)
    (partial / "medboost_bench.json").write_text(json.dumps({"marker": _marker(spec), "facts": facts}, indent=2))
    if folder.exists():
        folder.rmdir()  # empty, checked above
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(folder)
    return {**facts, "reused": False}
