"""The embedded default job: a small paraphrase dataset, a tokenizer and a small BERT, all made here.

`python scripts/train.py` with no flags fine-tunes on this, so that a fresh machine with no network has a
real job to run. Nothing is downloaded and nothing is stored in the repository: the data is generated
from a fixed seed, the WordPiece tokenizer is built in-process from the generator's word list, and the
model is a randomly initialised 2-layer BERT. Same seed, same dataset, on every machine.

The task has MRPC's layout (`sentence1`, `sentence2`, `label`, `idx`; 1 = paraphrase), half of each
label. A sentence is "the <adj> <noun> [never] <verb> the <adj> <noun> <place> <time>". Its paraphrase
says the same with some words swapped for synonyms and the time phrase moved. A non-paraphrase says
something else: the statement negated (60% of them), a different event, subject and object exchanged,
or one or two words replaced by non-synonyms.

What a 2-layer BERT trained from scratch learns in a minute is mostly the lexical cue: one "never" more
or less means the pair disagrees. That takes it from chance to about 80% accuracy (0.781 on the
validation split, whose majority class is 0.538, when measured on this project's machines; docs/job.md). The rest needs it to match words across the two
sentences, synonyms included, which takes far more training than the default job's budget; a
pretrained checkpoint (`--model_name_or_path minilm`) is the way to go further.
"""

from __future__ import annotations

import random

NAME = "embedded"
TASK_NAME = "embedded-paraphrase"
LABEL_NAMES = ("not_equivalent", "equivalent")
TEXT_COLUMNS = ("sentence1", "sentence2")
TRAIN_SIZE, VALIDATION_SIZE, TEST_SIZE = 4000, 1000, 200
SEED = 1234

# Each inner tuple is one meaning; its words are interchangeable.
NOUNS = (
    ("dog", "hound"),
    ("cat", "kitten"),
    ("man", "gentleman"),
    ("woman", "lady"),
    ("child", "kid"),
    ("doctor", "physician"),
    ("teacher", "instructor"),
    ("farmer", "grower"),
    ("pilot", "aviator"),
    ("student", "pupil"),
    ("thief", "burglar"),
    ("singer", "vocalist"),
)
VERBS = (
    ("saw", "noticed"),
    ("helped", "assisted"),
    ("chased", "pursued"),
    ("called", "phoned"),
    ("met", "encountered"),
    ("hired", "employed"),
    ("praised", "complimented"),
    ("followed", "trailed"),
)
ADJECTIVES = (
    ("big", "large"),
    ("small", "little"),
    ("quick", "fast"),
    ("happy", "glad"),
    ("angry", "furious"),
    ("clever", "smart"),
    ("quiet", "silent"),
    ("old", "elderly"),
)
PLACES = (
    ("in the shop", "in the store"),
    ("near the river", "by the stream"),
    ("on the road", "on the street"),
    ("in the forest", "in the woods"),
    ("at the station", "at the depot"),
    ("in the garden", "in the yard"),
)
TIMES = (
    ("at night", "after dark"),
    ("this morning", "early today"),
    ("in winter", "in wintertime"),
    ("at noon", "at midday"),
)
# How non-paraphrases differ (the rest replace one or two words), and how sentences are written.
NEGATE_RATE, UNRELATED_RATE, SWAP_RATE, ONE_SLOT_RATE = 0.6, 0.15, 0.1, 0.6
SYNONYM_RATE, FRONT_RATE, NEGATED_RATE = 0.3, 0.5, 0.1
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def vocabulary() -> list[str]:
    """Every word the generator can write, after the special tokens; the tokenizer's vocabulary."""
    words = {"the", ",", "never"}
    for group in (NOUNS, VERBS, ADJECTIVES, PLACES, TIMES):
        for meaning in group:
            for phrase in meaning:
                words.update(phrase.split())
    return list(SPECIAL_TOKENS) + sorted(words)


def _meaning(rng: random.Random) -> dict[str, int]:
    """A sentence's meaning: one index into each word table (subject and object are different nouns)."""
    subject, obj = rng.sample(range(len(NOUNS)), 2)
    return {
        "adj1": rng.randrange(len(ADJECTIVES)),
        "subject": subject,
        "verb": rng.randrange(len(VERBS)),
        "adj2": rng.randrange(len(ADJECTIVES)),
        "object": obj,
        "place": rng.randrange(len(PLACES)),
        "time": rng.randrange(len(TIMES)),
        "negated": int(rng.random() < NEGATED_RATE),
    }


