"""Fixtures shared by several test files."""

from __future__ import annotations

import os

# The suite trains tiny models, whose steps are dominated by thread synchronisation: one intra-op thread runs them
# many times faster on a small shared machine. medboost's start_run respects a thread count set this way, and the
# CLI subprocesses some tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> str:
    """A tiny random LLaMA saved as a Hugging Face folder: a real block source for end-to-end tests."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(folder)
    return str(folder)
