"""The fast paths (`looptrain/fastpath.py`): with the savings on and off, looptrain produces exactly what
`transformers.Trainer` produces (every non-timing log value, every weight), the savings are really taken when
on and never when off, and they step aside for whatever they cannot see through (a module switched to eval
mode, a custom `train()`, a patched accelerator, a callback listening, fp16's scaler, LOMO)."""

from __future__ import annotations

import ast
import contextlib
import inspect
import sys
import textwrap

import pytest
import torch
import transformers
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from torch import nn

import looptrain
from helpers import accuracy, assert_parity, random_token_dataset, run_both, run_trainer, tiny_bert
from looptrain import fastpath

TRAIN, EVAL = random_token_dataset(40, 1), random_token_dataset(12, 2)
BASE = dict(per_device_train_batch_size=8, per_device_eval_batch_size=8, num_train_epochs=2, logging_steps=1, seed=42)
# A few of test_parity.py's cases (which run with the savings on, the default), each run both ways here.
CASES = {
    "ga2_eval_epoch": dict(gradient_accumulation_steps=2, eval_strategy="epoch"),
    "no_clipping_norm_still_logged": dict(max_grad_norm=0.0),
    "unfused_adamw_clipping_decay": dict(optim="adamw_torch", weight_decay=0.1, max_grad_norm=0.05),
    "eval_steps_on_start_save": dict(
        eval_strategy="steps", eval_steps=2, eval_on_start=True, save_strategy="steps", save_steps=3
    ),
    "label_smoothing_ga3_tokens_seen": dict(
        label_smoothing_factor=0.1, gradient_accumulation_steps=3, include_num_input_tokens_seen=True
    ),
}


class Plain(looptrain.Trainer):
    fast_paths = False


# The plain calls each saving stands in for, counted with a profile hook (patching them would, rightly,
# switch the fast paths off: they step aside for a patched accelerator).
PLAIN_CALLS = {
    "backward": Accelerator.backward.__code__,
    "clip": Accelerator.clip_grad_norm_.__code__,
    "optimizer_step": AcceleratedOptimizer.step.__code__,
    "train": nn.Module.train.__code__,
    "base_callback": transformers.TrainerCallback.on_pre_optimizer_step.__code__,
}


@contextlib.contextmanager
def counting_plain_calls():
    counts = dict.fromkeys(PLAIN_CALLS, 0)
    by_code = {code: name for name, code in PLAIN_CALLS.items()}

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in by_code:
            name = by_code[frame.f_code]
            if name != "train" or frame.f_locals.get("mode") is True:  # train(True); evaluation calls train(False)
                counts[name] += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield counts
    finally:
        sys.setprofile(previous)


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_the_savings_on_and_off(tmp_path, case):
    args = {**BASE, **CASES[case]}
    kwargs = dict(compute_metrics=accuracy)
    hf, fast = run_both(tmp_path / "fast", tiny_bert, TRAIN, EVAL, args=args, trainer_kwargs=kwargs)
    assert fast[0].fast_paths
    assert_parity(hf, fast)
    plain = run_trainer(Plain, looptrain.TrainingArguments, tiny_bert, tmp_path / "plain", TRAIN, EVAL, args, kwargs)
    assert_parity(hf, plain)


def test_savings_are_taken_when_on_and_not_when_off(tmp_path):
    args = dict(
        BASE, gradient_accumulation_steps=2, eval_strategy="epoch"
    )  # 5 micro-batches, 3 optimizer steps an epoch
    counts = {}
    for name, cls in (("fast", looptrain.Trainer), ("plain", Plain)):
        with counting_plain_calls() as counts[name]:
            run_trainer(
                cls,
                looptrain.TrainingArguments,
                tiny_bert,
                tmp_path / name,
                TRAIN,
                EVAL,
                args,
                dict(compute_metrics=accuracy),
            )
    fast, plain = counts["fast"], counts["plain"]
    assert plain["backward"] == 10 and plain["clip"] == 6 and plain["optimizer_step"] == 6
    assert plain["base_callback"] > 0 and plain["train"] == 10 * 51  # the tree of 51 modules, per micro-batch
    assert fast["backward"] == fast["clip"] == fast["optimizer_step"] == fast["base_callback"] == 0
    # model.train() only where the mode changed: after the first epoch's evaluation (the model starts in training mode)
    assert fast["train"] == 51


