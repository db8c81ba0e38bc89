"""MedBLIP: 3D brain MRI + clinical text -> frozen image encoder -> MedQFormer -> frozen causal LLM -> answer.

``volume -> ImageEncoder3D (trainable 3D patch embedding, frozen encoder) -> LayerNorm -> MedQFormer queries ->
Linear -> frozen causal LLM``, whose input is ``[EHR text + question][queries][answer]``. Trained with

* the LLM's loss on the ANSWER tokens only (the released code also trains on the prompt: a bug not copied),
* image-text contrastive losses of the query features against the EHR text's CLS feature and against the
  "Question: ... Answer: ..." text (BLIP-2 style: max over queries, learnable temperature, label smoothing, both
  directions, features gathered across ranks under torch.distributed).

Prompts are LEFT-padded and answers right-padded, so padding never lands between prompt, queries and answer; position
ids count only real tokens, so a sample's result does not depend on what it is batched with.

Modes for the honest controls: ``"image+text"`` (the paper), ``"text"`` (no image tokens: what the EHR alone gives),
``"image"`` (empty EHR: what the image alone gives).
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medboost.errors import ConfigError
from medboost.llm.causal_lm import load_causal_lm, load_tokenizer
from medboost.models.image_encoder3d import Frozen, ImageEncoder3D
from medboost.models.qformer import qformer_from_bert

MODES = ("image+text", "text", "image")
_LLM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_LOSS_WEIGHTS = {"lm": 1.0, "itc_ehr": 1.0, "itc_qa": 1.0}
PROMPT_TEMPLATE = "{ehr} Question: {question} Answer:"
QA_TEMPLATE = "Question: {question} Answer: {answer}"


@dataclass
class LMInputs:
    """One batch laid out for the LLM: ``[left-padded prompt][queries][answer, right-padded]``."""

    embeds: torch.Tensor  # (B, T, H)
    attention_mask: torch.Tensor  # (B, T), 0 on padding
    position_ids: torch.Tensor  # (B, T), counting real tokens only
    labels: torch.Tensor  # (B, T), the answer's ids at its positions, -100 elsewhere


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for each rank's share (all-reduce, then own slice), so
    that each rank's features get the gradient of the losses of ALL ranks, as with one big batch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        dist = torch.distributed
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.share = (dist.get_rank() * x.shape[0], x.shape[0])
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        start, size = ctx.share
        return grad[start : start + size]


def all_gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` from every rank concatenated (gradients flow back to each rank's share), and this rank's offset."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank() * x.shape[0]


def contrastive_loss(
    image_feats: torch.Tensor, text_feats: torch.Tensor, temperature: torch.Tensor, label_smoothing: float = 0.1
) -> torch.Tensor:
    """BLIP-2's image-text contrastive loss. ``image_feats`` ``(B, Q, E)`` and ``text_feats`` ``(B, E)``, both
    L2-normalised; the image-text similarity is the best of the Q queries. Each rank scores its own images against
    every rank's texts and its own texts against every rank's images."""
    all_images, offset = all_gather_with_grad(image_feats)
    all_texts, _ = all_gather_with_grad(text_feats)
    sim_i2t = torch.einsum("bqe,ce->bqc", image_feats, all_texts).amax(dim=1) / temperature
    sim_t2i = torch.einsum("be,cqe->bcq", text_feats, all_images).amax(dim=2) / temperature
    targets = torch.arange(image_feats.shape[0], device=image_feats.device) + offset
    i2t = F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
    t2i = F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)
    return (i2t + t2i) / 2


def normalise_answer(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: how generated text is compared to candidate answers."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def match_candidate(text: str, candidates: list[str]) -> int | None:
    """The candidate a generated answer names: an exact normalised match, else the longest candidate the text starts
    with, else the longest candidate it contains; None when it names none."""
    said = normalise_answer(text)
    normal = [normalise_answer(c) for c in candidates]
    if said in normal:
        return normal.index(said)
    by_length = sorted(range(len(candidates)), key=lambda i: -len(normal[i]))
    for test in (lambda c: said.startswith(c + " "), lambda c: f" {c} " in f" {said} "):
        for i in by_length:
            if normal[i] and test(normal[i]):
                return i
    return None


class MedBLIP(nn.Module):
    """The MedBLIP model (see the module docstring).

    Args:
        image_encoder: keyword arguments of :class:`ImageEncoder3D` (``source``, ``kind``, ``img_size``...); may be
            None only in ``"text"`` mode.
        qformer: the BERT checkpoint that sizes and initialises the Q-Former (``"minilm-l6"`` offline; the paper:
            ``"google-bert/bert-base-uncased"``); its tokenizer encodes the Q-Former's text.
        llm: the frozen causal LLM (``"smollm2-135m"``, ``"gemma3-270m"``, folder, ``.gguf`` or hub id).
        qformer_pretrained: initialise the Q-Former from the BERT weights (False: same shapes, random).
        num_query_tokens, cross_attention_frequency: as BLIP-2 (32, every 2nd layer).
        embed_dim: width of the contrastive projections (256).
        temperature: initial contrastive temperature (0.07; learnable, clamped to [0.001, 0.5]).
        label_smoothing: of the contrastive cross-entropies (0.1).
        loss_weights: ``{"lm", "itc_ehr", "itc_qa"}`` weights (each 1.0 by default; 0 switches a loss off).
        mode: ``"image+text"``, ``"text"`` or ``"image"``.
        max_text_tokens: truncation of the Q-Former's texts and of the LLM prompt (kept from its end, the question).
        llm_dtype: ``"float32"`` or ``"bfloat16"`` for the frozen LLM.
        llm_tokenizer, text_tokenizer: tokenizer sources when they differ from ``llm`` / ``qformer``.
        text_soft_prompt: in ``"text"`` mode, put the learned queries (no image) where the image queries go, so the
            text-only control trains as many soft tokens with the same recipe; False: the frozen LLM alone.
    """

    frozen_prefixes = ("image_encoder.encoder.", "llm.")

    def __init__(
        self,
        image_encoder: dict | None = None,
        qformer: str | Path = "minilm-l6",
        llm: str | Path = "smollm2-135m",
        *,
        qformer_pretrained: bool = True,
        num_query_tokens: int = 32,
        cross_attention_frequency: int = 2,
        embed_dim: int = 256,
        temperature: float = 0.07,
        label_smoothing: float = 0.1,
        loss_weights: dict | None = None,
        mode: str = "image+text",
        max_text_tokens: int = 256,
        llm_dtype: str = "float32",
        llm_tokenizer: str | Path | None = None,
        text_tokenizer: str | Path | None = None,
        text_soft_prompt: bool = True,
    ):
        super().__init__()
        self._check_options(image_encoder, mode, loss_weights, llm_dtype)
        self.mode = mode
        self.text_soft_prompt = text_soft_prompt
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **(loss_weights or {})}
        self.label_smoothing = label_smoothing
        self.max_text_tokens = max_text_tokens
        self.image_encoder = ImageEncoder3D(**image_encoder) if image_encoder is not None else None
        width = self.image_encoder.width if self.image_encoder is not None else None
        self.ln_vision = nn.LayerNorm(width) if width is not None else None
        self.qformer = qformer_from_bert(
            qformer, width, num_query_tokens, cross_attention_frequency, pretrained=qformer_pretrained
        )
        hidden = self.qformer.hidden_size
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.qa_proj = nn.Linear(hidden, embed_dim)
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))
        self.llm = Frozen(load_causal_lm(llm, dtype=_LLM_DTYPES[llm_dtype]))
        self.llm_proj = nn.Linear(hidden, self.llm.module.config.hidden_size)
        self.tokenizer = load_tokenizer(llm_tokenizer or llm)
        self.text_tokenizer = load_tokenizer(text_tokenizer or qformer)

    @staticmethod
    def _check_options(image_encoder, mode, loss_weights, llm_dtype) -> None:
        """Refuse bad options before anything heavy is loaded."""
        if llm_dtype not in _LLM_DTYPES:
            raise ConfigError(f"llm_dtype must be one of {', '.join(_LLM_DTYPES)}, got {llm_dtype!r}")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if image_encoder is None and mode != "text":
            raise ConfigError(f"mode {mode!r} needs an image encoder (image_encoder=None only suits mode='text')")
        unknown = set(loss_weights or {}) - set(DEFAULT_LOSS_WEIGHTS)
        if unknown:
            raise ConfigError(f"unknown loss weights {sorted(unknown)}; known: {', '.join(DEFAULT_LOSS_WEIGHTS)}")

    @property
    def uses_image(self) -> bool:
        return self.mode != "text"

    # -- image path -------------------------------------------------------------------------------------------------
    def image_queries(self, volumes: torch.Tensor) -> torch.Tensor:
        """Q-Former query outputs for ``volumes`` ``(B, C, N, N, N)``: ``(B, queries, qformer hidden)``."""
        return self.qformer(self.ln_vision(self.image_encoder(volumes)))

    def _queries_or_none(self, volumes: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The query tokens the LLM sees: the image's; in ``"text"`` mode the learned queries alone (a soft prompt
        without image information) when ``text_soft_prompt``, else none."""
        if not self.uses_image:
            return self.qformer.query_tokens.expand(batch, -1, -1) if self.text_soft_prompt else None
        if volumes is None:
            raise ValueError(f"mode {self.mode!r} needs the volumes")
        return self.image_queries(volumes)

    # -- text -------------------------------------------------------------------------------------------------------
    def prompts(self, ehr: list[str], questions: list[str]) -> list[str]:
        """The LLM prompt of each sample; in ``"image"`` mode the EHR is left out."""
        texts = [""] * len(questions) if self.mode == "image" else ehr
        return [PROMPT_TEMPLATE.format(ehr=e, question=q).strip() for e, q in zip(texts, questions)]

    def _prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        # Truncate from the left: the question, at the end of the prompt, must survive a long EHR; a leading
        # begin-of-text token (Gemma's <bos>) stays first.
        ids = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        return [self._keep_end(row) for row in ids]

    def _keep_end(self, row: list[int]) -> list[int]:
        if len(row) <= self.max_text_tokens:
            return row
        head = row[:1] if row[0] == self.tokenizer.bos_token_id else []
        tail = self.max_text_tokens - len(head)
        return head + row[len(row) - tail :]

    def _answer_ids(self, answers: list[str], eos: bool) -> list[list[int]]:
        ids = self.tokenizer([" " + a.strip() for a in answers], add_special_tokens=False)["input_ids"]
        end = self.tokenizer.eos_token_id
        return [row + [end] if eos and end is not None else row for row in ids]

    def _text_features(self, texts: list[str], proj: nn.Linear) -> torch.Tensor:
        device = self.temperature.device
        batch = self.text_tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        )
        cls = self.qformer.text_features(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        return F.normalize(proj(cls), dim=-1)

    # -- LLM input --------------------------------------------------------------------------------------------------
    def build_lm_inputs(
        self, prompt_ids: list[list[int]], queries: torch.Tensor | None, answer_ids: list[list[int]]
    ) -> LMInputs:
        """Lay out ``[left-padded prompt][projected queries][answer + right padding]`` as input embeddings."""
        lm = self.llm.module
        embed = lm.get_input_embeddings()
        device = embed.weight.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        prompt, prompt_mask = _pad(prompt_ids, pad, left=True, device=device)
        answer, answer_mask = _pad(answer_ids, pad, left=False, device=device)
        parts, masks = [embed(prompt)], [prompt_mask]
        if queries is not None:
            parts.append(self.llm_proj(queries).to(embed.weight.dtype))
            masks.append(torch.ones(queries.shape[:2], dtype=torch.long, device=device))
        parts.append(embed(answer))
        masks.append(answer_mask)
        mask = torch.cat(masks, dim=1)
        labels = torch.full_like(mask, -100)
        answer_labels = answer.masked_fill(answer_mask == 0, -100)
        labels[:, mask.shape[1] - answer.shape[1] :] = answer_labels
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return LMInputs(torch.cat(parts, dim=1), mask, positions, labels)

    def _lm_logits(self, inputs: LMInputs) -> torch.Tensor:
        out = self.llm(
            inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids
        )
        return out.logits.float()

    # -- training ---------------------------------------------------------------------------------------------------
    def forward(
        self, volumes: torch.Tensor | None, ehr: list[str], questions: list[str], answers: list[str]
    ) -> dict[str, torch.Tensor]:
        """The weighted total ``loss`` and each term (``loss_lm``, ``loss_itc_ehr``, ``loss_itc_qa``, when used)."""
        queries = self._queries_or_none(volumes, len(questions))
        inputs = self.build_lm_inputs(
            self._prompt_ids(self.prompts(ehr, questions)), queries, self._answer_ids(answers, eos=True)
        )
        logits = self._lm_logits(inputs)
        losses = {"loss_lm": F.cross_entropy(logits[:, :-1].flatten(0, 1), inputs.labels[:, 1:].flatten())}
        if self.uses_image:
            losses.update(self._contrastive_losses(queries, ehr, questions, answers))
        weights = {"loss_lm": "lm", "loss_itc_ehr": "itc_ehr", "loss_itc_qa": "itc_qa"}
        losses["loss"] = sum(self.loss_weights[weights[k]] * v for k, v in losses.items())
        return losses

    def _contrastive_losses(self, queries, ehr, questions, answers) -> dict[str, torch.Tensor]:
        temperature = self.temperature.clamp(0.001, 0.5)
        image_feats = F.normalize(self.vision_proj(queries), dim=-1)
        out = {}
        # The image-only control has no EHR text to contrast with.
        if self.loss_weights["itc_ehr"] and self.mode != "image":
            ehr_feats = self._text_features(ehr, self.text_proj)
            out["loss_itc_ehr"] = contrastive_loss(image_feats, ehr_feats, temperature, self.label_smoothing)
        if self.loss_weights["itc_qa"]:
            qa = [QA_TEMPLATE.format(question=q, answer=a) for q, a in zip(questions, answers)]
            qa_feats = self._text_features(qa, self.qa_proj)
            out["loss_itc_qa"] = contrastive_loss(image_feats, qa_feats, temperature, self.label_smoothing)
        return out

    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        """What a saved model holds: the trainable parts (the frozen encoder and LLM are rebuilt from their sources)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.frozen_prefixes)}

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load :meth:`saved_state_dict`'s tensors; every trainable tensor must be there, nothing else."""
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(self.frozen_prefixes)]
        if missing or result.unexpected_keys:
            raise ConfigError(
                f"saved MedBLIP weights do not fit: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
            )

    # -- inference --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score_candidates(
        self,
        volumes: torch.Tensor | None,
        ehr: list[str],
        questions: list[str],
        candidates: list[str] | list[list[str]],
    ) -> dict[str, torch.Tensor]:
        """Zero-shot scores: the log-likelihood of each candidate answer's tokens under the frozen LLM given
        ``[prompt][queries]``; ``{"sum": (B, C), "mean": (B, C)}`` (mean = per token, fair to long answers).

        ``candidates`` is one list for the whole batch, or one list per sample (as the data side's batches give);
        a sample with fewer than C candidates scores ``-inf`` in the missing columns."""
        per_sample = _per_sample(candidates, len(questions))
        queries = self._queries_or_none(volumes, len(questions))
        prompt_ids = self._prompt_ids(self.prompts(ehr, questions))
        sums, means = [], []
        for c in range(max(len(row) for row in per_sample)):
            answers = [row[c] if c < len(row) else "" for row in per_sample]
            answer_ids = [
                ids if c < len(row) else [] for ids, row in zip(self._answer_ids(answers, eos=False), per_sample)
            ]
            inputs = self.build_lm_inputs(prompt_ids, queries, answer_ids)
            total, count = _answer_log_likelihood(self._lm_logits(inputs), inputs.labels)
            missing = count == 0
            sums.append(total.masked_fill(missing, -math.inf))
            means.append((total / count.clamp(min=1)).masked_fill(missing, -math.inf))
        return {"sum": torch.stack(sums, dim=1), "mean": torch.stack(means, dim=1)}

    @torch.no_grad()
    def generate(
        self, volumes: torch.Tensor | None, ehr: list[str], questions: list[str], max_new_tokens: int = 16
    ) -> list[str]:
        """Greedy answers to the prompts (stopping at the end-of-text token), decoded."""
        queries = self._queries_or_none(volumes, len(questions))
        prompt_ids = self._prompt_ids(self.prompts(ehr, questions))
        inputs = self.build_lm_inputs(prompt_ids, queries, [[] for _ in prompt_ids])
        return self._greedy(inputs, max_new_tokens)

    def _greedy(self, inputs: LMInputs, max_new_tokens: int) -> list[str]:
        embed = self.llm.module.get_input_embeddings()
        eos = self.tokenizer.eos_token_id
        mask, positions = inputs.attention_mask, inputs.position_ids
        # transformers renamed `past_key_values` to `cache` (5.2x); take whichever this version has.
        cache_name = "cache" if "cache" in inspect.signature(self.llm.module.forward).parameters else "past_key_values"
        out = self.llm(inputs_embeds=inputs.embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        tokens, done = [], torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        for _ in range(max_new_tokens):
            step = out.logits[:, -1].argmax(dim=-1)
            tokens.append(step)
            done |= step == eos if eos is not None else torch.zeros_like(done)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = self.llm(
                inputs_embeds=embed(step[:, None]),
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{cache_name: getattr(out, cache_name)},
            )
        return [self._decode(row) for row in torch.stack(tokens, dim=1).tolist()]

    def _decode(self, ids: list[int]) -> str:
        eos = self.tokenizer.eos_token_id
        if eos in ids:
            ids = ids[: ids.index(eos)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def predict(
        self,
        volumes: torch.Tensor | None,
        ehr: list[str],
        questions: list[str],
        candidates: list[str] | list[list[str]],
        method: str = "mean",
        max_new_tokens: int = 16,
    ) -> list[int | None]:
        """The chosen candidate per sample (an index into its candidates): by ``"mean"`` or ``"sum"``
        log-likelihood, or by ``"generate"`` (free greedy text matched to a candidate by normalised string match;
        None when it names none)."""
        if method == "generate":
            texts = self.generate(volumes, ehr, questions, max_new_tokens)
            return [match_candidate(t, c) for t, c in zip(texts, _per_sample(candidates, len(questions)))]
        if method not in ("mean", "sum"):
            raise ConfigError(f"method must be 'mean', 'sum' or 'generate', got {method!r}")
        return self.score_candidates(volumes, ehr, questions, candidates)[method].argmax(dim=1).tolist()


def _per_sample(candidates: list[str] | list[list[str]], batch: int) -> list[list[str]]:
    if candidates and all(isinstance(c, str) for c in candidates):
        return [list(candidates)] * batch
    if len(candidates) != batch or not all(isinstance(c, (list, tuple)) and c for c in candidates):
        raise ValueError(f"candidates must be one list of answers or {batch} non-empty lists, one per sample")
    return [list(c) for c in candidates]


def _pad(rows: list[list[int]], pad: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        if not row:
            continue
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long, device=device)
        mask[i, span] = 1
    return ids, mask


def _answer_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of the labelled tokens (each predicted from the position before it), and
    how many there are."""
    targets = labels[:, 1:]
    keep = targets != -100
    logp = logits[:, :-1].log_softmax(dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * keep).sum(dim=1), keep.sum(dim=1)
