"""GGUF (llama.cpp) checkpoints: a cheap header parse, then single tensors dequantised on demand.

The header (metadata and tensor table) is parsed here rather than with ``gguf.GGUFReader``, which decodes every
metadata array when it opens a file: the tokenizer vocabulary alone costs seconds and hundreds of MB for Gemma 3.
Arrays are skipped by computing their byte length instead. Tensor data stays in a read-only memory map until a tensor
is asked for, and is then dequantised with ``gguf.quants.dequantize``, the routine transformers' own GGUF loader uses,
so values match ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` exactly.

The config and the undoing of llama.cpp's conversion follow transformers' GGUF loader
(``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint``, the path every architecture supported here takes):
metadata keys are renamed with its ``GGUF_CONFIG_MAPPING`` table, q/k rows of llama files are un-permuted, and Gemma
norms, stored as ``1 + w``, get 1 subtracted.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize
from gguf.tensor_mapping import TensorNameMap, get_tensor_name_map
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

from medboost.errors import BlockLoadError
from medboost.llm.readers.base import CheckpointInfo, CheckpointReader

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # v1 counted with 32-bit integers and is long extinct
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS: more is a corrupt table, not a real tensor

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SCALARS = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"),
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<?"),
    GGUFValueType.UINT64: struct.Struct("<Q"),
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_NUMPY_SCALARS = {t: np.dtype(s.format) for t, s in _SCALARS.items()}

# GGUF ``general.architecture`` values supported. Mistral has no GGUF architecture of its own: llama.cpp writes it as
# "llama" (transformers then calls it "mistral" only when ``general.name`` is exactly "mistral"; mirrored here).
SUPPORTED_GGUF_ARCHITECTURES = ("gemma", "gemma2", "gemma3", "llama", "phi3", "qwen2", "qwen3")
# llama.cpp permutes q/k rows of these for its interleaved RoPE kernels.
_QK_PERMUTED = frozenset({"llama"})
# llama.cpp stores every ``*norm.weight`` of these as ``1 + w`` (Gemma's RMSNorm scales by ``1 + w``).
_NORMS_PLUS_ONE = frozenset({"gemma", "gemma2", "gemma3"})
# transformers has no GGUF key table for Gemma 1, whose keys are a subset of Gemma 2's.
_CONFIG_TABLE_ALIASES = {"gemma": "gemma2"}
# Keys llama.cpp writes that transformers' table skips although the config needs them: Qwen3's head_dim is not
# hidden_size // heads, and Qwen3Config's default (128) is right for the released models only.
_EXTRA_CONFIG_KEYS = {"qwen3": {"attention.key_length": "head_dim"}}
# A Gemma 3 GGUF holds only the text model.
_MODEL_TYPES = {"gemma3": "gemma3_text"}

# Float types stored as plain values (F64 aside): viewed with a numpy dtype rather than as bytes of blocks.
_PLAIN_DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array left undecoded: its element type, length and the file offset of its first element."""

    element_type: GGUFValueType
    count: int
    offset: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table."""

    name: str  # GGUF name, e.g. "blk.29.attn_q.weight"
    shape: tuple[int, ...]  # torch order: GGUF stores the dims reversed (ne0, the innermost, first)
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def byte_shape(self) -> tuple[int, ...]:
        """The shape of the raw data as numpy sees it: blocks of bytes along the innermost dimension."""
        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        return (*self.shape[:-1], self.shape[-1] // block_size * type_size)


@dataclass
class GGUFHeader:
    """Everything before the tensor data."""

    version: int
    metadata: dict[str, object]  # scalars decoded, arrays as GGUFArray
    tensors: list[GGUFTensorInfo]
    data_start: int


class _HeaderParser:
    """Walks the header bytes. A read past the end raises ``struct.error``, reported as a cut-short header."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf = buf
        self.path = path
        self.pos = 0

    def fail(self, problem: str) -> BlockLoadError:
        return BlockLoadError(f"{self.path}: {problem}")

    def u32(self) -> int:
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return value

    def u64(self) -> int:
        (value,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return value

    def advance(self, nbytes: int) -> int:
        """Skip ``nbytes``; return where they started."""
        start = self.pos
        if start + nbytes > len(self.buf):
            raise struct.error("past end")
        self.pos += nbytes
        return start

    def string(self) -> str:
        start = self.advance(self.u64())
        try:
            return bytes(self.buf[start : self.pos]).decode("utf-8")
        except UnicodeDecodeError as err:
            raise self.fail(f"corrupt GGUF header: invalid UTF-8 string at byte {start}") from err

    def value_type(self) -> GGUFValueType:
        raw = self.u32()
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"corrupt GGUF header: unknown metadata value type {raw} at byte {self.pos - 4}") from None

    def value(self, vtype: GGUFValueType) -> object:
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            (value,) = fmt.unpack_from(self.buf, self.advance(fmt.size))
            return value
        if vtype == GGUFValueType.STRING:
            return self.string()
        element_type, count = self.value_type(), self.u64()
        array = GGUFArray(element_type, count, self.pos)
        self.skip_elements(element_type, count)
        return array

    def skip_elements(self, element_type: GGUFValueType, count: int) -> None:
        """Move past ``count`` array elements without decoding them."""
        if element_type in _SCALARS:
            self.advance(count * _SCALARS[element_type].size)
        elif element_type == GGUFValueType.STRING:
            # Strings have to be walked length by length; this loop is the whole cost of a large vocabulary.
            pos, buf, unpack = self.pos, self.buf, _U64.unpack_from
            for _ in range(count):
                pos += 8 + unpack(buf, pos)[0]
            if pos > len(buf):
                raise struct.error("past end")
            self.pos = pos
        else:  # arrays of arrays: rare, walk each
            for _ in range(count):
                self.value(element_type)


