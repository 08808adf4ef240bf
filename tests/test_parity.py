"""Parity: the same tiny model trained by `transformers.Trainer` and by `looptrain.Trainer` in this test run.

Every case compares every non-timing `log_history` value (keys, order and values) and every final
parameter for exact equality. Nothing here is compared against numbers recorded earlier.
All cases run on CPU with dropout on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import looptrain
from helpers import (
    TIMING_KEYS,
    accuracy,
    accuracy_f1,
    assert_parity,
    make_args,
    random_token_dataset,
    run_both,
    run_trainer,
    sentence_pairs,
    strip_timing,
    tiny_bert,
    tiny_gpt2,
    wordpiece_tokenizer,
)

TRAIN, EVAL = random_token_dataset(40, 1), random_token_dataset(12, 2)

# (case id, TrainingArguments overrides). Base: batch 8, 40 examples = 5 batches per epoch, 2 epochs.
BASE = dict(per_device_train_batch_size=8, per_device_eval_batch_size=8, num_train_epochs=2, logging_steps=1, seed=42)
CASES = [
    ("reference_run_ga2_eval_epoch", dict(gradient_accumulation_steps=2, eval_strategy="epoch")),
    ("ga3", dict(gradient_accumulation_steps=3, eval_strategy="epoch")),
    ("ga2_drop_last", dict(gradient_accumulation_steps=2, dataloader_drop_last=True)),
    ("warmup_count", dict(warmup_steps=3)),
    ("warmup_ratio", dict(warmup_steps=0.5, gradient_accumulation_steps=2)),
    ("weight_decay_and_clipping", dict(weight_decay=0.1, max_grad_norm=0.05)),
    ("no_clipping_norm_still_logged", dict(max_grad_norm=0.0)),
    ("adamw_torch_unfused", dict(optim="adamw_torch", weight_decay=0.01)),
    ("cosine_schedule", dict(lr_scheduler_type="cosine", warmup_steps=2)),
    (
        "cosine_with_restarts_kwargs",
        dict(lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": 2}),
    ),
    ("constant_schedule", dict(lr_scheduler_type="constant_with_warmup", warmup_steps=2)),
    ("max_steps_mid_epoch", dict(max_steps=7, eval_strategy="epoch")),
    ("max_steps_ga2_mid_epoch", dict(max_steps=4, gradient_accumulation_steps=2, eval_strategy="epoch")),
    ("logging_steps3_first_step", dict(logging_steps=3, logging_first_step=True)),
    ("logging_ratio", dict(logging_steps=0.25)),
    ("logging_epoch", dict(logging_strategy="epoch", eval_strategy="epoch")),
    ("logging_no", dict(logging_strategy="no")),
    ("eval_steps", dict(eval_strategy="steps", eval_steps=4)),
    ("eval_steps_with_delay", dict(eval_strategy="steps", eval_steps=2, eval_delay=5)),
    ("eval_on_start", dict(eval_on_start=True, eval_strategy="epoch")),
    ("fractional_epochs", dict(num_train_epochs=1.5, eval_strategy="epoch")),
    ("data_seed", dict(data_seed=7, seed=3)),
    ("sequential_sampler", dict(train_sampling_strategy="sequential")),
    ("label_smoothing", dict(label_smoothing_factor=0.1, gradient_accumulation_steps=2)),
    ("tokens_seen", dict(include_num_input_tokens_seen=True)),
    ("eval_accumulation_steps", dict(eval_strategy="epoch", eval_accumulation_steps=1, per_device_eval_batch_size=5)),
    ("save_every_2_steps", dict(save_strategy="steps", save_steps=2, save_total_limit=2)),
    ("no_nan_filter", dict(logging_nan_inf_filter=False)),
]


@pytest.mark.parametrize("case,overrides", CASES, ids=[c for c, _ in CASES])
def test_sequence_classification_parity(tmp_path, case, overrides):
    args = {**BASE, **overrides}
    hf, lt = run_both(tmp_path, tiny_bert, TRAIN, EVAL, args=args, trainer_kwargs=dict(compute_metrics=accuracy))
    assert_parity(hf, lt)


def test_reference_run_shape(tmp_path):
    """The reference run of the semantics doc: 3 steps per epoch, windows [2, 2, 1], eval each epoch."""
    args = {**BASE, "gradient_accumulation_steps": 2, "eval_strategy": "epoch"}
    hf, lt = run_both(tmp_path, tiny_bert, TRAIN, EVAL, args=args, trainer_kwargs=dict(compute_metrics=accuracy))
    assert_parity(hf, lt)
    log = strip_timing(lt[0].state.log_history)
    assert [e["step"] for e in log] == [1, 2, 3, 3, 4, 5, 6, 6, 6]
    # transformers#47688 reproduced: full windows sum two undivided batch means (~2 ln 2),
    # the one-batch remainder window logs one (~ln 2).
    assert log[0]["loss"] > 1.3 and log[2]["loss"] < 0.75
    assert (tmp_path / "lt" / "checkpoint-6" / "model.safetensors").is_file()


def test_seed_recipe_defaults_parity(tmp_path):
    """The course recipe: tokenized variable-length sentence pairs, DataCollatorWithPadding chosen from the
    tokenizer, string columns removed, eval every epoch, accuracy and F1. Defaults otherwise."""
    tokenizer = wordpiece_tokenizer()

    def tokenize(batch):
        return tokenizer(batch["sentence1"], batch["sentence2"], truncation=True)

    train = sentence_pairs(48, seed=1).map(tokenize, batched=True)
    evals = sentence_pairs(20, seed=2).map(tokenize, batched=True)
    model_fn = lambda: tiny_bert(vocab_size=len(tokenizer))  # noqa: E731
    hf, lt = run_both(
        tmp_path,
        model_fn,
        train,
        evals,
        args=dict(eval_strategy="epoch"),
        trainer_kwargs=dict(processing_class=tokenizer, compute_metrics=accuracy_f1),
    )
    assert isinstance(lt[0].data_collator, transformers.DataCollatorWithPadding)
    assert_parity(hf, lt)
    evals_logged = [e for e in lt[0].state.log_history if "eval_f1" in e]
    assert len(evals_logged) == 3


def test_seed_recipe_with_logging_every_step(tmp_path):
    tokenizer = wordpiece_tokenizer()
    tok = lambda b: tokenizer(b["sentence1"], b["sentence2"], truncation=True)  # noqa: E731
    train = sentence_pairs(30, seed=3).map(tok, batched=True)
    evals = sentence_pairs(9, seed=4).map(tok, batched=True)
    hf, lt = run_both(
        tmp_path,
        lambda: tiny_bert(vocab_size=len(tokenizer)),
        train,
        evals,
        args=dict(eval_strategy="epoch", logging_steps=1, gradient_accumulation_steps=2, per_device_train_batch_size=4),
        trainer_kwargs=dict(processing_class=tokenizer, compute_metrics=accuracy_f1),
    )
    assert_parity(hf, lt)


def _lm_dataset(n, seed, vocab=64):
    """Variable-length token sequences; the collator pads labels with -100."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        length = int(rng.integers(4, 14))
        ids = rng.integers(1, vocab, length).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    from datasets import Dataset

    return Dataset.from_list(rows)


