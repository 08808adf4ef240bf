"""`TrainingArguments`: every knob of the loop, with transformers 5.24's names, defaults and checks.

Only the fields looptrain implements exist here, so nothing is accepted and then silently ignored.
Three extras over transformers 5.24, for code written against 4.x (the Hugging Face course among it):
the old spellings `evaluation_strategy=`, `warmup_ratio=` and `group_by_length=` are translated to
their 5.x fields with a deprecation warning instead of failing with a TypeError.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import Enum
from functools import cached_property
from typing import Any

from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType
from transformers.training_args import OptimizerNames

SUPPORTED_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
SUPPORTED_SAMPLING = ("random", "sequential", "group_by_length")

# Old keyword -> (new field, how to translate the value). transformers 5.x raises a TypeError for these.
_LEGACY_KWARGS = {
    "evaluation_strategy": ("eval_strategy", lambda v: v),
    "warmup_ratio": ("warmup_steps", lambda v: v),  # 5.x reads warmup_steps < 1 as a ratio
    "group_by_length": ("train_sampling_strategy", lambda v: "group_by_length" if v else "random"),
    "no_cuda": ("use_cpu", lambda v: v),
}


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class TrainingArguments:
    """The arguments of a training run, field for field those of `transformers.TrainingArguments` 5.24.

    Differences from transformers, all deliberate:
      * only implemented fields exist; an unknown keyword is a TypeError that suggests the closest name;
      * the pre-5.x keywords `evaluation_strategy`, `warmup_ratio`, `group_by_length` and `no_cuda` are
        accepted with a FutureWarning (transformers 5.24 raises TypeError);
      * no `torch.nn.DataParallel`: one process drives one device (`n_gpu` is 0 or 1). Use
        `accelerate launch` for several GPUs, as transformers recommends too.
    """

    output_dir: str | None = field(default=None, metadata=_help("Where checkpoints and the final model go (default 'trainer_output')."))
    do_train: bool = field(default=False, metadata=_help("Run training (read by scripts, not by the Trainer)."))
    do_eval: bool = field(default=False, metadata=_help("Run evaluation (read by scripts, not by the Trainer)."))
    do_predict: bool = field(default=False, metadata=_help("Run prediction (read by scripts, not by the Trainer)."))

    # --- batch sizes and length of training
    per_device_train_batch_size: int = field(default=8, metadata=_help("Batch size per device for training."))
    per_device_eval_batch_size: int = field(default=8, metadata=_help("Batch size per device for evaluation."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches accumulated before each optimizer step."))
    num_train_epochs: float = field(default=3.0, metadata=_help("Epochs to train; fractions are allowed."))
    max_steps: int = field(default=-1, metadata=_help("If > 0, the number of optimizer steps; overrides num_train_epochs."))

    # --- optimizer and schedule
    learning_rate: float = field(default=5e-5, metadata=_help("Peak learning rate of AdamW."))
    weight_decay: float = field(default=0.0, metadata=_help("Weight decay for all but bias and norm parameters."))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1."))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2."))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW epsilon."))
    optim: str = field(default="adamw_torch_fused", metadata=_help("'adamw_torch_fused' (default, as transformers 5.x) or 'adamw_torch'."))
    lr_scheduler_type: str = field(default="linear", metadata=_help("Any transformers scheduler name: linear, cosine, constant, ..."))
    lr_scheduler_kwargs: dict | str | None = field(default=None, metadata=_help("Extra keyword arguments for the scheduler (dict or JSON string)."))
    warmup_steps: float = field(default=0, metadata=_help("Warmup steps; a value below 1 is a ratio of the total steps."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm; 0 disables clipping (the norm is still logged)."))
    label_smoothing_factor: float = field(default=0.0, metadata=_help("Label smoothing epsilon; 0 disables it."))

    # --- logging
    logging_strategy: str = field(default="steps", metadata=_help("When to log: 'no', 'steps' or 'epoch'."))
    logging_steps: float = field(default=500, metadata=_help("Log every N steps; a value below 1 is a ratio of the total steps."))
    logging_first_step: bool = field(default=False, metadata=_help("Also log after the first step."))
    logging_nan_inf_filter: bool = field(default=True, metadata=_help("Replace NaN/Inf step losses by the running mean when logging."))
    log_level: str = field(default="passive", metadata=_help("transformers log level on the main process."))
    log_level_replica: str = field(default="warning", metadata=_help("transformers log level on the other processes."))
    disable_tqdm: bool | None = field(default=None, metadata=_help("Disable progress bars (then logs are printed)."))
    report_to: None | str | list[str] = field(default="none", metadata=_help("Integrations to report to ('none', 'tensorboard', ...)."))
    run_name: str | None = field(default=None, metadata=_help("A name for the run, shown by reporting integrations."))
    include_num_input_tokens_seen: str | bool = field(default="no", metadata=_help("Count input tokens: 'no', 'all' (or True) or 'non_padding'."))
    skip_memory_metrics: bool = field(default=True, metadata=_help("Accepted for compatibility; memory metrics are not collected."))

    # --- evaluation
    eval_strategy: str = field(default="no", metadata=_help("When to evaluate: 'no', 'steps' or 'epoch'."))
    eval_steps: float | None = field(default=None, metadata=_help("Evaluate every N steps (defaults to logging_steps); < 1 is a ratio."))
    eval_delay: float = field(default=0, metadata=_help("Epochs or steps to wait before the first evaluation."))
    eval_on_start: bool = field(default=False, metadata=_help("Evaluate once before training starts."))
    eval_accumulation_steps: int | None = field(default=None, metadata=_help("Move predictions to the CPU every N eval steps."))
    eval_do_concat_batches: bool = field(default=True, metadata=_help("Concatenate eval predictions across batches."))
    batch_eval_metrics: bool = field(default=False, metadata=_help("Call compute_metrics on every batch (compute_result=True on the last) so memory stays flat."))
    prediction_loss_only: bool = field(default=False, metadata=_help("In predict/evaluate, only return the loss."))
    include_for_metrics: list[str] = field(default_factory=list, metadata=_help("Also pass 'inputs' and/or 'loss' to compute_metrics."))

    # --- checkpoints
    save_strategy: str = field(default="steps", metadata=_help("When to save: 'no', 'steps', 'epoch' or 'best'."))
    save_steps: float = field(default=500, metadata=_help("Save every N steps; a value below 1 is a ratio of the total steps."))
    save_total_limit: int | None = field(default=None, metadata=_help("Keep at most this many checkpoints (the best one is kept)."))
    save_only_model: bool = field(default=False, metadata=_help("Save only the model, not optimizer/scheduler/RNG state (no resume)."))
    load_best_model_at_end: bool = field(default=False, metadata=_help("Load the best checkpoint at the end of training."))
    metric_for_best_model: str | None = field(default=None, metadata=_help("Metric that picks the best checkpoint (default 'loss')."))
    greater_is_better: bool | None = field(default=None, metadata=_help("Whether a larger metric_for_best_model is better."))
    ignore_data_skip: bool = field(default=False, metadata=_help("On resume, do not skip the batches already seen."))
    resume_from_checkpoint: str | None = field(default=None, metadata=_help("Checkpoint to resume from (read by scripts)."))

    # --- reproducibility and devices
    seed: int = field(default=42, metadata=_help("Seed set at Trainer construction."))
    data_seed: int | None = field(default=None, metadata=_help("Seed of the training sampler (default: seed)."))
    full_determinism: bool = field(default=False, metadata=_help("Call enable_full_determinism instead of set_seed."))
    use_cpu: bool = field(default=False, metadata=_help("Train on the CPU even if an accelerator is present."))
    fp16: bool = field(default=False, metadata=_help("fp16 mixed precision through accelerate (with a GradScaler)."))
    bf16: bool = field(default=False, metadata=_help("bf16 mixed precision through accelerate."))
    torch_compile: bool = field(default=False, metadata=_help("Compile the model with torch.compile through accelerate."))
    torch_compile_backend: str | None = field(default=None, metadata=_help("torch.compile backend (implies torch_compile)."))
    torch_compile_mode: str | None = field(default=None, metadata=_help("torch.compile mode (implies torch_compile)."))
    use_cache: bool = field(default=False, metadata=_help("Value written to model.config.use_cache."))
    local_rank: int = field(default=-1, metadata=_help("Set by old launchers; use accelerate launch instead."))
    ddp_backend: str | None = field(default=None, metadata=_help("torch.distributed backend (nccl, gloo, ...)."))
    ddp_timeout: int = field(default=1800, metadata=_help("torch.distributed timeout in seconds."))
    ddp_find_unused_parameters: bool | None = field(default=None, metadata=_help("DDP find_unused_parameters (default True)."))
    average_tokens_across_devices: bool = field(default=True, metadata=_help("Sum num_items_in_batch across processes."))

    # --- data
    dataloader_drop_last: bool = field(default=False, metadata=_help("Drop the last incomplete batch."))
    dataloader_num_workers: int = field(default=0, metadata=_help("DataLoader worker processes."))
    dataloader_pin_memory: bool = field(default=True, metadata=_help("Pin memory in the DataLoader (forced off with use_cpu)."))
    dataloader_persistent_workers: bool = field(default=False, metadata=_help("Keep DataLoader workers alive between epochs."))
    dataloader_prefetch_factor: int | None = field(default=None, metadata=_help("Batches each worker loads ahead."))
    remove_unused_columns: bool = field(default=True, metadata=_help("Drop dataset columns that model.forward does not take."))
    label_names: list[str] | None = field(default=None, metadata=_help("Input keys holding the labels (default: forward arguments with 'label')."))
    train_sampling_strategy: str = field(default="random", metadata=_help("'random', 'sequential' or 'group_by_length'."))
    length_column_name: str = field(default="length", metadata=_help("Column with precomputed lengths for group_by_length."))

    def __post_init__(self):
        # transformers: output_dir=None -> "trainer_output"
        self.output_dir = os.path.expanduser(self.output_dir if self.output_dir is not None else "trainer_output")
        if isinstance(self.lr_scheduler_kwargs, str) and self.lr_scheduler_kwargs.startswith("{"):
            self.lr_scheduler_kwargs = json.loads(self.lr_scheduler_kwargs)
        if self.disable_tqdm is None:
            # transformers: progress bars unless the transformers logger is quieter than WARNING
            from transformers.utils import logging as hf_logging

            self.disable_tqdm = hf_logging.get_logger("transformers").getEffectiveLevel() > hf_logging.WARN
        if isinstance(self.include_num_input_tokens_seen, bool):
            self.include_num_input_tokens_seen = "all" if self.include_num_input_tokens_seen else "no"
        if self.include_num_input_tokens_seen not in ("no", "all", "non_padding"):
            raise ValueError(
                f"include_num_input_tokens_seen={self.include_num_input_tokens_seen!r}: use 'no', 'all' or 'non_padding'."
            )

        self.eval_strategy = _enum(IntervalStrategy, self.eval_strategy, "eval_strategy")
        self.logging_strategy = _enum(IntervalStrategy, self.logging_strategy, "logging_strategy")
        self.save_strategy = _enum(SaveStrategy, self.save_strategy, "save_strategy")
        self.lr_scheduler_type = _enum(SchedulerType, self.lr_scheduler_type, "lr_scheduler_type")
        self.optim = _enum(OptimizerNames, self.optim, "optim")
        if self.optim not in SUPPORTED_OPTIMIZERS:
            raise ValueError(
                f"optim={self.optim.value!r} is not implemented by looptrain; use one of {SUPPORTED_OPTIMIZERS}, "
                "or pass your own optimizer with Trainer(optimizers=(optimizer, scheduler))."
            )
        if self.train_sampling_strategy not in SUPPORTED_SAMPLING:
            raise ValueError(
                f"train_sampling_strategy={self.train_sampling_strategy!r} is not implemented by looptrain; "
                f"use one of {SUPPORTED_SAMPLING}, or override Trainer._get_train_sampler."
            )

        if self.eval_strategy != IntervalStrategy.NO:
            self.do_eval = True  # transformers does the same, for scripts that read do_eval
        # transformers: eval_strategy="steps" without eval_steps evaluates every logging_steps
        if self.eval_strategy == IntervalStrategy.STEPS and not self.eval_steps:
            if self.logging_steps <= 0:
                raise ValueError("eval_strategy='steps' needs a non-zero eval_steps or logging_steps.")
            self.eval_steps = self.logging_steps
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
        if self.lr_scheduler_type in (SchedulerType.REDUCE_ON_PLATEAU, SchedulerType.GREEDY) and self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")
        if self.report_to in (None, "none", ["none"]):
            self.report_to = []
        elif self.report_to in ("all", ["all"]):
            from transformers.integrations import get_available_reporting_integrations

            self.report_to = get_available_reporting_integrations()
        elif not isinstance(self.report_to, list):
            self.report_to = [self.report_to]

        self._validate()

        self.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if self.fp16:
            self.mixed_precision = "fp16"
        elif self.bf16:
            self.mixed_precision = "bf16"
        if (self.torch_compile_mode is not None or self.torch_compile_backend is not None) and not self.torch_compile:
            self.torch_compile = True
        if self.torch_compile and self.torch_compile_backend is None:
            self.torch_compile_backend = "inductor"
        if self.use_cpu:
            self.dataloader_pin_memory = False  # transformers does the same
        self.device  # set up the (distributed) process state now, as transformers does

    def _validate(self):
        """Reject impossible combinations with transformers' checks, and say how to fix each."""
        for name in ("logging", "eval", "save"):
            strategy = getattr(self, f"{name}_strategy")
            steps = getattr(self, f"{name}_steps")
            if strategy == "steps" and steps is not None:
                if steps <= 0:
                    raise ValueError(f"{name}_strategy='steps' needs {name}_steps > 0, got {steps}.")
                if steps > 1:
                    if steps != int(steps):
                        raise ValueError(f"{name}_steps must be an integer when it is above 1 (a ratio below 1), got {steps}.")
                    setattr(self, f"{name}_steps", int(steps))
        if self.load_best_model_at_end and self.save_strategy != SaveStrategy.BEST:
            if self.eval_strategy != self.save_strategy:
                raise ValueError(
                    "load_best_model_at_end=True requires eval_strategy and save_strategy to match (or "
                    f"save_strategy='best'), but eval_strategy={self.eval_strategy.value!r} and "
                    f"save_strategy={self.save_strategy.value!r}."
                )
            if self.eval_strategy == IntervalStrategy.STEPS and self.save_steps % self.eval_steps != 0:
                raise ValueError(
                    "load_best_model_at_end=True requires save_steps to be a multiple of eval_steps, "
                    f"but save_steps={self.save_steps} and eval_steps={self.eval_steps}."
                )
        if self.save_strategy == SaveStrategy.BEST and self.metric_for_best_model is None:
            raise ValueError("save_strategy='best' needs metric_for_best_model (for example 'loss' or 'accuracy').")
        if self.fp16 and self.bf16:
            raise ValueError("fp16=True and bf16=True: choose at most one mixed precision.")
        if self.lr_scheduler_type in (SchedulerType.REDUCE_ON_PLATEAU, SchedulerType.GREEDY) and self.eval_strategy == "no":
            raise ValueError(f"lr_scheduler_type={self.lr_scheduler_type.value!r} steps on eval metrics: set an eval_strategy.")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 (a count, or a ratio below 1), got {self.warmup_steps}.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            raise ValueError(
                f"Nothing to train: max_steps={self.max_steps}, num_train_epochs={self.num_train_epochs}. "
                "Set max_steps > 0 or num_train_epochs > 0."
            )
        if self.dataloader_num_workers == 0 and self.dataloader_prefetch_factor is not None:
            raise ValueError("dataloader_prefetch_factor needs dataloader_num_workers > 0.")
        if self.eval_accumulation_steps is not None and self.eval_accumulation_steps < 1:
            raise ValueError(f"eval_accumulation_steps must be at least 1, got {self.eval_accumulation_steps}.")
        unknown = set(self.include_for_metrics) - {"inputs", "loss"}
        if unknown:
            raise ValueError(f"include_for_metrics accepts 'inputs' and 'loss', got {sorted(unknown)}.")

    # ------------------------------------------------------------------ devices
    @cached_property
    def _setup_devices(self):
        """Create accelerate's process state, as `transformers.TrainingArguments._setup_devices` does.

        Like transformers, this resets any earlier accelerate state first, so arguments built in the
        same process one after the other (the parity tests do this) each get the state they ask for.
        """
        import torch
        from accelerate.state import AcceleratorState, PartialState
        from datetime import timedelta

        AcceleratorState._reset_state(reset_partial_state=True)
        cpu = self.use_cpu or os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
        self.distributed_state = PartialState(cpu=cpu, backend=self.ddp_backend, timeout=timedelta(seconds=self.ddp_timeout))
        device = self.distributed_state.device
        if cpu:
            device = torch.device("cpu")
        return device

    @property
    def device(self):
        """The device this process trains on."""
        return self._setup_devices

    @property
    def n_gpu(self) -> int:
        """Accelerators driven by this process: 0 on CPU, else 1 (looptrain never uses DataParallel)."""
        return 0 if self.device.type == "cpu" else 1

    @property
    def world_size(self) -> int:
        """Number of processes (1 unless launched with accelerate launch / torchrun)."""
        return self.distributed_state.num_processes

    @property
    def process_index(self) -> int:
        """This process's rank among all processes."""
        return self.distributed_state.process_index

    @property
    def local_process_index(self) -> int:
        """This process's rank on its machine."""
        return self.distributed_state.local_process_index

    @property
    def should_log(self) -> bool:
        """Whether this process logs (the first process of each machine, as transformers' default)."""
        return self.local_process_index == 0

    @property
    def should_save(self) -> bool:
        """Only the main process writes checkpoints and results."""
        return self.process_index == 0

    @property
    def parallel_mode(self):
        """transformers' `ParallelMode`: NOT_PARALLEL on one process, DISTRIBUTED on several."""
        from transformers.training_args import ParallelMode

        if self.distributed_state.distributed_type.value == "NO":
            return ParallelMode.NOT_PARALLEL
        return ParallelMode.DISTRIBUTED

    @property
    def train_batch_size(self) -> int:
        """Training batch size of this process (per_device_train_batch_size; there is no DataParallel)."""
        return self.per_device_train_batch_size

    @property
    def eval_batch_size(self) -> int:
        """Evaluation batch size of this process."""
        return self.per_device_eval_batch_size

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """transformers 5.x: a value >= 1 is a count, a value below 1 a ratio of the steps, rounded up."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        return math.ceil(num_training_steps * self.warmup_steps)

    def get_process_log_level(self) -> int:
        """The transformers log level for this process (log_level on the main one, log_level_replica elsewhere)."""
        from transformers.utils import logging as hf_logging

        levels = {**hf_logging.log_levels, "passive": -1}
        level = levels[self.log_level if self.should_log else self.log_level_replica]
        return hf_logging.get_verbosity() if level == -1 else level

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (enums as strings), as transformers' `to_dict`."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in d.items()}

    def to_json_string(self) -> str:
        """`to_dict()` as indented JSON; checkpoints store it as training_args.json."""
        return json.dumps(self.to_dict(), indent=2)

    def to_sanitized_dict(self) -> dict[str, Any]:
        """Scalars only, for reporting integrations' hyper-parameter tables (as transformers)."""
        d = {**self.to_dict(), "train_batch_size": self.train_batch_size, "eval_batch_size": self.eval_batch_size}
        return {k: v if type(v) in (bool, int, float, str) else str(v) for k, v in d.items()}

    def __str__(self):
        return f"{type(self).__name__}(\n" + "".join(f"{k}={v},\n" for k, v in sorted(self.to_dict().items())) + ")"

    __repr__ = __str__

    # ------------------------------------------------------------------ transformers interop
    @classmethod
    def from_transformers(cls, hf_args) -> "TrainingArguments":
        """Convert a `transformers.TrainingArguments`.

        Every field looptrain knows is copied. Any other field that differs from transformers' default
        is a feature looptrain does not implement: rather than ignore it, raise and list them all.
        """
        import transformers

        defaults = transformers.TrainingArguments(output_dir=hf_args.output_dir)
        ours = {f.name for f in fields(cls) if f.init}
        unsupported = []
        for f in fields(hf_args):
            if not f.init or f.name in ours:
                continue
            value, default = getattr(hf_args, f.name), getattr(defaults, f.name)
            if _differs(value, default):
                unsupported.append(f"{f.name}={value!r}")
        if unsupported:
            raise ValueError(
                "These transformers.TrainingArguments fields are set but looptrain does not implement them: "
                + ", ".join(unsupported)
                + ". Remove them, or use transformers.Trainer for these features."
            )
        kwargs = {name: getattr(hf_args, name) for name in ours if hasattr(hf_args, name)}
        for name in ("eval_strategy", "logging_strategy", "save_strategy", "lr_scheduler_type", "optim"):
            kwargs[name] = _enum_value(kwargs[name])
        return cls(**kwargs)


