"""Tiny in-process models and data shared by the recipes in this folder (no download, seconds on a CPU).

* `toy_tokenizer`: an uncased WordPiece tokenizer over a small fixed vocabulary, built in memory;
* `toy_sentiment`: variable-length sentences labelled 1 when they hold more happy words than sad ones
  (about one in seven: the classes are imbalanced on purpose, for the class-weighted loss);
* `toy_counting`: token sequences that count up by a fixed stride, for a causal LM, with `labels`;
* `tiny_bert`, `tiny_gpt2`: two-layer models built from a config with a fixed seed;
* `trainer_classes`: `(Trainer, TrainingArguments)` of looptrain or of transformers, so every recipe can
  be run on both (`python examples/<recipe>.py --library transformers`);
* `recipe_options`, `toy_arguments`: the recipes' command line (`--library`, `--output_dir`,
  `--max_steps`) and quiet CPU training arguments for a quick run.
"""

from __future__ import annotations

import random

import torch
import transformers
from datasets import Dataset

HAPPY = "happy glad great good fun".split()
SAD = "sad bad awful poor dull".split()
NEUTRAL = "the a cat dog sat ran on under mat rug big small red blue house tree bird fish car book".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_tokenizer(
    words: list[str], model_input_names: list[str] | None = None
) -> transformers.PreTrainedTokenizerFast:
    """An uncased BERT-style WordPiece tokenizer over `words` (after [PAD] [UNK] [CLS] [SEP] [MASK]), built in memory
    and wrapped as a transformers fast tokenizer: sentence pairs get `[CLS] a [SEP] b [SEP]` and token type ids."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIAL + list(words))}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    extra = {"model_input_names": model_input_names} if model_input_names is not None else {}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        **extra,
    )


def toy_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The recipes' tokenizer: happy, sad and neutral words."""
    return wordpiece_tokenizer(HAPPY + SAD + NEUTRAL)


def toy_sentiment(n: int, seed: int, tokenizer=None) -> Dataset:
    """Columns `text` and `label` (1: more happy than sad words), and the tokenizer's columns when one is given."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(2, 9))]
        happy = rng.choices([0, 1, 2], weights=[5, 3, 1])[0]
        sad = rng.choices([0, 1, 2], weights=[2, 5, 2])[0]
        for pool, count in ((HAPPY, happy), (SAD, sad)):
            for _ in range(count):
                words.insert(rng.randrange(len(words) + 1), rng.choice(pool))
        texts.append(" ".join(words))
        labels.append(int(happy > sad))
    columns = {"text": texts, "label": labels}
    if tokenizer is not None:
        columns.update(tokenizer(texts))  # input_ids and attention_mask
    return Dataset.from_dict(columns)


def toy_counting(n: int, seed: int, vocab_size: int = 64) -> Dataset:
    """Sequences `start, start+k, start+2k, ...` (mod the vocabulary, avoiding id 0, the padding), 4 to 13 tokens."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start, stride, length = rng.randrange(1, vocab_size), rng.randint(1, 3), rng.randint(4, 13)
        ids = [1 + (start + i * stride) % (vocab_size - 1) for i in range(length)]
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": list(ids)})
    return Dataset.from_list(rows)


def pad_for_causal_lm(features: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input ids with 0, the attention mask with 0, labels with -100 (ignored by the loss)."""
    width = max(len(f["input_ids"]) for f in features)

    def pad(key, value):
        return torch.tensor([f[key] + [value] * (width - len(f[key])) for f in features])

    return {"input_ids": pad("input_ids", 0), "attention_mask": pad("attention_mask", 0), "labels": pad("labels", -100)}


def tiny_bert(
    vocab_size: int,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 32,
    dropout: float = 0.1,
    num_labels: int = 2,
    **config_overrides,
):
    """A BERT sequence classifier built from a config (any BertConfig field may be overridden), seeded."""
    torch.manual_seed(seed)
    config = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    config = transformers.BertConfig(**{**config, **config_overrides})
    return transformers.BertForSequenceClassification(config)


def tiny_gpt2(vocab_size: int = 64, seed: int = 0, layers: int = 2, dropout: float = 0.1):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_embd=32,
        n_layer=layers,
        n_head=2,
        n_positions=64,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    model = transformers.GPT2LMHeadModel(config)
    # Built from a config, GPT2LMHeadModel has `loss_type=None`, and Trainer then counts `num_items_in_batch`
    # over all labels instead of the shifted ones the loss uses. Naming the causal-LM loss fixes the count.
    model.loss_type = "ForCausalLM"
    return model


def trainer_classes(library: str = "looptrain"):
    """`(Trainer, TrainingArguments)` of one library: "looptrain" or "transformers"."""
    if library == "looptrain":
        import looptrain

        return looptrain.Trainer, looptrain.TrainingArguments
    if library == "transformers":
        return transformers.Trainer, transformers.TrainingArguments
    raise ValueError(f"library must be 'looptrain' or 'transformers', not {library!r}")


def recipe_options(description: str, argv=None):
    """The command line every recipe's `main` takes: `--library`, `--output_dir` and `--max_steps`."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--library",
        choices=["looptrain", "transformers"],
        default="looptrain",
        help="whose Trainer the recipe subclasses (the recipe's body is the same)",
    )
    parser.add_argument("--output_dir", default=None, help="default: a new temporary folder")
    parser.add_argument(
        "--max_steps", type=int, default=-1, help="stop after this many optimizer steps (a quick check)"
    )
    options = parser.parse_args(argv)
    if options.output_dir is None:
        options.output_dir = tempfile.mkdtemp(prefix="looptrain-example-")
    return options


def toy_arguments(arguments_cls, options, subfolder: str = "", **overrides):
    """Quick, quiet, CPU-only training arguments for `options` (from `recipe_options`); any can be overridden."""
    import os

    settings = dict(
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        num_train_epochs=2,
        learning_rate=1e-3,
        logging_steps=2,
        seed=42,
        max_steps=options.max_steps,
    )
    output_dir = os.path.join(options.output_dir, subfolder) if subfolder else options.output_dir
    return arguments_cls(output_dir=output_dir, **{**settings, **overrides})
