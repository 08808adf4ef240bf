"""Shared builders for the tests: tiny models, in-process tokenizers, small datasets, and the
parity harness that runs `transformers.Trainer` and `looptrain.Trainer` side by side."""

from __future__ import annotations

import contextlib
import io
import pathlib
import random
import sys

import numpy as np
import torch
import transformers
from datasets import Dataset

import looptrain

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import toy  # noqa: E402  (the examples' in-process tokenizer and models)

WORDS = (
    "the a cat dog sat ran on under mat rug quickly slowly big small red blue house tree bird fish "
    "saw ate found kept old new happy sad man woman child park river city car train book"
).split()


def tiny_bert(seed: int = 0, num_labels: int = 2, vocab_size: int = 100, **overrides):
    """The semantics doc's reference model: 2 layers, hidden 32, dropout on (examples/toy.py builds it)."""
    return toy.tiny_bert(vocab_size, seed=seed, num_labels=num_labels, **overrides)


def tiny_gpt2(seed: int = 0, vocab_size: int = 64):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    return transformers.GPT2LMHeadModel(config)


def random_token_dataset(n: int, seed: int, seq_len: int = 16, extra_columns: bool = True) -> Dataset:
    """Section 11.1 of the semantics doc: random ids, all-ones mask, random 0/1 labels, unused columns."""
    rng = np.random.default_rng(seed)
    data = {
        "input_ids": rng.integers(5, 100, (n, seq_len)).tolist(),
        "attention_mask": np.ones((n, seq_len), dtype=np.int64).tolist(),
        "label": rng.integers(0, 2, n).tolist(),
    }
    if extra_columns:
        data["text"] = [f"example {i}" for i in range(n)]
        data["idx"] = list(range(n))
    return Dataset.from_dict(data)


def wordpiece_tokenizer():
    """An uncased WordPiece tokenizer over WORDS, built in-process (no Hub), returning token type ids for pairs
    as BERT's does (examples/toy.py builds it)."""
    return toy.wordpiece_tokenizer(WORDS, model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def sentence_pairs(n: int, seed: int) -> Dataset:
    """Variable-length sentence pairs in the MRPC layout (sentence1, sentence2, label, idx)."""
    rng = random.Random(seed)
    rows = {"sentence1": [], "sentence2": [], "label": [], "idx": []}
    for i in range(n):
        s1 = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        same = rng.random() < 0.5
        s2 = list(s1) if same else [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        if same and len(s2) > 3:
            s2.pop(rng.randrange(len(s2)))
        rows["sentence1"].append(" ".join(s1))
        rows["sentence2"].append(" ".join(s2))
        rows["label"].append(int(same))
        rows["idx"].append(i)
    return Dataset.from_dict(rows)


def accuracy_f1(eval_pred):
    """The course's compute_metrics (accuracy and F1 of class 1, what GLUE's MRPC metric computes), locally."""
    from sklearn.metrics import accuracy_score, f1_score

    logits, labels = eval_pred
    preds = np.argmax(logits, axis=-1)
    return {"accuracy": float(accuracy_score(labels, preds)), "f1": float(f1_score(labels, preds))}


def accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


TIMING_KEYS = ("runtime", "per_second", "model_preparation_time")


def strip_timing(log_history):
    return [{k: v for k, v in entry.items() if not any(t in k for t in TIMING_KEYS)} for entry in log_history]


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_params(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [n for n in a if not torch.equal(a[n], b[n])]
    assert not different, f"parameters differ bit-wise: {different[:5]}"


# What every test run shares: the CPU, no reporting integration, no progress bar.
BASE_ARGS = dict(use_cpu=True, report_to="none", disable_tqdm=True)


def make_args(args_cls, output_dir, **kwargs):
    """Training arguments of either library (`args_cls`) for a test run: BASE_ARGS, then `kwargs`."""
    return args_cls(output_dir=str(output_dir), **{**BASE_ARGS, **kwargs})


def run_trainer(
    trainer_cls,
    args_cls,
    model_fn,
    output_dir,
    train_dataset=None,
    eval_dataset=None,
    args=None,
    trainer_kwargs=None,
    do_train=True,
):
    """Build a model, arguments and trainer of one library, train, and return (trainer, result)."""
    model = model_fn()
    targs = make_args(args_cls, output_dir, **(args or {}))
    kwargs = dict(trainer_kwargs or {})
    trainer = trainer_cls(model=model, args=targs, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)
    with contextlib.redirect_stdout(io.StringIO()):
        result = trainer.train() if do_train else None
    return trainer, result


def run_both(
    tmp_path,
    model_fn,
    train_dataset=None,
    eval_dataset=None,
    args=None,
    trainer_kwargs=None,
    hf_trainer_cls=None,
    lt_trainer_cls=None,
    do_train=True,
):
    """Train the same model with both libraries in this process; return both trainers and results."""
    hf = run_trainer(
        hf_trainer_cls or transformers.Trainer,
        transformers.TrainingArguments,
        model_fn,
        tmp_path / "hf",
        train_dataset,
        eval_dataset,
        args,
        trainer_kwargs,
        do_train,
    )
    lt = run_trainer(
        lt_trainer_cls or looptrain.Trainer,
        looptrain.TrainingArguments,
        model_fn,
        tmp_path / "lt",
        train_dataset,
        eval_dataset,
        args,
        trainer_kwargs,
        do_train,
    )
    return hf, lt


def assert_parity(hf, lt):
    """Every non-timing log_history value, and every final parameter, bit for bit."""
    (hf_trainer, hf_result), (lt_trainer, lt_result) = hf, lt
    hf_log, lt_log = strip_timing(hf_trainer.state.log_history), strip_timing(lt_trainer.state.log_history)
    assert len(hf_log) == len(lt_log), f"{len(hf_log)} vs {len(lt_log)} log entries:\n{hf_log}\n{lt_log}"
    for i, (a, b) in enumerate(zip(hf_log, lt_log)):
        assert list(a.keys()) == list(b.keys()), f"entry {i}: keys {list(a)} vs {list(b)}"
        assert a == b, f"entry {i} differs:\n  transformers: {a}\n  looptrain:    {b}"
    if hf_result is not None:
        assert hf_result.global_step == lt_result.global_step
        assert hf_result.training_loss == lt_result.training_loss
    assert_same_params(params_of(hf_trainer.model), params_of(lt_trainer.model))
