"""Features behind `TrainingArguments` fields, each against `transformers.Trainer` in the same test.

Where a feature changes numbers, both trainers train the same tiny model and every non-timing `log_history`
value and every final weight is compared exactly (`assert_parity`). Where its effect is not a number on CPU,
the test compares what both trainers did: the keyword arguments handed to `accelerate.Accelerator`, the calls
made to a mocked function, the files written, the DataLoader built, the hooks attached, the error raised.
Nothing is compared against numbers recorded earlier.

Fields that need hardware or packages this machine lacks (liger-kernel, DeepSpeed, TF32, several processes) are
checked for the same error as Trainer's, or for the same objects handed to accelerate.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import inspect
import os
import signal
import sys
import threading

import accelerate
import pytest
import safetensors.torch
import torch
import transformers
import transformers.trainer as HF_TRAINER
from accelerate.utils import ParallelismConfig

import looptrain
import looptrain.backends as LT_BACKENDS  # the modules, where the names some tests replace are looked up
import looptrain.trainer as LT_TRAINER
from helpers import (
    accuracy,
    assert_parity,
    params_of,
    random_token_dataset,
    run_trainer,
    sentence_pairs,
    strip_timing,
    tiny_bert,
    wordpiece_tokenizer,
)

TRAIN, EVAL = random_token_dataset(40, 1), random_token_dataset(12, 2)
# 40 examples, batch 8: 5 micro-batches per epoch, 2 epochs. No checkpoints unless a test asks.
BASE = dict(
    per_device_train_batch_size=8,
    per_device_eval_batch_size=8,
    num_train_epochs=2,
    logging_steps=1,
    seed=42,
    save_strategy="no",
)


def run_pair(tmp_path, model_fn, train=TRAIN, evals=EVAL, args=None, trainer_kwargs=None, do_train=True):
    """`helpers.run_both`, except that each trainer gets its own deep copy of the arguments and, when
    `trainer_kwargs` is a function, its own keyword arguments (collators and callbacks that record)."""
    runs = []
    for trainer_cls, args_cls, name in (
        (transformers.Trainer, transformers.TrainingArguments, "hf"),
        (looptrain.Trainer, looptrain.TrainingArguments, "lt"),
    ):
        kwargs = trainer_kwargs() if callable(trainer_kwargs) else dict(trainer_kwargs or {})
        runs.append(
            run_trainer(
                trainer_cls,
                args_cls,
                model_fn,
                tmp_path / name,
                train,
                evals,
                copy.deepcopy(args or {}),
                kwargs,
                do_train,
            )
        )
    return runs


def files_under(folder) -> list[str]:
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(root, n), folder) for n in names]
    return sorted(found)


@pytest.fixture(autouse=True)
def quick_garbage_collection():
    """Trainer and accelerate call gc.collect() around auto_find_batch_size retries, memory metrics and
    free_memory(); with transformers and datasets loaded each call takes seconds. Objects that exist before the
    test are set aside (gc.freeze), so each collection only looks at what the test creates."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def restore_environment():
    """Some arguments write to os.environ (fsdp: ACCELERATE_USE_FSDP) or the logging verbosity; undo it."""
    environ, verbosity = dict(os.environ), transformers.logging.get_verbosity()
    yield
    os.environ.clear()
    os.environ.update(environ)
    transformers.logging.set_verbosity(verbosity)


# ============================================================================== activation checkpointing
def checkpointed_modules(model) -> list:
    """(module name, whether it checkpoints, the keywords of its checkpoint function) for every module that can."""
    return [
        (name, m.gradient_checkpointing, getattr(getattr(m, "_gradient_checkpointing_func", None), "keywords", None))
        for name, m in model.named_modules()
        if hasattr(m, "gradient_checkpointing")
    ]


# (case, arguments, the keywords torch.utils.checkpoint gets)
CHECKPOINTING = [
    ("default", dict(activation_checkpointing=True), {"use_reentrant": False}),
    (
        "old_names_reentrant",
        dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}),
        {"use_reentrant": True},
    ),
    (
        "every_2nd_layer",
        dict(
            activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False, "every_n_layers": 2}
        ),
        {"use_reentrant": False},
    ),
]


@pytest.mark.parametrize("case,overrides,keywords", CHECKPOINTING, ids=[c[0] for c in CHECKPOINTING])
def test_activation_checkpointing_parity(tmp_path, case, overrides, keywords):
    """`activation_checkpointing(_kwargs)` (5.24's names; `gradient_checkpointing(_kwargs)` are its deprecated
    aliases): the same layers checkpointed with the same torch.utils.checkpoint keywords, the same run."""
    hf, lt = run_pair(
        tmp_path,
        tiny_bert,
        args={**BASE, **overrides, "eval_strategy": "epoch"},
        trainer_kwargs=dict(compute_metrics=accuracy),
    )
    assert_parity(hf, lt)
    layers = checkpointed_modules(lt[0].model)
    assert layers == checkpointed_modules(hf[0].model)
    assert any(on for _, on, _ in layers), "no layer checkpoints"
    assert all(kw == keywords for _, _, kw in layers)
    if case == "every_2nd_layer":
        assert [on for name, on, _ in layers if name.startswith("bert.encoder.layer.")] == [True, False]


