"""Every `optim` value of transformers 5.24 (`OptimizerNames`, 41 of them), trained by `transformers.Trainer` and by
`looptrain.Trainer` in this test run.

`test_optim[NAME]` has one of four outcomes for each value:
- parity: both trainers train the same tiny BERT (gradient accumulation 2, weight decay, warm-up, an evaluation per
  epoch, `optim_args` where the optimizer reads them, `optim_target_modules` for GaLore/APOLLO) and every log value
  and final weight is compared bit for bit;
- skipped: the optimizer's package is not installed (`make test-optimizers` installs them all);
  `test_missing_package_is_named` checks the error that looptrain gives then;
- refused: the optimizer cannot run on this machine (CUDA-only code) or fails inside transformers' own handler:
  Trainer fails too, and looptrain's error says why and what to use instead.
`python tests/test_optimizers.py` prints which outcome each value has here.

The model's two 32x128 feed-forward weights per layer have 4,096 elements, the size from which bitsandbytes and
torchao keep 8-bit / 4-bit optimizer state, so the quantised paths run (checked in `_assert_quantised`).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers.training_args import OptimizerNames

import looptrain
from helpers import assert_parity, random_token_dataset, run_both, run_trainer
from looptrain.optim import NEEDS_CUDA, OPTIONAL_PACKAGES, OptimizerPackageError

NAMES = [o.value for o in OptimizerNames]
TRAIN, EVAL = random_token_dataset(16, 1), random_token_dataset(8, 2)

# 16 examples, batch 4, accumulation 2, 2 epochs: 4 optimizer steps, each logged, and 2 evaluations.
BASE = dict(
    per_device_train_batch_size=4,
    per_device_eval_batch_size=8,
    gradient_accumulation_steps=2,
    num_train_epochs=2,
    eval_strategy="epoch",
    logging_steps=1,
    learning_rate=1e-3,
    weight_decay=0.01,
    warmup_steps=1,
    seed=42,
)
LAYERWISE = dict(gradient_accumulation_steps=1)  # transformers refuses accumulation for layer-wise optimizers
GALORE_ARGS = "rank=4,update_proj_gap=2,scale=0.5,proj_type=std"
APOLLO_ARGS = "rank=4,update_proj_gap=2,scale=1.0,proj=random,scale_type=channel"
ADEMAMIX_ARGS = "beta3=0.999,alpha=4.0,t_alpha=4,t_beta3=4"
SCHEDULE_FREE_ARGS = "weight_lr_power=1.5,r=0.5"
# What each value adds to BASE: the optim_args its handler reads, and the modules GaLore/APOLLO project.
OVERRIDES = {
    "sgd": dict(optim_args="momentum=0.9,nesterov=true,dampening=0.0,weight_decay=0.02"),
    "adagrad": dict(optim_args="lr_decay=0.01,eps=1e-8,weight_decay=0.02"),
    "rmsprop": dict(optim_args="momentum=0.5,alpha=0.9,eps=1e-7,centered=true"),
    "ademamix": dict(optim_args=ADEMAMIX_ARGS),
    "ademamix_8bit": dict(optim_args=ADEMAMIX_ARGS),
    "paged_ademamix_32bit": dict(optim_args="beta1=0.8,beta2=0.99,alpha=3.0,eps=1e-7"),
    "paged_ademamix_8bit": dict(optim_args=ADEMAMIX_ARGS),
    "adamw_torch_8bit": dict(optim_args="bf16_stochastic_round=false"),
    "galore_adamw": dict(optim_target_modules=["attention", "intermediate"], optim_args=GALORE_ARGS),
    "galore_adafactor": dict(optim_target_modules=r".*\.attention\..*", optim_args="rank=4,update_proj_gap=2"),
    "galore_adamw_layerwise": dict(LAYERWISE, optim_target_modules=["intermediate"], optim_args=GALORE_ARGS),
    "galore_adamw_8bit": dict(optim_target_modules=["attention"], optim_args=GALORE_ARGS),
    "galore_adamw_8bit_layerwise": dict(LAYERWISE, optim_target_modules=["attention"], optim_args=GALORE_ARGS),
    "galore_adafactor_layerwise": dict(LAYERWISE, optim_target_modules=["attention"], optim_args=GALORE_ARGS),
    "apollo_adamw": dict(optim_target_modules="all-linear", optim_args=APOLLO_ARGS),
    "apollo_adamw_layerwise": dict(
        LAYERWISE,
        optim_target_modules=["attention", "intermediate"],
        optim_args="rank=4,update_proj_gap=2,scale_type=tensor",
    ),
    "lomo": LAYERWISE,
    "adalomo": LAYERWISE,
    "grokadamw": dict(optim_args="alpha_init=0.9,lamb=1.5,gamma=0.2,grokking_signal_decay_rate=0.2"),
    "schedule_free_adamw": dict(optim_args=SCHEDULE_FREE_ARGS),
    "schedule_free_radam": dict(optim_args=SCHEDULE_FREE_ARGS),
    "schedule_free_sgd": dict(optim_args=SCHEDULE_FREE_ARGS),
    "stable_adamw": dict(optim_args="decouple_lr=1,max_lr=1e-3"),
}
TORCHAO = ("adamw_torch_4bit", "adamw_torch_8bit")
# Values that need hardware this machine never has, whatever is installed.
OTHER_HARDWARE = {"adamw_torch_xla": "a TPU", "adamw_torch_npu_fused": "an Ascend NPU"}
# Values that fail inside transformers 5.24's own handler, on any machine.
FAILS_IN_TRANSFORMERS = {"galore_adafactor_layerwise": "relative_step"}


def tiny_bert():
    """The tests' tiny BERT (2 layers, hidden 32), with 32x128 feed-forward weights."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    return transformers.BertForSequenceClassification(config)