def _differs(value, default) -> bool:
    try:
        return bool(value != default)
    except Exception:  # objects without a usable __eq__ (configs, arrays)
        return value is not default


def _enum(enum_cls, value, name):
    try:
        return enum_cls(_enum_value(value))
    except ValueError:
        choices = [e.value for e in enum_cls]
        raise ValueError(f"{name}={value!r} is not valid; choose one of {choices}.") from None


def _enum_value(value):
    return value.value if isinstance(value, Enum) else value


# ---------------------------------------------------------------------------- legacy keywords
_dataclass_init = TrainingArguments.__init__


def _init_with_legacy_names(self, *args, **kwargs):
    """Accept the 4.x spellings (and TypeError with a suggestion for any unknown keyword)."""
    for old, (new, translate) in _LEGACY_KWARGS.items():
        if old not in kwargs:
            continue
        value = kwargs.pop(old)
        if old == "warmup_ratio" and not 0 <= value < 1:
            raise ValueError(f"warmup_ratio={value} must be in [0, 1); for a count of steps use warmup_steps={value}.")
        translated = translate(value)
        if new in kwargs and kwargs[new] != translated:
            raise ValueError(
                f"Both {old}={value!r} and {new}={kwargs[new]!r} were given and they disagree. "
                f"{old} is the pre-5.x spelling of {new}: pass only {new}."
            )
        warnings.warn(
            f"TrainingArguments({old}=...) is the pre-5.x spelling; use {new}={translated!r} instead "
            "(transformers 5.x raises a TypeError for it).",
            FutureWarning,
            stacklevel=2,
        )
        kwargs[new] = translated
    known = {f.name for f in fields(TrainingArguments) if f.init}
    for name in kwargs:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"TrainingArguments got an unexpected keyword argument {name!r}.{hint}")
    _dataclass_init(self, *args, **kwargs)


_init_with_legacy_names.__signature__ = __import__("inspect").signature(_dataclass_init)
TrainingArguments.__init__ = _init_with_legacy_names


def default_of(name: str):
    """The declared default of a field (used by tests that compare with transformers)."""
    f = TrainingArguments.__dataclass_fields__[name]
    return f.default_factory() if f.default is MISSING else f.default


__all__ = ["TrainingArguments"]