class OnlyOldCheckpointingName(torch.nn.Module):
    """A model outside PreTrainedModel with only the deprecated `gradient_checkpointing_enable` (sentence-transformers)."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_bert()
        self.enabled_with = []

    def gradient_checkpointing_enable(self, **kwargs):
        self.enabled_with.append(kwargs)

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def test_activation_checkpointing_falls_back_to_the_old_method_name(tmp_path):
    args = {
        **BASE,
        "max_steps": 1,
        "activation_checkpointing": True,
        "activation_checkpointing_kwargs": {"use_reentrant": True, "every_n_layers": 3, "offload": False},
    }
    with pytest.warns(FutureWarning, match="gradient_checkpointing_enable"):
        hf, lt = run_pair(tmp_path, OnlyOldCheckpointingName, args=args)
    assert (
        lt[0].model.enabled_with
        == hf[0].model.enabled_with
        == [dict(gradient_checkpointing_kwargs={"use_reentrant": True}, every_n_layers=3, offload=False)]
    )


# =========================================================================================== NEFTune
def test_neftune_parity(tmp_path):
    """`neftune_noise_alpha`: uniform noise on the input embeddings while training (drawn from the global RNG, so
    any extra or missing draw changes every later number); removed when train() ends."""
    args = {**BASE, "neftune_noise_alpha": 5.0, "eval_strategy": "epoch"}
    hf, lt = run_pair(tmp_path, tiny_bert, args=args, trainer_kwargs=dict(compute_metrics=accuracy))
    assert_parity(hf, lt)
    for trainer, _ in (hf, lt):
        embeddings = trainer.model.get_input_embeddings()
        assert not embeddings._forward_hooks and not hasattr(embeddings, "neftune_noise_alpha")
    without, _ = run_trainer(
        looptrain.Trainer,
        looptrain.TrainingArguments,
        tiny_bert,
        tmp_path / "plain",
        TRAIN,
        EVAL,
        {**BASE, "eval_strategy": "epoch"},
        dict(compute_metrics=accuracy),
    )
    assert strip_timing(without.state.log_history)[0]["loss"] != strip_timing(lt[0].state.log_history)[0]["loss"]


# ============================================================================== auto_find_batch_size
FITS = 5  # the largest batch the "device" holds


def oom_above(limit: int, training_only: bool = True):
    """A tiny BERT whose forward raises the error a CUDA out-of-memory raises (what accelerate's
    `should_reduce_batch_size` recognises) on batches over `limit`; it records every batch size it is given."""

    def model_fn():
        model = tiny_bert()
        model.batch_sizes = []

        def hook(module, args, kwargs):
            size = kwargs["input_ids"].shape[0]
            if module.training or not training_only:
                module.batch_sizes.append(size)
            if size > limit and (module.training or not training_only):
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

        model.register_forward_pre_hook(hook, with_kwargs=True)
        return model

    return model_fn


def test_auto_find_batch_size_parity(tmp_path):
    """accelerate's find_executable_batch_size, as Trainer calls it: 8 -> 7 -> 6 -> 5 (90% each time), each retry a
    fresh loop; the same sizes are tried and the runs at batch 5 are identical."""
    args = {**BASE, "auto_find_batch_size": True, "eval_strategy": "epoch"}
    hf, lt = run_pair(tmp_path, oom_above(FITS), args=args, trainer_kwargs=dict(compute_metrics=accuracy))
    assert_parity(hf, lt)
    tried = list(dict.fromkeys(lt[0].model.batch_sizes))
    assert tried == list(dict.fromkeys(hf[0].model.batch_sizes)) == [8, 7, 6, 5]
    assert lt[0].model.batch_sizes == hf[0].model.batch_sizes  # every forward, failed ones included
    assert lt[0]._train_batch_size == hf[0]._train_batch_size == lt[0].state.train_batch_size == 5
    assert lt[0].state.max_steps == hf[0].state.max_steps == 16  # 8 batches of 5 per epoch


def test_auto_find_batch_size_resume_starts_from_the_saved_batch_size(tmp_path):
    """Trainer: resuming under auto_find_batch_size starts from the checkpoint's train_batch_size."""
    args = {**BASE, "auto_find_batch_size": True, "save_strategy": "steps", "save_steps": 4, "max_steps": 6}
    first = run_pair(tmp_path / "first", oom_above(FITS), args=args)
    resumed = []
    for (_trainer, _), name in zip(first, ("hf", "lt")):
        lib = transformers if name == "hf" else looptrain
        again = lib.Trainer(
            model=oom_above(FITS)(),
            train_dataset=TRAIN,
            args=lib.TrainingArguments(
                output_dir=str(tmp_path / "first" / name), use_cpu=True, report_to="none", disable_tqdm=True, **args
            ),
        )
        result = again.train(resume_from_checkpoint=str(tmp_path / "first" / name / "checkpoint-4"))
        resumed.append((again, result))
    assert_parity(*resumed)
    assert resumed[1][0].model.batch_sizes == resumed[0][0].model.batch_sizes == [5, 5]


