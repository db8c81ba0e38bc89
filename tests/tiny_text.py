"""Tiny random text models WITH tokenizers (word-level, a fixed vocabulary) saved as Hugging Face folders.

MedBLIP tokenises its own texts, so its test sources need tokenizers; a word-level vocabulary small enough for the
tiny models' embedding tables keeps everything offline and fast.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import tiny_config
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, BertModel, PreTrainedTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]
WORDS = (
    "a male female subject aged years old mmse score cdr education of is the and with question answer what will this "
    "be diagnosed dementia not demented mild cognitive impairment mci yes no left right hand : ( ) ? . , 0 1 2 3 4 5 6 "
    "7 8 9 70 75 80"
).split()
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}


def word_tokenizer(bert_style: bool) -> PreTrainedTokenizerFast:
    """BERT style: ``[CLS] text [SEP]``; LLM style: no added tokens, ``</s>`` as end of text."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert_style:
        specials = [("[CLS]", VOCAB["[CLS]"]), ("[SEP]", VOCAB["[SEP]"])]
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=specials)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")


def save_tiny_bert(folder: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    config = tiny_config("bert", vocab_size=len(VOCAB), pad_token_id=0, **overrides)
    BertModel(config).save_pretrained(folder)
    word_tokenizer(bert_style=True).save_pretrained(folder)
    return folder


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = tiny_config("llama", vocab_size=len(VOCAB), pad_token_id=0, eos_token_id=VOCAB["</s>"], bos_token_id=None)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    word_tokenizer(bert_style=False).save_pretrained(folder)
    return folder