def _parse_header(buf: memoryview, path: Path) -> GGUFHeader:
    """Magic, version, counts, metadata, tensor table and the aligned start of the tensor data."""
    if bytes(buf[:4]) != _MAGIC:
        raise BlockLoadError(f"{path}: not a GGUF file (starts with {bytes(buf[:4])!r}, expected {_MAGIC!r})")
    p = _HeaderParser(buf, path)
    try:
        p.advance(4)
        version = p.u32()
        if version not in _VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            hint = " (a big-endian file, which is not supported)" if swapped in _VERSIONS else ""
            raise p.fail(f"unsupported GGUF version {version}{hint}; supported: {', '.join(map(str, _VERSIONS))}")
        n_tensors, n_kv = p.u64(), p.u64()
        metadata = {}
        for _ in range(n_kv):
            key = p.string()
            metadata[key] = p.value(p.value_type())
        tensors_raw = [_read_tensor_entry(p) for _ in range(n_tensors)]
    except struct.error:
        raise BlockLoadError(
            f"{path}: GGUF header is cut short at byte {p.pos} of {len(buf)} (truncated file?)"
        ) from None
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise p.fail(f"corrupt GGUF header: general.alignment is {alignment!r}, not a power of two")
    data_start = -(-p.pos // alignment) * alignment  # the tensor data begins at the next aligned offset
    tensors = [_tensor_info(entry, data_start, len(buf), path) for entry in tensors_raw]
    return GGUFHeader(version, metadata, tensors, data_start)


def _read_tensor_entry(p: _HeaderParser) -> tuple[str, tuple[int, ...], int, int]:
    name = p.string()
    n_dims = p.u32()
    if not 0 < n_dims <= _MAX_DIMS:
        raise p.fail(f"corrupt GGUF tensor table: tensor {name!r} has {n_dims} dimensions")
    dims = tuple(p.u64() for _ in range(n_dims))
    raw_type = p.u32()
    return name, dims, raw_type, p.u64()


def _tensor_info(entry: tuple, data_start: int, file_size: int, path: Path) -> GGUFTensorInfo:
    """Resolve type and byte size of one table entry and check its data lies inside the file."""
    name, dims, raw_type, offset = entry
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        known = ", ".join(t.name for t in GGMLQuantizationType)
        raise BlockLoadError(
            f"{path}: tensor {name!r} has unknown ggml type id {raw_type} (known to this gguf package: {known})"
        ) from None
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if dims[0] % block_size:
        raise BlockLoadError(
            f"{path}: corrupt tensor table: tensor {name!r} ({qtype.name}) has row length {dims[0]}, "
            f"not a multiple of the block size {block_size}"
        )
    nbytes = math.prod(dims) // block_size * type_size
    start = data_start + offset
    if start + nbytes > file_size:
        raise BlockLoadError(
            f"{path}: truncated file: tensor {name!r} needs bytes {start}..{start + nbytes} "
            f"but the file has only {file_size} bytes"
        )
    return GGUFTensorInfo(name, tuple(reversed(dims)), qtype, start, nbytes)


class GGUFReader(CheckpointReader):
    """A GGUF file opened for by-name reads of single tensors, in transformers naming and layout.

    Opening parses the header and builds the transformers config; no tensor data is read until :meth:`read`.
    Tensors are returned as float32 (dequantised), with llama.cpp's conversion undone, equal to what transformers'
    GGUF loader puts in the model.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.source = str(self.path)
        self._mm = _open_memmap(self.path)
        self._buf = memoryview(self._mm)
        header = _parse_header(self._buf, self.path)
        self.version = header.version
        self.metadata = header.metadata
        self.data_start = header.data_start
        self.architecture = self._architecture()
        self.config = self._build_config([t.name for t in header.tensors])
        self._expected_shapes = self._parameter_shapes()
        self._by_hf_name, self.unmapped = self._map_names(header.tensors)
        self.info = CheckpointInfo(
            format="gguf",
            files=[self.path],
            tensor_types={hf: t.qtype.name for hf, t in self._by_hf_name.items()},
        )

    # -- CheckpointReader -------------------------------------------------------------------------------------------

    def tensor_names(self) -> list[str]:
        return list(self._by_hf_name)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        missing = [n for n in names if n not in self._by_hf_name]
        if missing:
            raise BlockLoadError(
                f"{self.path}: no tensor named {', '.join(map(repr, missing[:5]))}"
                f"{f' (and {len(missing) - 5} more)' if len(missing) > 5 else ''} in this GGUF file; it holds "
                f"{len(self._by_hf_name)} tensors, e.g. {', '.join(list(self._by_hf_name)[:3])}"
            )
        if self._mm is None:
            raise BlockLoadError(f"{self.path}: reader is closed")
        return {n: torch.from_numpy(self._load(n)) for n in names}

    def close(self) -> None:
        # Arrays already returned are copies, so dropping the map is safe; numpy unmaps when the last view goes.
        if self._mm is not None:
            self._buf.release()
            self._mm = None

    # -- extras -----------------------------------------------------------------------------------------------------

    def gguf_name(self, hf_name: str) -> str:
        """The GGUF name a transformers tensor name is stored under, e.g. ``blk.29.attn_q.weight``."""
        if hf_name not in self._by_hf_name:
            raise BlockLoadError(f"{self.path}: no tensor named {hf_name!r} in this GGUF file")
        return self._by_hf_name[hf_name].name

    # -- internals --------------------------------------------------------------------------------------------------

    def _architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise BlockLoadError(f"{self.path}: GGUF metadata has no general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise BlockLoadError(
                f"{self.path}: GGUF architecture {arch!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)} (Mistral files use 'llama')"
            )
        return arch

    def _decode_array(self, array: GGUFArray) -> list:
        if array.element_type in _NUMPY_SCALARS:
            dtype = _NUMPY_SCALARS[array.element_type]
            return np.frombuffer(self._buf, dtype=dtype, count=array.count, offset=array.offset).tolist()
        if array.element_type == GGUFValueType.STRING:
            p = _HeaderParser(self._buf, self.path)
            p.pos = array.offset
            return [p.string() for _ in range(array.count)]
        raise BlockLoadError(f"{self.path}: cannot decode a metadata array of {array.element_type.name} elements")

    def _build_config(self, gguf_tensor_names: list[str]) -> PretrainedConfig:
        """The transformers config, built from metadata the way transformers' GGUF loader builds it."""
        kwargs = self._config_kwargs()
        # llama.cpp writes the output projection only when it is not tied to the embedding.
        kwargs.setdefault("tie_word_embeddings", "output.weight" not in gguf_tensor_names)
        if "vocab_size" not in kwargs and isinstance(self.metadata.get("tokenizer.ggml.tokens"), GGUFArray):
            kwargs["vocab_size"] = len(self.metadata["tokenizer.ggml.tokens"])
        model_type = kwargs.pop("model_type")
        model_type = _MODEL_TYPES.get(model_type, model_type)
        try:
            return AutoConfig.for_model(model_type, **kwargs)
        except (ValueError, TypeError) as err:
            raise BlockLoadError(
                f"{self.path}: cannot build a {model_type} config from the GGUF metadata: {err}"
            ) from err

    def _config_kwargs(self) -> dict[str, object]:
        """Metadata renamed to config fields with transformers' ``GGUF_CONFIG_MAPPING`` (keys it maps to None or -1
        are dropped), on top of its per-architecture defaults."""
        arch = self.architecture
        # transformers tests ``"mistral" in [general.name]``: list membership, so only an exact name counts.
        model_arch = "mistral" if arch == "llama" and self.metadata.get("general.name") == "mistral" else arch
        tables = {**{a: GGUF_CONFIG_MAPPING[b] for a, b in _CONFIG_TABLE_ALIASES.items()}, **GGUF_CONFIG_MAPPING}
        tables[model_arch] = {**tables.get(model_arch, {}), **_EXTRA_CONFIG_KEYS.get(model_arch, {})}
        defaults = GGUF_CONFIG_DEFAULTS_MAPPING.get(model_arch, GGUF_CONFIG_DEFAULTS_MAPPING.get(arch, {}))
        kwargs = dict(defaults)
        for key, value in self.metadata.items():
            # "llama.*" keys (and "llama" inside string values) read as "mistral.*" for a Mistral file
            prefix, _, rest = key.replace(arch, model_arch).partition(".")
            target = tables.get(prefix, {}).get(rest)
            if target is None or target == -1:
                continue
            if isinstance(value, GGUFArray):
                value = self._decode_array(value)
            elif isinstance(value, str):
                value = value.replace(arch, model_arch)
            kwargs[target] = value
        return kwargs

    def _parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every state-dict name of the causal-LM model for the config, with its shape (from a meta-device model)."""
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(self.config)
        except Exception as err:  # whatever the model class rejects in the metadata-built config
            raise BlockLoadError(
                f"{self.path}: cannot build a {self.config.model_type} model from the GGUF metadata: {err}"
            ) from err
        return {name: tuple(t.shape) for name, t in model.state_dict().items()}

    def _map_names(self, tensors: list[GGUFTensorInfo]) -> tuple[dict[str, GGUFTensorInfo], list[str]]:
        """``{transformers name: tensor}`` in file order, plus the GGUF names transformers has no parameter for.

        As transformers does, the model's own parameter names are mapped to GGUF names with gguf's table (which
        knows many source spellings per GGUF name) and the result is inverted.
        """
        name_map = _tensor_name_map(self.architecture, self.config.num_hidden_layers)
        hf_by_gguf = {}
        for hf_name in self._expected_shapes:
            base, dot, suffix = hf_name.rpartition(".")
            if suffix not in ("weight", "bias"):
                base, dot, suffix = hf_name, "", ""
            gguf_base = name_map.get_name(base)
            if gguf_base is not None:
                hf_by_gguf[gguf_base + dot + suffix] = hf_name
        mapped = {hf_by_gguf[t.name]: t for t in tensors if t.name in hf_by_gguf}
        unmapped = [t.name for t in tensors if t.name not in hf_by_gguf]  # e.g. rope_freqs, rope_factors_long
        return mapped, unmapped

    def _load(self, hf_name: str) -> np.ndarray:
        """One tensor as a fresh float32 array in transformers' layout."""
        info = self._by_hf_name[hf_name]
        values = self._undo_conversion(info, self._dequantised(info))
        expected = self._expected_shapes[hf_name]
        if tuple(values.shape) != expected:
            raise BlockLoadError(
                f"{self.path}: tensor {info.name!r} has shape {tuple(values.shape)}, but the config built from the "
                f"file's metadata expects {expected}"
            )
        # Views of the read-only map (plain F32 data) must be copied: the caller owns what read() returns.
        if isinstance(values, np.memmap) or not values.flags.writeable:
            values = np.array(values, dtype=np.float32)
        return np.ascontiguousarray(values, dtype=np.float32)

    def _dequantised(self, info: GGUFTensorInfo) -> np.ndarray:
        """The stored values as float32, in torch order. Plain float types are viewed with their numpy dtype, block
        types as bytes, exactly as ``gguf.GGUFReader`` hands them to ``dequantize`` for transformers."""
        raw = self._mm[info.offset : info.offset + info.nbytes]
        if info.qtype == GGMLQuantizationType.F64:  # gguf has no dequantiser for it (nor does transformers)
            return raw.view(np.float64).reshape(info.shape).astype(np.float32)
        if info.qtype in _PLAIN_DTYPES:
            return dequantize(raw.view(_PLAIN_DTYPES[info.qtype]).reshape(info.shape), info.qtype)
        try:
            return dequantize(raw.reshape(info.byte_shape), info.qtype)
        except NotImplementedError:  # integer tensors, and block types gguf cannot unpack (e.g. Q8_1, Q8_K)
            raise BlockLoadError(
                f"{self.path}: tensor {info.name!r} is stored as {info.qtype.name}, which the installed gguf package "
                "cannot dequantise"
            ) from None

    def _undo_conversion(self, info: GGUFTensorInfo, values: np.ndarray) -> np.ndarray:
        """Reverse what llama.cpp's converter did to this tensor (as transformers' GGUF tensor processors do)."""
        if self.architecture in _QK_PERMUTED:
            if ".attn_q." in info.name:
                values = self._unpermute_rows(info, values, self.config.num_attention_heads)
            elif ".attn_k." in info.name:
                values = self._unpermute_rows(info, values, self.config.num_key_value_heads)
        if self.architecture in _NORMS_PLUS_ONE and "norm.weight" in info.name:
            values = values - np.float32(1)  # in float32, as transformers does
        return values

    def _unpermute_rows(self, info: GGUFTensorInfo, values: np.ndarray, n_heads: int) -> np.ndarray:
        """Undo llama.cpp's per-head row order (pairs interleaved for its RoPE) back to the half-split order.

        llama.cpp viewed each head's rows as (2, head_dim // 2) and transposed to (head_dim // 2, 2); transposing
        back is the inverse.
        """
        rows = values.shape[0]
        if rows % (2 * n_heads):
            raise BlockLoadError(
                f"{self.path}: tensor {info.name!r} has {rows} rows, not divisible into {n_heads} heads of even size"
            )
        per_head = values.reshape(n_heads, rows // n_heads // 2, 2, *values.shape[1:])
        return per_head.swapaxes(1, 2).reshape(values.shape)


def _open_memmap(path: Path) -> np.memmap:
    """The whole file as a read-only uint8 memory map, with the user-facing errors for unusable paths."""
    if not path.exists():
        raise BlockLoadError(f"{path}: GGUF file not found")
    if not path.is_file():
        raise BlockLoadError(f"{path}: not a file")
    size = path.stat().st_size
    if size < 24:  # magic + version + two counts: nothing shorter can be a GGUF header
        with path.open("rb") as f:
            start = f.read(4)
        problem = "GGUF header is cut short (truncated file?)" if start == _MAGIC else "not a GGUF file"
        raise BlockLoadError(f"{path}: {problem} ({size} bytes)")
    try:
        return np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as err:
        raise BlockLoadError(f"{path}: cannot open: {err}") from err


@lru_cache(maxsize=16)
def _tensor_name_map(arch: str, n_blocks: int) -> TensorNameMap:
    """gguf's table of source names -> GGUF names for this architecture (~0.1 s to build, so cached)."""
    model_arch = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    return get_tensor_name_map(model_arch, n_blocks)
