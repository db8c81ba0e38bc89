"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> str:
    """A tiny random LLaMA saved as a Hugging Face folder: a real block source for end-to-end tests."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(folder)
    return str(folder)