def _lm_collator(features):
    """Right-pad input_ids with 0, attention_mask with 0, labels with -100."""
    width = max(len(f["input_ids"]) for f in features)
    pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
    return {
        "input_ids": torch.tensor([pad(f["input_ids"], 0) for f in features]),
        "attention_mask": torch.tensor([pad(f["attention_mask"], 0) for f in features]),
        "labels": torch.tensor([pad(f["labels"], -100) for f in features]),
    }


@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize("loss_type", [None, "ForCausalLM"], ids=["loss_type_unset", "loss_type_causal"])
def test_causal_lm_token_normalised_loss_parity(tmp_path, ga, loss_type):
    """GPT-2 consumes num_items_in_batch: the window's loss is sum / (label tokens of the window).

    Trainer counts `labels[..., 1:]` only when `model.loss_type` maps to ForCausalLMLoss. A GPT-2 built from a
    config has `loss_type=None`, so Trainer then counts every label (one token per row too many); looptrain
    reproduces both paths.
    """

    def model_fn():
        model = tiny_gpt2()
        model.loss_type = loss_type
        return model

    train, evals = _lm_dataset(22, 5), _lm_dataset(7, 6)
    args = dict(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=ga,
        num_train_epochs=2,
        logging_steps=1,
        eval_strategy="epoch",
        per_device_eval_batch_size=3,
    )
    hf, lt = run_both(tmp_path, model_fn, train, evals, args=args, trainer_kwargs=dict(data_collator=_lm_collator))
    assert lt[0].model_accepts_loss_kwargs
    assert lt[0]._loss_shifts_labels == (loss_type is not None) == hf[0]._loss_shifts_labels
    assert_parity(hf, lt)