def installed(name: str) -> bool:
    return name not in OPTIONAL_PACKAGES or importlib.util.find_spec(OPTIONAL_PACKAGES[name][0]) is not None


def outcome(name: str) -> str:
    """What `test_optim[name]` does on this machine."""
    if not installed(name):
        module, how = OPTIONAL_PACKAGES[name]
        return f"skipped: needs {module} ({how}), not installed"
    if name in OTHER_HARDWARE:
        return f"skipped: needs {OTHER_HARDWARE[name]}"
    if name in NEEDS_CUDA and not torch.cuda.is_available():
        return "refused: needs CUDA"
    if name in FAILS_IN_TRANSFORMERS:
        return "refused: fails in transformers"
    return "parity"


def args_for(name: str) -> dict:
    return dict(BASE, optim=name, **OVERRIDES.get(name, {}))


def looptrain_trainer(tmp_path, args: dict):
    return looptrain.Trainer(
        model=tiny_bert(),
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        args=looptrain.TrainingArguments(output_dir=str(tmp_path / "lt"), use_cpu=True, report_to="none", **args),
    )


def compile_without_codegen(monkeypatch):
    """torchao compiles its step with torch.compile, once per parameter shape: a minute or more of C++ compilation
    on a cold cache. Here both trainers get it traced by Dynamo but run eagerly (backend "eager"): the loop around
    the step is what these tests compare."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))


def _assert_quantised(trainer):
    """8-bit and 4-bit optimizers keep some state quantised: bitsandbytes as uint8, torchao as a tensor subclass."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    states = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    assert any(t.dtype == torch.uint8 or type(t) is not torch.Tensor for t in states), "no quantised state"


