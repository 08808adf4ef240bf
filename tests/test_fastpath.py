"""The fast paths (`looptrain/fastpath.py`): with the savings on and off, looptrain produces exactly what
`transformers.Trainer` produces (every non-timing log value, every weight), the savings are really taken when
on and never when off, and they step aside for whatever they cannot see through (a module switched to eval
mode, a custom `train()`, a patched accelerator, a callback listening, fp16's scaler, LOMO)."""

from __future__ import annotations

import ast
import contextlib
import inspect
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from torch import nn

import helpers
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
    "zero_grad": nn.Module.zero_grad.__code__,
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
    assert plain["zero_grad"] == 1 + 6 and fast["zero_grad"] == 1  # once before the first step, then per step
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


# ------------------------------------------------------------------------------------------- the parameter walk
class Block(nn.Module):
    def __init__(self, shared=None):
        super().__init__()
        self.inner = shared if shared is not None else nn.Linear(3, 3)
        self.other = nn.Linear(3, 2)
        self.nothing = None  # a None child, skipped by torch
        self.register_parameter("absent", None)  # a None parameter, skipped by torch


def tricky_tree():
    """Shared submodules met at different depths, a tied weight, None children and parameters."""
    shared = nn.Linear(3, 3)
    first, second = Block(shared), Block()
    root = nn.Sequential(nn.ModuleList([first, nn.Sequential(shared, second)]), second, Block(shared))
    root[2].other.weight = first.other.weight  # tied: one parameter, two places
    return root


@pytest.mark.parametrize("build", [tricky_tree, tiny_bert, lambda: helpers.tiny_gpt2()], ids=["tricky", "bert", "gpt2"])
def test_the_parameter_walk_is_torchs(build):
    """`_parameters` lists what `model.parameters()` yields: the same objects, in the same order (the gradient norm's
    summation follows it), each once."""
    model = build()
    assert fastpath._parameters(model) == list(model.parameters())
    assert all(a is b for a, b in zip(fastpath._parameters(model), model.parameters()))


def test_a_tree_with_a_walk_of_its_own_gets_torchs():
    class OwnWalk(nn.Linear):
        def parameters(self, recurse=True):
            return iter([self.weight])

    class OwnHash(nn.Parameter):
        def __hash__(self):
            return 0

    model = nn.Sequential(nn.Linear(2, 2), OwnWalk(2, 2))
    assert fastpath._parameters(model) is None
    odd = nn.Linear(2, 2)
    odd.weight = OwnHash(torch.ones(2, 2))
    assert fastpath._parameters(nn.Sequential(odd)) is None


def test_zero_grad_clears_every_gradient_like_torchs(tmp_path):
    trainer, _ = run_trainer(
        looptrain.Trainer, looptrain.TrainingArguments, tiny_bert, tmp_path, TRAIN, args=dict(BASE, max_steps=1)
    )
    model = tricky_tree()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with counting_plain_calls() as counts:
        fastpath.zero_grad(trainer, model)
    assert counts["zero_grad"] == 0 and all(p.grad is None for p in model.parameters())

    class OwnZeroGrad(nn.Sequential):
        def zero_grad(self, set_to_none=True):
            super().zero_grad(set_to_none)

    trainer.fast_paths = False
    for model in (tricky_tree(), OwnZeroGrad(nn.Linear(2, 2))):
        with counting_plain_calls() as counts:
            fastpath.zero_grad(trainer, model)
        assert counts["zero_grad"] == 1
        trainer.fast_paths = True


