"""Tiny offline builders for the ecosystem scripts: a word-level tokenizer with a chat template, a Llama-style
causal LM and classifier, a BERT folder for sentence-transformers, and sentences (seconds on a CPU, no Hub)."""

from __future__ import annotations

import os
import random

import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

WORDS = (
    "the a cat dog sat ran on under mat rug big small red blue house tree bird fish car book happy sad "
    "good bad yes no is was what where who user assistant"
).split()
SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]
COMMON = dict(use_cpu=True, report_to="none", disable_tqdm=True, seed=0)


def tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"
    )
    return tok


def _config():
    return transformers.LlamaConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )


def causal_lm(seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(_config())


def reward_model(seed=0):
    torch.manual_seed(seed)
    config = _config()
    config.num_labels = 1
    return transformers.LlamaForSequenceClassification(config)


def sentences(n, seed, lo=3, hi=9):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[:-2]) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def bert_folder(path, seed=0):
    """A tiny BERT and its WordPiece tokenizer saved to `path`: what sentence-transformers loads."""
    if os.path.isdir(path):
        return path
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
