"""The seed recipe: the Hugging Face course's Trainer walkthrough (chapter 3), with only its imports changed.

The course loads GLUE MRPC and bert-base-uncased from the Hub; here the same code runs on an in-process
MRPC-shaped dataset, tokenizer and tiny BERT, and `evaluate.load("glue", "mrpc")` is replaced by the same
accuracy/F1 computed locally. Every other line is the course's.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import transformers
from datasets import DatasetDict

from helpers import accuracy_f1, sentence_pairs, tiny_bert, wordpiece_tokenizer


def course_code(Trainer, TrainingArguments, DataCollatorWithPadding):
    # --- stand-ins for the Hub (load_dataset("glue", "mrpc"), from_pretrained("bert-base-uncased"))
    raw_datasets = DatasetDict({"train": sentence_pairs(40, 1), "validation": sentence_pairs(16, 2)})
    tokenizer = wordpiece_tokenizer()

    # --- the course, line for line
    def tokenize_function(example):
        return tokenizer(example["sentence1"], example["sentence2"], truncation=True)

    tokenized_datasets = raw_datasets.map(tokenize_function, batched=True)
    data_collator = DataCollatorWithPadding(tokenizer=tokenizer)

    training_args = TrainingArguments("test-trainer", evaluation_strategy="epoch")
    model = tiny_bert(
        vocab_size=len(tokenizer)
    )  # AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=2)

    def compute_metrics(eval_preds):
        return accuracy_f1(eval_preds)  # metric = evaluate.load("glue", "mrpc"); metric.compute(...)

    trainer = Trainer(
        model,
        training_args,
        train_dataset=tokenized_datasets["train"],
        eval_dataset=tokenized_datasets["validation"],
        data_collator=data_collator,
        tokenizer=tokenizer,
        compute_metrics=compute_metrics,
    )
    trainer.train()

    predictions = trainer.predict(tokenized_datasets["validation"])
    preds = np.argmax(predictions.predictions, axis=-1)
    return trainer, predictions, preds


def test_course_code_runs_on_looptrain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from transformers import DataCollatorWithPadding

    from looptrain import Trainer, TrainingArguments

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, predictions, preds = course_code(Trainer, TrainingArguments, DataCollatorWithPadding)
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert any("evaluation_strategy" in m for m in messages) and any("tokenizer" in m for m in messages)
    evals = [e for e in trainer.state.log_history if "eval_f1" in e]
    assert [e["epoch"] for e in evals] == [1.0, 2.0, 3.0]
    assert predictions.predictions.shape == (16, 2) and preds.shape == (16,)
    assert set(predictions.metrics) >= {"test_loss", "test_accuracy", "test_f1"}
    assert (tmp_path / "test-trainer" / "checkpoint-15" / "model.safetensors").is_file()


def test_course_code_no_longer_runs_on_transformers_5(tmp_path, monkeypatch):
    """Why the old spellings matter: transformers 5.24 rejects this code."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError, match="evaluation_strategy"):
        course_code(transformers.Trainer, transformers.TrainingArguments, transformers.DataCollatorWithPadding)