@pytest.mark.parametrize("name", NAMES)
def test_optim(monkeypatch, tmp_path, name):
    status = outcome(name)
    if status.startswith("skipped"):
        pytest.skip(
            f"optim={name!r} {status.split(': ', 1)[1]}"
            + ("; test_missing_package_is_named checks the error" if not installed(name) else "")
        )
    if status.startswith("refused"):
        # Trainer cannot train it either: it fails, when it builds the optimizer or at the first step.
        cause = "Torch not compiled with CUDA enabled" if name in NEEDS_CUDA else FAILS_IN_TRANSFORMERS[name]
        with pytest.raises(Exception, match=cause):
            run_trainer(
                transformers.Trainer,
                transformers.TrainingArguments,
                tiny_bert,
                tmp_path / "hf",
                TRAIN,
                EVAL,
                args_for(name),
            )
        with pytest.raises((RuntimeError, ValueError)) as lt_err:
            looptrain_trainer(tmp_path, args_for(name)).create_optimizer()
        message = str(lt_err.value)
        assert f"optim={name!r}" in message and "transformers.Trainer fails the same way" in message
        assert re.search(r"[Uu]se optim='\w+'", message), message  # names what runs instead
        if name in NEEDS_CUDA:
            assert "needs a CUDA GPU" in message and NEEDS_CUDA[name][0] in message
        return
    if name in TORCHAO:
        compile_without_codegen(monkeypatch)
    hf, lt = run_both(tmp_path, tiny_bert, TRAIN, EVAL, args=args_for(name))
    assert_parity(hf, lt)
    assert lt[0].state.global_step == (8 if name == "lomo" or "layerwise" in name else 4)
    if "8bit" in name or "4bit" in name:
        _assert_quantised(hf[0])
        _assert_quantised(lt[0])


@pytest.mark.parametrize("name", [name for name in NAMES if name in OPTIONAL_PACKAGES])
def test_missing_package_is_named(monkeypatch, tmp_path, name):
    """looptrain's error names the optim, the package and the pip command, and is of the type(s) Trainer raises."""
    module, how = OPTIONAL_PACKAGES[name]
    model = tiny_bert()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **args_for(name))
    really_missing = importlib.util.find_spec(module) is None
    if not really_missing:
        monkeypatch.setitem(sys.modules, module, None)  # imports of it fail, find_spec says it is absent
    with pytest.raises(OptimizerPackageError) as lt_err:
        looptrain.Trainer.get_optimizer_cls_and_kwargs(args, model)
    message = str(lt_err.value)
    assert message.startswith(f"optim={name!r} needs the `{module}` package, which is not installed: ")
    assert how in message and isinstance(lt_err.value, ImportError) and isinstance(lt_err.value, ValueError)
    if really_missing:  # then Trainer's own error can be had: looptrain's is of the same type
        with pytest.raises(Exception) as hf_err:
            transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
        assert isinstance(lt_err.value, type(hf_err.value)), (hf_err.value, lt_err.value)


needs = {
    module: pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed")
    for module in ("bitsandbytes", "galore_torch", "torchao")
}


@needs["galore_torch"]
@pytest.mark.parametrize(
    "change, error",
    [
        (dict(gradient_accumulation_steps=2), "does not support gradient accumulation"),
        (dict(optim_target_modules=None), "You need to define `optim_target_modules`"),
        (dict(optim_target_modules=["no_such_module"]), "No target modules found"),
    ],
)
def test_galore_setup_errors_are_trainers(tmp_path, change, error):
    """transformers' handler refuses these; looptrain calls the same handler, so the error is the same."""
    args = dict(args_for("galore_adamw_layerwise"), **change)
    messages = []
    for lib in (transformers, looptrain):
        trainer = lib.Trainer(
            model=tiny_bert(),
            args=lib.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **args),
            train_dataset=TRAIN,
            eval_dataset=EVAL,
        )
        with pytest.raises(ValueError, match=re.escape(error)) as err:
            trainer.create_optimizer()
        messages.append(str(err.value))
    assert messages[0] == messages[1]