# --------------------------------------------------------------------------------------- loss bookkeeping
def test_label_count_and_rescale_are_trainers_values(tmp_path):
    trainer, _ = run_trainer(
        looptrain.Trainer, looptrain.TrainingArguments, tiny_bert, tmp_path, TRAIN, args=dict(BASE, max_steps=1)
    )
    labels = [torch.tensor([[1, -100, 3]]), torch.tensor([[-100, -100, 2]]), torch.tensor([[4, 5, 6]])]
    plain = sum(label.ne(-100).sum() for label in labels)
    for fast_paths in (True, False):
        trainer.fast_paths = fast_paths
        for window in (labels[:1], labels):
            counted = fastpath.label_count(trainer, window)
            expected = sum(label.ne(-100).sum() for label in window)
            assert counted.dtype == expected.dtype and counted.item() == expected.item()
    assert plain.item() == 6
    loss = torch.tensor(0.37, requires_grad=True) * 1.5
    trainer.fast_paths = True
    assert fastpath.rescale_loss(trainer, loss, 1) is loss  # x * 1 is x: left out
    doubled = fastpath.rescale_loss(trainer, loss.detach().clone(), 2)
    assert doubled.item() == pytest.approx(2 * loss.item())
    trainer.fast_paths = False
    kept = loss.detach().clone()
    assert fastpath.rescale_loss(trainer, kept, 1) is kept and kept.item() == loss.item()


# ---------------------------------------------------------------------------------------- divergence guard
@pytest.mark.parametrize("bad_step", [None, 1, 7, 300, 513])
def test_the_divergence_guard_names_the_first_bad_step(bad_step):
    """`observe` only keeps the norms; folding them (every FOLD_EVERY steps and at `check`) finds the first
    non-finite one, across folds, a gap in the steps and norms that came as Python floats."""
    guard = looptrain.checks.DivergenceGuard("cpu")
    steps = list(range(1, 400)) + list(range(410, 600))  # a gap: the fold before it must not shift the steps
    for step in steps:
        value = float("nan") if step == bad_step or (bad_step and step == bad_step + 3) else 1.0
        guard.observe(torch.tensor(value), step)
    if bad_step is None:
        guard.check(lambda: None)
        return
    expected = bad_step if bad_step in steps else min(s for s in steps if s > bad_step)
    with pytest.raises(looptrain.checks.TrainingDiverged, match=rf"optimizer step {expected}\b"):
        guard.check(lambda: None)


def test_the_divergence_guard_reads_float_norms_on_the_host():
    guard = looptrain.checks.DivergenceGuard("cpu")
    for step in range(1, 6):
        guard.observe(float("inf") if step >= 4 else 0.5, step)
    with pytest.raises(looptrain.checks.TrainingDiverged, match=r"optimizer step 4\b"):
        guard.check(lambda: None)


# ------------------------------------------------------------------------------------------- the NaN/inf filter
POISONED = []  # one entry per NaN step loss made by loss_with_nan_on_some_batches


def loss_with_nan_on_some_batches(outputs, labels, num_items_in_batch=None):
    """The model's cross-entropy plus a constant that is NaN on some batches (those whose first two labels are 1, 0):
    those step losses are NaN while the gradients stay finite, so the run goes on and the filter is exercised."""
    loss = nn.functional.cross_entropy(outputs["logits"], labels)
    poisoned = bool(labels[0] == 1 and labels[1] == 0)
    POISONED.extend([1] if poisoned else [])
    return loss + torch.tensor(float("nan") if poisoned else 0.0)


@pytest.mark.parametrize("logging_steps", [1, 3])
def test_nan_step_losses_are_filtered_like_trainer_both_ways(tmp_path, logging_steps):
    """Trainer replaces a NaN step loss by the running mean; looptrain defers that check to the next log or save
    (fast) or makes it on the device every micro-batch (plain): logs, weights and the saved running loss agree."""
    args = dict(BASE, gradient_accumulation_steps=2, logging_steps=logging_steps, save_strategy="steps", save_steps=2)
    kwargs = dict(compute_loss_func=loss_with_nan_on_some_batches)
    POISONED.clear()
    hf, fast = run_both(tmp_path / "fast", tiny_bert, TRAIN, args=args, trainer_kwargs=kwargs)
    assert POISONED, "no step loss was NaN: the test proves nothing"
    assert fast[0]._loop.defer_nan_filter and not fast[0]._loop.unchecked
    assert_parity(hf, fast)
    plain = run_trainer(Plain, looptrain.TrainingArguments, tiny_bert, tmp_path / "plain", TRAIN, None, args, kwargs)
    assert not plain[0]._loop.defer_nan_filter
    assert_parity(hf, plain)
    for step in (2, 4):
        fast_state = tmp_path / "fast" / "lt" / f"checkpoint-{step}" / "looptrain_state.json"
        plain_state = tmp_path / "plain" / f"checkpoint-{step}" / "looptrain_state.json"
        assert fast_state.read_text() == plain_state.read_text()