def test_auto_find_batch_size_out_of_memory_in_evaluation(tmp_path):
    """Trainer: an out-of-memory error in an evaluation during training is not retried with a smaller training batch."""
    args = {**BASE, "auto_find_batch_size": True, "eval_strategy": "epoch", "per_device_train_batch_size": 4}
    errors = []
    for lib in (transformers, looptrain):
        with pytest.raises(RuntimeError, match="per_device_eval_batch_size") as err:
            run_trainer(
                lib.Trainer,
                lib.TrainingArguments,
                oom_above(FITS, training_only=False),
                tmp_path / lib.__name__,
                TRAIN,
                EVAL,
                dict(args),
            )
        errors.append(err.value)
    assert all("out of memory" in str(e.__cause__) for e in errors)


# ============================================================================== torch_empty_cache_steps
class StepNow(transformers.TrainerCallback):
    step = None

    def on_step_begin(self, args, state, control, **kwargs):
        StepNow.step = state.global_step


def test_torch_empty_cache_steps_calls(tmp_path, monkeypatch):
    """Trainer calls accelerate's clear_device_cache after the forward of every micro-batch taken while
    global_step % torch_empty_cache_steps == 0; mocked in both trainers, the calls are the same."""
    calls = {"hf": [], "lt": []}
    monkeypatch.setattr(HF_TRAINER, "clear_device_cache", lambda: calls["hf"].append(StepNow.step))
    monkeypatch.setattr(LT_TRAINER, "clear_device_cache", lambda: calls["lt"].append(StepNow.step))
    args = {**BASE, "torch_empty_cache_steps": 2, "gradient_accumulation_steps": 2}
    hf, lt = run_pair(tmp_path, tiny_bert, args=args, trainer_kwargs=lambda: dict(callbacks=[StepNow()]))
    assert_parity(hf, lt)
    # windows of [2, 2, 1] micro-batches per epoch (steps 0-2, then 3-5): steps 0, 2 and 4 clear the cache
    assert calls["lt"] == calls["hf"] == [0, 0, 2, 4, 4]


# ============================================================================== fp16/bf16 full eval
@pytest.mark.parametrize("field,dtype", [("bf16_full_eval", torch.bfloat16), ("fp16_full_eval", torch.float16)])
def test_full_eval_dtype_parity(tmp_path, field, dtype):
    """`bf16_full_eval`/`fp16_full_eval`: the model is not placed on the device in __init__; evaluations inside
    train() run in float32; an evaluate() outside training casts the model itself to the half dtype."""
    args = {**BASE, field: True, "eval_strategy": "epoch"}
    hf, lt = run_pair(tmp_path, tiny_bert, args=args, trainer_kwargs=dict(compute_metrics=accuracy))
    assert_parity(hf, lt)
    assert hf[0].place_model_on_device is lt[0].place_model_on_device is False
    assert next(lt[0].model.parameters()).dtype == torch.float32
    metrics = [strip_timing([trainer.evaluate()])[0] for trainer, _ in (hf, lt)]
    assert metrics[0] == metrics[1]
    assert {p.dtype for p in lt[0].model.parameters()} == {p.dtype for p in hf[0].model.parameters()} == {dtype}
    assert_parity(hf, lt)
    # before any training: the first evaluate() casts too
    hf, lt = run_pair(
        tmp_path / "untrained", tiny_bert, args=args, trainer_kwargs=dict(compute_metrics=accuracy), do_train=False
    )
    metrics = [strip_timing([trainer.evaluate()])[0] for trainer, _ in (hf, lt)]
    assert metrics[0] == metrics[1] and metrics[0]["eval_loss"] > 0
    assert next(lt[0].model.parameters()).dtype == next(hf[0].model.parameters()).dtype == dtype


# ============================================================================== skip_memory_metrics
def is_memory_key(key: str) -> bool:
    return "_mem_" in key


def test_memory_metrics_keys(tmp_path):
    """`skip_memory_metrics=False`: the same memory metrics (values vary from run to run) in the same places:
    init_* and train_* in train()'s metrics and last log entry, eval_* in evaluate(), test_* in predict()."""
    args = {**BASE, "skip_memory_metrics": False, "max_steps": 2, "eval_strategy": "steps", "eval_steps": 2}
    hf, lt = run_pair(tmp_path, tiny_bert, args=args)
    outputs = {}
    for name, (trainer, result) in zip(("hf", "lt"), (hf, lt)):
        outputs[name] = dict(
            train=result.metrics,
            eval=trainer.evaluate(),
            test=trainer.predict(EVAL).metrics,
            log=[list(entry) for entry in trainer.state.log_history],
        )
    assert outputs["lt"].keys() == outputs["hf"].keys()
    for key in ("train", "eval", "test"):
        assert sorted(outputs["lt"][key]) == sorted(outputs["hf"][key]), key
        assert [k for k in outputs["lt"][key] if is_memory_key(k)], f"no memory metric in {key}"
    assert outputs["lt"]["log"] == outputs["hf"]["log"]
    assert any(k.startswith("init_mem_cpu") for k in outputs["lt"]["train"])
    for trainer, _ in (hf, lt):  # every other value is compared exactly
        trainer.state.log_history = [
            {k: v for k, v in e.items() if not is_memory_key(k)} for e in trainer.state.log_history
        ]
    assert_parity((hf[0], None), (lt[0], None))