_TABLE = {
    "adj1": ADJECTIVES,
    "subject": NOUNS,
    "verb": VERBS,
    "adj2": ADJECTIVES,
    "object": NOUNS,
    "place": PLACES,
    "time": TIMES,
}


def _say(meaning: dict[str, int], rng: random.Random, synonyms: float = 0.0) -> str:
    """Write a meaning as a sentence: each slot's first word, or with probability `synonyms` its synonym;
    the time phrase goes at the front or the end."""
    word = {slot: _TABLE[slot][index][rng.random() < synonyms] for slot, index in meaning.items() if slot in _TABLE}
    verb = f"never {word['verb']}" if meaning["negated"] else word["verb"]
    clause = f"the {word['adj1']} {word['subject']} {verb} the {word['adj2']} {word['object']} {word['place']}"
    return f"{word['time']} , {clause}" if rng.random() < FRONT_RATE else f"{clause} {word['time']}"


def _change(meaning: dict[str, int], rng: random.Random) -> dict[str, int]:
    """A different meaning: negated, unrelated, subject and object exchanged, or one or two words replaced."""
    kind = rng.random()
    if kind < NEGATE_RATE:
        return {**meaning, "negated": 1 - meaning["negated"]}
    if kind < NEGATE_RATE + UNRELATED_RATE:
        while True:
            other = _meaning(rng)
            if other != meaning:
                return other
    if kind < NEGATE_RATE + UNRELATED_RATE + SWAP_RATE:
        return {**meaning, "subject": meaning["object"], "object": meaning["subject"]}
    changed = dict(meaning)
    for slot in rng.sample(sorted(_TABLE), 1 if rng.random() < ONE_SLOT_RATE else 2):
        choices = [i for i in range(len(_TABLE[slot])) if i != changed[slot]]
        if slot in ("subject", "object"):  # subject and object stay different nouns
            other = changed["object" if slot == "subject" else "subject"]
            choices = [i for i in choices if i != other]
        changed[slot] = rng.choice(choices)
    return changed


def generate(n: int, seed: int) -> dict[str, list]:
    """`n` sentence pairs as columns; half are paraphrases (label 1)."""
    rng = random.Random(seed)
    rows = {"sentence1": [], "sentence2": [], "label": [], "idx": []}
    for i in range(n):
        meaning = _meaning(rng)
        label = int(rng.random() < 0.5)
        other = meaning if label else _change(meaning, rng)
        rows["sentence1"].append(_say(meaning, rng))
        rows["sentence2"].append(_say(other, rng, SYNONYM_RATE))
        rows["label"].append(label)
        rows["idx"].append(i)
    return rows


def load_splits(train_size: int = TRAIN_SIZE, validation_size: int = VALIDATION_SIZE, test_size: int = TEST_SIZE):
    """`{"train", "validation", "test"}` as `datasets.Dataset`s, each from its own seed (no overlap by design)."""
    from datasets import Dataset

    sizes = {"train": train_size, "validation": validation_size, "test": test_size}
    return {split: Dataset.from_dict(generate(size, SEED + k)) for k, (split, size) in enumerate(sizes.items())}


def tokenizer():
    """An uncased WordPiece tokenizer over `vocabulary()`, built in-process, saved and reloaded like any other."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(vocabulary())}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def model_config(num_labels: int = 2, id2label: dict | None = None, **overrides):
    """A small BERT (2 layers, hidden 64): about 0.1 M parameters, a few seconds per epoch on 2 CPU cores."""
    import transformers

    id2label = id2label or dict(enumerate(LABEL_NAMES))
    settings = dict(
        vocab_size=len(vocabulary()),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
        num_labels=num_labels,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    settings.update(overrides)
    return transformers.BertConfig(**settings)


# Training settings of the default job, used for every TrainingArguments field the user did not set.
TRAINING_DEFAULTS = dict(
    num_train_epochs=3,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=128,
    learning_rate=2e-3,
    warmup_steps=0.1,
    weight_decay=0.01,
    eval_strategy="epoch",
    eval_on_start=True,  # so the chart starts from the untrained model's accuracy
    save_strategy="no",
    # Every parameter of this model gets a gradient: DDP needs no search for unused ones (Trainer's default turns
    # it on, and torch then warns in every process that it found none).
    ddp_find_unused_parameters=False,
)