class EvalModeCallback(transformers.TrainerCallback):
    """Puts the model in eval mode after every optimizer step (dropout off): Trainer's model.train() before the
    next micro-batch turns it back on, so the saving must not skip it."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model.eval()


class CountingDropout(nn.Dropout):
    calls = 0

    def train(self, mode=True):
        CountingDropout.calls += 1
        return super().train(mode)


def bert_with_custom_train():
    model = tiny_bert()
    model.bert.embeddings.dropout = CountingDropout(model.config.hidden_dropout_prob)
    return model


def test_mode_switched_by_a_callback_and_a_custom_train_are_honoured(tmp_path):
    args = dict(BASE, gradient_accumulation_steps=2, logging_steps=2)
    hf, lt = run_both(tmp_path, tiny_bert, TRAIN, args=args, trainer_kwargs=dict(callbacks=[EvalModeCallback()]))
    assert_parity(hf, lt)
    CountingDropout.calls = 0
    hf, lt = run_both(tmp_path / "custom", bert_with_custom_train, TRAIN, args=args)
    assert_parity(hf, lt)
    assert (
        CountingDropout.calls == 2 * 10
    )  # once per micro-batch in each library: a train() of its own is never skipped


def test_a_patched_accelerator_or_optimizer_is_called(tmp_path):
    calls = []

    class Patched(looptrain.Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            acc = self.accelerator
            for name in ("backward", "clip_grad_norm_"):
                method = getattr(acc, name)
                setattr(acc, name, lambda *a, _m=method, _n=name, **k: (calls.append(_n), _m(*a, **k))[1])

        def create_scheduler(self, num_training_steps, optimizer=None):
            scheduler = super().create_scheduler(num_training_steps, optimizer)
            step = self.optimizer.step  # (the schedule's wrapper)
            self.optimizer.step = lambda *a, **k: (calls.append("step"), step(*a, **k))[1]
            return scheduler

    hf, lt = run_both(tmp_path, tiny_bert, TRAIN, args=dict(BASE, num_train_epochs=1), lt_trainer_cls=Patched)
    assert_parity(hf, lt)
    assert calls.count("backward") == 5 and calls.count("clip_grad_norm_") == 5 and calls.count("step") == 5


def test_the_skipped_callback_methods_are_empty():
    """A callback is skipped only where its method is TrainerCallback's own: check that those do nothing."""
    for name, fn in fastpath._BASE_EVENTS.items():
        body = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0].body
        assert all(
            isinstance(node, (ast.Expr, ast.Pass))
            and (isinstance(node, ast.Pass) or isinstance(node.value, ast.Constant))
            for node in body
        ), name


def test_the_handler_calls_every_listening_callback(tmp_path):
    seen = []

    class Listening(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen.append("class")

    on_instance = transformers.TrainerCallback()
    on_instance.on_optimizer_step = lambda args, state, control, **kwargs: seen.append("instance")
    run_trainer(
        looptrain.Trainer,
        looptrain.TrainingArguments,
        tiny_bert,
        tmp_path,
        TRAIN,
        args=dict(BASE, num_train_epochs=1),
        trainer_kwargs=dict(callbacks=[Listening(), on_instance]),
    )
    assert seen.count("class") == 5 and seen.count("instance") == 5


def test_the_environment_switch():
    assert looptrain.Trainer.fast_paths is fastpath.DEFAULT
    for value, expected in (("1", False), ("yes", False), ("0", True), ("", True), (None, True)):
        assert fastpath.default_from({} if value is None else {"LOOPTRAIN_PLAIN": value}) is expected


def test_schedule_free_optimizer_trains_its_mode_both_ways(tmp_path):
    pytest.importorskip("schedulefree")
    args = dict(
        BASE,
        num_train_epochs=1,
        optim="schedule_free_adamw",
        eval_strategy="epoch",
        optim_args="weight_lr_power=1.5,r=0.5",
    )
    hf, lt = run_both(tmp_path, tiny_bert, TRAIN, EVAL, args=args, trainer_kwargs=dict(compute_metrics=accuracy))
    assert_parity(hf, lt)
    plain = run_trainer(
        Plain,
        looptrain.TrainingArguments,
        tiny_bert,
        tmp_path / "plain",
        TRAIN,
        EVAL,
        args,
        dict(compute_metrics=accuracy),
    )
    assert_parity(hf, plain)


def test_a_dtensor_gradient_gets_accelerates_clipping(monkeypatch, tmp_path):
    """Under tensor parallelism gradients are DTensors, which accelerate clips mesh by mesh: any DTensor gradient
    sends the fast path to accelerate's call (a stand-in class here makes every gradient count as one)."""
    trainer, _ = run_trainer(
        looptrain.Trainer, looptrain.TrainingArguments, tiny_bert, tmp_path, TRAIN, args=dict(BASE, max_steps=1)
    )
    for p in trainer.model.parameters():
        p.grad = torch.ones_like(p)
    for stand_in, expected in ((None, 0), (torch.Tensor, 1)):
        if stand_in is not None:
            monkeypatch.setattr(fastpath, "_dtensor_class", lambda cls=stand_in: cls)
        with counting_plain_calls() as counts:
            norm = fastpath.clip_grad_norm(trainer, trainer.model, float("inf"))
        assert counts["clip"] == expected
        assert norm == torch.nn.utils.get_total_norm([p.grad for p in trainer.model.parameters()])
