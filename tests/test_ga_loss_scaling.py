"""transformers#47688: Trainer 5.24 does not divide the loss by gradient accumulation for models whose
`forward` takes **kwargs but ignores `num_items_in_batch` (BertForSequenceClassification is one).

looptrain reproduces that by default (parity), warns once, and honours Trainer's `loss_is_scaled_for_ga`
override. With the override, GA=2 x batch 4 equals GA=1 x batch 8 up to float rounding; without it, it
does not. Dropout is off and the optimizer is plain SGD, so the comparison isolates the loss scale (Adam
would hide a constant gradient factor) and clipping is off so it cannot mask it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import looptrain
from helpers import (
    assert_parity,
    make_args,
    params_of,
    random_token_dataset,
    run_both,
    run_trainer,
    strip_timing,
    tiny_bert,
)

TRAIN = random_token_dataset(32, 3)


def no_dropout_bert():
    return tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


SGD = dict(optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.5}))


def _args(bs, ga):
    return dict(
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga,
        num_train_epochs=2,
        logging_steps=1,
        max_grad_norm=0.0,
        save_strategy="no",
    )


class CorrectlyScaled(looptrain.Trainer):
    loss_is_scaled_for_ga = False  # "my loss is a per-batch mean: divide it by the window size"


class CorrectlyScaledHF(transformers.Trainer):
    loss_is_scaled_for_ga = False


def _losses(trainer):
    return [e["loss"] for e in strip_timing(trainer.state.log_history) if "loss" in e]


def test_default_reproduces_trainer_bug_and_override_fixes_it(tmp_path):
    big_batch, _ = run_trainer(
        looptrain.Trainer,
        looptrain.TrainingArguments,
        no_dropout_bert,
        tmp_path / "b8",
        TRAIN,
        args=_args(8, 1),
        trainer_kwargs=SGD,
    )
    fixed, _ = run_trainer(
        CorrectlyScaled,
        looptrain.TrainingArguments,
        no_dropout_bert,
        tmp_path / "fixed",
        TRAIN,
        args=_args(4, 2),
        trainer_kwargs=SGD,
    )
    hf_default, lt_default = run_both(tmp_path, no_dropout_bert, TRAIN, args=_args(4, 2), trainer_kwargs=SGD)
    assert_parity(hf_default, lt_default)  # the default is Trainer's behaviour, bug included

    reference, with_override, default = _losses(big_batch), _losses(fixed), _losses(lt_default[0])
    assert len(reference) == len(with_override) == len(default) == 8
    # With the override: the same losses and weights as one big batch, up to float rounding
    # (mean of 8 vs mean of two means of 4). 1e-6 is the tightest bound that holds here.
    assert max(abs(a - b) for a, b in zip(reference, with_override)) < 1e-6
    diffs = [(params_of(big_batch.model)[n] - p).abs().max().item() for n, p in params_of(fixed.model).items()]
    assert max(diffs) < 1e-6
    # Trainer's default: the first step (same weights everywhere) logs the sum of the two batch means,
    # exactly twice the correctly scaled value; the gradients are twice as large, so SGD's weights diverge.
    assert default[0] == 2 * with_override[0]
    assert abs(default[0] - 2 * reference[0]) < 2e-6
    diffs = [(params_of(big_batch.model)[n] - p).abs().max().item() for n, p in params_of(lt_default[0].model).items()]
    assert max(diffs) > 1e-3


def test_override_matches_trainer_with_the_same_override(tmp_path):
    hf, lt = run_both(
        tmp_path,
        no_dropout_bert,
        TRAIN,
        args=_args(4, 2),
        trainer_kwargs=SGD,
        hf_trainer_cls=CorrectlyScaledHF,
        lt_trainer_cls=CorrectlyScaled,
    )
    assert_parity(hf, lt)


def _warnings_for(tmp_path, model_fn, ga, cls=looptrain.Trainer):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_trainer(
            cls,
            looptrain.TrainingArguments,
            model_fn,
            tmp_path,
            TRAIN.select(range(8)),
            args=dict(gradient_accumulation_steps=ga, per_device_train_batch_size=4, max_steps=1, save_strategy="no"),
        )
    return [w for w in caught if "47688" in str(w.message)]


def test_warns_once_for_a_model_in_the_hazard(tmp_path):
    caught = _warnings_for(tmp_path / "a", no_dropout_bert, ga=2)
    assert len(caught) == 1 and "loss_is_scaled_for_ga" in str(caught[0].message)


@pytest.mark.parametrize("ga,cls", [(1, looptrain.Trainer), (2, CorrectlyScaled)], ids=["ga1", "override_set"])
def test_no_warning_when_not_in_the_hazard(tmp_path, ga, cls):
    assert _warnings_for(tmp_path / "b", no_dropout_bert, ga=ga, cls=cls) == []


def test_multi_process_loss_scaling_warns_like_accumulation(tmp_path, monkeypatch):
    """The same hazard on several processes: a **kwargs model that ignores num_items_in_batch has its loss multiplied
    by the number of processes (Trainer's behaviour, kept); train() says so once, naming the fix."""
    import warnings

    args = make_args(looptrain.TrainingArguments, tmp_path, max_steps=1, save_strategy="no")
    trainer = looptrain.Trainer(tiny_bert(), args, train_dataset=random_token_dataset(8, 0))
    monkeypatch.setattr(type(args), "world_size", property(lambda self: 2))  # what `accelerate launch` would report
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer._warn_if_loss_not_scaled_for_ga()
        trainer._warn_if_loss_not_scaled_for_ga()  # once only
    ours = [str(w.message) for w in caught if "num_items_in_batch" in str(w.message)]
    assert (
        len(ours) == 1
        and "multiplied by the 2 processes" in ours[0]
        and "average_tokens_across_devices=False" in ours[0]
    )
    assert "gradient_accumulation_steps" not in ours[0]  # GA is 1 here


class OwnLabels(looptrain.Trainer):
    """sentence-transformers' shape: batches carry their targets under another key than `labels`, so there is no label
    count (`num_items_in_batch` is None) and Trainer divides the loss by the window size itself."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        target = inputs.pop("target")
        logits = model(**inputs).logits
        return torch.nn.functional.cross_entropy(logits, target)


def _own_labels_collator(rows):
    return {
        "input_ids": torch.tensor([r["input_ids"] for r in rows]),
        "attention_mask": torch.tensor([r["attention_mask"] for r in rows]),
        "target": torch.tensor([r["label"] for r in rows]),
    }


def test_no_warning_when_the_batches_have_no_label_count(tmp_path):
    """The hazard model (BERT takes **kwargs, ignores num_items_in_batch) with GA=2, but batches without `labels`:
    the loss is divided, so looptrain does not warn (it did, deciding from the model's signature alone)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = run_trainer(
            OwnLabels,
            looptrain.TrainingArguments,
            no_dropout_bert,
            tmp_path,
            TRAIN.select(range(8)),
            args=dict(
                gradient_accumulation_steps=2,
                per_device_train_batch_size=4,
                max_steps=1,
                save_strategy="no",
                remove_unused_columns=False,
            ),
            trainer_kwargs=dict(data_collator=_own_labels_collator),
        )
    assert trainer.model_accepts_loss_kwargs and trainer.state.global_step == 1
    assert [w for w in caught if "47688" in str(w.message)] == []
