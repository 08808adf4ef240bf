"""Each kind of bad input, broken run or misconfigured launch gets an error that names the problem, the
value and the fix, before the first optimizer step where it can be known then; the output folder never holds
anything half-written; and no valid setup that transformers.Trainer trains is refused (the property test at the end).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers
from datasets import Dataset

import looptrain
from helpers import (
    make_args,
    random_token_dataset,
    strip_timing,
    tiny_bert,
    tiny_gpt2,
    wordpiece_tokenizer,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(tmp_path, **kwargs):
    return make_args(looptrain.TrainingArguments, tmp_path, **kwargs)


def checkpoints(folder) -> list[str]:
    """Every checkpoint-like entry of an output folder: complete ones, and half-written ones (`.tmp-*`)."""
    return (
        sorted(n for n in os.listdir(folder) if n.startswith(("checkpoint-", ".tmp-"))) if os.path.isdir(folder) else []
    )


def with_labels(dataset, labels):
    return dataset.remove_columns(["label"]).add_column("label", labels)


# ------------------------------------------------------------------------------------ labels out of range
def test_label_out_of_range_is_found_before_training(tmp_path):
    train = with_labels(random_token_dataset(16, 0), [0, 1] * 7 + [5, 1])  # a 2-class model, one label 5
    trainer = looptrain.Trainer(
        tiny_bert(num_labels=2), _args(tmp_path, max_steps=4, save_steps=1), train_dataset=train
    )
    with pytest.raises(ValueError, match=r"label 5 in column 'label'.*num_labels=2.*num_labels=6"):
        trainer.train()
    assert trainer.state.global_step == 0 and checkpoints(tmp_path) == []


def test_label_out_of_range_behind_a_custom_collator_is_explained_at_the_first_batch(tmp_path):
    """A custom collator may remap labels, so nothing is said before training; torch's IndexError is explained."""
    train = with_labels(random_token_dataset(16, 0), [7] * 16)

    def collate(features):
        return transformers.default_data_collator(features)

    trainer = looptrain.Trainer(
        tiny_bert(num_labels=2), _args(tmp_path, max_steps=4, save_steps=1), train_dataset=train, data_collator=collate
    )
    with pytest.raises(ValueError, match=r"label 7.*num_labels=2.*Target 7 is out of bounds"):
        trainer.train()
    assert checkpoints(tmp_path) == []