def test_the_filter_check_is_deferred_only_for_looptrains_own_methods(tmp_path):
    class OwnStep(looptrain.Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            return super().training_step(model, inputs, num_items_in_batch)

    class OwnLog(looptrain.Trainer):
        def _maybe_log_save_evaluate(self, *args, **kwargs):
            return super()._maybe_log_save_evaluate(*args, **kwargs)

    for cls, deferred in (
        (looptrain.Trainer, True),
        (looptrain.Seq2SeqTrainer, True),
        (OwnStep, False),
        (OwnLog, False),
    ):
        args_cls = (
            looptrain.Seq2SeqTrainingArguments if cls is looptrain.Seq2SeqTrainer else looptrain.TrainingArguments
        )
        trainer, _ = run_trainer(cls, args_cls, tiny_bert, tmp_path / cls.__name__, TRAIN, args=dict(BASE, max_steps=2))
        assert trainer._loop.defer_nan_filter is deferred, cls


def test_a_long_unchecked_run_is_settled_on_the_device(monkeypatch):
    """Without a log the kept losses are bounded: past UNCHECKED_LIMIT they are folded into the plain sum with
    device operations only; the sum equals the plain one bit for bit, NaN steps included."""
    monkeypatch.setattr(fastpath, "UNCHECKED_LIMIT", 4)
    from looptrain.checkpoint import LoopState

    losses = [torch.tensor(v) for v in (0.5, 0.25, float("nan"), 1.5, float("inf"), 0.75, 2.0, float("nan"), 0.1)]
    sums = []
    for defer in (True, False):
        loop = LoopState(tr_loss=torch.tensor(0.0), defer_nan_filter=defer)
        for i, loss in enumerate(losses):
            fastpath.add_step_loss(None, loop, loss, 1 + i // 2)
            assert len(loop.unchecked) < 4
        fastpath.settle_loss(loop)
        sums.append(loop.tr_loss.item())
    assert sums[0] == sums[1] and math.isfinite(sums[0])


def test_a_subclass_reading_tr_loss_gets_the_filtered_sum_without_a_sync(tmp_path):
    """Trainer's `_tr_loss` attribute, read by a subclass between logs, is the plain filtered sum: the deferred
    check is done on the device first (no host sync), and setting it replaces the sum."""
    from looptrain.checkpoint import LoopState

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import host_syncs
    finally:
        sys.path.pop(0)

    trainer, _ = run_trainer(
        looptrain.Trainer, looptrain.TrainingArguments, tiny_bert, tmp_path, TRAIN, args=dict(BASE, max_steps=1)
    )
    losses = [torch.tensor(v) for v in (0.5, float("nan"), 1.5)]
    sums = []
    for defer in (True, False):
        trainer._loop = LoopState(tr_loss=torch.tensor(0.0), defer_nan_filter=defer)
        for loss in losses:
            fastpath.add_step_loss(trainer, trainer._loop, loss, 2)
        with host_syncs.counting() as counter:
            sums.append(trainer._tr_loss.clone())
        assert counter.events == [] and not trainer._loop.unchecked
    assert torch.equal(sums[0], sums[1]) and math.isfinite(sums[0].item())
    trainer._tr_loss = torch.tensor(7.0)
    assert trainer._loop.tr_loss.item() == 7.0