def test_memory_metrics_skipped_by_default(tmp_path):
    hf, lt = run_pair(tmp_path, tiny_bert, args={**BASE, "max_steps": 1})
    assert not [k for k in lt[1].metrics if is_memory_key(k)] and not [k for k in hf[1].metrics if is_memory_key(k)]


# ============================================================================== the Accelerator's arguments
def described(obj):
    """A comparable description of what was handed to accelerate (plugins and handlers are dataclasses)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return (type(obj).__name__, {f.name: described(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    if isinstance(obj, ParallelismConfig):
        return ("ParallelismConfig", described(vars(obj)))
    if isinstance(obj, functools.partial):
        return ("partial", described(obj.func), described(obj.args), described(obj.keywords))
    if isinstance(obj, (list, tuple)):
        return [described(o) for o in obj]
    if isinstance(obj, dict):
        return {k: described(v) for k, v in obj.items()}
    if inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isclass(obj):
        return obj.__qualname__
    return obj


@pytest.fixture
def accelerator_kwargs(monkeypatch):
    """The keyword arguments each trainer hands to accelerate.Accelerator (the real one is then built)."""
    calls = {"hf": [], "lt": []}

    def spy(name):
        class Spy(accelerate.Accelerator):
            def __init__(self, *args, **kwargs):
                calls[name].append(described(kwargs))
                super().__init__(*args, **kwargs)

        return Spy

    monkeypatch.setattr(HF_TRAINER, "Accelerator", spy("hf"))
    monkeypatch.setattr(LT_BACKENDS, "Accelerator", spy("lt"))
    return calls


def build_both(tmp_path, args, model_fn=tiny_bert, **trainer_kwargs):
    """Construct (not train) both trainers; return [(trainer or None, error or None)] for transformers, looptrain."""
    built = []
    for lib in (transformers, looptrain):
        try:
            targs = lib.TrainingArguments(
                output_dir=str(tmp_path / lib.__name__), use_cpu=True, report_to="none", **copy.deepcopy(args)
            )
            built.append((lib.Trainer(model=model_fn(), args=targs, **trainer_kwargs), None))
        except Exception as err:  # compared below: the same error from both
            built.append((None, err))
    return built


ACCELERATOR_CASES = [
    ("defaults", dict()),
    ("ddp_kwargs", dict(ddp_bucket_cap_mb=5, ddp_broadcast_buffers=False, ddp_static_graph=True)),
    ("ddp_find_unused", dict(ddp_find_unused_parameters=True, ddp_bucket_cap_mb=1)),
    ("checkpointing_turns_off_unused_search", dict(activation_checkpointing=True)),
    (
        "accelerator_config",
        dict(
            accelerator_config={
                "split_batches": True,
                "even_batches": False,
                "use_seedable_sampler": False,
                "non_blocking": True,
                "gradient_accumulation_kwargs": {"num_steps": 3, "sync_each_batch": True},
            }
        ),
    ),
    ("parallelism_config", dict(parallelism_config=ParallelismConfig(dp_replicate_size=1, dp_shard_size=1, cp_size=1))),
    ("parallelism_config_needs_processes", dict(parallelism_config=ParallelismConfig(dp_shard_size=2))),
    (
        "bf16_compile",
        dict(bf16=True, torch_compile=True, torch_compile_backend="aot_eager", torch_compile_mode="default"),
    ),
    (
        "fsdp",
        dict(
            fsdp=True,
            fsdp_config={
                "fsdp_version": 2,
                "reshard_after_forward": False,
                "transformer_layer_cls_to_wrap": ["BertLayer"],
                "cpu_ram_efficient_loading": True,
            },
        ),
    ),
    (
        "fsdp_v1_offload",
        dict(fsdp="full_shard offload auto_wrap", fsdp_config={"fsdp_version": 1, "min_num_params": 100}),
    ),
    ("data_seed", dict(data_seed=11)),
]


@pytest.mark.parametrize("case,args", ACCELERATOR_CASES, ids=[c for c, _ in ACCELERATOR_CASES])
def test_accelerator_receives_what_trainer_hands_it(tmp_path, accelerator_kwargs, case, args):
    """ddp_bucket_cap_mb / ddp_broadcast_buffers / ddp_static_graph / ddp_find_unused_parameters (the
    DistributedDataParallelKwargs), accelerator_config (DataLoaderConfiguration and GradientAccumulationPlugin),
    parallelism_config, fsdp/fsdp_config (the FullyShardedDataParallelPlugin), deepspeed (the plugin: None here),
    mixed precision and torch_compile: the same keyword arguments reach accelerate.Accelerator, and the same error
    follows where one process cannot run the setting (FSDP, several data-parallel shards)."""
    (hf, hf_err), (lt, lt_err) = build_both(tmp_path, args)
    assert accelerator_kwargs["lt"] == accelerator_kwargs["hf"]
    if case == "fsdp":  # the plugin reached accelerate before Trainer's "fsdp needs several processes" check
        plugin = accelerator_kwargs["lt"][0]["fsdp_plugin"]
        assert plugin[0] == "FullyShardedDataParallelPlugin" and plugin[1]["reshard_after_forward"] is False
    assert (hf_err is None) == (lt_err is None), f"transformers: {hf_err!r}; looptrain: {lt_err!r}"
    if hf_err is not None:
        assert type(lt_err) is type(hf_err)
        # looptrain words "fsdp needs several processes" its own way; any other error is accelerate's or torch's
        assert str(lt_err) == str(hf_err) or all(
            "only works in distributed training" in str(e) for e in (hf_err, lt_err)
        )
        return
    assert len(accelerator_kwargs["lt"]) == 1
    for name in ("find_unused_parameters", "bucket_cap_mb", "broadcast_buffers", "static_graph"):
        assert getattr(lt.accelerator.ddp_handler, name) == getattr(hf.accelerator.ddp_handler, name), name
    assert described(lt.accelerator.dataloader_config) == described(hf.accelerator.dataloader_config)
    assert lt.accelerator.gradient_state.plugin_kwargs == hf.accelerator.gradient_state.plugin_kwargs
    assert lt.args.gradient_accumulation_steps == hf.args.gradient_accumulation_steps
    assert described(lt.accelerator.parallelism_config) == described(hf.accelerator.parallelism_config)
    if case == "ddp_kwargs":
        handler = lt.accelerator.ddp_handler
        assert (handler.bucket_cap_mb, handler.broadcast_buffers, handler.static_graph) == (5, False, True)
    if case == "accelerator_config":
        assert lt.args.gradient_accumulation_steps == 3
        assert lt.accelerator.gradient_state.plugin_kwargs["num_steps"] == 1  # the loop accumulates itself
        assert lt.accelerator.gradient_state.plugin_kwargs["sync_each_batch"] is True
    if case == "parallelism_config":
        assert lt.accelerator.parallelism_config is lt.args.parallelism_config


def test_accelerator_config_parity(tmp_path):
    """accelerator_config with num_steps (the accumulation), no seedable sampler (torch's RandomSampler seeded
    from the global RNG) and a sync on every micro-batch: the same run."""
    config = {"use_seedable_sampler": False, "gradient_accumulation_kwargs": {"num_steps": 2, "sync_each_batch": True}}
    args = {**BASE, "accelerator_config": config, "eval_strategy": "epoch"}
    hf, lt = run_pair(tmp_path, tiny_bert, args=args, trainer_kwargs=dict(compute_metrics=accuracy))
    assert_parity(hf, lt)
    assert lt[0].args.gradient_accumulation_steps == 2 and lt[0].state.max_steps == 6
    for trainer, _ in (hf, lt):  # not accelerate's SeedableRandomSampler
        assert type(trainer.get_train_dataloader().batch_sampler.sampler) is torch.utils.data.RandomSampler


def test_deepspeed_needs_the_package_like_trainer(tmp_path):
    """`deepspeed=` builds transformers' HfTrainerDeepSpeedConfig in the arguments (the plugin handed to accelerate
    as Trainer hands it: `args.deepspeed_plugin`); without the package both fail the same way. (With DeepSpeed
    installed, tests/test_sharded.py compares the configs both build.)"""
    import importlib.util

    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed: tests/test_sharded.py covers deepspeed=")

    errors = []
    try:
        for lib in (transformers, looptrain):
            with pytest.raises(Exception) as err:
                lib.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, deepspeed={"train_batch_size": "auto"})
            errors.append((type(err.value), str(err.value)))
            del err  # its traceback keeps the half-built config alive
    finally:
        # the config registered itself globally before failing: every later is_deepspeed_zero3_enabled() would read it
        unset_hf_deepspeed_config()
    assert errors[0] == errors[1] and "deepspeed" in errors[1][1]


# ============================================================================== liger, tf32, trackio
def test_use_liger_kernel_without_the_package(tmp_path):
    """liger-kernel needs triton and a GPU; without it train() fails with Trainer's own ImportError."""
    errors = []
    for lib in (transformers, looptrain):
        with pytest.raises(ImportError) as err:
            run_trainer(
                lib.Trainer,
                lib.TrainingArguments,
                tiny_bert,
                tmp_path / lib.__name__,
                TRAIN,
                None,
                {**BASE, "use_liger_kernel": True},
            )
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "liger-kernel" in errors[1]