def test_token_classification_labels_ignore_minus_100(tmp_path):
    """-100 marks ignored tokens: never an out-of-range label (a check that refused it would refuse run_ner)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
    )
    rng = np.random.default_rng(0)
    data = Dataset.from_dict(
        {"input_ids": rng.integers(5, 100, (8, 6)).tolist(), "labels": [[-100, 0, 1, 2, 1, -100]] * 8}
    )
    trainer = looptrain.Trainer(
        transformers.BertForTokenClassification(config),
        _args(tmp_path, max_steps=1, save_strategy="no"),
        train_dataset=data,
    )
    assert trainer.train().global_step == 1
    bad = data.map(lambda e: {"labels": [-100, 0, 3, 2, 1, -100]})
    trainer = looptrain.Trainer(
        transformers.BertForTokenClassification(config), _args(tmp_path, max_steps=1), train_dataset=bad
    )
    with pytest.raises(ValueError, match="label 3 in column 'labels'.*num_labels=3"):
        trainer.train()


# ------------------------------------------------------------------------------------ compute_metrics
@pytest.mark.parametrize("returned", [0.5, [("accuracy", 0.5)], None])
def test_compute_metrics_that_returns_no_mapping(tmp_path, returned):
    trainer = looptrain.Trainer(
        tiny_bert(), _args(tmp_path), eval_dataset=random_token_dataset(8, 1), compute_metrics=lambda p: returned
    )
    with pytest.raises(TypeError, match=f"compute_metrics returned a {type(returned).__name__}.*must return a dict"):
        trainer.evaluate()


# ------------------------------------------------------------------------------------ mixed precision
def test_fp16_on_a_cpu_is_refused(tmp_path):
    hf = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, fp16=True)
    transformers.Trainer(tiny_bert(), hf)  # transformers accepts it and trains in float32
    with pytest.raises(ValueError, match="fp16=True on a CPU does nothing.*bf16=True"):
        looptrain.Trainer(tiny_bert(), hf)
    assert not os.path.exists(tmp_path / "checkpoint-1")


# ------------------------------------------------------------------------------------ checkpoint limit
@pytest.mark.parametrize("limit", [0, -1])
def test_save_total_limit_that_keeps_nothing(tmp_path, limit):
    transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, save_total_limit=limit)  # accepted there
    with pytest.raises(ValueError, match=f"save_total_limit={limit} would keep no checkpoint.*save_strategy='no'"):
        _args(tmp_path, save_total_limit=limit)


# ------------------------------------------------------------------------------------ sequence length
def long_dataset(n, length, seed=0):
    rng = np.random.default_rng(seed)
    return Dataset.from_dict(
        {"input_ids": rng.integers(5, 100, (n, length)).tolist(), "label": rng.integers(0, 2, n).tolist()}
    )


def test_sequences_longer_than_the_position_embeddings_are_found_before_training(tmp_path):
    model = tiny_bert()  # max_position_embeddings=64
    train = long_dataset(8, 16).remove_columns([])  # fine
    data = Dataset.from_dict({"input_ids": train["input_ids"][:7] + [list(range(5, 85))], "label": train["label"]})
    trainer = looptrain.Trainer(model, _args(tmp_path, max_steps=2, save_steps=1), train_dataset=data)
    with pytest.raises(
        ValueError, match="Example 7 of the training dataset has 80 tokens.*cover 64.*truncation=True, max_length=64"
    ):
        trainer.train()
    assert checkpoints(tmp_path) == []


def test_too_long_sequences_behind_a_custom_collator_are_explained(tmp_path):
    trainer = looptrain.Trainer(
        tiny_gpt2(),
        _args(tmp_path, max_steps=1),
        train_dataset=Dataset.from_dict({"input_ids": [list(range(5, 60)) * 2] * 4}),
        data_collator=lambda f: {
            "input_ids": torch.tensor([x["input_ids"] for x in f]),
            "labels": torch.tensor([x["input_ids"] for x in f]),
        },
    )
    with pytest.raises(ValueError, match="sequences of 110 tokens.*cover 64"):
        trainer.train()


def test_relative_positions_have_no_limit(tmp_path):
    """No position limit is invented for models without absolute position embeddings."""
    from looptrain.checks import position_limit

    assert position_limit(tiny_bert(position_embedding_type="relative_key")) is None
    assert position_limit(tiny_bert()) == 64
    roberta = transformers.RobertaForSequenceClassification(
        transformers.RobertaConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=18,
        )
    )
    assert position_limit(roberta) == 16  # positions start after the padding index
    roberta(input_ids=torch.full((1, 16), 5))
    with pytest.raises(RuntimeError):
        roberta(input_ids=torch.full((1, 17), 5))


# ------------------------------------------------------------------------------------ divergence
class NaNAt(transformers.TrainerCallback):
    """Poisons the classifier bias gradient at one step: a run that diverges there."""

    def __init__(self, model, step):
        self.step, self.global_step = step, 0
        model.classifier.bias.register_hook(lambda g: g * float("nan") if self.global_step == self.step else g)

    def on_step_begin(self, args, state, control, **kwargs):
        self.global_step = state.global_step


def test_divergence_stops_the_run_and_keeps_good_checkpoints(tmp_path):
    model = tiny_bert()
    trainer = looptrain.Trainer(
        model,
        _args(tmp_path, max_steps=8, save_steps=2, logging_steps=3),
        train_dataset=random_token_dataset(64, 0),
        callbacks=[NaNAt(model, step=4)],
    )
    with pytest.raises(
        looptrain.checks.TrainingDiverged, match=r"optimizer step 5.*Nothing after step 4 was saved.*checkpoint-4"
    ):
        trainer.train()
    assert checkpoints(tmp_path) == [
        "checkpoint-2",
        "checkpoint-4",
    ]  # kept; nothing at or after step 5, nothing half-written
    assert trainer.state.global_step == 6  # stopped at the first log after it (logging every 3 steps)
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "checkpoint-4" / "model.safetensors").values())


def test_divergence_with_raise_off_trains_on_like_trainer(tmp_path):
    """`raise_on_divergence = False` is transformers.Trainer's behaviour: both log the same NaN run."""

    class TrainOn(looptrain.Trainer):
        raise_on_divergence = False

    logs = {}
    for name, cls, args_cls in (
        ("hf", transformers.Trainer, transformers.TrainingArguments),
        ("lt", TrainOn, looptrain.TrainingArguments),
    ):
        model = tiny_bert()
        trainer = cls(
            model,
            args_cls(
                output_dir=str(tmp_path / name),
                use_cpu=True,
                max_steps=6,
                logging_steps=1,
                save_strategy="no",
                report_to="none",
                disable_tqdm=True,
            ),
            train_dataset=random_token_dataset(64, 0),
            callbacks=[NaNAt(model, step=2)],
        )
        trainer.train()
        logs[name] = strip_timing(trainer.state.log_history)
    assert [sorted(e) for e in logs["hf"]] == [sorted(e) for e in logs["lt"]]
    for a, b in zip(logs["hf"], logs["lt"]):
        for key in a:
            assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), (key, a[key], b[key])
    assert math.isnan(logs["lt"][3]["grad_norm"])  # the diverged steps really were logged


