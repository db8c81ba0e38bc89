"""MetaReader: a tiny LLaMA written in Meta's consolidated.*.pth layout reads back as the transformers tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_OVERRIDES
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from medboost.errors import BlockLoadError
from medboost.llm.readers.meta_reader import MetaReader

# Two params.json styles, each sized so Meta's FFN formula gives the tiny model's intermediate size:
# LLaMA 1/2: int(2 * 4 * 64 / 3) = 170 -> next multiple of 32 = 192; no n_kv_heads, vocab_size -1, embeddings split
# along dim 1. Llama 3: int(0.5 * 170) = 85 -> 96; grouped-query attention, scaled RoPE, embeddings split along dim 0.
STYLES = {
    "llama2": dict(
        hf=dict(intermediate_size=192, num_key_value_heads=4, rms_norm_eps=1e-6),
        params=dict(dim=64, n_layers=3, n_heads=4, multiple_of=32, norm_eps=1e-6, vocab_size=-1),
    ),
    "llama3": dict(
        hf=dict(intermediate_size=96, num_key_value_heads=2, rms_norm_eps=1e-5),
        params=dict(
            dim=64, n_layers=3, n_heads=4, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=0.5, norm_eps=1e-5,
            vocab_size=128, rope_theta=500000.0, use_scaled_rope=True,
        ),
    ),
}  # fmt: skip

_LAYER_TO_META = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}


def _tiny_llama(style: str) -> LlamaForCausalLM:
    kwargs = dict(TINY_OVERRIDES["llama"], **STYLES[style]["hf"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**kwargs, tie_word_embeddings=False))
    with torch.no_grad():  # random norms too, so a swapped tensor cannot pass
        for p in model.parameters():
            p.normal_()
    return model


def _half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of HF's conversion permutation: back to Meta's interleaved-pair rows within each head."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _to_meta(state: dict[str, torch.Tensor], config: LlamaConfig, n_ranks: int, vocab_parallel: bool) -> list[dict]:
    """The transformers state dict in Meta's layout, cut into ``n_ranks`` model-parallel files."""
    ranks: list[dict] = [{} for _ in range(n_ranks)]

    def put(meta_name: str, tensor: torch.Tensor, split_dim: int | None) -> None:
        pieces = [tensor] * n_ranks if split_dim is None else tensor.chunk(n_ranks, dim=split_dim)
        for rank, piece in zip(ranks, pieces):
            rank[meta_name] = piece.clone().contiguous()

    for i in range(config.num_hidden_layers):
        for suffix, (meta_suffix, split_dim) in _LAYER_TO_META.items():
            tensor = state[f"model.layers.{i}.{suffix}"]
            if suffix.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                heads = config.num_attention_heads if "q_proj" in suffix else config.num_key_value_heads
                tensor = _half_to_interleaved(tensor, heads)
            put(f"layers.{i}.{meta_suffix}", tensor, split_dim)
    put("tok_embeddings.weight", state["model.embed_tokens.weight"], 0 if vocab_parallel else 1)
    put("norm.weight", state["model.norm.weight"], None)
    put("output.weight", state["lm_head.weight"], 0)
    put("rope.freqs", torch.ones(config.head_dim // 2), None)  # LLaMA 1 files carry it; readers must skip it
    return ranks


class MetaCheckpoint:
    def __init__(self, root: Path, style: str, n_ranks: int, dtype: torch.dtype = torch.float32):
        self.style, self.n_ranks = style, n_ranks
        model = _tiny_llama(style)
        self.config = model.config
        self.state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
        self.folder = root / f"{style}-mp{n_ranks}"
        self.folder.mkdir()
        (self.folder / "params.json").write_text(json.dumps(STYLES[style]["params"]))
        for r, rank in enumerate(_to_meta(self.state, self.config, n_ranks, vocab_parallel=style == "llama3")):
            torch.save(rank, self.folder / f"consolidated.{r:02d}.pth")

    def rank_file(self, r: int = 0) -> Path:
        return self.folder / f"consolidated.{r:02d}.pth"


@pytest.fixture(scope="module", params=[(s, n) for s in STYLES for n in (1, 2)], ids=lambda p: f"{p[0]}-mp{p[1]}")
def ckpt(request, tmp_path_factory) -> MetaCheckpoint:
    return MetaCheckpoint(tmp_path_factory.mktemp("meta"), *request.param)


@pytest.fixture(scope="module")
def llama2(tmp_path_factory) -> MetaCheckpoint:
    return MetaCheckpoint(tmp_path_factory.mktemp("meta"), "llama2", 2)


def _assert_equal_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == torch.float32, name
        assert torch.equal(got[name], tensor.float()), name


def _copy(ckpt: MetaCheckpoint, dst: Path) -> Path:
    return Path(shutil.copytree(ckpt.folder, dst))


# ---------------------------------------------------------------------- exact tensors and config


def test_every_tensor_reads_back_exactly(ckpt: MetaCheckpoint):
    with MetaReader(ckpt.folder) as reader:
        assert set(reader.tensor_names()) == set(ckpt.state)
        layer = [n for n in ckpt.state if n.startswith("model.layers.2.")]
        _assert_equal_tensors(reader.read(layer), {n: ckpt.state[n] for n in layer})
        _assert_equal_tensors(reader.read(ckpt.state), ckpt.state)
        assert reader.info.format == "meta"
        assert [p.name for p in reader.info.files] == [f"consolidated.{r:02d}.pth" for r in range(ckpt.n_ranks)]


def test_config_matches_the_model(ckpt: MetaCheckpoint):
    got, want = MetaReader(ckpt.folder).config, ckpt.config
    for field in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "vocab_size", "rms_norm_eps",
    ):  # fmt: skip
        assert getattr(got, field) == getattr(want, field), field
    assert got.model_type == "llama" and got.tie_word_embeddings is False
    rope = got.rope_parameters
    if ckpt.style == "llama3":
        assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0 and rope["factor"] == 8.0
        assert got.max_position_embeddings == 131072
    else:
        assert rope["rope_type"] == "default" and rope["rope_theta"] == 10000.0
        assert got.max_position_embeddings == 2048  # norm_eps 1e-6: LLaMA 1


def test_reader_output_loads_strictly_into_a_transformers_model(ckpt: MetaCheckpoint):
    reader = MetaReader(ckpt.folder)
    with torch.device("meta"):
        model = LlamaForCausalLM(reader.config)
    model.load_state_dict(reader.read(reader.tensor_names()), strict=True, assign=True)


def test_permutation_turns_meta_rope_into_transformers_rope(ckpt: MetaCheckpoint):
    """The row permutation is right iff Meta's complex RoPE on Meta's weights and transformers' rotate_half RoPE on
    the read weights give the same attention scores (RoPE without scaling on both sides)."""
    cfg = ckpt.config
    n_heads, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    theta = float(STYLES[ckpt.style]["params"].get("rope_theta", 10000.0))
    meta = {
        k: torch.cat([torch.load(ckpt.rank_file(r))[f"layers.1.attention.{k}.weight"] for r in range(ckpt.n_ranks)])
        for k in ("wq", "wk")
    }
    read = MetaReader(ckpt.folder).read(
        ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"]
    )
    seq = 7
    x = torch.randn(seq, cfg.hidden_size, generator=torch.Generator().manual_seed(1))

    # Meta: rotate consecutive pairs as complex numbers by position * freq.
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    cis = torch.polar(torch.ones(seq, hd // 2), torch.outer(torch.arange(seq).float(), freqs))

    def meta_rope(w, heads):
        pairs = (x @ w.T).view(seq, heads, hd // 2, 2)
        return torch.view_as_real(torch.view_as_complex(pairs) * cis[:, None]).flatten(2).transpose(0, 1)

    q_meta, k_meta = meta_rope(meta["wq"], n_heads), meta_rope(meta["wk"], n_kv)

    # transformers: rotate_half with cos/sin from its own rotary module.
    rope_cfg = LlamaConfig(**{**cfg.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": theta}})
    cos, sin = LlamaRotaryEmbedding(rope_cfg)(x, torch.arange(seq)[None])
    q = (x @ read["model.layers.1.self_attn.q_proj.weight"].T).view(1, seq, n_heads, hd).transpose(1, 2)
    k = (x @ read["model.layers.1.self_attn.k_proj.weight"].T).view(1, seq, n_kv, hd).transpose(1, 2)
    q_hf, k_hf = (t[0] for t in apply_rotary_pos_emb(q, k, cos, sin))

    group = n_heads // n_kv
    for h in range(n_heads):
        meta_scores = q_meta[h] @ k_meta[h // group].T
        hf_scores = q_hf[h] @ k_hf[h // group].T
        torch.testing.assert_close(hf_scores, meta_scores, rtol=1e-4, atol=1e-3)
    # Without the permutation the scores differ: the test can tell.
    q_raw = (x @ meta["wq"].T).view(1, seq, n_heads, hd).transpose(1, 2)
    k_raw = (x @ meta["wk"].T).view(1, seq, n_kv, hd).transpose(1, 2)
    q_bad, k_bad = (t[0] for t in apply_rotary_pos_emb(q_raw, k_raw, cos, sin))
    assert not torch.allclose(q_bad[0] @ k_bad[0].T, q_meta[0] @ k_meta[0].T, atol=1e-3)


def test_bf16_storage_is_reported_and_returned_as_float32(tmp_path):
    ckpt = MetaCheckpoint(tmp_path, "llama3", 2, dtype=torch.bfloat16)
    reader = MetaReader(ckpt.folder)
    names = [n for n in ckpt.state if n.startswith("model.layers.0.")]
    _assert_equal_tensors(reader.read(names), {n: ckpt.state[n] for n in names})
    assert reader.info.quantization_summary(names) == f"BF16 x{len(names)}"


def test_single_pth_path(tmp_path, llama2: MetaCheckpoint):
    one = MetaCheckpoint(tmp_path, "llama3", 1)
    _assert_equal_tensors(MetaReader(one.rank_file()).read(one.state), one.state)
    # One rank of a model-parallel checkpoint is only a slice: its siblings are used too.
    reader = MetaReader(llama2.rank_file(1))
    assert len(reader.info.files) == 2
    _assert_equal_tensors(reader.read(llama2.state), llama2.state)


def test_stored_ffn_size_wins_over_params_with_a_warning(llama2: MetaCheckpoint, tmp_path):
    folder = _copy(llama2, tmp_path / "m")
    (folder / "params.json").write_text(json.dumps(dict(STYLES["llama2"]["params"], multiple_of=256)))
    with pytest.warns(UserWarning, match="FFN size of 256 but the stored weights have 192"):
        reader = MetaReader(folder)
    assert reader.config.intermediate_size == 192


def test_config_overrides(llama2: MetaCheckpoint):
    assert (
        MetaReader(llama2.folder, config_overrides={"max_position_embeddings": 4096}).config.max_position_embeddings
        == 4096
    )


# ---------------------------------------------------------------------- bad input


def test_missing_folder(tmp_path):
    with pytest.raises(BlockLoadError, match=r"nope: no such file or folder"):
        MetaReader(tmp_path / "nope")


def test_params_json_missing(llama2: MetaCheckpoint, tmp_path):
    folder = _copy(llama2, tmp_path / "m")
    (folder / "params.json").unlink()
    with pytest.raises(BlockLoadError, match=r"params.json: params.json is missing"):
        MetaReader(folder)


def test_params_json_invalid(llama2: MetaCheckpoint, tmp_path):
    folder = _copy(llama2, tmp_path / "m")
    (folder / "params.json").write_text("{dim: 64")
    with pytest.raises(BlockLoadError, match=r"params.json: not valid JSON"):
        MetaReader(folder)
    (folder / "params.json").write_text(json.dumps({"dim": 64}))
    with pytest.raises(BlockLoadError, match=r"params.json: missing or invalid field 'n_heads'"):
        MetaReader(folder)


def test_no_consolidated_files(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(STYLES["llama2"]["params"]))
    with pytest.raises(BlockLoadError, match=r"no consolidated\.\*\.pth files \(found: params.json\)"):
        MetaReader(tmp_path)


def test_truncated_pth(llama2: MetaCheckpoint, tmp_path):
    folder = _copy(llama2, tmp_path / "m")
    rank = folder / "consolidated.01.pth"
    rank.write_bytes(rank.read_bytes()[:-200])
    with pytest.raises(BlockLoadError, match=r"consolidated.01.pth: cannot open this PyTorch checkpoint \(truncated"):
        MetaReader(folder)


def test_key_missing_from_one_rank(llama2: MetaCheckpoint, tmp_path):
    folder = _copy(llama2, tmp_path / "m")
    rank = torch.load(folder / "consolidated.01.pth")
    del rank["layers.1.feed_forward.w2.weight"]
    torch.save(rank, folder / "consolidated.01.pth")
    reader = MetaReader(folder)
    reader.read(["model.layers.0.mlp.down_proj.weight"])  # other layers still read
    with pytest.raises(BlockLoadError, match=r"consolidated.01.pth: tensor 'layers.1.feed_forward.w2.weight'"):
        reader.read(["model.layers.1.mlp.down_proj.weight"])


def test_unknown_tensor_name(llama2: MetaCheckpoint):
    with pytest.raises(BlockLoadError, match=r"'layers.1.attention.wq.weight' is not in this checkpoint.*transformers"):
        MetaReader(llama2.folder).read(["layers.1.attention.wq.weight"])


def test_params_not_matching_the_weights(llama2: MetaCheckpoint, tmp_path):
    folder = _copy(llama2, tmp_path / "m")
    (folder / "params.json").write_text(json.dumps(dict(STYLES["llama2"]["params"], dim=32)))
    with pytest.warns(UserWarning):
        reader = MetaReader(folder)
    with pytest.raises(BlockLoadError, match=r"q_proj.weight assembled from consolidated.00.pth, consolidated.01.pth"):
        reader.read(["model.layers.0.self_attn.q_proj.weight"])
