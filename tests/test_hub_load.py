"""``load_pretrained`` builds the model on the meta device and assigns the saved tensors: nothing is drawn at random,
and the model it returns equals the saved one exactly (dtypes, frozen flags, computed rotary frequencies)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM

from medboost.llm.readers.memory import StateDictReader
from medboost.models import create_model, load_pretrained, save_pretrained

INITS = ("normal_", "trunc_normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_")
SMALL = {"spatial_dims": 2, "in_channels": 1, "num_classes": 3, "dim": 32, "depth": 2, "heads": 2, "img_size": 16}


@pytest.fixture(scope="module")
def tiny_reader():
    torch.manual_seed(0)
    return StateDictReader.from_model(AutoModelForCausalLM.from_config(tiny_config("llama")), source="tiny-llama")


def _spy_on_random_init(monkeypatch) -> list[str]:
    """Record every torch.nn.init call that writes real memory (on the meta device they only declare shapes)."""
    drawn: list[str] = []
    for name in INITS:

        def spy(tensor, *args, _init=getattr(torch.nn.init, name), _name=name, **kwargs):
            if not tensor.is_meta:
                drawn.append(_name)
            return _init(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, spy)
    return drawn


@pytest.mark.parametrize(
    "name,block",
    [
        ("vit_tiny_llm", {"rope": True, "final_norm": True, "dtype": "bfloat16"}),
        ("medvisionllama", {"init": "random", "rope": True}),
    ],
)
def test_load_pretrained_assigns_the_saved_weights_and_draws_nothing(tmp_path, monkeypatch, tiny_reader, name, block):
    torch.manual_seed(0)
    model = create_model(name, **SMALL, patch_size=4, booster={"block": {"source": tiny_reader, **block}}).eval()
    torch.nn.init.normal_(model.booster.m2.weight)  # make the booster matter
    save_pretrained(model, tmp_path / "m")

    drawn = _spy_on_random_init(monkeypatch)
    rng = torch.get_rng_state()
    loaded = load_pretrained(tmp_path / "m")
    assert drawn == [] and torch.equal(torch.get_rng_state(), rng)

    saved, ours = model.state_dict(), loaded.state_dict()
    assert list(ours) == list(saved)
    assert all(ours[k].dtype == saved[k].dtype and torch.equal(ours[k], saved[k]) for k in saved)
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in model.parameters()]
    # The rotary frequencies are not saved: they are computed, float32, as in the model that was trained.
    torch.testing.assert_close(
        loaded.booster.block.rotary.inv_freq, model.booster.block.rotary.inv_freq, rtol=0, atol=0
    )
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