# ------------------------------------------------------------------------------------ launches
def test_processes_that_did_not_connect_are_refused_before_anything_is_written(tmp_path):
    """An FSDP config on a machine without GPUs: accelerate starts 2 processes that each run alone."""
    script = tmp_path / "job.py"
    out = tmp_path / "out"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        import looptrain
        from helpers import tiny_bert, random_token_dataset
        args = looptrain.TrainingArguments(output_dir={str(out)!r}, max_steps=2, report_to="none")
        looptrain.Trainer(tiny_bert(), args, train_dataset=random_token_dataset(8, 0)).train()
    """)
    )
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.accelerate_cli",
    ]  # make test's .venv-test has no script of its own
    result = subprocess.run(
        [
            *launcher,
            "launch",
            "--config_file",
            os.path.join(ROOT, "examples", "accelerate_configs", "fsdp.yaml"),
            "--num_processes",
            "2",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0
    assert result.stderr.count("The launcher started 2 processes") == 2, result.stderr[-3000:]  # said on every process
    assert "not connected" in result.stderr and "FSDP" in result.stderr
    assert not out.exists()


def test_report_to_trackio_without_trackio_fails_when_constructed(tmp_path):
    import importlib.util

    if importlib.util.find_spec("trackio") is not None:
        pytest.skip("trackio is installed")
    with pytest.raises(RuntimeError, match="pip install trackio"):
        args = looptrain.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="trackio")
        looptrain.Trainer(tiny_bert(), args, train_dataset=random_token_dataset(8, 0))


# ------------------------------------------------------------------------------------ never refuse what Trainer trains
class TupleModel(torch.nn.Module):
    """A plain module that returns (loss, logits) and names its labels `target`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.EmbeddingBag(100, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, input_ids, target=None):
        logits = self.head(self.embed(input_ids))
        loss = torch.nn.functional.cross_entropy(logits, target) if target is not None else None
        return (loss, logits) if loss is not None else (logits,)


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        rng = np.random.default_rng(0)
        for _ in range(64):
            yield {"input_ids": torch.tensor(rng.integers(5, 100, 8)), "labels": torch.tensor(int(rng.integers(0, 2)))}


def _mlm_setup():
    tok = wordpiece_tokenizer()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    texts = Dataset.from_dict({"text": ["the cat sat on the mat", "a dog ran in the park", "the big red car"] * 6})
    data = texts.map(lambda e: tok(e["text"]), remove_columns=["text"])
    return (
        transformers.BertForMaskedLM(config),
        data,
        transformers.DataCollatorForLanguageModeling(tok, mlm_probability=0.3),
    )


