"""Save a trained model as a folder (``config.json`` + ``model.safetensors``) and load it back in three lines::

    from medboost.models import load_pretrained
    model = load_pretrained("runs/breastmnist/vit_tiny_llm/seed0/model")
    probs = model(images).softmax(-1)

The frozen LLM block's weights are saved with the model and its transformers config is stored in ``config.json``, so
loading needs neither the training code nor the LLM checkpoint it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig

from medboost.errors import ConfigError
from medboost.llm.load import meta_tensors
from medboost.models.booster import BoosterConfig
from medboost.models.registry import create_model

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_pretrained(model: nn.Module, folder: str | Path, extra: dict | None = None) -> Path:
    """Write ``model`` (made by :func:`create_model`) to ``folder``. ``extra`` (e.g. label names, task) is stored in
    the config for users of the saved model."""
    config = getattr(model, "medboost_config", None)
    if config is None:
        raise ConfigError("only models made by medboost.models.create_model can be saved with save_pretrained")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"medboost_model": config["name"], "kwargs": config["kwargs"], **(extra or {})}
    block = getattr(getattr(model, "booster", None), "block", None)
    if block is not None and hasattr(block, "config"):
        record["llm_config"] = block.config.to_dict()
    # Models with frozen parts rebuilt from their sources (MedBLIP's encoder and LLM) save only the rest.
    saved_state = getattr(model, "saved_state_dict", None)
    if saved_state is not None:
        record["frozen_parts_from_sources"] = True
    state = {k: v.detach().contiguous().cpu() for k, v in (saved_state or model.state_dict)().items()}
    # Write to temporary names and rename: an interrupted save never leaves a half-written model in place.
    tmp_weights, tmp_config = folder / (WEIGHTS_NAME + ".tmp"), folder / (CONFIG_NAME + ".tmp")
    save_file(state, tmp_weights)
    tmp_config.write_text(json.dumps(record, indent=2))
    tmp_weights.replace(folder / WEIGHTS_NAME)
    tmp_config.replace(folder / CONFIG_NAME)
    return folder


def read_model_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{path}: not found (a saved medboost model folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON: {err}") from err
    if "medboost_model" not in record:
        raise ConfigError(f"{path}: not a medboost model config (no 'medboost_model' key)")
    return record


def load_pretrained(folder: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_pretrained`, in eval mode, on ``map_location``.

    The model is built on the meta device (shapes only: no memory, no random init) and the saved tensors are assigned
    to it, so loading holds one copy of the weights, as read from ``model.safetensors``.
    """
    from medboost.llm.readers.memory import StateDictReader

    folder = Path(folder)
    record = read_model_config(folder)
    kwargs = record["kwargs"]
    booster = BoosterConfig(**kwargs["booster"]).to_dict() if kwargs.get("booster") else None
    if booster and booster["block"]["init"] != "none" and "llm_config" in record:
        # Rebuild the block's structure from the stored config (a random block, built on the meta device below, so
        # nothing is drawn); its weights come from model.safetensors.
        llm = record["llm_config"]
        config = AutoConfig.for_model(llm.pop("model_type"), **llm)
        spec = dict(booster["block"], source=StateDictReader(config, {}, source=str(folder)), init="random")
        kwargs = dict(kwargs, booster=dict(booster, block=spec))
    weights = folder / WEIGHTS_NAME
    try:
        state = load_file(weights, device=str(map_location))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise ConfigError(f"{weights}: cannot read the model weights: {err}") from err
    if record.get("frozen_parts_from_sources"):
        return _load_with_frozen_sources(record, state, map_location)
    with torch.device("meta"):
        model = create_model(record["medboost_model"], **kwargs)
    model.medboost_config = {"name": record["medboost_model"], "kwargs": record["kwargs"]}
    try:
        # assign: the saved tensors become the parameters (keeping each parameter's requires_grad: frozen stays so).
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ConfigError(f"{weights}: weights do not match the model in {CONFIG_NAME}: {err}") from err
    empty = meta_tensors(model)
    if empty:
        raise ConfigError(
            f"{weights}: the model in {CONFIG_NAME} has tensors that are neither saved nor computed: {empty}"
        )
    # Computed buffers (rotary frequencies) were made on the CPU: bring them to the weights.
    return model.to(map_location).eval()


def _load_with_frozen_sources(record: dict, state: dict, map_location) -> nn.Module:
    """Build the model for real (its frozen parts load their pre-trained weights from the sources named in the
    config), then load the saved trainable tensors over the fresh ones."""
    model = create_model(record["medboost_model"], **record["kwargs"])
    model.load_saved_state(state)
    return model.to(map_location).eval()
