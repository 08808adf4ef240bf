"""Bad input fails before any work, with a message that names the problem and the fix."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers
from datasets import Dataset

import looptrain
from helpers import accuracy, make_args, random_token_dataset, tiny_bert


def _args(tmp_path, **kwargs):
    return make_args(looptrain.TrainingArguments, tmp_path, **kwargs)


def test_no_labels_and_no_loss_function(tmp_path):
    """Checked on the first real batch (a collator may add labels: no pre-flight check can know), before any
    optimizer step or save."""
    train = random_token_dataset(16, 0).remove_columns(["label"])
    trainer = looptrain.Trainer(tiny_bert(), _args(tmp_path), train_dataset=train)
    with pytest.raises(ValueError, match=r"(?s)returned no loss.*\['labels'\].*rename_column.*compute_loss_func"):
        trainer.train()
    assert trainer.state.global_step == 0 and not any(p.startswith("checkpoint") for p in os.listdir(tmp_path))


def test_label_advice_works_when_followed(tmp_path):
    """Labels in a column named `sentiment`: the error says to rename it, and renaming it trains."""
    train = random_token_dataset(16, 0).rename_column("label", "sentiment")
    with pytest.raises(ValueError, match="rename_column") as err:
        looptrain.Trainer(tiny_bert(), _args(tmp_path / "a", max_steps=1), train_dataset=train).train()
    assert "label_names=" not in str(err.value)  # label_names would not help: BERT's forward takes `labels`
    fixed = train.rename_column("sentiment", "label")
    trainer = looptrain.Trainer(
        tiny_bert(), _args(tmp_path / "b", max_steps=1, save_strategy="no"), train_dataset=fixed
    )
    assert trainer.train().global_step == 1


def test_no_labels_is_fine_with_a_loss_function(tmp_path):
    train = random_token_dataset(16, 0).remove_columns(["label"])

    def loss_func(outputs, labels, num_items_in_batch=None):
        return outputs["logits"].pow(2).mean()

    trainer = looptrain.Trainer(
        tiny_bert(), _args(tmp_path, max_steps=2, save_strategy="no"), train_dataset=train, compute_loss_func=loss_func
    )
    assert trainer.train().global_step == 2


def test_eval_strategy_without_eval_dataset(tmp_path):
    with pytest.raises(ValueError, match="eval_strategy='epoch' needs an eval_dataset"):
        looptrain.Trainer(tiny_bert(), _args(tmp_path, eval_strategy="epoch"), train_dataset=random_token_dataset(8, 0))


def test_collator_needs_a_removed_column(tmp_path):
    """A collator that reads the raw text column: remove_unused_columns dropped it before collation."""

    def collate_from_text(features):
        ids = [[5 + len(word) for word in f["text"].split()] + [0] * 4 for f in features]
        width = min(len(i) for i in ids)
        return {
            "input_ids": torch.tensor([i[:width] for i in ids]),
            "labels": torch.tensor([f["label"] for f in features]),
        }

    trainer = looptrain.Trainer(
        tiny_bert(),
        _args(tmp_path, max_steps=1),
        train_dataset=random_token_dataset(8, 0),
        data_collator=collate_from_text,
    )
    with pytest.raises(KeyError, match="'text'.*remove_unused_columns=False"):
        trainer.train()
    ok = looptrain.Trainer(
        tiny_bert(),
        _args(tmp_path, max_steps=1, remove_unused_columns=False, save_strategy="no"),
        train_dataset=random_token_dataset(8, 0).remove_columns(["input_ids", "attention_mask", "idx"]),
        data_collator=collate_from_text,
    )
    assert ok.train().global_step == 1


def test_label_names_missing_from_eval_batch(tmp_path, caplog):
    """Trainer silently returns no metric when the labels are not in the batch; looptrain does the same (it is a
    valid setup: an eval set without labels) and says why compute_metrics was not called."""
    evals = random_token_dataset(8, 1).rename_column("label", "target")
    hf = transformers.Trainer(
        tiny_bert(),
        transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), use_cpu=True),
        eval_dataset=evals,
        compute_metrics=accuracy,
    )
    hf_metrics = hf.evaluate()
    assert "eval_accuracy" not in hf_metrics  # the silent failure
    trainer = looptrain.Trainer(tiny_bert(), _args(tmp_path), eval_dataset=evals, compute_metrics=accuracy)
    with caplog.at_level("WARNING"):
        transformers.logging.enable_propagation()
        try:
            metrics = trainer.evaluate()
        finally:
            transformers.logging.disable_propagation()
    assert sorted(metrics) == sorted(hf_metrics)
    assert (
        "compute_metrics was not called" in caplog.text and "['labels']" in caplog.text and "label_names" in caplog.text
    )


def test_empty_datasets_fail_where_they_are_used(tmp_path):
    empty = random_token_dataset(8, 0).select([])
    trainer = looptrain.Trainer(tiny_bert(), _args(tmp_path), train_dataset=empty, eval_dataset=empty)
    with pytest.raises(ValueError, match="training dataset is empty"):
        trainer.train()
    with pytest.raises(ValueError, match="evaluation dataset is empty"):
        trainer.evaluate()


def test_train_without_train_dataset(tmp_path):
    with pytest.raises(ValueError, match="needs a train_dataset"):
        looptrain.Trainer(tiny_bert(), _args(tmp_path)).train()


def test_no_model(tmp_path):
    with pytest.raises(RuntimeError, match="model or a model_init"):
        looptrain.Trainer(args=_args(tmp_path))


def test_no_column_matches_the_model(tmp_path):
    train = Dataset.from_dict({"sentence": ["a b", "c d"], "label": [0, 1]}).remove_columns(["label"])
    trainer = looptrain.Trainer(
        tiny_bert(),
        _args(tmp_path),
        train_dataset=train,
        compute_loss_func=lambda o, l, num_items_in_batch=None: o["logits"].sum(),
    )
    with pytest.raises(ValueError, match="No column.*remove_unused_columns"):
        trainer.train()


def test_iterable_dataset_needs_max_steps(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            rng = np.random.default_rng(0)
            while True:
                yield {"input_ids": torch.tensor(rng.integers(5, 100, 8)), "labels": torch.tensor(1)}

    with pytest.raises(ValueError, match="max_steps"):  # as Trainer, when it is constructed
        looptrain.Trainer(tiny_bert(), _args(tmp_path), train_dataset=Stream())
    trainer = looptrain.Trainer(tiny_bert(), _args(tmp_path, max_steps=3, save_strategy="no"), train_dataset=Stream())
    assert trainer.train().global_step == 3


def test_a_resumed_run_says_where_it_resumes(tmp_path, caplog):
    """One line at WARNING (visible at transformers' default verbosity): the checkpoint, the step, the epoch and the
    batches skipped."""
    args = dict(max_steps=4, save_steps=1, per_device_train_batch_size=4, logging_steps=1)
    first = looptrain.Trainer(tiny_bert(), _args(tmp_path, **args), train_dataset=random_token_dataset(24, 0))
    first.train()  # 6 batches per epoch: checkpoint-2 is mid-epoch, after 2 batches
    resumed = looptrain.Trainer(tiny_bert(), _args(tmp_path, **args), train_dataset=random_token_dataset(24, 0))
    transformers.logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    finally:
        transformers.logging.disable_propagation()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Resuming from")]
    assert lines == [
        f"Resuming from {tmp_path / 'checkpoint-2'} at step 2, epoch 0: skipping the 2 batches of that "
        "epoch already trained on."
    ]


def test_the_column_checking_collator_pickles(tmp_path):
    """DataLoader workers started with spawn (the default on macOS) receive the collator pickled."""
    import pickle

    from looptrain.data import ColumnCheckingCollator

    collator = pickle.loads(pickle.dumps(ColumnCheckingCollator(transformers.default_data_collator, ["text"], "Bert")))
    assert collator.removed == {"text"} and collator.collator is transformers.default_data_collator
