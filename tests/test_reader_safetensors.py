"""SafetensorsReader: exact tensors for every family, shard-selective reads, hub downloads (mocked), errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors.torch import save_file
from tiny_models import TINY_OVERRIDES, tiny_config
from transformers import AutoModel, AutoModelForCausalLM, Gemma3Config

from medboost.errors import BlockLoadError
from medboost.llm.readers import safetensors_reader as sr
from medboost.llm.readers.safetensors_reader import SafetensorsReader

LAYER = 1
CONFIG_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _layer_prefix(model_type: str) -> str:
    return "encoder.layer" if model_type == "bert" else "model.layers"


def _tiny_model(model_type: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    auto = AutoModel if model_type == "bert" else AutoModelForCausalLM
    model = auto.from_config(tiny_config(model_type))
    # Random values everywhere (default init sets norms to 1 or 0), so a swapped or misnamed tensor cannot pass.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model.to(dtype)


class Saved:
    """One tiny model saved as a single file and as >= 5 shards, plus its state dict."""

    def __init__(self, model_type: str, root: Path, dtype: torch.dtype = torch.float32):
        self.model_type = model_type
        model = _tiny_model(model_type, dtype)
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.config = model.config
        self.single, self.sharded = root / "single", root / "sharded"
        model.save_pretrained(self.single)
        model.save_pretrained(self.sharded, max_shard_size="50KB")
        self.weight_map = json.loads((self.sharded / sr.INDEX_NAME).read_text())["weight_map"]

    def layer_names(self, layer: int = LAYER) -> list[str]:
        prefix = f"{_layer_prefix(self.model_type)}.{layer}."
        return [n for n in self.state if n.startswith(prefix)]


@pytest.fixture(scope="module", params=sorted(TINY_OVERRIDES))
def saved(request, tmp_path_factory) -> Saved:
    return Saved(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Saved:
    return Saved("llama", tmp_path_factory.mktemp("llama"))


def _assert_equal_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        want = tensor.float() if tensor.is_floating_point() else tensor
        assert got[name].dtype == want.dtype, name
        assert torch.equal(got[name], want), name


# ---------------------------------------------------------------------- exact tensors and config


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_layer_tensors_and_config_match_the_model(saved: Saved, layout: str):
    reader = SafetensorsReader(getattr(saved, layout))
    names = saved.layer_names()
    assert len(names) >= 6
    _assert_equal_tensors(reader.read(names), {n: saved.state[n] for n in names})
    assert set(reader.tensor_names()) <= set(saved.state)
    assert set(reader.tensor_names()) >= {n for n in saved.state if n != "lm_head.weight"}  # tied heads not stored
    for field in CONFIG_FIELDS:
        assert getattr(reader.config, field) == getattr(saved.config, field), field
    if saved.model_type != "bert":
        assert reader.config.num_key_value_heads == saved.config.num_key_value_heads
    assert reader.info.format == "safetensors"


def test_reading_one_layer_opens_only_its_shards(saved: Saved, monkeypatch):
    opened, headers = [], []
    real_open, real_header = sr._read_tensors, sr.read_safetensors_header

    def spy_open(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    def spy_header(path):
        headers.append(Path(path).name)
        return real_header(path)

    monkeypatch.setattr(sr, "_read_tensors", spy_open)
    monkeypatch.setattr(sr, "read_safetensors_header", spy_header)
    reader = SafetensorsReader(saved.sharded)
    assert headers == [] and opened == []  # opening an index reads no shard at all
    names = saved.layer_names()
    expected = {saved.weight_map[n] for n in names}
    assert reader.read(names).keys() == set(names)
    assert set(opened) == set(headers) == expected == set(reader.files_for(names))
    assert len(opened) == len(expected)  # each shard opened once
    assert expected < set(saved.weight_map.values())
    assert set(reader.info.tensor_types) == {n for n, f in saved.weight_map.items() if f in expected}


def test_whole_checkpoint_reads_back_exactly(llama: Saved):
    with SafetensorsReader(llama.sharded) as reader:
        names = reader.tensor_names()
        _assert_equal_tensors(reader.read(names), {n: llama.state[n] for n in names})


def test_bf16_storage_is_reported_and_returned_as_float32(tmp_path):
    saved = Saved("qwen3", tmp_path, dtype=torch.bfloat16)
    reader = SafetensorsReader(saved.single)
    names = saved.layer_names()
    _assert_equal_tensors(reader.read(names), {n: saved.state[n] for n in names})
    assert reader.info.quantization_summary(names) == f"BF16 x{len(names)}"


def test_path_to_a_safetensors_file_works(llama: Saved):
    reader = SafetensorsReader(llama.single / sr.SINGLE_FILE_NAME)
    names = llama.layer_names(0)
    _assert_equal_tensors(reader.read(names), {n: llama.state[n] for n in names})


def test_multimodal_names_pass_through_and_config_is_the_text_config(tmp_path):
    text = dict(TINY_OVERRIDES["gemma3_text"])
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    Gemma3Config(text_config=text, vision_config=vision).save_pretrained(tmp_path)
    tensors = {"model.language_model.layers.0.mlp.up_proj.weight": torch.randn(96, 64)}
    save_file(tensors, tmp_path / sr.SINGLE_FILE_NAME)
    reader = SafetensorsReader(tmp_path)
    assert reader.full_config.model_type == "gemma3"
    assert reader.config.model_type == "gemma3_text" and reader.config.hidden_size == 64
    _assert_equal_tensors(reader.read(tensors), tensors)


# ---------------------------------------------------------------------- hub (mocked, no network)


class FakeHub:
    """Serves a local folder as if it were a hub repo and records every requested file."""

    def __init__(self, folder: Path, repo_id: str = "org/tiny"):
        self.folder, self.repo_id, self.requested = folder, repo_id, []

    def __call__(self, *, repo_id, filename, revision=None, cache_dir=None, token=None):
        assert repo_id == self.repo_id
        self.requested.append(filename)
        path = self.folder / filename
        if not path.exists():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)


def test_hub_downloads_config_index_then_only_the_shards_read(llama: Saved, monkeypatch):
    hub = FakeHub(llama.sharded)
    monkeypatch.setattr(sr, "hf_hub_download", hub)
    reader = SafetensorsReader.from_hub("org/tiny")
    assert hub.requested == [sr.CONFIG_NAME, sr.INDEX_NAME]
    assert reader.config.hidden_size == llama.config.hidden_size
    assert reader.source == "hub:org/tiny"
    names = llama.layer_names()
    _assert_equal_tensors(reader.read(names), {n: llama.state[n] for n in names})
    shards = hub.requested[2:]
    assert sorted(shards) == sorted({llama.weight_map[n] for n in names})
    assert len(shards) < len(set(llama.weight_map.values()))
    reader.read(names)
    assert hub.requested[2:] == shards  # a shard is downloaded once


def test_hub_single_file_repo_downloads_the_file(llama: Saved, monkeypatch):
    hub = FakeHub(llama.single)
    monkeypatch.setattr(sr, "hf_hub_download", hub)
    reader = SafetensorsReader.from_hub("org/tiny", revision="main")
    assert hub.requested == [sr.CONFIG_NAME, sr.INDEX_NAME]  # the index is probed, absent
    names = llama.layer_names()
    _assert_equal_tensors(reader.read(names), {n: llama.state[n] for n in names})
    assert hub.requested[2:] == [sr.SINGLE_FILE_NAME]


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (LocalEntryNotFoundError("Cannot find the requested files in the disk cache"), "hub is unreachable"),
        (ConnectionError("Failed to resolve 'huggingface.co'"), "ConnectionError"),
    ],
)
def test_hub_unreachable_names_repo_and_suggests_local_folder(monkeypatch, exc, words):
    def offline(**kwargs):
        raise exc

    monkeypatch.setattr(sr, "hf_hub_download", offline)
    with pytest.raises(BlockLoadError, match="meta-llama/Llama-3.1-8B") as info:
        SafetensorsReader.from_hub("meta-llama/Llama-3.1-8B")
    message = str(info.value)
    assert words in message and "config.json" in message and "local folder" in message and "PyPI" in message
    assert info.value.__cause__ is exc


def test_hub_gated_repo_says_how_to_get_access(monkeypatch):
    httpx = pytest.importorskip("httpx2")  # huggingface_hub's HTTP errors need a response object
    from huggingface_hub.errors import GatedRepoError

    response = httpx.Response(401, request=httpx.Request("GET", "https://huggingface.co/org/gated"))

    def gated(**kwargs):
        raise GatedRepoError("Access to model org/gated is restricted", response=response)

    monkeypatch.setattr(sr, "hf_hub_download", gated)
    with pytest.raises(BlockLoadError, match=r"'org/gated'.*gated.*log in"):
        SafetensorsReader.from_hub("org/gated")


def test_hub_shard_download_failure_is_reported_on_read(llama: Saved, monkeypatch):
    hub = FakeHub(llama.sharded)
    monkeypatch.setattr(sr, "hf_hub_download", hub)
    reader = SafetensorsReader.from_hub("org/tiny")

    def offline(**kwargs):
        raise LocalEntryNotFoundError("connection lost")

    monkeypatch.setattr(sr, "hf_hub_download", offline)
    shard = llama.weight_map[llama.layer_names()[0]]
    with pytest.raises(BlockLoadError, match=rf"'{shard}' from Hugging Face hub repo 'org/tiny'"):
        reader.read(llama.layer_names())


def test_hub_repo_without_safetensors(tmp_path, llama: Saved, monkeypatch):
    shutil.copy(llama.single / sr.CONFIG_NAME, tmp_path / sr.CONFIG_NAME)
    monkeypatch.setattr(sr, "hf_hub_download", FakeHub(tmp_path))
    reader = SafetensorsReader.from_hub("org/tiny")
    with pytest.raises(BlockLoadError, match=r"'model.safetensors' from .*'org/tiny'.*no model.safetensors.index.json"):
        reader.tensor_names()


# ---------------------------------------------------------------------- bad input


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(BlockLoadError, match=r"nope: no such folder"):
        SafetensorsReader(tmp_path / "nope")


def test_folder_without_safetensors_weights(tmp_path):
    with pytest.raises(BlockLoadError, match=r"no safetensors weights"):
        SafetensorsReader(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(BlockLoadError, match=r"found pytorch_model.bin: convert it"):
        SafetensorsReader(tmp_path)


def test_missing_config(llama: Saved, tmp_path):
    folder = _copy(llama.single, tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(BlockLoadError, match=r"config.json: config.json is missing"):
        SafetensorsReader(folder)


def test_invalid_config_json(llama: Saved, tmp_path):
    folder = _copy(llama.single, tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(BlockLoadError, match=r"config.json: not valid JSON"):
        SafetensorsReader(folder)


def test_corrupt_safetensors_header(llama: Saved, tmp_path):
    folder = _copy(llama.single, tmp_path / "m")
    (folder / sr.SINGLE_FILE_NAME).write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(BlockLoadError, match=r"model.safetensors: corrupt or not a safetensors file"):
        SafetensorsReader(folder)
    bad_json = b"{oops}   "
    (folder / sr.SINGLE_FILE_NAME).write_bytes(len(bad_json).to_bytes(8, "little") + bad_json)
    with pytest.raises(BlockLoadError, match=r"model.safetensors: corrupt safetensors file \(header is not valid JSON"):
        SafetensorsReader(folder)


def test_truncated_safetensors(llama: Saved, tmp_path):
    folder = _copy(llama.single, tmp_path / "m")
    data = (folder / sr.SINGLE_FILE_NAME).read_bytes()
    (folder / sr.SINGLE_FILE_NAME).write_bytes(data[: len(data) - 1000])
    with pytest.raises(BlockLoadError, match=rf"model.safetensors: truncated safetensors file \({len(data) - 1000} "):
        SafetensorsReader(folder)


def test_truncated_shard_is_reported_when_read(llama: Saved, tmp_path):
    folder = _copy(llama.sharded, tmp_path / "m")
    name = llama.layer_names()[0]
    shard = folder / llama.weight_map[name]
    shard.write_bytes(shard.read_bytes()[:-8])
    reader = SafetensorsReader(folder)  # opening reads no shard
    with pytest.raises(BlockLoadError, match=rf"{shard.name}: truncated safetensors file"):
        reader.read([name])


def test_index_pointing_at_a_missing_shard(llama: Saved, tmp_path):
    folder = _copy(llama.sharded, tmp_path / "m")
    names = llama.layer_names()
    gone = llama.weight_map[names[0]]
    (folder / gone).unlink()
    reader = SafetensorsReader(folder)
    with pytest.raises(BlockLoadError, match=rf"{gone}: shard is missing; the index .*index.json maps tensors"):
        reader.read(names)
    # Tensors in the shards that are present still read: users may keep only the shards they need.
    others = [n for n in llama.state if llama.weight_map.get(n, gone) != gone]
    _assert_equal_tensors(reader.read(others), {n: llama.state[n] for n in others})


def test_index_naming_a_tensor_its_shard_lacks(llama: Saved, tmp_path):
    folder = _copy(llama.sharded, tmp_path / "m")
    index = json.loads((folder / sr.INDEX_NAME).read_text())
    name = llama.layer_names()[0]
    wrong = next(f for f in index["weight_map"].values() if f != index["weight_map"][name])
    index["weight_map"][name] = wrong
    (folder / sr.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(BlockLoadError, match=rf"{wrong}: the index .* lists '{name}' in this shard"):
        SafetensorsReader(folder).read([name])


def test_missing_tensor_names_similar_ones(llama: Saved):
    reader = SafetensorsReader(llama.sharded)
    with pytest.raises(BlockLoadError, match=r"'model.layers.7.mlp.up_proj.weight' is not in this checkpoint.*similar"):
        reader.read(["model.layers.0.mlp.up_proj.weight", "model.layers.7.mlp.up_proj.weight"])