@needs["bitsandbytes"]
@pytest.mark.parametrize("optim_args", ["momentum=0.5", "centered=false"])
def test_bitsandbytes_rmsprop_optim_args_refused_clearly(tmp_path, optim_args):
    """transformers hands bitsandbytes' RMSprop the optim_args strings, which it rejects (TypeError when it compares a
    number, NotImplementedError for any `centered` string): Trainer fails, looptrain says why, with the same type."""
    args = dict(args_for("rmsprop_bnb"), optim_args=optim_args)
    with pytest.raises((TypeError, NotImplementedError)) as hf_err:
        run_both(tmp_path, tiny_bert, TRAIN, EVAL, args=args)
    with pytest.raises(type(hf_err.value), match="transformers passes them to bitsandbytes' RMSprop as strings") as err:
        looptrain_trainer(tmp_path, args).create_optimizer()
    assert "optim='rmsprop'" in str(err.value)


@needs["torchao"]
def test_torchao_block_size_refused_clearly(monkeypatch, tmp_path):
    """transformers passes `block_size` to torchao as a string, which fails at the first step of a model with a
    tensor of 4,096+ elements. looptrain refuses it before training; with smaller tensors both train."""
    args = dict(args_for("adamw_torch_8bit"), optim_args="block_size=128")
    compile_without_codegen(monkeypatch)
    with pytest.raises(TypeError, match="unsupported operand"):
        run_both(tmp_path, tiny_bert, TRAIN, EVAL, args=args)
    with pytest.raises(ValueError, match="cannot take block_size from optim_args"):
        looptrain_trainer(tmp_path, args).create_optimizer()

    def small_bert():  # every tensor under 4,096 elements: torchao never reads block_size
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(
            transformers.BertConfig(
                vocab_size=100,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=64,
            )
        )

    assert_parity(*run_both(tmp_path / "small", small_bert, TRAIN, EVAL, args=args))


def test_unread_optim_args_and_target_modules_are_trained_as_trainer_does_with_a_warning(tmp_path, caplog):
    """Trainer ignores optim_args keys the optimizer's handler does not read, and optim_target_modules for optimizers
    other than GaLore/APOLLO. looptrain trains the same, and says so."""
    args = dict(args_for("sgd"), optim_args="momentum=0.9,betas=0.5", optim_target_modules=["attention"])
    with caplog.at_level(logging.WARNING, logger="looptrain.optim"):
        assert_parity(*run_both(tmp_path, tiny_bert, TRAIN, EVAL, args=args))
    warnings = [r.getMessage() for r in caplog.records if r.name == "looptrain.optim"]
    assert warnings == [
        "optim_args ['betas'] have no effect: optim='sgd' does not read them.",
        "optim_target_modules has no effect: only GaLore and APOLLO optimizers use it, not 'sgd'.",
    ]


@pytest.mark.parametrize("optim_args", ["momentum", "momentum=0.9,nesterov", "a=b=c"])
def test_malformed_optim_args(tmp_path, optim_args):
    args = looptrain.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, optim="sgd", optim_args=optim_args)
    with pytest.raises(
        ValueError, match=re.escape(f"optim_args={optim_args!r} is not of the form 'key=value,key=value'")
    ):
        looptrain.Trainer.get_optimizer_cls_and_kwargs(args, tiny_bert())


def test_the_optimizers_page_lists_every_optim():
    section = (Path(__file__).resolve().parents[1] / "docs" / "optimizers.md").read_text()
    missing = [name for name in NAMES if f"`{name}`" not in section]
    assert not missing, f"docs/optimizers.md does not list {missing}"


if __name__ == "__main__":
    width = max(map(len, NAMES))
    for name in NAMES:
        package = OPTIONAL_PACKAGES.get(name, ("torch / transformers",))[0]
        print(f"{name:<{width}}  {package:<20}  {outcome(name)}")
    counts = {}
    for name in NAMES:
        counts[outcome(name).split(":")[0]] = counts.get(outcome(name).split(":")[0], 0) + 1
    print(counts)