def test_compute_loss_func_parity(tmp_path):
    def loss_func(outputs, labels, num_items_in_batch=None):
        loss = torch.nn.functional.cross_entropy(outputs["logits"], labels, reduction="sum")
        return loss / num_items_in_batch

    args = {**BASE, "gradient_accumulation_steps": 2, "eval_strategy": "epoch"}
    hf, lt = run_both(
        tmp_path,
        tiny_bert,
        TRAIN,
        EVAL,
        args=args,
        trainer_kwargs=dict(compute_loss_func=loss_func, compute_metrics=accuracy),
    )
    assert_parity(hf, lt)


def test_model_init_parity(tmp_path):
    """model_init: the model is rebuilt after set_seed(args.seed) inside train()."""
    hf, lt = run_both(
        tmp_path,
        lambda: None,
        TRAIN,
        EVAL,
        args={**BASE, "eval_strategy": "epoch"},
        trainer_kwargs=dict(model_init=lambda: tiny_bert(seed=5), compute_metrics=accuracy),
    )
    assert_parity(hf, lt)


def test_preprocess_logits_and_dict_of_eval_sets(tmp_path):
    def preprocess(logits, labels):
        return logits.argmax(-1)

    def metrics(p):
        return {"accuracy": float((p.predictions == p.label_ids).mean())}

    evals = {"first": EVAL, "second": random_token_dataset(9, 3)}
    hf, lt = run_both(
        tmp_path,
        tiny_bert,
        TRAIN,
        evals,
        args={**BASE, "eval_strategy": "epoch"},
        trainer_kwargs=dict(compute_metrics=metrics, preprocess_logits_for_metrics=preprocess),
    )
    assert_parity(hf, lt)
    keys = [k for e in lt[0].state.log_history for k in e]
    assert "eval_first_accuracy" in keys and "eval_second_loss" in keys


def test_batch_eval_metrics_parity(tmp_path):
    class Streaming:
        def __init__(self):
            self.correct = self.total = 0

        def __call__(self, p, compute_result):
            self.correct += int((p.predictions.argmax(-1) == p.label_ids).sum())
            self.total += len(p.label_ids)
            if compute_result:
                result = {"accuracy": self.correct / self.total}
                self.correct = self.total = 0
                return result
            return {}

    args = {**BASE, "eval_strategy": "epoch", "batch_eval_metrics": True, "per_device_eval_batch_size": 5}
    hf, lt = run_both(tmp_path, tiny_bert, TRAIN, EVAL, args=args, trainer_kwargs=dict(compute_metrics=Streaming()))
    assert_parity(hf, lt)
    assert "eval_accuracy" in lt[0].state.log_history[-2]


