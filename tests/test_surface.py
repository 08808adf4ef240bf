"""The whole public surface of transformers.Trainer 5.24, enumerated from transformers itself, so that a new
transformers release shows what to add: every public member exists with Trainer's signature; every method
Trainer calls (public or private) is called by looptrain at the same point with the same arguments, or a
subclass overriding it is refused by name; and the calls both trainers make during a run are the same.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch
import transformers

import looptrain
from helpers import accuracy, random_token_dataset, tiny_bert
from looptrain.trainer import NOT_CALLED

HF = transformers.Trainer
LT = looptrain.Trainer

PUBLIC = sorted(n for n in dir(HF) if not n.startswith("_"))
# Every function Trainer defines, public and private (the hooks a subclass may override).
METHODS = sorted(n for n, v in vars(HF).items() if inspect.isfunction(v) or isinstance(v, staticmethod))


def test_the_lists_come_from_transformers():
    assert len(PUBLIC) == 48 and len(METHODS) >= 95  # transformers 5.24; a new release changes these


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_member_exists_with_trainers_signature(name):
    assert hasattr(LT, name), f"looptrain.Trainer has no {name}"
    theirs, ours = getattr(HF, name), getattr(LT, name)
    if callable(theirs):
        assert_same_signature(name, ours, theirs)
    else:
        assert ours == theirs


@pytest.mark.parametrize("name", [m for m in METHODS if m not in PUBLIC])
def test_every_private_method_is_honoured_or_refused(name):
    """Implemented with Trainer's signature, or listed in NOT_CALLED (then overriding it is refused, below)."""
    if name in NOT_CALLED:
        return
    assert hasattr(LT, name), f"looptrain.Trainer has no {name}: implement it or add it to NOT_CALLED with a reason"
    assert_same_signature(name, getattr(LT, name), getattr(HF, name))


@pytest.mark.parametrize("name", sorted(NOT_CALLED))
def test_overriding_a_method_looptrain_never_calls_is_refused(tmp_path, name):
    assert name in METHODS, f"NOT_CALLED lists {name}, which transformers.Trainer does not have"
    subclass = type("MySubclass", (LT,), {name: lambda self, *a, **k: None})
    args = looptrain.TrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    with pytest.raises(TypeError, match=f"MySubclass overrides .*{name}"):
        subclass(tiny_bert(), args)


def test_overriding_create_optimizer_and_scheduler_warns_with_the_methods_to_override(tmp_path):
    """Neither Trainer's loop nor looptrain's calls create_optimizer_and_scheduler: an override would be silently
    ignored, so constructing the subclass says which methods run instead."""
    subclass = type("MyTrainer", (LT,), {"create_optimizer_and_scheduler": lambda self, num_training_steps: None})
    args = looptrain.TrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    with pytest.warns(
        UserWarning,
        match="MyTrainer overrides create_optimizer_and_scheduler.*override create_optimizer and create_scheduler",
    ):
        subclass(tiny_bert(), args)
    assert "create_optimizer_and_scheduler" not in {name for name, *_ in _calls_of_a_short_run(LT, tmp_path)}


def test_errors_advise_overriding_methods_that_run(tmp_path):
    """The refusal of optimizers= with model_init names create_optimizer, which train() calls."""
    args = looptrain.TrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    optimizer = torch.optim.SGD(tiny_bert().parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="override create_optimizer") as err:
        LT(args=args, model_init=lambda: tiny_bert(), optimizers=(optimizer, None))
    assert "create_optimizer_and_scheduler" not in str(err.value)


def _calls_of_a_short_run(cls, tmp_path):
    log = []
    args = looptrain.TrainingArguments(
        output_dir=str(tmp_path / "short"),
        use_cpu=True,
        max_steps=1,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
    )
    recording(cls, log, str(tmp_path))(tiny_bert(), args, train_dataset=random_token_dataset(8, 0)).train()
    return log