def test_tf32_on_cpu_is_trainers_error(tmp_path):
    errors = []
    for lib in (transformers, looptrain):
        with pytest.raises(ValueError) as err:
            lib.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, tf32=True)
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "tf32" in errors[1]
    for lib in (transformers, looptrain):  # tf32=False has nothing to turn off here
        assert lib.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, tf32=False).tf32 is False


FAKE_TRACKIO = '''
"""A stand-in for trackio: records what TrackioCallback asks of it."""
import types

__version__ = "0.0.0"
calls = []


class _NoValue:
    def get(self):
        return None


context_vars = types.SimpleNamespace(current_space_id=_NoValue(), current_project=_NoValue())


class _Config(dict):
    def update(self, values, allow_val_change=False):
        dict.update(self, values)


config = _Config()


def init(**kwargs):
    calls.append(("init", kwargs))


def log(values):
    calls.append(("log", dict(values)))


def finish():
    calls.append(("finish",))
'''


def test_report_to_trackio(tmp_path, monkeypatch):
    """report_to="trackio": transformers' TrackioCallback reads `project`, `run_name`, `trackio_space_id`,
    `trackio_bucket_id` and `hub_private_repo` from the arguments; with a stand-in trackio both trainers make the
    same calls. Without trackio installed both fail with TrackioCallback's RuntimeError naming the package."""
    args = {
        **BASE,
        "max_steps": 3,
        "eval_strategy": "steps",
        "eval_steps": 3,
        "report_to": "trackio",
        "project": "features-test",
        "run_name": "run-1",
        "trackio_space_id": None,
        "trackio_bucket_id": "bucket",
    }
    missing = []
    for lib in (transformers, looptrain):
        with pytest.raises(RuntimeError, match="pip install trackio") as err:
            lib.Trainer(
                tiny_bert(),
                lib.TrainingArguments(output_dir=str(tmp_path / "missing"), use_cpu=True, **args),
                eval_dataset=EVAL,
            )
        missing.append(str(err.value))
    assert missing[0] == missing[1]

    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "trackio.py").write_text(FAKE_TRACKIO)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    import trackio

    monkeypatch.setitem(sys.modules, "trackio", trackio)
    calls = {}
    for trainer_cls, args_cls, name in (
        (transformers.Trainer, transformers.TrainingArguments, "hf"),
        (looptrain.Trainer, looptrain.TrainingArguments, "lt"),
    ):
        trackio.calls.clear()
        trainer = trainer_cls(
            model=tiny_bert(),
            train_dataset=TRAIN,
            eval_dataset=EVAL,
            args=args_cls(output_dir=str(tmp_path / name), use_cpu=True, disable_tqdm=True, **args),
        )
        trainer.train()
        calls[name] = [(c[0], strip_timing([c[1]])[0]) if len(c) > 1 else c for c in trackio.calls]
    assert calls["lt"] == calls["hf"]
    assert calls["lt"][0] == (
        "init",
        dict(project="features-test", name="run-1", space_id=None, resume="allow", private=None, bucket_id="bucket"),
    )
    assert calls["lt"][-1] == ("finish",) and sum(c[0] == "log" for c in calls["lt"]) == 5  # 3 steps, eval, summary