# ------------------------------------------------------------------ evaluate() / predict() called directly
def _direct_calls(trainer, dataset_with, dataset_without):
    out = {"evaluate": trainer.evaluate()}
    out["evaluate_other"] = trainer.evaluate(dataset_with, metric_key_prefix="dev")
    out["predict_labels"] = trainer.predict(dataset_with)
    out["predict_no_labels"] = trainer.predict(dataset_without)
    out["rng_after"] = torch.random.get_rng_state()
    return out


@pytest.mark.parametrize("trained", [False, True], ids=["before_training", "after_training"])
def test_evaluate_and_predict_parity(tmp_path, trained):
    with_labels = random_token_dataset(11, 4)
    without_labels = with_labels.remove_columns(["label"])
    results = []
    for trainer_cls, args_cls, sub in (
        (transformers.Trainer, transformers.TrainingArguments, "hf"),
        (looptrain.Trainer, looptrain.TrainingArguments, "lt"),
    ):
        args = make_args(args_cls, tmp_path / sub, per_device_eval_batch_size=4, num_train_epochs=1, save_strategy="no")
        trainer = trainer_cls(
            model=tiny_bert(), args=args, train_dataset=TRAIN, eval_dataset=EVAL, compute_metrics=accuracy
        )
        if trained:
            trainer.train()
        results.append((trainer, _direct_calls(trainer, with_labels, without_labels)))
    (hf_trainer, hf), (lt_trainer, lt) = results
    drop = lambda m: {k: v for k, v in m.items() if not any(t in k for t in TIMING_KEYS)}  # noqa: E731
    assert list(drop(hf["evaluate"])) == list(drop(lt["evaluate"]))
    assert drop(hf["evaluate"]) == drop(lt["evaluate"])
    assert drop(hf["evaluate_other"]) == drop(lt["evaluate_other"])
    for key in ("predict_labels", "predict_no_labels"):
        assert np.array_equal(hf[key].predictions, lt[key].predictions)
        assert drop(hf[key].metrics) == drop(lt[key].metrics)
        if hf[key].label_ids is None:
            assert lt[key].label_ids is None
        else:
            assert np.array_equal(hf[key].label_ids, lt[key].label_ids)
            assert hf[key].label_ids.dtype == lt[key].label_ids.dtype
    assert lt["predict_no_labels"].label_ids is None and "test_loss" not in lt["predict_no_labels"].metrics
    assert torch.equal(hf["rng_after"], lt["rng_after"]), "evaluate/predict consumed the RNG differently"
    assert strip_timing(hf_trainer.state.log_history) == strip_timing(lt_trainer.state.log_history)


# ------------------------------------------------------------------ callbacks
class Recorder(transformers.TrainerCallback):
    """Records each event with the TrainerState and TrainerControl values it sees."""

    EVENTS = [
        "on_init_end",
        "on_train_begin",
        "on_epoch_begin",
        "on_step_begin",
        "on_substep_end",
        "on_pre_optimizer_step",
        "on_optimizer_step",
        "on_step_end",
        "on_log",
        "on_evaluate",
        "on_prediction_step",
        "on_save",
        "on_epoch_end",
        "on_predict",
        "on_train_end",
    ]

    def __init__(self):
        self.events = []
        for name in self.EVENTS:
            setattr(self, name, self._recorder(name))

    def _recorder(self, name):
        def record(args, state, control, **kwargs):
            snapshot = {
                k: getattr(state, k)
                for k in (
                    "epoch",
                    "global_step",
                    "max_steps",
                    "logging_steps",
                    "eval_steps",
                    "save_steps",
                    "train_batch_size",
                    "num_train_epochs",
                    "total_flos",
                    "best_metric",
                    "best_global_step",
                    "num_input_tokens_seen",
                )
            }
            snapshot["log_len"] = len(state.log_history)
            snapshot["control"] = (
                control.should_log,
                control.should_evaluate,
                control.should_save,
                control.should_epoch_stop,
                control.should_training_stop,
            )
            snapshot["kwargs"] = sorted(kwargs)
            self.events.append((name, snapshot))

        return record