def _clm_setup():
    tok = wordpiece_tokenizer()
    model = tiny_gpt2(vocab_size=tok.vocab_size)
    data = Dataset.from_dict({"text": ["the cat sat on the mat", "a dog ran in the park"] * 8}).map(
        lambda e: tok(e["text"]), remove_columns=["text"]
    )
    return model, data, transformers.DataCollatorForLanguageModeling(tok, mlm=False)


VALID_SETUPS = {
    # the collator makes the labels (run_mlm, every causal-LM fine-tune written the course's way)
    "mlm_collator_adds_labels": lambda: (*_mlm_setup(), {}),
    "clm_collator_adds_labels": lambda: (*_clm_setup(), {}),
    # a custom collator that adds a column the dataset does not have
    "collator_adds_labels": lambda: (
        tiny_bert(),
        random_token_dataset(16, 0).remove_columns(["label"]),
        lambda f: {**transformers.default_data_collator(f), "labels": torch.zeros(len(f), dtype=torch.long)},
        {},
    ),
    # a dataset without a length
    "iterable_dataset": lambda: (tiny_bert(), Stream(), None, {}),
    # a model that returns tuples, with custom label names
    "tuple_model_custom_label_names": lambda: (
        TupleModel(),
        random_token_dataset(16, 0).rename_column("label", "target"),
        None,
        {"label_names": ["target"]},
    ),
    # labels under a name the model takes, found by its signature
    "tuple_model_label_column_named_target": lambda: (
        TupleModel(),
        random_token_dataset(16, 0).rename_column("label", "target").remove_columns(["text"]),
        None,
        {},
    ),
    # a regression head: float labels
    "regression_labels": lambda: (
        tiny_bert(num_labels=1),
        random_token_dataset(16, 0).remove_columns(["label"]).add_column("label", [0.5] * 16),
        None,
        {},
    ),
}


@pytest.mark.parametrize("name", sorted(VALID_SETUPS))
def test_looptrain_never_refuses_a_setup_that_trainer_trains(tmp_path, name):
    results = {}
    for library in ("hf", "lt"):
        model, data, collator, extra = VALID_SETUPS[name]()
        args = dict(
            output_dir=str(tmp_path / library),
            use_cpu=True,
            max_steps=2,
            per_device_train_batch_size=4,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            logging_steps=1,
            **extra,
        )
        cls, args_cls = (
            (transformers.Trainer, transformers.TrainingArguments)
            if library == "hf"
            else (looptrain.Trainer, looptrain.TrainingArguments)
        )
        trainer = cls(model, args_cls(**args), train_dataset=data, data_collator=collator)
        try:
            trainer.train()
            results[library] = strip_timing(trainer.state.log_history)
        except Exception as err:  # noqa: BLE001 - recorded and compared below
            results[library] = err
    if isinstance(results["hf"], Exception):
        pytest.skip(f"transformers.Trainer does not train this setup either: {results['hf']!r}")
    assert not isinstance(results["lt"], Exception), f"looptrain refused a setup Trainer trains: {results['lt']!r}"
    assert results["lt"] == results["hf"]


