"""Meta's original LLaMA checkpoints (``params.json`` + ``consolidated.NN.pth``), read one tensor at a time.

Meta ships LLaMA 1/2/3 as one ``consolidated.NN.pth`` per model-parallel rank. Each rank holds a slice of every
weight, cut the way Meta's fairscale layers cut them: column-parallel weights (``wq``/``wk``/``wv``/``w1``/``w3``,
``output``) along dim 0, row-parallel ones (``wo``/``w2``) along dim 1, norms replicated, and ``tok_embeddings``
along dim 1 (LLaMA 1/2, ``ParallelEmbedding``) or dim 0 (Llama 3, vocabulary-parallel). The reader glues the slices
back, renames to transformers naming and undoes the difference in rotary layout: Meta rotates interleaved pairs
(complex RoPE), transformers rotates halves, so HF's conversion permutes the rows of ``wq`` and ``wk`` within each
head. Files are memory-mapped, so only the tensors that are read are paged in from disk.
"""

from __future__ import annotations

import difflib
import json
import math
import pickle
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig

from medboost.errors import BlockLoadError
from medboost.llm.readers.base import CheckpointInfo, CheckpointReader

PARAMS_NAME = "params.json"
_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth$")
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)$")

# Meta per-layer name -> (transformers name under model.layers.{i}., how the model-parallel slices join).
# "col": concatenated along dim 0, "row": along dim 1, "rep": replicated on every rank.
_LAYER_NAMES: dict[str, tuple[str, str]] = {
    "attention.wq.weight": ("self_attn.q_proj.weight", "col"),
    "attention.wk.weight": ("self_attn.k_proj.weight", "col"),
    "attention.wv.weight": ("self_attn.v_proj.weight", "col"),
    "attention.wo.weight": ("self_attn.o_proj.weight", "row"),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", "col"),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", "row"),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", "col"),
    "attention_norm.weight": ("input_layernorm.weight", "rep"),
    "ffn_norm.weight": ("post_attention_layernorm.weight", "rep"),
}
_GLOBAL_NAMES: dict[str, tuple[str, str]] = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", "embed"),  # dim decided from shapes, see _join_dim
    "norm.weight": ("model.norm.weight", "rep"),
    "output.weight": ("lm_head.weight", "col"),
}
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

# Llama 3.1 "use_scaled_rope" values, as in its released transformers config; params.json does not store them.
_LLAMA3_ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
_LLAMA3_ORIGINAL_CONTEXT = 8192


@dataclass(frozen=True)
class _Spec:
    meta_name: str
    join: str  # "col" | "row" | "rep" | "embed"
    rope_heads: int | None  # heads for the q/k row permutation, None for other tensors


