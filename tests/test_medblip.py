"""MedBLIP: LLM input layout, answer-only loss, contrastive losses, zero-shot scoring, generation, modes, save/load.

Every model here is tiny and random (BERT, LLaMA and a BLIP-2 vision tower saved to tmp_path with word-level
tokenizers); the checks compare against direct computations, not against stored numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from tiny_text import VOCAB, save_tiny_bert, save_tiny_llama

from medboost.errors import ConfigError
from medboost.models import create_model, load_pretrained, save_pretrained
from medboost.models.medblip import contrastive_loss, match_candidate

QUERIES = 4
EHR = ["a male subject aged 70 years , mmse 29", "female aged 80"]
QUESTIONS = ["what will this subject be diagnosed with ?"] * 2
ANSWERS = ["dementia", "mild cognitive impairment ( mci )"]
CANDIDATES = ["not demented", "mild cognitive impairment ( mci )", "dementia"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("medblip-sources")
    torch.manual_seed(0)
    vision = T.Blip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8
    )
    T.Blip2VisionModel(vision).save_pretrained(root / "vision")
    return {
        "image_encoder": dict(source=str(root / "vision"), img_size=16, patch_size=8),
        "qformer": str(save_tiny_bert(root / "bert")),
        "llm": str(save_tiny_llama(root / "llm")),
    }


def _model(sources, **kwargs):
    torch.manual_seed(1)
    options = dict(sources, num_query_tokens=QUERIES, embed_dim=16, **kwargs)
    return create_model("medblip", **options).eval()


@pytest.fixture(scope="module")
def model(sources):
    return _model(sources)


@pytest.fixture(scope="module")
def volumes():
    return torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))


def _direct_answer_nll(model, queries, prompt_ids, answer_ids) -> tuple[float, int]:
    """Summed NLL of ``answer_ids`` after ``[prompt][queries]``: one unpadded sequence through the LLM, no mask."""
    lm = model.llm.module
    embed = lm.get_input_embeddings()
    parts = [embed(torch.tensor([prompt_ids]))]
    if queries is not None:
        parts.append(model.llm_proj(queries[None]))
    parts.append(embed(torch.tensor([answer_ids])))
    logits = lm(inputs_embeds=torch.cat(parts, dim=1)).logits[0].float()
    start = logits.shape[0] - len(answer_ids)
    logp = logits[start - 1 : -1].log_softmax(-1)
    return -float(logp[torch.arange(len(answer_ids)), torch.tensor(answer_ids)].sum()), len(answer_ids)


def test_lm_input_layout(model):
    prompts, answers = [[5, 6, 7], [8]], [[9], [10, 11, 12]]
    queries = torch.randn(2, QUERIES, model.qformer.hidden_size)
    inputs = model.build_lm_inputs(prompts, queries, answers)
    assert inputs.embeds.shape == (2, 3 + QUERIES + 3, 64)
    mask = [[1, 1, 1] + [1] * QUERIES + [1, 0, 0], [0, 0, 1] + [1] * QUERIES + [1, 1, 1]]
    assert inputs.attention_mask.tolist() == mask
    ignore = [-100] * (3 + QUERIES)
    assert inputs.labels.tolist() == [ignore + [9, -100, -100], ignore + [10, 11, 12]]
    # Positions count real tokens only: the left-padded prompt starts at 0 like the unpadded one.
    assert inputs.position_ids[1, 2:].tolist() == list(range(1 + QUERIES + 3))
    assert inputs.position_ids[0].tolist()[: 3 + QUERIES + 1] == list(range(3 + QUERIES + 1))


def test_lm_loss_is_on_the_answer_tokens_only(model, volumes):
    with torch.no_grad():
        losses = model(volumes, EHR, QUESTIONS, ANSWERS)
        queries = model.image_queries(volumes)
        prompt_ids = model._prompt_ids(model.prompts(EHR, QUESTIONS))
        answer_ids = model._answer_ids(ANSWERS, eos=True)
        total, count = 0.0, 0
        for i in range(2):
            nll, n = _direct_answer_nll(model, queries[i], prompt_ids[i], answer_ids[i])
            total, count = total + nll, count + n
    assert answer_ids[0][-1] == VOCAB["</s>"]  # the answer ends with end-of-text, which is trained too
    assert losses["loss_lm"].item() == pytest.approx(total / count, rel=1e-5)
    expected = losses["loss_lm"] + losses["loss_itc_ehr"] + losses["loss_itc_qa"]
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_contrastive_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(3, 5, 8), dim=-1)
    texts = F.normalize(torch.randn(3, 8), dim=-1)
    temperature = torch.tensor(0.07)
    sim = torch.stack([torch.stack([(images[b] @ texts[c]).max() for c in range(3)]) for b in range(3)]) / 0.07
    targets = torch.arange(3)
    i2t = F.cross_entropy(sim, targets, label_smoothing=0.1)
    t2i = F.cross_entropy(sim.T, targets, label_smoothing=0.1)
    torch.testing.assert_close(contrastive_loss(images, texts, temperature, 0.1), (i2t + t2i) / 2)
    # Batch size 1 works (the released code's squeeze() breaks there); a single pair has nothing to contrast.
    one = contrastive_loss(images[:1], texts[:1], temperature, 0.1)
    assert one.item() == pytest.approx(0.0, abs=1e-6)


def test_training_step_gradients_and_frozen_parts(sources, volumes):
    model = _model(sources).train()
    assert not model.llm.module.training and not model.image_encoder.encoder.module.training
    losses = model(volumes, EHR, QUESTIONS, ANSWERS)
    losses["loss"].backward()
    trained = ["image_encoder.patch_embed.proj.weight", "image_encoder.pos_embed", "ln_vision.weight",
               "qformer.query_tokens", "llm_proj.weight", "vision_proj.weight", "text_proj.weight", "qa_proj.weight",
               "temperature", "qformer.word_embeddings.weight"]  # fmt: skip
    params = dict(model.named_parameters())
    for name in trained:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    frozen = [p for n, p in params.items() if n.startswith(("llm.", "image_encoder.encoder."))]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    assert model.temperature.item() == pytest.approx(0.07)


def test_loss_weights_switch_terms_off(sources, volumes):
    model = _model(sources, loss_weights={"itc_ehr": 0.0, "itc_qa": 0.0})
    with torch.no_grad():
        losses = model(volumes, EHR, QUESTIONS, ANSWERS)
    assert set(losses) == {"loss", "loss_lm"}
    assert losses["loss"].item() == losses["loss_lm"].item()
    with pytest.raises(ConfigError, match="loss weights"):
        _model(sources, loss_weights={"itm": 1.0})


def test_scores_equal_a_direct_full_sequence_computation(model, volumes):
    scores = model.score_candidates(volumes, EHR, QUESTIONS, CANDIDATES)
    assert scores["sum"].shape == (2, 3)
    with torch.no_grad():
        queries = model.image_queries(volumes)
    prompt_ids = model._prompt_ids(model.prompts(EHR, QUESTIONS))
    for c, candidate in enumerate(CANDIDATES):
        answer_ids = model._answer_ids([candidate], eos=False)[0]
        for i in range(2):
            with torch.no_grad():
                nll, n = _direct_answer_nll(model, queries[i], prompt_ids[i], answer_ids)
            assert scores["sum"][i, c].item() == pytest.approx(-nll, rel=1e-5)
            assert scores["mean"][i, c].item() == pytest.approx(-nll / n, rel=1e-5)


def test_scorer_ranks_a_constructed_case(sources, volumes):
    """With the LLM's final norm zeroed every next-token distribution is uniform: a candidate of k tokens has
    log-likelihood exactly -k log V, so the sum prefers the shortest and the mean ties."""
    model = _model(sources)
    with torch.no_grad():
        model.llm.module.model.norm.weight.zero_()
    scores = model.score_candidates(volumes, EHR, QUESTIONS, CANDIDATES)
    lengths = torch.tensor([2.0, 6.0, 1.0])
    expected = -lengths * math.log(len(VOCAB))
    torch.testing.assert_close(scores["sum"], expected.expand(2, -1))
    torch.testing.assert_close(scores["mean"], torch.full((2, 3), -math.log(len(VOCAB))))
    assert model.predict(volumes, EHR, QUESTIONS, CANDIDATES, method="sum") == [2, 2]


def test_generation_equals_transformers_generate(sources):
    text_sources = {k: v for k, v in sources.items() if k != "image_encoder"}
    model = _model(text_sources, mode="text", text_soft_prompt=False)
    texts = model.generate(None, EHR, QUESTIONS, max_new_tokens=5)
    lm, tok = model.llm.module, model.tokenizer
    for text, prompt in zip(texts, model.prompts(EHR, QUESTIONS)):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = lm.generate(input_ids=ids, max_new_tokens=5, do_sample=False, eos_token_id=tok.eos_token_id)
        assert text == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    chosen = model.predict(None, EHR, QUESTIONS, CANDIDATES, method="generate", max_new_tokens=5)
    assert chosen == [match_candidate(t, CANDIDATES) for t in texts]


def test_match_candidate():
    assert match_candidate("Dementia.", CANDIDATES) == 2
    assert match_candidate("not demented", CANDIDATES) == 0
    assert match_candidate("Mild cognitive impairment (MCI)", CANDIDATES) == 1
    assert match_candidate("dementia , likely", CANDIDATES) == 2
    assert match_candidate("the subject is not demented at all", CANDIDATES) == 0
    assert match_candidate("healthy", CANDIDATES) is None


def test_control_modes(sources, volumes):
    text_sources = {k: v for k, v in sources.items() if k != "image_encoder"}
    text_only = _model(text_sources, mode="text")
    losses = text_only(None, EHR, QUESTIONS, ANSWERS)
    assert set(losses) == {"loss", "loss_lm"}
    # The text-only control trains a soft prompt of as many tokens as the image queries, carrying no image.
    losses["loss"].backward()
    assert text_only.qformer.query_tokens.grad.abs().sum() > 0 and text_only.llm_proj.weight.grad.abs().sum() > 0
    assert torch.equal(text_only._queries_or_none(None, 2)[1], text_only.qformer.query_tokens[0])
    frozen_llm_only = _model(text_sources, mode="text", text_soft_prompt=False)
    assert frozen_llm_only._queries_or_none(None, 2) is None
    assert frozen_llm_only.build_lm_inputs([[5, 6]], None, [[7]]).embeds.shape[1] == 3  # no query tokens
    image_only = _model(sources, mode="image")
    assert image_only.prompts(EHR, QUESTIONS)[0] == "Question: " + QUESTIONS[0] + " Answer:"
    with torch.no_grad():
        losses = image_only(volumes, EHR, QUESTIONS, ANSWERS)
    assert set(losses) == {"loss", "loss_lm", "loss_itc_qa"}  # no EHR text to contrast with
    with pytest.raises(ConfigError, match="image encoder"):
        _model({k: v for k, v in sources.items() if k != "image_encoder"})
    with pytest.raises(ConfigError, match="mode"):
        _model(sources, mode="video")


def test_save_load_round_trip(model, volumes, tmp_path):
    folder = save_pretrained(model, tmp_path / "medblip")
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        saved = set(f.keys())
    assert saved and not any(k.startswith(("llm.", "image_encoder.encoder.")) for k in saved)
    assert "qformer.query_tokens" in saved and "image_encoder.patch_embed.proj.weight" in saved

    loaded = load_pretrained(folder)
    before = model.score_candidates(volumes, EHR, QUESTIONS, CANDIDATES)
    after = loaded.score_candidates(volumes, EHR, QUESTIONS, CANDIDATES)
    assert torch.equal(before["sum"], after["sum"])
    with torch.no_grad():
        assert torch.equal(
            model(volumes, EHR, QUESTIONS, ANSWERS)["loss"], loaded(volumes, EHR, QUESTIONS, ANSWERS)["loss"]
        )


def _gather_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        images, texts = _contrastive_batch()
        share = slice(2 * rank, 2 * rank + 2)
        local_images = images[share].clone().requires_grad_(True)
        loss = contrastive_loss(local_images, texts[share], torch.tensor(0.07), 0.1)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": local_images.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _contrastive_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    images = F.normalize(torch.randn(4, 3, 8, generator=generator), dim=-1)
    return images, F.normalize(torch.randn(4, 8, generator=generator), dim=-1)


def test_contrastive_loss_gathers_across_ranks(tmp_path):
    """Two gloo ranks with two pairs each: the mean of their losses is the loss of the whole batch of four, and the
    gradient reaching each rank's images is its share of the whole batch's gradient (x world size, as DDP averages)."""
    torch.multiprocessing.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    images, texts = _contrastive_batch()
    images.requires_grad_(True)
    full = contrastive_loss(images, texts, torch.tensor(0.07), 0.1)
    full.backward()
    assert ((ranks[0]["loss"] + ranks[1]["loss"]) / 2).item() == pytest.approx(full.item(), rel=1e-5)
    # Each rank's own loss term: its rows directly, and (through the gather's backward) the other rank's rows.
    grads = torch.cat([ranks[0]["grad"], ranks[1]["grad"]]) / 2
    torch.testing.assert_close(grads, images.grad, atol=1e-6, rtol=1e-4)


def test_bfloat16_llm_scores_close_to_float32(sources, volumes, model):
    half = _model(sources, llm_dtype="bfloat16")
    assert half.llm.module.get_input_embeddings().weight.dtype == torch.bfloat16
    a = model.score_candidates(volumes, EHR, QUESTIONS, CANDIDATES)["mean"]
    b = half.score_candidates(volumes, EHR, QUESTIONS, CANDIDATES)["mean"]
    torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)
    with pytest.raises(ConfigError, match="llm_dtype"):
        _model(sources, llm_dtype="int8")


def test_per_sample_candidates(model, volumes):
    """Batches from the data side carry one candidate list per sample; missing columns score -inf."""
    shared = model.score_candidates(volumes, EHR, QUESTIONS, CANDIDATES)
    own = model.score_candidates(volumes, EHR, QUESTIONS, [CANDIDATES, CANDIDATES[::-1][:2]])
    torch.testing.assert_close(own["sum"][0], shared["sum"][0])
    torch.testing.assert_close(own["sum"][1, :2], shared["sum"][1, [2, 1]])
    assert own["sum"][1, 2] == -math.inf and own["mean"][1, 2] == -math.inf
    assert model.predict(volumes, EHR, QUESTIONS, [CANDIDATES, ["yes", "no"]], method="sum")[1] in (0, 1)
    with pytest.raises(ValueError, match="one per sample"):
        model.score_candidates(volumes, EHR, QUESTIONS, [CANDIDATES])


def test_long_prompts_keep_the_question(sources):
    model = _model(sources, max_text_tokens=6)
    ids = model._prompt_ids(model.prompts(["a male subject aged 70 years , mmse 29"], ["what ?"]))[0]
    assert model.tokenizer.convert_ids_to_tokens(ids) == ["question", ":", "what", "?", "answer", ":"]
    # A begin-of-text token stays first.
    model.tokenizer.bos_token = "[CLS]"
    bos = model.tokenizer.bos_token_id
    assert model._keep_end([bos, 5, 6, 7, 8, 9, 10, 11]) == [bos, 7, 8, 9, 10, 11]
    assert model._keep_end([5, 6, 7]) == [5, 6, 7]
