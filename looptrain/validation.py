"""Every input checked where it enters the loop, by kind: arguments, paths, callbacks, the optimizer and scheduler
a user passes, the datasets' columns, the first step (does the loss reach what the optimizer updates?).

The principle, shared with `checks.py`: a check refuses only what cannot train, or what trains to nothing (a run
whose optimizer steps cannot change a weight), and only where that is certain from host-side facts (types,
`requires_grad` flags, parameter identity, dataset schemas); each error names the object, the offending value and
the fix, and comes before any file is written. What cannot be known before training is explained at the first
step, from facts that cost no device synchronisation (`p.grad is None`, `loss.requires_grad`).
"""

from __future__ import annotations

import math
import os

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from .checkpoint import remove_debris

logger = logging.get_logger(__name__)


# ------------------------------------------------------------------------------------------ arguments
_VERB = {"logging_steps": "log", "save_steps": "save", "eval_steps": "evaluate"}


def check_argument_values(args) -> None:
    """Values transformers.TrainingArguments accepts that cannot mean anything; torch or numpy would fail on them
    later, deep inside the optimizer or the seeding, with a message that does not name the argument."""
    for name in (
        "learning_rate",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "label_smoothing_factor",
        "num_train_epochs",
        "warmup_steps",
    ):
        value = getattr(args, name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(
                f"{name}={value} is not a finite number; give a real value (see its default, TrainingArguments.{name})."
            )
    for name, strategy in (
        ("logging_steps", "logging_strategy"),
        ("save_steps", "save_strategy"),
        ("eval_steps", "eval_strategy"),
    ):
        value = getattr(args, name)
        if (
            str(getattr(getattr(args, strategy), "value", getattr(args, strategy))) == "steps"
            and value is not None
            and value < 0
            or (
                name == "save_steps"
                and value == 0
                and str(getattr(args.save_strategy, "value", args.save_strategy)) == "steps"
            )
        ):
            raise ValueError(
                f"{name}={value} with {strategy}='steps' would never {_VERB[name]} (transformers.Trainer then "
                f"silently never does). Give {name} a number of steps (or a ratio of the run below 1), or set {strategy}='no'."
            )
    if args.learning_rate < 0:
        raise ValueError(
            f"learning_rate={args.learning_rate} is negative: the optimizer would climb the loss (torch refuses it when "
            "the optimizer is built). Use a positive learning rate, e.g. learning_rate=5e-5."
        )
    for name in ("seed", "data_seed"):
        value = getattr(args, name)
        if value is not None and not 0 <= value < 2**32:
            raise ValueError(
                f"{name}={value} is outside 0..2**32-1, the seeds numpy accepts; pick a seed in that range."
            )
    if not 0 <= args.label_smoothing_factor < 1:
        raise ValueError(
            f"label_smoothing_factor={args.label_smoothing_factor} is outside [0, 1): the smoothed target would give the "
            "true class no weight or a negative one. Use a small value such as 0.1, or 0 to turn it off."
        )
    if args.dataloader_num_workers < 0:
        raise ValueError(
            f"dataloader_num_workers={args.dataloader_num_workers} is negative; use 0 (load in the main process) or more."
        )
    optim = str(getattr(args.optim, "value", args.optim))
    if "adam" in optim or "lion" in optim:  # the optimizers that read the betas and epsilon
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(args, name) < 1:
                raise ValueError(
                    f"{name}={getattr(args, name)} is outside [0, 1), where {optim} needs it (e.g. 0.9 and 0.999)."
                )
        if args.adam_epsilon < 0:
            raise ValueError(f"adam_epsilon={args.adam_epsilon} is negative; use a small positive value such as 1e-8.")


# ------------------------------------------------------------------------------------------ paths
def check_output_dir(args) -> None:
    """`output_dir` must be a folder that can be written (or created): said before anything is written there."""
    if not args.should_save:
        return
    path = os.path.abspath(os.fspath(args.output_dir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"output_dir={args.output_dir!r} is an existing file, not a folder: the checkpoints and the model are written "
            "into a folder there. Choose another output_dir, or move the file away."
        )
    parent = path
    while not os.path.exists(parent):  # the nearest existing folder is the one the new folders are created in
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"output_dir={args.output_dir!r} cannot be created: {parent} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"output_dir={args.output_dir!r} cannot be written: no write permission on {parent}. Choose another output_dir."
        )


# ------------------------------------------------------------------------------------------ callbacks
_EVENTS = sorted(name for name in vars(TrainerCallback) if name.startswith("on_"))


def check_callbacks(callbacks) -> None:
    """Each callback is a TrainerCallback (instance or class), or at least answers every event the loop fires."""
    if callbacks is None:
        return
    if isinstance(callbacks, (TrainerCallback, type)) or not isinstance(callbacks, (list, tuple)):
        raise TypeError(
            f"callbacks must be a list of TrainerCallback instances or classes, got {type(callbacks).__name__} "
            f"{callbacks!r}: pass callbacks=[{getattr(callbacks, '__name__', type(callbacks).__name__)}...]."
        )
    for callback in callbacks:
        cls = callback if isinstance(callback, type) else type(callback)
        if issubclass(cls, TrainerCallback):
            continue
        missing = [event for event in _EVENTS if not callable(getattr(callback, event, None))]
        if missing:
            raise TypeError(
                f"callbacks holds {callback!r}, which is not a transformers.TrainerCallback: it has no {missing[0]} "
                f"(nor {len(missing) - 1} other events the loop calls). Subclass TrainerCallback and override the events "
                "you need (on_step_end, on_log, ...)."
            )


# ------------------------------------------------------------------------------------------ optimizer and scheduler
def check_optimizers(model, optimizer, lr_scheduler) -> None:
    """An optimizer passed with optimizers= must update this model's parameters; a scheduler must drive that
    optimizer (one built for another optimizer would change nothing, and the run would train at a constant rate)."""
    if optimizer is not None and not (
        hasattr(optimizer, "param_groups") and callable(getattr(optimizer, "step", None))
    ):
        raise TypeError(
            f"optimizers=({type(optimizer).__name__}, ...): the first item must be a torch.optim.Optimizer, or None."
        )
    if lr_scheduler is not None and not callable(getattr(lr_scheduler, "step", None)):
        raise TypeError(
            f"optimizers=(..., {type(lr_scheduler).__name__}): the second item must be a learning-rate scheduler, or None."
        )
    scheduled = getattr(lr_scheduler, "optimizer", None)
    if lr_scheduler is not None and scheduled is not None:
        if optimizer is None:
            raise ValueError(
                f"optimizers=(None, {type(lr_scheduler).__name__}): the scheduler was built on an optimizer Trainer never "
                "uses (Trainer builds its own), so it would not change the learning rate. Pass both: "
                "optimizers=(optimizer, get_scheduler(..., optimizer)), or neither."
            )
        if scheduled is not optimizer and getattr(optimizer, "optimizer", None) is not scheduled:
            raise ValueError(
                f"optimizers=({type(optimizer).__name__}, {type(lr_scheduler).__name__}): the scheduler was built on another "
                "optimizer, so it would not change this one's learning rate. Build it on the optimizer you pass."
            )
    if optimizer is None or model is None:
        return
    ours = {id(p) for p in model.parameters()}
    theirs = [p for group in optimizer.param_groups for p in group["params"]]
    if theirs and not any(id(p) in ours for p in theirs):
        raise ValueError(
            f"optimizers=({type(optimizer).__name__}, ...) updates {len(theirs)} tensors, none of which is a parameter of "
            f"this {type(model).__name__}: training would not change the model. Build the optimizer on the model you pass "
            "(torch.optim.AdamW(model.parameters(), ...)), after loading it."
        )


# ------------------------------------------------------------------------------------------ before the first step
# The optimizers looptrain builds whose update is proportional to the learning rate (so lr 0 updates nothing)
_LR_SCALED = ("adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop", "adafactor")


def check_before_training(trainer) -> None:
    """Host-side facts about the run, before anything is written: something to train, a learning rate that moves it."""
    model, args = trainer.model, trainer.args
    trainer._first_backward_checked = False
    check_datasets(trainer)
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return  # their engines own the parameters (and flags); a check here could refuse a setup they handle
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            f"Every parameter of {type(model).__name__} has requires_grad=False, so training would change nothing (and "
            "the backward pass fails). Unfreeze what should learn, e.g. `for p in model.classifier.parameters(): "
            "p.requires_grad = True`, or attach trainable adapters (PEFT)."
        )
    check_output_dir(args)
    if args.should_save or args.local_process_index == 0:  # each machine's disk (save_on_each_node=False too)
        remove_debris(args.output_dir)  # what a killed save left behind
    if any(getattr(m, "running_mean", None) is not None for m in model.modules()):
        return  # batch-norm statistics change in the forward pass even at learning rate 0
    optim = str(getattr(args.optim, "value", args.optim))
    if (
        trainer.optimizer is None
        and trainer.optimizer_cls_and_kwargs is None
        and args.learning_rate == 0
        and optim in _LR_SCALED
    ):
        if _default(trainer, "create_optimizer"):
            raise ValueError(
                f"learning_rate=0 with optim={optim!r}: every optimizer step would leave the weights unchanged "
                "(transformers.Trainer runs the whole schedule without changing a weight). Set a learning rate above 0, "
                "e.g. 5e-5; to only evaluate, call trainer.evaluate() without train()."
            )
    optimizer = trainer.optimizer
    if optimizer is not None and type(optimizer) in (
        torch.optim.SGD,
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.RMSprop,
        torch.optim.Adagrad,
    ):
        scheduler = trainer.lr_scheduler
        lambda_like = scheduler is None or isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
        base = getattr(scheduler, "base_lrs", None) or [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        if lambda_like and all(g["lr"] == 0 for g in optimizer.param_groups) and all(lr == 0 for lr in base):
            raise ValueError(
                f"optimizers=({type(optimizer).__name__}(lr=0), ...): every parameter group has learning rate 0, and the "
                "schedule only scales it, so no step would change a weight. Build the optimizer with a learning rate above 0."
            )


def _default(trainer, name: str) -> bool:
    """Whether `name` is looptrain's own method (a subclass that overrides it may build any optimizer)."""
    owner = next((c for c in type(trainer).__mro__ if name in vars(c)), None)
    return owner is not None and owner.__module__.startswith("looptrain.")


def check_first_backward(trainer, model) -> None:
    """After the first micro-batch's backward: the loss reached at least one tensor the optimizer updates. Host-side
    (`p.grad is None`), once per train(); not under DeepSpeed/FSDP/LOMO, whose engines keep gradients elsewhere."""
    trainer._first_backward_checked = True
    optimizer = getattr(trainer, "optimizer", None)
    optim = str(getattr(trainer.args.optim, "value", trainer.args.optim))
    if optimizer is None or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled or "lomo" in optim:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if params and all(p.grad is None for p in params):
        name = type(trainer.accelerator.unwrap_model(model)).__name__
        raise RuntimeError(
            f"After the first backward pass none of the {len(params)} tensors the optimizer updates has a gradient: the "
            f"loss does not depend on them, so training would not change {name}. Is the optimizer built on another model "
            "or on frozen parameters, or does compute_loss / compute_loss_func detach the loss from the model's outputs?"
        )


# ------------------------------------------------------------------------------------------ datasets
def check_datasets(trainer) -> None:
    """The datasets the run will read (the evaluation sets only when training evaluates), where a collator of
    transformers' that passes columns through unchanged hands them to the model (`check_columns`)."""
    import transformers

    try:
        import datasets
    except ImportError:
        return
    args, collator = trainer.args, trainer.data_collator
    passes_through = collator is transformers.default_data_collator or isinstance(
        collator,
        (
            transformers.DataCollatorWithPadding,
            transformers.DataCollatorForTokenClassification,
            transformers.DefaultDataCollator,
        ),
    )
    if not passes_through:
        return  # a custom collator may make anything of the columns: failures are explained at the first batch
    sets = [("training", trainer.train_dataset, args.per_device_train_batch_size)]
    if str(getattr(args.eval_strategy, "value", args.eval_strategy)) != "no" or args.eval_on_start:
        evals = (
            trainer.eval_dataset.items()
            if isinstance(trainer.eval_dataset, dict)
            else [("evaluation", trainer.eval_dataset)]
        )
        sets += [(description, dataset, args.per_device_eval_batch_size) for description, dataset in evals]
    for description, dataset, batch_size in sets:
        if isinstance(dataset, datasets.Dataset) and len(dataset):
            check_columns(trainer.model, dataset, collator, trainer.label_names, description, batch_size)


def check_columns(model, dataset, collator, label_names, description: str, batch_size: int = 2) -> None:
    """What a collator that passes columns through (transformers' own) hands the model: its main input, sequences
    that can be stacked without padding (batches of more than one), and labels of a type its loss takes
    (`check_label_types`)."""
    import transformers

    features = getattr(dataset, "features", None) or {}
    main_input = getattr(model, "main_input_name", "input_ids")
    own_model = type(model).__module__.startswith("transformers.")
    import inspect

    takes = set(inspect.signature(model.forward).parameters) | {"label", "label_ids", *label_names}
    if (
        own_model
        and features
        and main_input not in features
        and "inputs_embeds" not in features
        and takes & set(features)
    ):
        # (no column the model takes at all: `remove_unused_columns` leaves nothing, and data.py says so)
        text = [c for c, f in features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        hint = (
            f"tokenize it first: dataset.map(lambda e: tokenizer(e[{text[0]!r}], truncation=True), batched=True)"
            if text
            else f"give it a {main_input!r} column"
        )
        raise ValueError(
            f"The {description} dataset has no {main_input!r} column (it has {', '.join(features)}), which "
            f"{type(model).__name__} needs as its input: {hint}."
        )
    fixed_length = collator is transformers.default_data_collator or type(collator) is transformers.DefaultDataCollator
    column = dataset.data.column(main_input) if fixed_length and batch_size > 1 and main_input in features else None
    if column is not None and str(column.type).startswith(("list", "large_list")) and len(column):
        import pyarrow.compute as pc

        extremes = pc.min_max(pc.list_value_length(column))
        low, high = extremes["min"].as_py(), extremes["max"].as_py()
        if low != high:
            raise ValueError(
                f"The {description} dataset's {main_input!r} sequences have {low} to {high} tokens, and "
                f"{getattr(collator, '__name__', type(collator).__name__)} does not pad, so examples of different lengths "
                "cannot form a batch. Pass processing_class=tokenizer (Trainer then pads with DataCollatorWithPadding), "
                "or data_collator=DataCollatorWithPadding(tokenizer), or tokenize with padding='max_length'."
            )
    check_label_types(model, dataset, label_names, description)


def check_label_types(model, dataset, label_names, description: str) -> None:
    """A `datasets.Dataset` handed to a collator that passes labels through unchanged: labels the model's loss can
    take. Text labels (a CSV read from Python keeps them as strings) and one float per example for a classification
    head of several classes fail inside the collator or the loss, with messages that do not name the column."""
    features = getattr(dataset, "features", None) or {}
    name = type(model).__name__
    config = getattr(model, "config", None)
    for column in dict.fromkeys(["label", "label_ids", *label_names]):
        feature = features.get(column)
        dtype = getattr(feature, "dtype", None)
        if dtype in ("string", "large_string"):
            sample = sorted({str(v) for v in dataset[column][:50]})[:3]
            raise ValueError(
                f"The {description} dataset's {column!r} column holds text ({', '.join(map(repr, sample))}, ...), but "
                f"{name} takes class numbers. Encode it first: `dataset = dataset.class_encode_column({column!r})`, then "
                f"load the model with num_labels=len(dataset.features[{column!r}].names) and "
                "id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}."
            )
        num_labels = getattr(config, "num_labels", None) or 0
        problem_type = getattr(config, "problem_type", None)
        own_loss = type(model).__module__.startswith("transformers.") and name.endswith("ForSequenceClassification")
        if (
            own_loss
            and num_labels > 1
            and dtype is not None
            and dtype.startswith("float")
            and problem_type != "regression"
        ):
            raise ValueError(
                f"The {description} dataset's {column!r} column holds one float per example ({dtype}), and {name} has "
                f"num_labels={num_labels}: its loss needs a class number per example (single-label), or {num_labels} "
                "floats per example (multi-label). For classes, cast them: `dataset = dataset.cast_column("
                f"{column!r}, datasets.Value('int64'))`; for a regression score, load the model with num_labels=1."
            )


# ------------------------------------------------------------------------------------------ the constructor
def check_constructor_inputs(trainer, callbacks) -> None:
    """`Trainer(...)`'s own inputs, before the callbacks are instantiated and the output folder is created."""
    check_callbacks(callbacks)
    if not callable(trainer.data_collator):
        raise TypeError(
            f"data_collator={trainer.data_collator!r} is not callable: pass a function or an object with "
            "__call__ (e.g. DataCollatorWithPadding(tokenizer)), or None for Trainer's default."
        )
    if not trainer.is_deepspeed_enabled:  # DeepSpeed's engine may wrap the optimizer and scheduler it is given
        check_optimizers(trainer.model, trainer.optimizer, trainer.lr_scheduler)
    check_output_dir(trainer.args)


# ------------------------------------------------------------------------------------------ the launch
def launcher_asked_processes() -> int | None:
    """How many processes `accelerate launch` was asked for (its --num_processes, or its config file's), read from
    the launcher's command line; None when that is not known (not launched by accelerate, not Linux) or when the
    launcher set WORLD_SIZE (then `checks.check_process_group` compares)."""
    if "WORLD_SIZE" in os.environ or "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return None
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    if "launch" not in argv or not any(
        os.path.basename(a).startswith("accelerate") or a.startswith("accelerate.") for a in argv
    ):
        return None
    value = _flag(argv, "num_processes")
    if value is None and _flag(argv, "config_file") is not None:
        try:
            import yaml

            with open(_flag(argv, "config_file")) as f:
                value = (yaml.safe_load(f) or {}).get("num_processes")
        except Exception:  # noqa: BLE001 - an unreadable config: nothing to compare
            return None
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _flag(argv: list[str], name: str) -> str | None:
    value = None
    for i, arg in enumerate(argv):
        key, eq, rest = arg.partition("=")
        if key in (f"--{name}", f"--{name.replace('_', '-')}"):
            value = rest if eq else (argv[i + 1] if i + 1 < len(argv) else None)
        if arg.endswith((".py", "-m")) and i > argv.index("launch"):
            break  # the script's own flags follow
    return value


def warn_if_fewer_processes_than_asked(accelerator) -> None:
    """`accelerate launch --cpu --num_processes 2` runs the script once (accelerate starts several CPU processes only
    through mpirun): said, with the fix, instead of a run that quietly uses one process."""
    asked = launcher_asked_processes()
    if asked is not None and asked > accelerator.num_processes:
        logger.warning(
            f"accelerate launch was asked for {asked} processes (--num_processes {asked}), but {accelerator.num_processes} "
            f"started: with --cpu, accelerate starts several processes only through mpirun (--mpirun_hostfile), and "
            f"otherwise runs the script once. This run trains on {accelerator.num_processes} process. For {asked} CPU "
            f"processes over gloo launch `accelerate launch --multi_gpu --num_processes {asked} ...` (accelerate falls back "
            f"to CPUs without GPUs), or `torchrun --nproc_per_node {asked} ...`."
        )