# Random valid-looking setups (issue 21): head sizes and problem types, label dtypes and shapes, label column names,
# collators and arguments drawn at random (seeded). Whatever transformers.Trainer trains, looptrain must train to the
# same logs and weights; a setup Trainer refuses too is counted, not compared.
def _random_setup(rng):
    num_labels = int(rng.choice([1, 2, 3]))
    problem_type = rng.choice([None, "regression", "single_label_classification", "multi_label_classification"])
    if num_labels == 1 and problem_type in ("single_label_classification", "multi_label_classification"):
        problem_type = None
    n, seq_len = 8, int(rng.choice([6, 8]))
    kind = rng.choice(["int", "float", "multi_hot"])
    if kind == "multi_hot":
        labels = rng.integers(0, 2, (n, num_labels)).astype(float if rng.random() < 0.7 else int).tolist()
    elif kind == "float":
        labels = (
            rng.uniform(0, 5, n).round(2).tolist()
            if num_labels == 1
            else rng.integers(0, num_labels, n).astype(float).tolist()
        )
    else:
        labels = rng.integers(0, 6 if num_labels == 1 else num_labels, n).tolist()  # int scores for a regression head
    ragged = rng.random() < 0.3
    ids = [rng.integers(5, 100, seq_len - (i % 3 if ragged else 0)).tolist() for i in range(n)]
    data = {"input_ids": ids, rng.choice(["label", "labels"]): labels}
    if rng.random() < 0.5:
        data["attention_mask"] = [[1] * len(x) for x in ids]
    if rng.random() < 0.3:
        data["text"] = [f"example {i}" for i in range(n)]
    collator = rng.choice(["none", "default", "padding"])
    if ragged and collator == "default":
        collator = "padding"
    args = dict(
        learning_rate=float(rng.choice([1e-3, 5e-5])),
        warmup_steps=rng.choice([0, 1, 0.5]),
        lr_scheduler_type=str(rng.choice(["linear", "constant", "cosine"])),
        gradient_accumulation_steps=int(rng.choice([1, 2])),
        per_device_train_batch_size=int(rng.choice([2, 4])),
        max_grad_norm=float(rng.choice([1.0, 0.0])),
        weight_decay=float(rng.choice([0.0, 0.01])),
        label_smoothing_factor=float(rng.choice([0.0, 0.1])),
        optim=str(rng.choice(["adamw_torch", "sgd"])),
        seed=int(rng.integers(0, 100)),
    )
    description = (
        f"num_labels={num_labels} problem_type={problem_type} labels={kind} ragged={ragged} collator={collator} {args}"
    )
    overrides = {} if problem_type is None else {"problem_type": str(problem_type)}

    def build():
        model = tiny_bert(num_labels=num_labels, **overrides)
        tok = wordpiece_tokenizer() if collator == "padding" or ragged else None
        made = {
            "none": None,
            "default": transformers.default_data_collator,
            "padding": transformers.DataCollatorWithPadding(tok) if tok is not None else None,
        }[collator]
        return model, Dataset.from_dict(data), made, tok

    return build, args, description


def test_looptrain_never_refuses_random_setups_that_trainer_trains(tmp_path):
    import time

    rng = np.random.default_rng(21)
    trained = refused_by_both = 0
    started = time.monotonic()
    for case in range(24):
        if time.monotonic() - started > 90:  # a bound on the work on a slow machine, not a timed assertion
            break
        build, extra, description = _random_setup(rng)
        results = {}
        for library in ("hf", "lt"):
            model, data, collator, tok = build()
            args = dict(
                output_dir=str(tmp_path / f"{case}-{library}"),
                use_cpu=True,
                max_steps=2,
                save_strategy="no",
                report_to="none",
                disable_tqdm=True,
                logging_steps=1,
                **extra,
            )
            cls, args_cls = (
                (transformers.Trainer, transformers.TrainingArguments)
                if library == "hf"
                else (looptrain.Trainer, looptrain.TrainingArguments)
            )
            try:
                trainer = cls(model, args_cls(**args), train_dataset=data, data_collator=collator, processing_class=tok)
                trainer.train()
                results[library] = (
                    strip_timing(trainer.state.log_history),
                    {n: p.detach() for n, p in trainer.model.named_parameters()},
                )
            except Exception as err:  # noqa: BLE001 - compared below
                results[library] = err
        if isinstance(results["hf"], Exception):
            refused_by_both += isinstance(results["lt"], Exception)
            continue
        assert not isinstance(results["lt"], Exception), (
            f"looptrain refused a setup Trainer trains ({description}): {results['lt']!r}"
        )
        (log_hf, w_hf), (log_lt, w_lt) = results["hf"], results["lt"]
        assert log_lt == log_hf, description
        assert all(torch.equal(w_hf[n], w_lt[n]) for n in w_hf), description
        trained += 1
    print(f"random setups: {trained} trained identically by both, {refused_by_both} refused by both")
    assert trained >= 8  # the generator makes mostly trainable setups: the property is exercised, not skipped