def assert_same_signature(name, ours, theirs):
    ours, theirs = inspect.signature(ours), inspect.signature(theirs)
    assert list(ours.parameters)[: len(theirs.parameters)] == list(theirs.parameters), name
    for p in theirs.parameters.values():
        assert ours.parameters[p.name].default == p.default, f"{name}({p.name}=...)"
        assert ours.parameters[p.name].kind == p.kind, f"{name}({p.name}) kind"
    extra = list(ours.parameters)[len(theirs.parameters) :]
    assert all(ours.parameters[e].kind == inspect.Parameter.KEYWORD_ONLY for e in extra), f"{name}: extra {extra}"


# ------------------------------------------------------------------------------------------- the calls made
# Both trainers are subclassed with a recorder on every method Trainer defines (except those looptrain refuses),
# then run the same script: train with evaluation, logging, saving, the best model at the end; evaluate,
# predict, save; then a fresh trainer resumes from a mid-epoch checkpoint. Each call is recorded with a summary
# of its arguments; the two sequences must be equal.
RECORDED = [m for m in METHODS if m not in NOT_CALLED and m != "__init__"]


def summarize(value, root):
    if value is None or isinstance(value, (bool, int, str)):
        if isinstance(value, str) and root in value:
            # looptrain writes a checkpoint under `.tmp-checkpoint-N` and renames it when complete (README)
            return os.path.relpath(value, root).replace(".tmp-checkpoint-", "checkpoint-")
        return value
    if isinstance(value, float):
        return "float"  # times, losses: their values are compared by the parity tests
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype))
    if isinstance(value, torch.nn.Module):
        return type(value).__name__
    if isinstance(value, dict):
        return ("dict", tuple(sorted(value)))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(summarize(v, root) for v in value))
    return type(value).__name__


def recording(cls, log, root):
    def make(name):
        def method(self, *args, **kwargs):
            log.append((name, summarize(args, root), summarize(kwargs, root)))
            return getattr(super(subclass, self), name)(*args, **kwargs)

        method.__name__ = name
        method.__signature__ = inspect.signature(getattr(cls, name))
        return method

    subclass = type(f"Recording{cls.__name__}", (cls,), {name: make(name) for name in RECORDED})
    return subclass


def run_script(cls, args_cls, root):
    log = []
    Recording = recording(cls, log, root)
    common = dict(
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
        seed=7,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        save_total_limit=2,
        load_best_model_at_end=True,
        learning_rate=1e-3,
    )
    train, evals = random_token_dataset(24, 0), random_token_dataset(8, 1)
    first = Recording(
        tiny_bert(),
        args_cls(output_dir=os.path.join(root, "run"), **common),
        train_dataset=train,
        eval_dataset=evals,
        compute_metrics=accuracy,
    )
    first.train()
    first.evaluate()
    first.predict(random_token_dataset(6, 2))
    first.save_model()
    log.append(("--- resume ---",))
    resumed = Recording(
        tiny_bert(),
        args_cls(output_dir=os.path.join(root, "resumed"), **{**common, "save_total_limit": None}),
        train_dataset=train,
        eval_dataset=evals,
        compute_metrics=accuracy,
    )
    resumed.train(resume_from_checkpoint=os.path.join(root, "run", "checkpoint-4"))  # mid-epoch (3 steps per epoch)
    return log


def test_both_trainers_make_the_same_calls_with_the_same_arguments(tmp_path):
    hf = run_script(HF, transformers.TrainingArguments, str(tmp_path / "hf"))
    lt = run_script(LT, looptrain.TrainingArguments, str(tmp_path / "lt"))
    for i, (a, b) in enumerate(zip(hf, lt)):
        if a != b:
            context = "\n".join(f"  {x}  |  {y}" for x, y in zip(hf[max(0, i - 5) : i + 3], lt[max(0, i - 5) : i + 3]))
            pytest.fail(
                f"call {i} differs: transformers {a} vs looptrain {b}\ncontext (transformers | looptrain):\n{context}"
            )
    assert len(hf) == len(lt)
    called = {entry[0] for entry in hf}
    assert {
        "_save",
        "_get_train_sampler",
        "_remove_unused_columns",
        "_prepare_inputs",
        "_load_from_checkpoint",
        "_maybe_log_save_evaluate",
        "_save_checkpoint",
        "_load_best_model",
        "training_step",
        "compute_loss",
        "prediction_step",
        "evaluation_loop",
        "create_optimizer",
        "get_decay_parameter_names",
    } <= called