def test_callback_events_and_state_parity(tmp_path):
    recorders = {}

    def kwargs_for(sub):
        recorders[sub] = Recorder()
        return dict(callbacks=[recorders[sub]], compute_metrics=accuracy)

    args = {
        **BASE,
        "gradient_accumulation_steps": 2,
        "eval_strategy": "epoch",
        "logging_steps": 2,
        "metric_for_best_model": "accuracy",
        "save_steps": 3,
    }
    hf = run_trainer(
        transformers.Trainer,
        transformers.TrainingArguments,
        tiny_bert,
        tmp_path / "hf",
        TRAIN,
        EVAL,
        args,
        kwargs_for("hf"),
    )
    lt = run_trainer(
        looptrain.Trainer, looptrain.TrainingArguments, tiny_bert, tmp_path / "lt", TRAIN, EVAL, args, kwargs_for("lt")
    )
    assert_parity(hf, lt)
    hf_events, lt_events = recorders["hf"].events, recorders["lt"].events
    assert [e for e, _ in hf_events] == [e for e, _ in lt_events]
    for i, (a, b) in enumerate(zip(hf_events, lt_events)):
        assert a == b, f"event {i} ({a[0]}) differs:\n  transformers: {a[1]}\n  looptrain:    {b[1]}"
    names = [e for e, _ in lt_events]
    assert names[:3] == ["on_init_end", "on_train_begin", "on_epoch_begin"] and names[-1] == "on_train_end"
    assert "on_substep_end" in names and "on_prediction_step" in names and "on_save" in names


def test_early_stopping_callback_runs_unchanged(tmp_path):
    args = {
        **BASE,
        "num_train_epochs": 6,
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "metric_for_best_model": "loss",
        "load_best_model_at_end": True,
        "learning_rate": 1e-3,
    }
    kwargs = dict(callbacks=[transformers.EarlyStoppingCallback(early_stopping_patience=1)], compute_metrics=accuracy)
    hf, lt = run_both(tmp_path, tiny_bert, TRAIN, EVAL, args=args, trainer_kwargs=kwargs)
    assert_parity(hf, lt)
    assert lt[0].state.best_model_checkpoint is not None


# ------------------------------------------------------------------ a subclass written for Trainer
class ClassWeightedLoss:
    """The usual Trainer recipe for class-weighted cross-entropy; the body is written once for both libraries."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        weights = torch.tensor([1.0, 3.0], device=outputs.logits.device)
        loss = torch.nn.functional.cross_entropy(outputs.logits, labels, weight=weights)
        return (loss, outputs) if return_outputs else loss


class WeightedHF(ClassWeightedLoss, transformers.Trainer):
    pass


class WeightedLT(ClassWeightedLoss, looptrain.Trainer):
    pass


def test_subclass_overriding_compute_loss(tmp_path):
    args = {**BASE, "gradient_accumulation_steps": 2, "eval_strategy": "epoch"}
    hf, lt = run_both(
        tmp_path,
        tiny_bert,
        TRAIN,
        EVAL,
        args=args,
        trainer_kwargs=dict(compute_metrics=accuracy),
        hf_trainer_cls=WeightedHF,
        lt_trainer_cls=WeightedLT,
    )
    assert_parity(hf, lt)


def test_train_twice_and_evaluate_before_training(tmp_path):
    """evaluate() before train() prepares the model (and adds model_preparation_time); train() may run twice."""
    results = []
    for trainer_cls, args_cls, sub in (
        (transformers.Trainer, transformers.TrainingArguments, "hf"),
        (looptrain.Trainer, looptrain.TrainingArguments, "lt"),
    ):
        args = make_args(
            args_cls, tmp_path / sub, logging_steps=1, num_train_epochs=1, eval_strategy="epoch", save_strategy="no"
        )
        trainer = trainer_cls(
            model=tiny_bert(), args=args, train_dataset=TRAIN, eval_dataset=EVAL, compute_metrics=accuracy
        )
        trainer.evaluate()
        trainer.train()
        trainer.train()
        results.append((trainer, None))
    assert_parity(*results)
