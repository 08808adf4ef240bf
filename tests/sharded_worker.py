"""One worker process of the sharded-training tests (`tests/test_sharded.py`): FSDP2 on 2 CPU processes over
gloo, DeepSpeed ZeRO on 1 CPU process, each with `transformers.Trainer` and `looptrain.Trainer` in the same run.

    python -m torch.distributed.run --nproc_per_node 2 tests/sharded_worker.py --mode fsdp --out R --workdir W
    python -m torch.distributed.run --nproc_per_node 1 tests/sharded_worker.py --mode deepspeed --out R --workdir W

Two shims make this run on CPUs; both trainers run under them, and neither touches looptrain:
  * accelerate 1.15 turns a process group into FSDP only on GPU-like devices; on CPU processes (MULTI_CPU) it
    ignores the FSDP plugin, although torch's FSDP2 (`fully_shard`, DTensor, torch.distributed.checkpoint) runs
    on CPUs over gloo. `allow_fsdp_on_cpu` does for MULTI_CPU what AcceleratorState does for MULTI_GPU: the
    distributed type becomes FSDP and the plugin is kept (with the mixed precision).
  * DeepSpeed's CPU accelerator compiles a shared-memory all-reduce kernel when it starts (minutes); with one
    process there is nothing to all-reduce, so `build_shm_op` returns None (DeepSpeed then uses plain
    torch.distributed, as it does where the kernel is not available).

On a GPU (`scripts/gpu_check.py` launches it there, one process per GPU) the shims do nothing.

For each setup (FSDP2 with SHARDED_STATE_DICT and FULL_STATE_DICT; ZeRO-2 with Trainer's optimizer and schedule,
ZeRO-3 with DeepSpeed's) five runs: each library uninterrupted (saving checkpoint-3 of 4 optimizer steps,
mid-epoch), looptrain resumed from its own checkpoint and from Trainer's, Trainer resumed from looptrain's.
Each run records its non-timing logs, the files of its checkpoint, and fingerprints (SHA-1 per tensor) of
the *complete* weights and optimizer state, gathered from every shard: at the save, right after a resume
loaded the checkpoint (`on_train_begin`), and at the end. The mode also records, for both libraries, the
FSDP plugin / DeepSpeed config each hands accelerate, for a set of argument combinations and for the
repository's accelerate config files. Results go to `<out>.rank<N>.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import functools
import hashlib
import io
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import random_token_dataset, strip_timing, tiny_bert  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBS = ("transformers", "looptrain")
STEPS, SAVE_STEP = 4, 3  # two epochs of two optimizer steps (GA=2); checkpoint-3 is mid-epoch


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


# ------------------------------------------------------------------------------------------------ CPU shims
def allow_fsdp_on_cpu() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # what AcceleratorState.__init__ does for MULTI_GPU (accelerate/state.py)
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = __init__


def skip_deepspeed_shm_kernel() -> None:
    import importlib

    # (not `import deepspeed.comm.torch`: the name `deepspeed.comm.torch` is torch itself, which that package imports)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


# ------------------------------------------------------------------------------------------------ fingerprints
def digest(obj, prefix: str = "", local: bool = False) -> dict:
    """Flatten nested dicts/lists: every tensor to the SHA-1 of its dtype, shape and bytes, every number or
    string to its repr, anything else to its type name. A DTensor counts whole (gathered: collective), or with
    `local` as this rank's shard."""
    out = {}
    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            out.update(digest(obj[key], f"{prefix}{key}/", local))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            out.update(digest(value, f"{prefix}{i}/", local))
    elif torch.is_tensor(obj):
        t = obj.detach()
        if hasattr(t, "full_tensor"):  # a DTensor
            t = t.to_local() if local else t.full_tensor()
        t = t.cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        out[prefix.rstrip("/")] = f"{t.dtype} {tuple(t.shape)} " + hashlib.sha1(data).hexdigest()[:16]
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        out[prefix.rstrip("/")] = repr(obj)
    else:
        out[prefix.rstrip("/")] = type(obj).__name__
    return out