# ============================================================================== callbacks restored on resume
class CountSteps(transformers.TrainerCallback, transformers.trainer_callback.ExportableState):
    """A stateful callback: the number of optimizer steps it has seen, saved in checkpoints."""

    def __init__(self, steps: int = 0):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1

    def state(self) -> dict:
        return {"args": {"steps": self.steps}, "attributes": {}}


@pytest.mark.parametrize("restore", [True, False])
def test_restore_callback_states_from_checkpoint(tmp_path, restore):
    """Trainer restores the saved state of stateful callbacks only with restore_callback_states_from_checkpoint."""
    args = {
        **BASE,
        "max_steps": 4,
        "save_strategy": "steps",
        "save_steps": 2,
        "restore_callback_states_from_checkpoint": restore,
    }
    run_pair(tmp_path, tiny_bert, args=args, trainer_kwargs=dict(callbacks=[CountSteps]))
    counts, resumed = [], []
    for lib, name in ((transformers, "hf"), (looptrain, "lt")):
        trainer = lib.Trainer(
            model=tiny_bert(),
            train_dataset=TRAIN,
            callbacks=[CountSteps],
            args=lib.TrainingArguments(
                output_dir=str(tmp_path / name), use_cpu=True, report_to="none", disable_tqdm=True, **args
            ),
        )
        result = trainer.train(resume_from_checkpoint=str(tmp_path / name / "checkpoint-2"))
        resumed.append((trainer, result))
        counts.append([cb.steps for cb in trainer.callback_handler.callbacks if isinstance(cb, CountSteps)])
    assert_parity(*resumed)
    assert counts[0] == counts[1] == ([4] if restore else [2])
    # Trainer puts a restored callback at the end of the list (the order callbacks run in)
    order = [[type(cb).__name__ for cb in t.callback_handler.callbacks] for t, _ in resumed]
    assert order[0] == order[1]


# ============================================================================== debug="underflow_overflow"
def debug_hooks(model) -> list[str]:
    from transformers.debug_utils import DebugUnderflowOverflow

    return [
        name
        for name, m in model.named_modules()
        if any(isinstance(getattr(h, "__self__", None), DebugUnderflowOverflow) for h in m._forward_hooks.values())
    ]


def test_debug_underflow_overflow(tmp_path):
    """debug="underflow_overflow" attaches transformers' DebugUnderflowOverflow to every module (the run is
    unchanged), and an infinite activation stops training with its error."""
    args = {**BASE, "debug": "underflow_overflow", "max_steps": 3}
    hf, lt = run_pair(tmp_path, tiny_bert, args=args)
    assert_parity(hf, lt)
    hooked = debug_hooks(lt[0].model)
    assert hooked == debug_hooks(hf[0].model) and len(hooked) == len(list(lt[0].model.named_modules()))

    def overflowing():
        model = tiny_bert()
        with torch.no_grad():
            model.bert.embeddings.word_embeddings.weight[:] = float("inf")
        return model

    errors = []
    for lib in (transformers, looptrain):
        with pytest.raises(ValueError, match="inf/nan detected") as err:
            run_trainer(lib.Trainer, lib.TrainingArguments, overflowing, tmp_path / lib.__name__, TRAIN, None, args)
        errors.append(str(err.value))
    assert errors[0] == errors[1]