class MetaReader(CheckpointReader):
    """A Meta ``consolidated.*.pth`` checkpoint (LLaMA 1/2/3) opened for lazy reads in transformers naming.

    ``MetaReader(folder)`` opens a folder with ``params.json`` and ``consolidated.00.pth`` (``.01``... for
    model-parallel checkpoints). A path to one ``.pth`` file with ``params.json`` beside it also works; if it is one
    rank of several ``consolidated.NN.pth``, all ranks are used, since one rank holds only slices.

    ``config`` is a :class:`LlamaConfig` built from ``params.json`` the way Meta's code sizes the model. Values that
    params.json does not record are guessed: ``max_position_embeddings`` (``max_seq_len`` if present, else 131072 with
    scaled RoPE, 8192 for Llama 3, 2048 for LLaMA 1 - norm eps 1e-6 -, 4096 otherwise) and the Llama 3.1 RoPE scaling
    (factor 8; Llama 3.2 1B/3B use 32). Fix any of them with ``config_overrides``.
    """

    def __init__(self, path: str | Path, *, config_overrides: dict[str, Any] | None = None):
        path = Path(path).expanduser()
        self.source = str(path)
        folder, shard_paths = _locate(path)
        self.params = _load_params(folder / PARAMS_NAME)
        self._shards = [_load_shard(p) for p in shard_paths]
        self._shard_paths = shard_paths
        self.config = self._build_config(config_overrides or {})
        self._specs = self._build_specs()
        first = self._shards[0]
        self.info = CheckpointInfo(
            format="meta",
            files=list(shard_paths),
            tensor_types={hf: _dtype_name(first[s.meta_name].dtype) for hf, s in self._specs.items()},
        )

    # ------------------------------------------------------------------ public API

    def tensor_names(self) -> list[str]:
        return list(self._specs)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        if not self._shards:
            raise BlockLoadError(f"{self.source}: reader is closed")
        names = list(dict.fromkeys(names))
        self._check_known(names)
        return {name: self._read_one(name) for name in names}

    def close(self) -> None:
        # Dropping the state dicts releases the memory maps once no returned tensor refers to them (reads copy).
        self._shards = []

    # ------------------------------------------------------------------ config and names

    def _build_config(self, overrides: dict[str, Any]) -> LlamaConfig:
        p = self.params
        where = self._shard_paths[0].parent / PARAMS_NAME
        try:
            dim, n_heads, n_layers = int(p["dim"]), int(p["n_heads"]), int(p["n_layers"])
            n_kv_heads = int(p.get("n_kv_heads") or n_heads)
            norm_eps = float(p["norm_eps"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BlockLoadError(
                f"{where}: missing or invalid field {exc} (needs dim, n_heads, n_layers, norm_eps)"
            ) from exc
        rope_theta = float(p.get("rope_theta", 10000.0))
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
        if p.get("use_scaled_rope"):
            factor = float(p.get("rope_scaling_factor") or _LLAMA3_ROPE_SCALING["factor"])
            rope = dict(_LLAMA3_ROPE_SCALING, rope_type="llama3", rope_theta=rope_theta, factor=factor)
            rope["original_max_position_embeddings"] = _LLAMA3_ORIGINAL_CONTEXT
        vocab_size = int(p.get("vocab_size", -1))
        if vocab_size <= 0:  # LLaMA 1/2 params.json says -1: the tokenizer decided it, the embedding shows it
            vocab_size = self._embedding_rows()
        kwargs: dict[str, Any] = dict(
            hidden_size=dim,
            intermediate_size=self._intermediate_size(dim),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads,
            head_dim=dim // n_heads,
            vocab_size=vocab_size,
            rms_norm_eps=norm_eps,
            rope_parameters=rope,
            max_position_embeddings=_max_positions(p, rope_theta, norm_eps),
            tie_word_embeddings="output.weight" not in self._shards[0],  # Llama 3.2 1B/3B ship no output matrix
            bos_token_id=128000 if vocab_size >= 128000 else 1,
            eos_token_id=128001 if vocab_size >= 128000 else 2,
        )
        kwargs.update(overrides)
        return LlamaConfig(**kwargs)

    def _intermediate_size(self, dim: int) -> int:
        """Meta's FeedForward sizing, checked against the stored ``w1`` (the tensors win if they disagree)."""
        p = self.params
        hidden = int(2 * (4 * dim) / 3)
        if p.get("ffn_dim_multiplier") is not None:
            hidden = int(float(p["ffn_dim_multiplier"]) * hidden)
        multiple_of = int(p.get("multiple_of", 256))
        hidden = multiple_of * math.ceil(hidden / multiple_of)
        stored = self._summed_rows("layers.0.feed_forward.w1.weight")
        if stored is not None and stored != hidden:
            warnings.warn(
                f"{self.source}: params.json gives an FFN size of {hidden} but the stored weights have {stored}; "
                "using the stored size",
                stacklevel=3,
            )
            return stored
        return hidden

    def _embedding_rows(self) -> int:
        shapes = [s["tok_embeddings.weight"].shape for s in self._shards if "tok_embeddings.weight" in s]
        if not shapes:
            raise BlockLoadError(
                f"{self._shard_paths[0]}: params.json has no vocab_size and there is no tok_embeddings.weight to "
                "take it from"
            )
        dim = int(self.params["dim"])
        return sum(s[0] for s in shapes) if _join_dim(shapes, dim) == 0 else shapes[0][0]

    def _summed_rows(self, name: str) -> int | None:
        if any(name not in s for s in self._shards):
            return None
        return sum(s[name].shape[0] for s in self._shards)

    def _build_specs(self) -> dict[str, _Spec]:
        """transformers name -> how to assemble it, for every tensor Meta's rank 0 holds (``rope.freqs`` ignored)."""
        heads = {"attention.wq.weight": self.config.num_attention_heads}
        heads["attention.wk.weight"] = self.config.num_key_value_heads
        specs: dict[str, _Spec] = {}
        for meta_name in self._shards[0]:
            if meta_name in _GLOBAL_NAMES:
                hf_name, join = _GLOBAL_NAMES[meta_name]
                specs[hf_name] = _Spec(meta_name, join, None)
                continue
            m = _LAYER_RE.match(meta_name)
            if m and m.group(2) in _LAYER_NAMES:
                suffix, join = _LAYER_NAMES[m.group(2)]
                specs[f"model.layers.{m.group(1)}.{suffix}"] = _Spec(meta_name, join, heads.get(m.group(2)))
        return specs

    def _check_known(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self._specs]
        if missing:
            close = difflib.get_close_matches(missing[0], list(self._specs), n=3)
            hint = f"; similar names: {', '.join(close)}" if close else ""
            raise BlockLoadError(
                f"{self._shard_paths[0]}: tensor {missing[0]!r} is not in this checkpoint ({len(missing)} of "
                f"{len(names)} requested names missing; names are in transformers naming){hint}"
            )

    # ------------------------------------------------------------------ reading

    def _read_one(self, name: str) -> torch.Tensor:
        spec = self._specs[name]
        parts = []
        for path, shard in zip(self._shard_paths, self._shards):
            if spec.meta_name not in shard:
                raise BlockLoadError(f"{path}: tensor {spec.meta_name!r} ({name}) is missing from this rank's file")
            parts.append(shard[spec.meta_name])
        if spec.join == "rep" or len(parts) == 1:
            tensor = parts[0]
        else:
            dim = 0 if spec.join == "col" else 1
            if spec.join == "embed":
                dim = _join_dim([t.shape for t in parts], self.config.hidden_size)
            tensor = torch.cat(parts, dim=dim)
        self._check_shape(name, tensor)  # before permuting: a wrong params.json must not surface as a view error
        if spec.rope_heads is not None:
            tensor = _interleaved_to_half_rotary(tensor, spec.rope_heads)
        # Always copy, so returned tensors never pin the memory-mapped files.
        return tensor.to(torch.float32, copy=True) if tensor.is_floating_point() else tensor.clone()

    def _check_shape(self, name: str, tensor: torch.Tensor) -> None:
        expected = _expected_shape(self.config, name)
        if expected is not None and tuple(tensor.shape) != expected:
            files = ", ".join(p.name for p in self._shard_paths)
            raise BlockLoadError(
                f"{self._shard_paths[0].parent}: {name} assembled from {files} has shape {tuple(tensor.shape)}, but "
                f"params.json implies {expected}; params.json does not match the weights, or this model-parallel "
                "layout is not supported"
            )


# ---------------------------------------------------------------------- helpers


def _interleaved_to_half_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The row permutation HF's conversion applies to ``wq``/``wk`` (per head: pairs (2j, 2j+1) -> (j, j + d/2)).

    Meta's RoPE rotates adjacent pairs as complex numbers; transformers' ``rotate_half`` rotates the first half of the
    head against the second. Regrouping each head's rows from ``[x0, y0, x1, y1, ...]`` to ``[x0, x1, ..., y0, y1,
    ...]`` makes the two compute the same attention scores.
    """
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _join_dim(shapes: list[torch.Size], hidden: int) -> int:
    """Dimension along which ``tok_embeddings`` slices join: whole rows of width ``hidden`` mean a vocab split."""
    if len(shapes) > 1 and shapes[0][1] != hidden:
        return 1  # LLaMA 1/2 ParallelEmbedding: each rank holds hidden / n columns
    return 0


def _expected_shape(config: LlamaConfig, name: str) -> tuple[int, ...] | None:
    h, hd = config.hidden_size, config.head_dim
    q, kv, ffn = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.intermediate_size
    table = {
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (ffn, h),
        "mlp.up_proj.weight": (ffn, h),
        "mlp.down_proj.weight": (h, ffn),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "model.embed_tokens.weight": (config.vocab_size, h),
        "lm_head.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    key = name.split(".", 3)[3] if name.startswith("model.layers.") else name
    return table.get(key)


def _max_positions(params: dict[str, Any], rope_theta: float, norm_eps: float) -> int:
    if params.get("max_seq_len"):
        return int(params["max_seq_len"])
    if params.get("use_scaled_rope"):
        return 131072
    if rope_theta >= 500000:
        return 8192
    return 2048 if norm_eps <= 1e-6 else 4096


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _locate(path: Path) -> tuple[Path, list[Path]]:
    """The folder holding params.json and the rank files to read, in rank order."""
    if not path.exists():
        raise BlockLoadError(
            f"{path}: no such file or folder (expected a folder with {PARAMS_NAME} and consolidated.00.pth)"
        )
    if path.is_file():
        folder = path.parent
        siblings = _rank_files(folder) if _SHARD_RE.search(path.name) else []
        return folder, siblings if len(siblings) > 1 else [path]
    shards = _rank_files(path)
    if not shards:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise BlockLoadError(f"{path}: no consolidated.*.pth files (found: {found})")
    return path, shards


def _rank_files(folder: Path) -> list[Path]:
    ranked = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _SHARD_RE.search(p.name))]
    return [p for _, p in sorted(ranked)]


def _load_params(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BlockLoadError(f"{path}: params.json is missing (Meta checkpoints keep it beside consolidated.*.pth)")
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BlockLoadError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise BlockLoadError(f"{path}: expected a JSON object")
    # Some releases nest the model arguments under "model".
    return params.get("model", params) if isinstance(params.get("model"), dict) else params


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        # mmap: only the pickle is read now; tensor bytes are paged in when a read touches them.
        state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    # weights_only refuses pickled code with UnpicklingError; truncation and the legacy format give RuntimeError.
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        raise BlockLoadError(
            f"{path}: cannot open this PyTorch checkpoint (truncated or corrupt, not a plain dict of tensors, or "
            f"saved in the legacy non-zip format, which cannot be memory-mapped - re-save it with torch.save): {exc}"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BlockLoadError(f"{path}: expected a dict of tensors (a Meta consolidated.*.pth)")
    return state