def complete_state(trainer) -> dict:
    """The complete weights and optimizer state of a sharded run, gathered on every rank (collective)."""
    if trainer.is_fsdp_enabled:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        return {
            "weights": digest(get_model_state_dict(trainer.model_wrapped, options=options)),
            "optimizer": digest(get_optimizer_state_dict(trainer.model_wrapped, trainer.optimizer, options=options)),
        }
    engine = trainer.model_wrapped  # DeepSpeed's engine; one process holds every partition
    params = list(engine.module.parameters())
    gather = contextlib.nullcontext()
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gather:
        weights = digest({n: p for n, p in engine.module.named_parameters()})
    optimizer = engine.optimizer.state_dict()
    optimizer = {k: v for k, v in optimizer.items() if k not in ("ds_config", "ds_version")}
    return {"weights": weights, "optimizer": digest(optimizer)}


class Snapshot:
    """A callback that fingerprints the complete state at the save and right after a resume loaded it."""

    def __new__(cls):
        import transformers

        class _Snapshot(transformers.TrainerCallback):
            trainer = None
            at_save = at_resume = None

            def on_train_begin(self, args, state, control, **kwargs):
                if state.global_step > 0:
                    self.at_resume = complete_state(self.trainer)

            def on_save(self, args, state, control, **kwargs):
                if state.global_step == SAVE_STEP:
                    self.at_save = complete_state(self.trainer)

        return _Snapshot()


def files_under(folder: str) -> list[str]:
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(root, n), folder) for n in names]
    return sorted(found)


# ------------------------------------------------------------------------------------------------ runs
def classes(lib: str):
    import transformers

    import looptrain

    if lib == "looptrain":
        return looptrain.Trainer, looptrain.TrainingArguments
    return transformers.Trainer, transformers.TrainingArguments


DETERMINISTIC = False  # --deterministic (on a GPU): full_determinism, so that two runs can agree bit for bit


def run(lib: str, output_dir: str, sharding: dict, train_size: int, resume_from: str | None = None) -> dict:
    trainer_cls, args_cls = classes(lib)
    args = args_cls(
        output_dir=output_dir,
        report_to="none",
        disable_tqdm=True,
        seed=42,
        full_determinism=DETERMINISTIC,
        use_cpu="fsdp" in sharding and not torch.cuda.is_available(),  # (DeepSpeed needs use_cpu=False on CPUs too)
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
        max_grad_norm=0.5,
        learning_rate=1e-3,
        weight_decay=0.01,
        warmup_steps=1,
        logging_steps=1,
        save_strategy="steps",
        save_steps=SAVE_STEP,
        **sharding,
    )
    snapshot = Snapshot()
    trainer = trainer_cls(
        model=tiny_bert(), args=args, train_dataset=random_token_dataset(train_size, seed=1), callbacks=[snapshot]
    )
    snapshot.trainer = trainer
    with contextlib.redirect_stdout(io.StringIO()):
        result = trainer.train(resume_from_checkpoint=resume_from)
    end = complete_state(trainer)
    trainer.accelerator.wait_for_everyone()
    checkpoint = os.path.join(output_dir, f"checkpoint-{SAVE_STEP}")
    out = {
        "log": strip_timing(trainer.state.log_history),
        "global_step": result.global_step,
        "world_size": trainer.args.world_size,
        "is_fsdp_enabled": trainer.is_fsdp_enabled,
        "is_deepspeed_enabled": trainer.is_deepspeed_enabled,
        "at_save": snapshot.at_save,
        "at_resume": snapshot.at_resume,
        "end": end,
        "checkpoint_files": files_under(checkpoint) if resume_from is None and os.path.isdir(checkpoint) else [],
        "leftovers": sorted(n for n in os.listdir(output_dir) if n.startswith(".tmp"))
        if os.path.isdir(output_dir)
        else [],
    }
    if trainer.is_deepspeed_enabled:
        out["deepspeed_config"] = _jsonable(trainer.accelerator.deepspeed_config)
    if trainer.is_fsdp_enabled:
        # what a resume must restore: each rank's own shard of the optimizer state differs from the others'
        local = trainer.optimizer.state_dict()["state"]
        out["local_optimizer_shard"] = digest(local, local=True)
    del trainer
    return out