# ============================================================================== samplers
class RecordingCollator:
    """Pads like DataCollatorWithPadding and records, batch by batch, the input ids it was given."""

    def __init__(self, tokenizer):
        self.collator, self.batches = transformers.DataCollatorWithPadding(tokenizer), []

    def __call__(self, features):
        self.batches.append([tuple(f["input_ids"]) for f in features])
        return self.collator(features)


def tokenized_pairs(tokenizer, n, seed):
    return sentence_pairs(n, seed).map(
        lambda b: tokenizer(b["sentence1"], b["sentence2"], truncation=True), batched=True
    )


@pytest.mark.parametrize("strategy", ["group_by_length", "batch_rebalance"])
def test_length_samplers_parity(tmp_path, strategy):
    """train_sampling_strategy="group_by_length" with remove_unused_columns=True: Trainer removes the columns the
    model does not take, `length` among them, before it builds the sampler, so lengths come from input_ids and
    not from the (here deliberately wrong) `length` column. "batch_rebalance": transformers' BatchRebalanceSampler.
    The same batches, in the same order, and the same run."""
    tokenizer = wordpiece_tokenizer()
    train = tokenized_pairs(tokenizer, 48, 1)
    train = train.add_column("length", [100 - len(ids) for ids in train["input_ids"]])  # the opposite order
    evals = tokenized_pairs(tokenizer, 12, 2)
    args = {
        **BASE,
        "train_sampling_strategy": strategy,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "eval_strategy": "epoch",
        "per_device_eval_batch_size": 4,
    }
    if strategy == "batch_rebalance":
        train = train.remove_columns("length")
    hf, lt = run_pair(
        tmp_path,
        lambda: tiny_bert(vocab_size=len(tokenizer)),
        train,
        evals,
        args,
        trainer_kwargs=lambda: dict(
            processing_class=tokenizer, data_collator=RecordingCollator(tokenizer), compute_metrics=accuracy
        ),
    )
    assert_parity(hf, lt)
    batches = lt[0].data_collator.batches
    assert batches == hf[0].data_collator.batches
    if strategy == "group_by_length":
        # LengthGroupedSampler puts the longest example first: the longest by input_ids, not by the `length` column
        longest = max(len(ids) for ids in train["input_ids"])
        assert len(batches[0][0]) == longest


# ============================================================================== evaluation gathering
def test_eval_use_gather_object(tmp_path, monkeypatch):
    """eval_use_gather_object: Trainer's gather_function is accelerate's gather_for_metrics with
    use_gather_object=<the field>, which Trainer 5.24 resets to the plain method after the evaluation loop: only the
    first evaluation of a Trainer gathers with gather_object. The flags of every gather call are the same, and so
    is the run (on one process gather_object returns the tensors as they are)."""
    flags = []
    original = accelerate.Accelerator.gather_for_metrics

    def spy(self, input_data, use_gather_object=False):
        flags.append(use_gather_object)
        return original(self, input_data, use_gather_object=use_gather_object)

    monkeypatch.setattr(accelerate.Accelerator, "gather_for_metrics", spy)
    args = {**BASE, "eval_use_gather_object": True, "eval_strategy": "epoch"}
    recorded = []
    for lib in (transformers, looptrain):
        flags.clear()
        trainer, result = run_trainer(
            lib.Trainer,
            lib.TrainingArguments,
            tiny_bert,
            tmp_path / lib.__name__,
            TRAIN,
            EVAL,
            dict(args),
            dict(compute_metrics=accuracy),
        )
        trainer.evaluate()
        recorded.append(((trainer, result), list(flags)))
    (hf, hf_flags), (lt, lt_flags) = recorded
    assert_parity(hf, lt)
    assert lt_flags == hf_flags
    per_batch = 3  # losses, logits, labels; 2 batches per evaluation, 3 evaluations
    assert lt_flags == [True] * 2 * per_batch + [False] * 4 * per_batch


# ============================================================================== DataLoader arguments
def test_dataloader_multiprocessing_context_and_in_order(tmp_path):
    """dataloader_multiprocessing_context and dataloader_in_order reach the DataLoaders accelerate prepares."""
    args = {
        **BASE,
        "dataloader_num_workers": 1,
        "dataloader_multiprocessing_context": "spawn",
        "dataloader_in_order": False,
    }
    (hf, hf_err), (lt, lt_err) = build_both(tmp_path, args, train_dataset=TRAIN, eval_dataset=EVAL)
    assert hf_err is None and lt_err is None
    for get in ("get_train_dataloader", "get_eval_dataloader"):
        loaders = [getattr(t, get)() for t in (hf, lt)]
        described_loaders = [
            {k: getattr(dl, k) for k in ("num_workers", "in_order", "batch_size", "drop_last", "pin_memory")}
            for dl in loaders
        ]
        assert described_loaders[0] == described_loaders[1]
        contexts = [dl.multiprocessing_context for dl in loaders]
        assert [c.get_start_method() for c in contexts] == ["spawn", "spawn"]
        assert loaders[1].in_order is False


# ============================================================================== save_on_each_node, log_on_each_node
@pytest.fixture
def main_process_of_second_node(monkeypatch):
    """This process as the first process of a second machine: global rank 1, local rank 0 (one process, so
    nothing else changes; both trainers read these properties of the arguments)."""
    monkeypatch.setattr(transformers.TrainingArguments, "process_index", property(lambda self: 1))
    monkeypatch.setattr(transformers.TrainingArguments, "local_process_index", property(lambda self: 0))


