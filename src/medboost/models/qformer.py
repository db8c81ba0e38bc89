"""MedBLIP's MedQFormer: a BLIP-2 Q-Former (transformers' ``Blip2QFormerModel``) initialised from a BERT checkpoint.

Two paths share one transformer:

* queries: 32 learned query tokens attend to each other and, every ``cross_attention_frequency``-th layer, to the image
  tokens; their outputs feed the LLM and the contrastive losses;
* text: BERT-style word + position embeddings (no token types: type 0 is folded into the positions) through the same
  self-attention and the text FFN; the CLS output is the text feature of the contrastive losses.

Initialising from BERT (as MedBLIP does; not from BLIP-2 stage-1 weights) leaves only the cross-attention random.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, PretrainedConfig

from medboost.errors import BlockLoadError
from medboost.llm.load import open_reader
from medboost.llm.readers import CheckpointReader

_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "initializer_range",
    "layer_norm_eps",
    "pad_token_id",
)


def qformer_config_from_bert(
    bert: PretrainedConfig | dict, encoder_hidden_size: int | None, cross_attention_frequency: int = 2
) -> Blip2QFormerConfig:
    """A Q-Former config with the BERT's sizes, cross-attending to ``encoder_hidden_size``-wide image tokens
    (None: the BERT's own width, for text-only use)."""
    values = bert if isinstance(bert, dict) else bert.to_dict()
    kwargs = {k: values[k] for k in _CONFIG_FIELDS if values.get(k) is not None}
    return Blip2QFormerConfig(
        **kwargs,
        encoder_hidden_size=encoder_hidden_size or values["hidden_size"],
        cross_attention_frequency=cross_attention_frequency,
        # Without it the Q-Former has no text FFN and cannot encode text (transformers issue #30846).
        use_qformer_text_input=True,
    )


class MedQFormer(nn.Module):
    """Q-Former with learned queries and its own text embeddings.

    Args:
        config: the Q-Former config (see :func:`qformer_config_from_bert`).
        num_query_tokens: learned queries, ~N(0, initializer_range) as in BLIP-2.
    """

    def __init__(self, config: Blip2QFormerConfig, num_query_tokens: int = 32):
        super().__init__()
        self.config = config
        self.qformer = Blip2QFormerModel(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.query_tokens = nn.Parameter(torch.empty(1, num_query_tokens, config.hidden_size))
        nn.init.normal_(self.query_tokens, std=config.initializer_range)
        nn.init.normal_(self.word_embeddings.weight, std=config.initializer_range)
        nn.init.normal_(self.position_embeddings.weight, std=config.initializer_range)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]

    def forward_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of the text alone, ``(B, T, hidden)``; its LayerNorm is BERT's embedding LayerNorm."""
        out = self.qformer(query_embeds=self.embed_text(input_ids), query_length=0, attention_mask=attention_mask)
        return out.last_hidden_state

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The CLS output of the text, ``(B, hidden)`` (the tokenizer puts CLS first)."""
        return self.forward_text(input_ids, attention_mask)[:, 0]

    def forward(self, image_embeds: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The queries after attending to ``image_embeds`` ``(B, N, encoder_hidden_size)``: ``(B, queries, hidden)``."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.qformer(
            query_embeds=queries,
            query_length=queries.shape[1],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        )
        return out.last_hidden_state

    # -- initialisation from BERT ----------------------------------------------------------------------------------
    def expected_missing(self) -> list[str]:
        """The transformer keys a BERT checkpoint cannot provide: the cross-attention of every cross-attending layer
        (the learned queries, new by definition, are not counted)."""
        return sorted(k for k in self.state_dict() if ".crossattention." in k)

    def load_bert_state(self, bert_state: dict[str, torch.Tensor]) -> list[str]:
        """Copy a BERT state dict (``BertModel`` names, with or without a ``bert.`` prefix) in; returns the keys left
        random, which must be exactly :meth:`expected_missing`."""
        state = bert_to_qformer_state(bert_state, self.config.num_hidden_layers)
        result = self.load_state_dict(state, strict=False)
        missing = sorted(k for k in result.missing_keys if k != "query_tokens")
        if result.unexpected_keys or missing != self.expected_missing():
            extra = sorted(set(missing) - set(self.expected_missing()))
            unexpected = result.unexpected_keys[:5]
            raise BlockLoadError(
                f"BERT checkpoint does not fit the Q-Former: missing {extra[:5]}, unexpected {unexpected}"
            )
        return missing


def _bert_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip a ``bert.`` prefix and rename the original BERT checkpoints' ``gamma``/``beta`` LayerNorm names."""
    out = {}
    for name, tensor in state.items():
        name = name.removeprefix("bert.")
        if name.endswith("LayerNorm.gamma"):
            name = name[: -len("gamma")] + "weight"
        elif name.endswith("LayerNorm.beta"):
            name = name[: -len("beta")] + "bias"
        out[name] = tensor
    return out


def bert_to_qformer_state(bert_state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Map BERT tensor names onto :class:`MedQFormer` names (the mapping LAVIS applies, written from its facts)."""
    bert = _bert_names(bert_state)
    try:
        positions = bert["embeddings.position_embeddings.weight"]
        if "embeddings.token_type_embeddings.weight" in bert:
            # BERT adds the type-0 embedding to every token; the Q-Former has no token types, so fold it in.
            positions = positions + bert["embeddings.token_type_embeddings.weight"][0]
        state = {
            "word_embeddings.weight": bert["embeddings.word_embeddings.weight"],
            "position_embeddings.weight": positions,
            "qformer.layernorm.weight": bert["embeddings.LayerNorm.weight"],
            "qformer.layernorm.bias": bert["embeddings.LayerNorm.bias"],
        }
    except KeyError as err:
        raise BlockLoadError(f"not a BERT checkpoint: no tensor {err}") from err
    for i in range(num_layers):
        src, dst = f"encoder.layer.{i}.", f"qformer.encoder.layer.{i}."
        for name, tensor in bert.items():
            if not name.startswith(src):
                continue
            rest = name[len(src) :]
            if rest.startswith("attention.self."):
                state[dst + "attention.attention." + rest[len("attention.self.") :]] = tensor
            elif rest.startswith(("intermediate.", "output.")):
                # One FFN in BERT; the Q-Former has one for text and one for queries: both start from it.
                slot, tail = rest.split(".", 1)
                state[f"{dst}{slot}.{tail}"] = tensor
                state[f"{dst}{slot}_query.{tail}"] = tensor.clone()
            else:
                state[dst + rest] = tensor
    return state


def qformer_from_bert(
    source: str | Path | CheckpointReader,
    encoder_hidden_size: int | None,
    num_query_tokens: int = 32,
    cross_attention_frequency: int = 2,
    pretrained: bool = True,
) -> MedQFormer:
    """A :class:`MedQFormer` sized as the BERT at ``source`` (preset such as ``"minilm-l6"``, folder or hub id such
    as ``"google-bert/bert-base-uncased"``, the paper's), with its weights unless ``pretrained=False`` (random
    init, same shapes)."""
    with open_reader(source) as reader:
        config = qformer_config_from_bert(reader.config, encoder_hidden_size, cross_attention_frequency)
        model = MedQFormer(config, num_query_tokens)
        if pretrained:
            names = [n for n in reader.tensor_names() if not n.endswith("position_ids")]
            model.load_bert_state(reader.read(names))
    return model