def sharded_runs(workdir: str, name: str, sharding: dict, train_size: int) -> dict:
    """The five runs of one setup."""
    folder = lambda *parts: os.path.join(workdir, name, *parts)  # noqa: E731
    checkpoint = lambda lib: folder(lib, f"checkpoint-{SAVE_STEP}")  # noqa: E731
    results = {lib: run(lib, folder(lib), sharding, train_size) for lib in LIBS}
    results["looptrain_from_looptrain"] = run(
        "looptrain", folder("lt-lt"), sharding, train_size, checkpoint("looptrain")
    )
    results["looptrain_from_transformers"] = run(
        "looptrain", folder("lt-hf"), sharding, train_size, checkpoint("transformers")
    )
    results["transformers_from_looptrain"] = run(
        "transformers", folder("hf-lt"), sharding, train_size, checkpoint("looptrain")
    )
    return results


# ------------------------------------------------------------------------------------------------ what each hands accelerate
def _plain(value):
    """A JSON-comparable description of a plugin field."""
    if isinstance(value, functools.partial):
        return {
            "partial": _plain(value.func),
            "args": [_plain(a) for a in value.args],
            "keywords": {k: _plain(v) for k, v in sorted(value.keywords.items())},
        }
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return str(value)
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    if dataclasses.is_dataclass(value):
        return {type(value).__name__: {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    return f"{type(value).__name__}({_plain(vars(value)) if hasattr(value, '__dict__') else repr(value)})"


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def describe_fsdp_plugin(plugin) -> dict:
    return {f.name: _plain(getattr(plugin, f.name)) for f in dataclasses.fields(plugin)}


# Each is TrainingArguments(**kwargs) for both libraries (5.24's string and list forms of fsdp= included).
FSDP_COMBINATIONS = {
    "fsdp=True": dict(fsdp=True),
    "string full_shard auto_wrap": dict(fsdp="full_shard auto_wrap"),
    "string shard_grad_op offload": dict(fsdp="shard_grad_op offload"),
    "list full_shard offload auto_wrap": dict(fsdp=["full_shard", "offload", "auto_wrap"]),
    "transformer wrap, sharded state dict, activation checkpointing": dict(
        fsdp=True,
        fsdp_config={
            "transformer_layer_cls_to_wrap": "BertLayer",
            "state_dict_type": "SHARDED_STATE_DICT",
            "activation_checkpointing": True,
            "reshard_after_forward": False,
        },
    ),
    "size wrap, cpu_ram_efficient_loading": dict(
        fsdp=True,
        fsdp_config={"auto_wrap_policy": "SIZE_BASED_WRAP", "min_num_params": 1000, "cpu_ram_efficient_loading": True},
    ),
    "fsdp_ prefixed keys from a JSON file": dict(fsdp=True, fsdp_config="FSDP_JSON"),
    "bf16": dict(fsdp=True, bf16=True, fsdp_config={"transformer_layer_cls_to_wrap": ["BertLayer"]}),
    "version 1, hybrid_shard, prefetch": dict(
        fsdp="hybrid_shard auto_wrap",
        fsdp_config={
            "version": 1,
            "backward_prefetch": "backward_pre",
            "forward_prefetch": True,
            "use_orig_params": False,
            "sync_module_states": False,
            "limit_all_gathers": True,
        },
    ),
}


def fsdp_plugins(workdir: str) -> dict:
    """The FSDP plugin each library hands accelerate, per argument combination, and from fsdp.yaml's environment."""
    json_path = os.path.join(workdir, f"fsdp_config.rank{rank()}.json")
    os.makedirs(workdir, exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(
            {
                "fsdp_transformer_layer_cls_to_wrap": ["BertLayer"],
                "fsdp_state_dict_type": "FULL_STATE_DICT",
                "fsdp_version": 2,
                "fsdp_activation_checkpointing": "true",
            },
            f,
        )
    results = {}
    for name, kwargs in FSDP_COMBINATIONS.items():
        if kwargs.get("fsdp_config") == "FSDP_JSON":
            kwargs = {**kwargs, "fsdp_config": json_path}
        results[name] = {}
        for lib in LIBS:
            trainer_cls, args_cls = classes(lib)
            with contextlib.redirect_stderr(io.StringIO()):  # the deprecation warnings of the string forms
                args = args_cls(
                    output_dir=os.path.join(workdir, "plugins"),
                    report_to="none",
                    use_cpu=True,
                    **json.loads(json.dumps(kwargs)),
                )
            trainer = trainer_cls(model=tiny_bert(), args=args)
            results[name][lib] = describe_fsdp_plugin(trainer.accelerator.state.fsdp_plugin)
    results["accelerate config file (fsdp.yaml)"] = {}
    with config_file_environment(os.path.join(ROOT, "examples", "accelerate_configs", "fsdp.yaml"), processes=2):
        for lib in LIBS:
            trainer_cls, args_cls = classes(lib)
            args = args_cls(output_dir=os.path.join(workdir, "plugins"), report_to="none", use_cpu=True)
            trainer = trainer_cls(model=tiny_bert(), args=args)
            results["accelerate config file (fsdp.yaml)"][lib] = describe_fsdp_plugin(
                trainer.accelerator.state.fsdp_plugin
            )
    return results


@contextlib.contextmanager
def config_file_environment(config_file: str, processes: int):
    """The environment `accelerate launch --config_file <file>` gives its processes (accelerate's own code computes
    it), set for the duration: the processes here were started by torch.distributed.run."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    parsed = launch_command_parser().parse_args(
        ["--config_file", config_file, "--num_processes", str(processes), "x.py"]
    )
    parsed, defaults, _ = _validate_launch_command(parsed)
    if parsed.use_deepspeed:
        # as accelerate's launch_command does before it prepares a DeepSpeed launch
        fields = list(defaults.deepspeed_config.keys()) if defaults else []
        if defaults and "mixed_precision" in defaults.__dict__ and defaults.mixed_precision:
            fields.append("mixed_precision")
        parsed.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(parsed)
    else:
        env = prepare_multi_gpu_env(parsed)
    keep = {
        k: v
        for k, v in env.items()
        if k.startswith(("ACCELERATE_", "FSDP_")) and k not in ("ACCELERATE_DYNAMO_BACKEND",)
    }
    saved = {k: os.environ.get(k) for k in keep}
    os.environ.update(keep)
    try:
        yield keep
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def deepspeed_configs(workdir: str) -> dict:
    """The DeepSpeed config each library hands accelerate from deepspeed_zero2.yaml's environment (no deepspeed=)."""
    results = {}
    with config_file_environment(
        os.path.join(ROOT, "examples", "accelerate_configs", "deepspeed_zero2.yaml"), processes=1
    ):
        for lib in LIBS:
            trainer_cls, args_cls = classes(lib)
            # the file sets gradient_accumulation_steps 1 and gradient_clipping 1.0: the arguments must agree (Trainer
            # refuses a mismatch when it starts DeepSpeed); the batch size is "auto", filled in from the arguments
            args = args_cls(
                output_dir=os.path.join(workdir, "plugins"),
                report_to="none",
                gradient_accumulation_steps=1,
                max_grad_norm=1.0,
                per_device_train_batch_size=4,
            )
            trainer = trainer_cls(model=tiny_bert(), args=args)
            results[lib] = {
                "enabled": trainer.is_deepspeed_enabled,
                "config": _jsonable(trainer.accelerator.state.deepspeed_plugin.deepspeed_config),
            }
    return results


# ------------------------------------------------------------------------------------------------ modes
ZERO2 = {  # Trainer's optimizer and schedule, ZeRO-2 partitions them
    "zero_optimization": {"stage": 2},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}
ZERO3 = {  # DeepSpeed's own optimizer and schedule, filled in from the arguments; weights not gathered for saves
    "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False},
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", "torch_adam": True},
    },
    "scheduler": {
        "type": "WarmupDecayLR",
        "params": {
            "warmup_min_lr": "auto",
            "warmup_max_lr": "auto",
            "warmup_num_steps": "auto",
            "total_num_steps": "auto",
        },
    },
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


FSDP_SETUPS = ("SHARDED_STATE_DICT", "FULL_STATE_DICT")
DEEPSPEED_SETUPS = {"zero2": ZERO2, "zero3": ZERO3}


def mode_fsdp(workdir: str, setups, plugins: bool = True) -> dict:
    allow_fsdp_on_cpu()  # (a no-op on GPUs)
    results = {"plugins": fsdp_plugins(os.path.join(workdir, "plugins"))} if plugins else {}
    wrap = {"transformer_layer_cls_to_wrap": ["BertLayer"]}
    # 16 examples per process, 4 per micro-batch: 4 micro-batches per process and epoch, 2 optimizer steps
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    for state_dict_type in setups or FSDP_SETUPS:
        sharding = {"fsdp": True, "fsdp_config": {**wrap, "state_dict_type": state_dict_type}}
        results[state_dict_type] = sharded_runs(workdir, state_dict_type, sharding, train_size=16 * world_size)
    return results


def mode_deepspeed(workdir: str, setups, plugins: bool = True) -> dict:
    if not torch.cuda.is_available():
        skip_deepspeed_shm_kernel()
    results = {"config_file": deepspeed_configs(workdir)} if plugins else {}
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    for name in setups or DEEPSPEED_SETUPS:
        results[name] = sharded_runs(workdir, name, {"deepspeed": DEEPSPEED_SETUPS[name]}, train_size=16 * world_size)
    return results


def checks(runs: dict) -> list[tuple[str, bool]]:
    """What the five runs of one setup must show (tests/test_sharded.py and scripts/gpu_check.py): (check, passed)."""
    hf, lt = runs["transformers"], runs["looptrain"]
    out = [
        ("looptrain == Trainer: every log value", lt["log"] == hf["log"]),
        ("looptrain == Trainer: complete weights and optimizer state at the save", lt["at_save"] == hf["at_save"]),
        ("looptrain == Trainer: complete final weights and optimizer state", lt["end"] == hf["end"]),
    ]
    for name in ("looptrain_from_looptrain", "looptrain_from_transformers", "transformers_from_looptrain"):
        resumed = runs[name]
        out += [
            (
                f"{name}: optimizer state after loading == the state saved",
                resumed["at_resume"]["optimizer"] == lt["at_save"]["optimizer"],
            ),
            (
                f"{name}: weights after loading == the weights saved",
                resumed["at_resume"]["weights"] == lt["at_save"]["weights"],
            ),
            (
                f"{name}: losses after the resume == the uninterrupted run's",
                [e for e in resumed["log"] if "loss" in e] == [e for e in lt["log"] if "loss" in e],
            ),
            (f"{name}: final weights and optimizer state == the uninterrupted run's", resumed["end"] == lt["end"]),
        ]
    hf_files = {f for f in hf["checkpoint_files"] if f != "training_args.bin"}
    out += [
        ("looptrain's checkpoint holds every file of Trainer's", hf_files <= set(lt["checkpoint_files"])),
        (
            "the optimizer state changed after the save (the comparison is not vacuous)",
            lt["end"]["optimizer"] != lt["at_save"]["optimizer"],
        ),
        ("no staging folder left behind", lt["leftovers"] == []),
    ]
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("fsdp", "deepspeed"), required=True)
    parser.add_argument("--out", required=True, help="results go to <out>.rank<N>.json")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--setup", action="append", help="only these setups (default: all of the mode)")
    parser.add_argument("--no-plugins", action="store_true", help="skip the plugin/config comparisons")
    parser.add_argument("--deterministic", action="store_true", help="full_determinism=True (GPU runs)")
    opts = parser.parse_args()
    global DETERMINISTIC
    DETERMINISTIC = opts.deterministic
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    mode = mode_fsdp if opts.mode == "fsdp" else mode_deepspeed
    results = mode(opts.workdir, opts.setup, plugins=not opts.no_plugins)
    with open(f"{opts.out}.rank{rank()}.json", "w") as f:
        json.dump(results, f)
    from looptrain.backends import end_process_group

    end_process_group()  # gloo's threads must not outlive the interpreter: an abort at exit fails the launch


if __name__ == "__main__":
    main()