class Verbosity(transformers.TrainerCallback):
    def on_init_end(self, args, state, control, **kwargs):
        self.level = transformers.logging.get_verbosity()
        self.flags = (state.is_world_process_zero, state.is_local_process_zero)


@pytest.mark.parametrize("on_each_node", [True, False])
def test_save_and_log_on_each_node(tmp_path, main_process_of_second_node, on_each_node):
    """save_on_each_node: the first process of every machine writes checkpoints and the final model (should_save
    follows the local rank), else only the global first process. log_on_each_node: the same for the log level
    (log_level on the processes that log, log_level_replica on the others). The same files and levels as Trainer."""
    args = {
        **BASE,
        "max_steps": 4,
        "save_strategy": "steps",
        "save_steps": 2,
        "save_total_limit": 1,
        "save_on_each_node": on_each_node,
        "log_on_each_node": on_each_node,
        "log_level": "info",
        "log_level_replica": "error",
    }
    hf, lt = run_pair(tmp_path, tiny_bert, args=args, trainer_kwargs=lambda: dict(callbacks=[Verbosity()]))
    assert_parity(hf, lt)
    for trainer, _ in (hf, lt):
        trainer.save_model()
    hf_files, lt_files = files_under(tmp_path / "hf"), files_under(tmp_path / "lt")
    if on_each_node:  # looptrain's own files: training_args.json for Trainer's pickled .bin, and looptrain_state.json
        own = {"training_args.json": "training_args.bin"}
        lt_as_hf = [
            os.path.join(os.path.dirname(f), own.get(os.path.basename(f), os.path.basename(f)))
            for f in lt_files
            if not f.endswith("looptrain_state.json")
        ]
        assert sorted(lt_as_hf) == hf_files
        assert "checkpoint-4/model.safetensors" in lt_files and "model.safetensors" in lt_files
    else:
        # Only the RNG state, which every process writes (its own dropout stream), into checkpoint-<N>: looptrain's
        # staging folder, left on a disk the saving process does not share, is published there (issue 21).
        assert hf_files == ["checkpoint-2/rng_state.pth", "checkpoint-4/rng_state.pth"]
        assert lt_files == hf_files
    levels = [next(cb for cb in t.callback_handler.callbacks if isinstance(cb, Verbosity)) for t, _ in (hf, lt)]
    assert (
        levels[0].level
        == levels[1].level
        == (transformers.logging.INFO if on_each_node else transformers.logging.ERROR)
    )
    assert levels[0].flags == levels[1].flags == (False, True)


# ============================================================================== enable_jit_checkpoint / SIGTERM
class SigtermAfterStep(transformers.TrainerCallback):
    """Sends this process SIGTERM at the end of optimizer step 2 (a cluster preempting the job)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            for timer in [t for t in threading.enumerate() if isinstance(t, threading.Timer)]:
                timer.join()  # Trainer's JIT checkpointing asks for the save from a timer thread


def test_sigterm_with_enable_jit_checkpoint(tmp_path, monkeypatch):
    """enable_jit_checkpoint=True. Trainer: SIGTERM (after a grace period, set to 0 here) saves checkpoint-<step> at the
    next callback event (step 3's on_step_begin), then still trains step 3 and stops. looptrain's SIGTERM handling
    is always on, whatever the field says: it saves at the end of the optimizer step it is in (step 2) and stops,
    so the checkpoint is an exact resume point. Both checkpoint-2s hold the same weights; both put the previous
    SIGTERM handler back."""
    from transformers.trainer_jit_checkpoint import CheckpointManager

    monkeypatch.setattr(CheckpointManager.__init__, "__defaults__", (0,))  # kill_wait: no 3 s grace period
    before = signal.getsignal(signal.SIGTERM)
    args = {**BASE, "max_steps": 5, "enable_jit_checkpoint": True}
    hf, lt = run_pair(tmp_path, tiny_bert, args=args, trainer_kwargs=lambda: dict(callbacks=[SigtermAfterStep()]))
    assert signal.getsignal(signal.SIGTERM) == before
    assert os.listdir(tmp_path / "hf") == os.listdir(tmp_path / "lt") == ["checkpoint-2"]
    weights = [
        safetensors.torch.load_file(tmp_path / name / "checkpoint-2" / "model.safetensors") for name in ("hf", "lt")
    ]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert hf[0].state.global_step == 3 and lt[0].state.global_step == 2 and lt[0].preempted
    # without the field looptrain does the same (transformers.Trainer would die on the signal)
    args["enable_jit_checkpoint"] = False
    again, _ = run_trainer(
        looptrain.Trainer,
        looptrain.TrainingArguments,
        tiny_bert,
        tmp_path / "lt-no-jit",
        TRAIN,
        None,
        args,
        dict(callbacks=[SigtermAfterStep()]),
    )
    assert again.preempted and os.listdir(tmp_path / "lt-no-jit") == ["checkpoint-2"]
    assert params_of(again.model).keys() == params_of(lt[0].model).keys()
    assert all(torch.equal(a, b) for a, b in zip(params_of(again.model).values(), params_of(lt[0].model).values()))
