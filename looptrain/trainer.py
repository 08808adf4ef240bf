"""The training loop: `transformers.Trainer` 5.24's semantics, written to be read top to bottom.

Reading order:
  1. `Trainer.__init__`  - seed, accelerator, model introspection, collator, callbacks.
  2. `Trainer.train`     - plan the run, build optimizer and schedule, then the epoch / window /
                           micro-batch loop, then the summary. This is the whole loop, in one function.
  3. `training_step` and `compute_loss` - one forward and backward.
  4. `_maybe_log_save_evaluate` - what happens after an optimizer step.
Evaluation and prediction live in `evaluation.py`, checkpoints in `checkpoint.py`, data in `data.py`,
optimizer and schedule in `optim.py`, arguments in `training_args.py`.

Comments marked "Trainer:" name a behaviour copied from Trainer on purpose, usually because parity
depends on it. `../docs/how-trainer-works.md` walks through the same code in more words.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import sys
import time
import warnings
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    DistributedType,
    GradientAccumulationPlugin,
    TorchDynamoPlugin,
)
from torch import nn
from transformers.trainer_callback import (
    CallbackHandler,
    DefaultFlowCallback,
    ExportableState,
    PrinterCallback,
    ProgressCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)
from transformers.trainer_pt_utils import LabelSmoother
from transformers.trainer_utils import SaveStrategy, TrainOutput, enable_full_determinism, set_seed, speed_metrics
from transformers.utils import logging
from transformers.utils.generic import can_return_loss, find_labels

from . import data as data_utils
from . import optim as optim_utils
from .checkpoint import CheckpointMixin, preemptible
from .evaluation import EvaluationMixin
from .training_args import TrainingArguments

logger = logging.get_logger(__name__)


class Trainer(CheckpointMixin, EvaluationMixin):
    """A training loop with `transformers.Trainer`'s constructor, hooks and results.

    Subclasses written for `transformers.Trainer` work unchanged: the public methods keep their names and
    signatures (`compute_loss`, `training_step`, `prediction_step`, `evaluation_loop`, `create_optimizer`,
    `create_scheduler`, `get_train_dataloader`, `log`, ...).

    Differences from Trainer: `tokenizer=` is accepted as the old name of `processing_class`;
    a `transformers.TrainingArguments` is converted (unsupported settings raise); bad inputs that
    Trainer reports late or not at all (no labels, removed columns the collator needs, label names
    missing from the eval batch, empty datasets) raise a clear error before any work is done.
    """

    # Trainer: None means "decide from the model" (see `training_step`); subclasses may set True/False.
    loss_is_scaled_for_ga: bool | None = None

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        model_init: Callable[..., nn.Module] | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        *,
        tokenizer=None,
    ):
        # --- arguments. Trainer: no args -> TrainingArguments(output_dir="tmp_trainer")
        if args is None:
            args = TrainingArguments(output_dir="tmp_trainer")
        elif not isinstance(args, TrainingArguments):
            args = _convert_arguments(args)
        self.args = args
        if tokenizer is not None:  # the 4.x name; transformers 5 raises TypeError
            if processing_class is not None and processing_class is not tokenizer:
                raise ValueError("Both tokenizer= and processing_class= were given; pass only processing_class=.")
            warnings.warn("Trainer(tokenizer=...) is the pre-5.x name; use processing_class=.", FutureWarning, stacklevel=2)
            processing_class = tokenizer

        # Trainer: the seed is set here, after the user built the model, before anything draws from the RNG.
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        logging.set_verbosity(args.get_process_log_level())

        # --- the accelerator: devices, processes, mixed precision, compilation
        self.model = model  # Trainer: create_accelerator reads the model (DDP's find_unused_parameters)
        self.accelerator = self.create_accelerator()

        # --- the model
        if model is None and model_init is None:
            raise RuntimeError("Trainer needs a model or a model_init function.")
        if model is not None and model_init is not None:
            raise ValueError("Pass either model or model_init to Trainer, not both.")
        if optimizers[0] is not None and model_init is not None:
            raise RuntimeError("model_init builds a new model each train(): it cannot be used with optimizers=.")
        if optimizers != (None, None) and optimizer_cls_and_kwargs is not None:
            raise RuntimeError("Pass either optimizers= or optimizer_cls_and_kwargs=, not both.")
        self.model_init = model_init
        if model is None:
            model = self.call_model_init()
        self.model = self.model_wrapped = model.to(args.device)

        # Trainer: a forward that takes **kwargs gets `num_items_in_batch`, and its loss is then not
        # divided by the accumulation steps (see `training_step`). An `accepts_loss_kwargs` attribute overrides.
        if hasattr(model, "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = model.accepts_loss_kwargs
        else:
            params = inspect.signature(model.forward).parameters.values()
            self.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
        self.label_names = find_labels(type(model)) if args.label_names is None else list(args.label_names)
        self.can_return_loss = can_return_loss(type(model))
        self._loss_shifts_labels = _loss_shifts_labels(model)  # causal LMs count labels[..., 1:]
        self.label_smoother = LabelSmoother(epsilon=args.label_smoothing_factor) if args.label_smoothing_factor else None

        # --- data and user functions
        self.processing_class = processing_class
        self.data_collator = data_collator if data_collator is not None else data_utils.default_collator(processing_class)
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.compute_loss_func = compute_loss_func
        self.compute_metrics = compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.optimizer, self.lr_scheduler = optimizers
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        self._signature_columns = None
        self._created_lr_scheduler = False
        self._train_batch_size = args.train_batch_size
        self._validate_setup()

        # --- callbacks. Trainer: DefaultFlowCallback first, integrations, the user's, then the progress bar.
        from transformers.integrations import get_reporting_integration_callbacks

        default = [DefaultFlowCallback] + get_reporting_integration_callbacks(args.report_to)
        self.callback_handler = CallbackHandler(
            default + (callbacks or []), self.model, self.processing_class, self.optimizer, self.lr_scheduler
        )
        self.add_callback(PrinterCallback if args.disable_tqdm else ProgressCallback)
        if args.should_save:
            os.makedirs(args.output_dir, exist_ok=True)

        # --- state, shared with the callbacks
        self.control = TrainerControl()
        self.state = TrainerState(
            is_local_process_zero=self.is_local_process_zero(),
            is_world_process_zero=self.is_world_process_zero(),
            stateful_callbacks=self._stateful_callbacks(),
        )
        self.is_in_train = False
        self.hp_name = None
        self.current_flos = 0
        self.control = self.callback_handler.on_init_end(args, self.state, self.control)
        # Trainer: caching key/values only wastes memory in training; the model is told so.
        if getattr(self.model, "config", None) is not None:
            self.model.config.use_cache = args.use_cache

    def create_accelerator(self) -> Accelerator:
        """The one Accelerator, configured as Trainer configures it (`create_accelerator_and_postprocess`).

        Gradient accumulation stays at 1 in accelerate: the loop accumulates itself, so that the
        remainder window and loss-kwargs models are normalised Trainer's way.
        """
        args = self.args
        find_unused = args.ddp_find_unused_parameters
        if find_unused is None:
            # Trainer: DDP's unused-parameter search breaks activation checkpointing, so it is off for a
            # transformers model that checkpoints, and on otherwise.
            find_unused = not getattr(getattr(self, "model", None), "is_activation_checkpointing", False)
        return Accelerator(
            cpu=args.use_cpu,
            mixed_precision=args.mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1),
            # Trainer: the seedable sampler, so epoch e's order is randperm(seed + e) and never touches the global RNG
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.data_seed),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
            dynamo_plugin=TorchDynamoPlugin(backend=args.torch_compile_backend, mode=args.torch_compile_mode),
        )

    def _validate_setup(self):
        """Fail before any work with errors that name the problem and the fix."""
        args = self.args
        if args.eval_strategy != "no" and self.eval_dataset is None:
            raise ValueError(
                f"eval_strategy={args.eval_strategy.value!r} needs an eval_dataset: pass Trainer(eval_dataset=...) "
                "or set eval_strategy='no'."
            )
        for name, dataset in (("train_dataset", self.train_dataset), ("eval_dataset", self.eval_dataset)):
            datasets_ = dataset.values() if isinstance(dataset, dict) else [dataset]
            for ds in datasets_:
                if ds is not None and data_utils.has_length(ds) and len(ds) == 0:
                    raise ValueError(f"{name} is empty: there is nothing to train or evaluate on.")

    def _check_train_inputs(self):
        """Before training: the model must get labels, unless something else computes the loss."""
        keys = data_utils.first_example_keys(self.train_dataset)
        default_loss = type(self).compute_loss is Trainer.compute_loss
        if keys is None or not default_loss or self.compute_loss_func is not None or not self.label_names:
            return
        label_keys = set(self.label_names) | {"label", "label_ids"}
        if not keys & label_keys:
            raise ValueError(
                f"The training data has no labels: its columns are {sorted(keys)}, and {type(self.model).__name__} "
                f"computes its loss from {self.label_names}. Add a 'label' or 'labels' column, set "
                "TrainingArguments(label_names=[...]), or pass Trainer(compute_loss_func=...)."
            )

    # ============================================================================================ train
    @preemptible  # while training, SIGTERM saves a checkpoint at the next step and returns (checkpoint.py)
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None) -> TrainOutput:
        """Train the model; return `TrainOutput(global_step, training_loss, metrics)` as Trainer does."""
        args = self.args
        self.is_in_train = True
        # Trainer: forget what an earlier train()/evaluate() prepared. With nothing prepared yet (a first train())
        # that is only a full gc.collect(), 0.1 to 0.3 s once torch and transformers are loaded: skipped (issue 6).
        accelerator = self.accelerator
        if accelerator._models or accelerator._optimizers or accelerator._dataloaders or accelerator._schedulers:
            accelerator.free_memory()
        if self.model_init is not None:  # Trainer: re-seed and rebuild the model on every train()
            enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
            self.model = self.model_wrapped = self.call_model_init(trial).to(args.device)
            self.optimizer, self.lr_scheduler = None, None
        resume_from_checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
        if resume_from_checkpoint is not None:
            self._load_from_checkpoint(resume_from_checkpoint)  # weights, before accelerate wraps the model

        # ---- 1. Plan the run: how many micro-batches per epoch, optimizer steps per epoch, steps in all.
        train_dataloader = self.get_train_dataloader()
        self._check_train_inputs()
        GA = args.gradient_accumulation_steps
        total_train_batch_size = self._train_batch_size * GA * args.world_size
        if data_utils.has_length(train_dataloader):
            steps_in_epoch = len(train_dataloader)  # micro-batches per epoch on this process
            if steps_in_epoch == 0:
                raise ValueError("The training dataloader yields no batch (dataloader_drop_last with too few examples?).")
            # Trainer: an epoch ends with a possibly shorter "remainder" window, so this is a ceil.
            num_update_steps_per_epoch = max(math.ceil(steps_in_epoch / GA), 1)
            num_examples = self.num_examples(train_dataloader)
            if args.max_steps > 0:
                max_steps = args.max_steps
                num_train_epochs = math.ceil(max_steps / num_update_steps_per_epoch)
                num_train_samples = max_steps * total_train_batch_size
            else:
                max_steps = math.ceil(args.num_train_epochs * num_update_steps_per_epoch)
                num_train_epochs = math.ceil(args.num_train_epochs)
                num_train_samples = num_examples * args.num_train_epochs
        elif args.max_steps > 0:  # a dataset without length: run for max_steps
            max_steps = num_update_steps_per_epoch = args.max_steps
            num_train_epochs, steps_in_epoch = sys.maxsize, args.max_steps * GA
            num_examples = num_train_samples = args.max_steps * total_train_batch_size
        else:
            raise ValueError("The training dataset has no length: set TrainingArguments(max_steps=...) to say how long to train.")

        # ---- 2. Fresh state (or the checkpoint's), then optimizer and schedule on the prepared model.
        self.state = TrainerState(stateful_callbacks=self._stateful_callbacks())
        self.state.is_hyper_param_search = trial is not None
        self.state.train_batch_size = self._train_batch_size
        self.state.compute_steps(args, max_steps)  # resolves ratio logging/eval/save steps
        epochs_trained, steps_trained_in_current_epoch = 0, 0
        if resume_from_checkpoint is not None:
            epochs_trained, steps_trained_in_current_epoch = self._load_trainer_state(
                resume_from_checkpoint, num_update_steps_per_epoch, max_steps
            )
        self.state.max_steps, self.state.num_train_epochs = max_steps, num_train_epochs
        self.state.is_local_process_zero = self.is_local_process_zero()
        self.state.is_world_process_zero = self.is_world_process_zero()

        if self._created_lr_scheduler:  # Trainer: a schedule built by an earlier train() restarts
            self.lr_scheduler, self._created_lr_scheduler = None, False
        self.create_optimizer()
        # Trainer: model and optimizer go through accelerate.prepare; the scheduler does not.
        model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.model_wrapped = model
        if getattr(self.accelerator.state, "fsdp_plugin", None) is not None:
            self.model = model  # Trainer: under FSDP the sharded wrapper is the model (evaluation runs it too)
        self.create_scheduler(num_training_steps=max_steps, optimizer=self.optimizer)
        if resume_from_checkpoint is not None:
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
        for name in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, name, getattr(self, name))
        self.callback_handler.train_dataloader = train_dataloader
        self._warn_if_loss_not_scaled_for_ga()
        logger.info(
            f"***** Running training *****  examples={num_examples:,} epochs={num_train_epochs:,} "
            f"batch={self._train_batch_size} x accumulation {GA} x processes {args.world_size} = "
            f"{total_train_batch_size}; optimizer steps={max_steps:,}"
        )

        # ---- 3. The loop.
        start_time = time.time()
        self._initial_num_input_tokens_seen = self.state.num_input_tokens_seen
        self._initial_global_step = self.state.global_step
        self._tr_loss = torch.tensor(0.0, device=args.device)  # Trainer: a float32 sum on the device, no host sync
        self._total_loss_scalar = 0.0
        self._globalstep_last_logged = self.state.global_step
        self._flops_per_token = None
        grad_norm = learning_rate = None
        if resume_from_checkpoint is not None:  # looptrain: the loss summed since the last log, the last norm and lr
            grad_norm, learning_rate = self._restore_loop_state(resume_from_checkpoint)
        model.zero_grad()
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        # Trainer: before epoch 0, logged at epoch 0, step 0 (costs one RNG draw). Trainer evaluates again
        # when it resumes, one draw the uninterrupted run did not take; looptrain does not.
        if args.eval_on_start and resume_from_checkpoint is None:
            self._evaluate(trial, ignore_keys_for_eval, skip_scheduler=True)

        # looptrain, not Trainer (semantics doc section 0, item 8): a checkpoint written after the step that
        # ended an epoch precedes that epoch's end (its evaluation, one RNG draw, its logs). Trainer skips it on
        # resume; here it runs first, from the checkpoint's RNG, as it ran in the uninterrupted run.
        replay = self._epoch_end_to_replay if resume_from_checkpoint is not None else None
        if replay is not None:
            self._start_epoch_end_replay(resume_from_checkpoint)
            self._epoch_end(model, trial, replay.epoch, ignore_keys_for_eval, start_time, grad_norm, learning_rate)
            if self.control.should_training_stop:
                epochs_trained = num_train_epochs

        for epoch in range(epochs_trained, num_train_epochs):
            self.control = self.callback_handler.on_epoch_begin(args, self.state, self.control)
            epoch_dataloader, step, first_window = train_dataloader, -1, 0
            restore_rng_after_first_window = False
            if epoch == epochs_trained and resume_from_checkpoint is not None:
                if steps_trained_in_current_epoch > 0:
                    # Trainer: skip the consumed batches at the sampler (never collated), and restore the RNG
                    # once the first resumed window is fetched (that overwrites the iterator's draw).
                    epoch_dataloader = self._skip_first_batches(train_dataloader, steps_trained_in_current_epoch)
                    step = steps_trained_in_current_epoch - 1
                    first_window = steps_trained_in_current_epoch // GA
                    restore_rng_after_first_window = True
                elif replay is None:  # (after a replayed epoch end, the RNG already continues from the checkpoint)
                    self._load_rng_state(resume_from_checkpoint)
            if hasattr(epoch_dataloader, "set_epoch"):
                epoch_dataloader.set_epoch(epoch)
            # Trainer: a new iterator every epoch; creating it takes one draw from the global RNG.
            epoch_iterator = iter(epoch_dataloader)
            remainder = steps_in_epoch % GA or GA  # size of the epoch's last window

            for window in range(first_window, num_update_steps_per_epoch):
                # Trainer: fetch the whole window first, so the loss can be normalised by its label count.
                num_batches = GA if window != num_update_steps_per_epoch - 1 else remainder
                batch_samples, num_items_in_batch = self.get_batch_samples(epoch_iterator, num_batches, args.device)
                self.current_gradient_accumulation_steps = len(batch_samples)
                if restore_rng_after_first_window:
                    self._load_rng_state(resume_from_checkpoint)
                    restore_rng_after_first_window = False

                for i, inputs in enumerate(batch_samples):
                    step += 1
                    sync_step = (step + 1) % GA == 0 or (step + 1) == steps_in_epoch
                    self.accelerator.gradient_state._set_sync_gradients(sync_step)
                    if step % GA == 0:
                        self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
                    # Under DDP only the window's last micro-batch all-reduces gradients. Trainer: DeepSpeed
                    # marks the accumulation boundary itself (from sync_gradients), so no no_sync there.
                    no_sync = i != len(batch_samples) - 1 and self.accelerator.distributed_type != DistributedType.DEEPSPEED
                    with self.accelerator.no_sync(model) if no_sync else contextlib.nullcontext():
                        tr_loss_step = self.training_step(model, inputs, num_items_in_batch)
                    if args.logging_nan_inf_filter:
                        # Trainer: a NaN/Inf step loss counts as the running mean instead. Same values as
                        # Trainer's `if isnan or isinf`, without a host sync on every micro-batch.
                        running_mean = self._tr_loss / (1 + self.state.global_step - self._globalstep_last_logged)
                        tr_loss_step = torch.where(torch.isfinite(tr_loss_step), tr_loss_step, running_mean)
                    self._tr_loss += tr_loss_step
                    self.current_flos += float(self.floating_point_ops(inputs))
                    self._track_num_input_tokens(inputs)

                    if not sync_step:
                        self.control = self.callback_handler.on_substep_end(args, self.state, self.control)
                    else:
                        # The optimizer step, in Trainer's order: norm/clip, step, read lr, schedule, zero.
                        grad_norm = self._clip_grad_norm(model)
                        self.control = self.callback_handler.on_pre_optimizer_step(args, self.state, self.control)
                        self._optimizer_step()
                        self.control = self.callback_handler.on_optimizer_step(args, self.state, self.control)
                        learning_rate = self._get_learning_rate()  # the lr this step used
                        # fp16: a step skipped for overflow does not advance the schedule. Plateau-type
                        # schedulers step on eval metrics instead (`_evaluate`).
                        if not self.accelerator.optimizer_step_was_skipped and not _steps_on_metrics(self.lr_scheduler):
                            self.lr_scheduler.step()
                        model.zero_grad()
                        self.state.global_step += 1
                        self.state.epoch = epoch + (step + 1) / steps_in_epoch
                        self.control = self.callback_handler.on_step_end(args, self.state, self.control)
                        if self._preemption_requested():  # SIGTERM: save at this step boundary, then stop
                            self.control.should_save = self._preempted = True
                        self._maybe_log_save_evaluate(
                            self._tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                            learning_rate=learning_rate,
                        )
                        if self._preempted:  # set after the save, so the checkpoint does not say "stopped"
                            self.control.should_training_stop = True
                    if self.control.should_epoch_stop or self.control.should_training_stop:
                        break
                if self.control.should_epoch_stop or self.control.should_training_stop:
                    break

            if step < 0:
                logger.warning(f"The epoch yielded no batch; stopping at step {self.state.global_step}.")
                self.control.should_training_stop = True
            if self._preempted:  # the checkpoint is written; this epoch's end is the resumed run's to do
                break
            # Trainer: epoch-end log/eval/save also runs when max_steps stopped the epoch early.
            self._epoch_end(model, trial, epoch, ignore_keys_for_eval, start_time, grad_norm, learning_rate)
            if self.control.should_training_stop:
                break

        # ---- 4. The summary.
        return self._finalize_training(trial, num_train_samples, start_time)

    def _epoch_end(self, model, trial, epoch, ignore_keys_for_eval, start_time, grad_norm, learning_rate):
        """`on_epoch_end`, then log/evaluate/save. A checkpoint written here is marked "epoch_end" in
        looptrain_state.json: nothing of this epoch is left for a resumed run to do."""
        self.control = self.callback_handler.on_epoch_end(self.args, self.state, self.control)
        self._saving_at = "epoch_end"
        try:
            self._maybe_log_save_evaluate(
                self._tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                learning_rate=learning_rate,
            )
        finally:
            self._saving_at = "step_end"

    def _finalize_training(self, trial, num_train_samples, start_time) -> TrainOutput:
        """The train summary log: Trainer's `train_loss` is the mean of the logged losses of this call."""
        self._total_loss_scalar += self._tr_loss.item()
        num_steps = self.state.global_step - self._initial_global_step
        train_loss = self._total_loss_scalar / max(num_steps, 0.001)
        metrics = speed_metrics(
            "train",
            start_time,
            num_samples=num_train_samples * num_steps / max(self.state.max_steps, 1),
            num_steps=num_steps,
        )
        self.store_flos()
        metrics["total_flos"] = self.state.total_flos
        metrics["train_loss"] = train_loss
        self.log(metrics)
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None and not self._preempted:
            self._load_best_model()
        self._delete_non_best_checkpoints()
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        self.is_in_train = False
        return TrainOutput(self.state.global_step, train_loss, metrics)

    # ============================================================================================ one step
    def get_batch_samples(self, epoch_iterator, num_batches: int, device) -> tuple[list, torch.Tensor | None]:
        """Fetch up to `num_batches` batches, and count the label tokens the whole window holds."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        return batch_samples, self._get_num_items_in_batch(batch_samples, device)

    def _get_num_items_in_batch(self, batch_samples: list, device) -> torch.Tensor | None:
        """Trainer: labels != -100 summed over the window (shifted by one for causal LMs), summed over
        processes when `average_tokens_across_devices`, returned as a float tensor. Only counted when the
        model or `compute_loss_func` can use it."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        if not (self.model_accepts_loss_kwargs or self.compute_loss_func is not None):
            return None
        try:
            labels = [
                b["shift_labels"] if "shift_labels" in b else b["labels"][..., 1:] if self._loss_shifts_labels else b["labels"]
                for b in batch_samples
            ]
            num_items = sum(label.ne(-100).sum() for label in labels)
        except (TypeError, AttributeError):
            return None
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            num_items = self.accelerator.gather(num_items.to(device)).sum()
        if torch.is_tensor(num_items):
            # Trainer divides by the tensor/context/sequence-parallel sizes (all 1 here): that makes it a float.
            num_items = num_items.to(device) / 1
        return num_items

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the loss that is added to the logged sum."""
        self._set_train_mode(model)  # Trainer: model.train() before every micro-batch
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):  # schedule-free optimizers
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        del inputs
        # Trainer: a loss that already saw `num_items_in_batch` is taken as normalised over the whole
        # window; any other is a per-batch mean, divided here by the window's actual size.
        # (transformers#47688: a model that takes **kwargs but ignores num_items_in_batch, like
        # BertForSequenceClassification, is therefore not divided at all. Set loss_is_scaled_for_ga=False.)
        if self.loss_is_scaled_for_ga is not None:
            loss_is_scaled_for_ga = self.loss_is_scaled_for_ga
        else:
            loss_is_scaled_for_ga = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        if not loss_is_scaled_for_ga:
            loss = loss / self.current_gradient_accumulation_steps
        if self._accelerate_only_forwards() and self.accelerator.gradient_accumulation_steps == 1:
            # Performance (issue 6): accelerate's backward would divide the loss by its accumulation steps, pinned
            # to 1 (which changes no bit, forward or backward), then call this; the division and its backward node
            # are skipped.
            loss.backward()
            return loss.detach()
        # Trainer: the loss is already normalised for accumulation, so DeepSpeed must not divide it again.
        kwargs = {"scale_wrt_gas": False} if self.accelerator.distributed_type == DistributedType.DEEPSPEED else {}
        self.accelerator.backward(loss, **kwargs)  # mixed-precision scaling happens in accelerate
        return loss.detach()

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        """The model's own loss, or `compute_loss_func`'s, or the label smoother's."""
        if (self.label_smoother is not None or self.compute_loss_func is not None) and "labels" in inputs:
            labels = inputs.pop("labels")
        else:
            labels = None
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs)
        if self.compute_loss_func is not None:
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        elif labels is not None:
            shift = _is_causal_lm(self.accelerator.unwrap_model(model))
            loss = self.label_smoother(outputs, labels, shift_labels=shift, num_items_in_batch=num_items_in_batch)
        else:
            if isinstance(outputs, dict) and "loss" not in outputs:
                raise ValueError(
                    f"The model returned no loss, only {', '.join(outputs.keys())}; it received "
                    f"{', '.join(inputs.keys())}. Pass labels in the data (label_names={self.label_names}), "
                    "or compute the loss with Trainer(compute_loss_func=...) or a compute_loss override."
                )
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        if (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            # Trainer: the window's count was summed over processes, so each rank's loss is scaled back up;
            # DDP's gradient averaging then yields the global token mean. On one process it would multiply by 1,
            # which changes no bit; skipping it saves an op and a backward node per micro-batch (issue 6).
            if self.accelerator.num_processes > 1:
                loss *= self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def compute_loss_context_manager(self):
        """Trainer leaves autocast to accelerate; kept as a hook for subclasses."""
        return contextlib.nullcontext()

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        """Trainer's autocast hook; a no-op, since accelerate wraps forward in autocast itself."""
        return contextlib.nullcontext()

    def _prepare_input(self, data):
        """Move a (nested) batch to the device; accelerate's loader usually already did."""
        if isinstance(data, dict):
            return type(data)({k: self._prepare_input(v) for k, v in data.items()})
        if isinstance(data, (tuple, list)):
            return type(data)(self._prepare_input(v) for v in data)
        if isinstance(data, torch.Tensor):
            return data.to(device=self.args.device)
        return data

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        inputs = self._prepare_input(inputs)
        if len(inputs) == 0:
            raise ValueError(
                "A batch is empty: no column of the dataset is an argument of the model's forward "
                f"({', '.join(self._get_signature_columns())})."
            )
        return inputs

    def _clip_grad_norm(self, model) -> torch.Tensor:
        """Clip to `max_grad_norm` and return the pre-clip norm; with 0, only measure it (Trainer logs it anyway)."""
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        if self._accelerate_only_forwards():
            # Performance (issue 6): accelerate's clip_grad_norm_ ends in this same call; before it, it scans every
            # gradient for DTensors and parses torch's version (about 0.08 ms per step on CPU).
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return self.accelerator.clip_grad_norm_(model.parameters(), max_norm)

    def _optimizer_step(self):
        """`optimizer.step()`, as Trainer calls it on the accelerate-wrapped optimizer."""
        optimizer = self.optimizer
        if (
            type(optimizer) is AcceleratedOptimizer
            and optimizer.scaler is None
            and self._accelerate_only_forwards()
            and not type(optimizer.optimizer).__module__.startswith("lomo_optim")
        ):
            # Performance (issue 6): `AcceleratedOptimizer.step` looks for the optional package lomo_optim on every
            # call (`importlib.util.find_spec` twice: file-system look-ups, 0.1 to 0.25 ms per step on CPU), then
            # calls the wrapped optimizer's step, which is all it does without a GradScaler, XLA or LOMO. So that
            # is called directly, and the flag the LR scheduler's step() checks is set as its wrapper would.
            optimizer._opt_called = True
            optimizer.optimizer.step()
        else:
            optimizer.step()

    def _accelerate_only_forwards(self) -> bool:
        """True when accelerate's optimizer step and gradient clipping would only call torch's: one or several
        plain processes (no FSDP, DeepSpeed, XLA, tensor parallelism), no fp16/fp8 (no GradScaler)."""
        accelerator = self.accelerator
        return (
            accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
            and accelerator.mixed_precision in ("no", "bf16")
            and accelerator.scaler is None
            and not accelerator.parallelism_config
        )

    def _set_train_mode(self, model):
        """`model.train()`, skipped when every module is already in training mode.

        Performance (issue 6): `nn.Module.train` sets the flag on every submodule through `__setattr__`
        (0.14 ms per micro-batch for a 2-layer BERT, 4% of its step); when every flag is already set that
        changes nothing, and reading the flags takes microseconds. The module list is kept per model; an
        evaluation, or anything else that puts a module in eval mode, makes the full call run again.
        """
        modules = getattr(self, "_train_mode_modules", None)
        if modules is None or modules[0] is not model:
            modules = self._train_mode_modules = list(model.modules())
        if not all(module.training for module in modules):
            model.train()

    def _get_learning_rate(self) -> float:
        if _steps_on_metrics(self.lr_scheduler):
            lr = self.optimizer.param_groups[0]["lr"]
        else:
            lr = self.lr_scheduler.get_last_lr()[0]
        return lr.item() if torch.is_tensor(lr) else lr

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """Trainer's estimate, 6 x tokens x non-embedding parameters (the count is cached per train())."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._flops_per_token is None:
            self._flops_per_token = 6 * self.model.num_parameters(exclude_embeddings=True)
        return self._flops_per_token * inputs[main_input].numel()

    def _track_num_input_tokens(self, inputs):
        mode = self.args.include_num_input_tokens_seen
        if mode == "no":
            return
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs:
            logger.warning(f"include_num_input_tokens_seen: the batch has no {main_input!r}; tokens are not counted.")
            return
        if mode == "non_padding" and "attention_mask" in inputs:
            tokens = inputs["attention_mask"].sum()
        elif mode == "non_padding" and getattr(self.processing_class, "pad_token_id", None) is not None:
            tokens = (inputs[main_input] != self.processing_class.pad_token_id).sum()
        else:
            tokens = inputs[main_input].numel()
        tokens = torch.as_tensor(tokens, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()

    # ============================================================================================ after a step
    def _maybe_log_save_evaluate(
        self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time, learning_rate=None
    ):
        """Trainer's order: log, then evaluate (and track the best metric), then save."""
        if self.control.should_log and self.state.global_step > self._globalstep_last_logged:
            # Trainer: the loss logged is the float32 sum since the last log (mean over processes),
            # divided by the number of optimizer steps in between. Not rounded.
            tr_loss_scalar = self.accelerator.gather(tr_loss).mean().item()
            tr_loss -= tr_loss
            logs = {"loss": tr_loss_scalar / (self.state.global_step - self._globalstep_last_logged)}
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm.item() if torch.is_tensor(grad_norm) else grad_norm
            logs["learning_rate"] = learning_rate if learning_rate is not None else self._get_learning_rate()
            self._total_loss_scalar += tr_loss_scalar
            self._globalstep_last_logged = self.state.global_step
            self.store_flos()
            self.log(logs, start_time)

        if self.control.should_evaluate:
            metrics = self._evaluate(trial, ignore_keys_for_eval)
            is_new_best = self._determine_best_metric(metrics=metrics, trial=trial)
            if self.args.save_strategy == SaveStrategy.BEST:
                self.control.should_save = is_new_best

        if self.control.should_save:
            self._last_step_logs = (grad_norm, learning_rate)  # looptrain_state.json keeps them (exact resume)
            self._save_checkpoint(model, trial)
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add `epoch` (and token counts), append to `state.log_history` with the step, fire `on_log`."""
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        if self.args.include_num_input_tokens_seen != "no":
            logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
            if start_time is not None:
                tokens = self.state.num_input_tokens_seen - self._initial_num_input_tokens_seen
                logs.update(speed_metrics("train", start_time, num_tokens=tokens))
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    def store_flos(self):
        """Move this process's FLOP count into `state.total_flos` (summed over processes)."""
        if self.args.world_size > 1:
            # Trainer (`distributed_broadcast_scalars`): a float32 tensor gathered and summed.
            flos = torch.tensor([self.current_flos], device=self.args.device)
            self.state.total_flos += self.accelerator.gather(flos).sum().item()
        else:
            self.state.total_flos += self.current_flos
        self.current_flos = 0

    # ============================================================================================ building blocks
    def get_train_dataloader(self):
        """The training DataLoader, prepared by accelerate (seeded sampler, device placement, sharding)."""
        if self.train_dataset is None:
            raise ValueError("Trainer.train() needs a train_dataset.")
        sampler = self._get_train_sampler(self.train_dataset)
        return data_utils.build_dataloader(self, self.train_dataset, self._train_batch_size, sampler, True, "training")

    def _get_train_sampler(self, train_dataset=None):
        return data_utils.train_sampler(self.args, train_dataset if train_dataset is not None else self.train_dataset, self.processing_class)

    def _get_eval_sampler(self, eval_dataset):
        return data_utils.eval_sampler(self.args, eval_dataset, self.processing_class)

    def _get_signature_columns(self) -> list[str]:
        if self._signature_columns is None:
            self._signature_columns = data_utils.signature_columns(self.model, self.label_names)
        return self._signature_columns

    def num_examples(self, dataloader) -> int:
        """Examples in the dataloader's dataset (estimated from its length when the dataset has none)."""
        try:
            return len(dataloader.dataset)
        except (NameError, AttributeError, TypeError):
            return len(dataloader) * self.args.per_device_train_batch_size

    def create_optimizer_and_scheduler(self, num_training_steps: int):
        """Build both, as Trainer's hook of the same name; `train()` calls the two halves itself."""
        self.create_optimizer()
        self.create_scheduler(num_training_steps=num_training_steps)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """AdamW over Trainer's decay / no-decay groups, unless an optimizer was passed in."""
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            groups = optim_utils.parameter_groups(opt_model, self.args.weight_decay)
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None) -> tuple[Any, dict]:
        """(optimizer class, keyword arguments) for `args.optim`: AdamW, fused or not."""
        return optim_utils.optimizer_cls_and_kwargs(args)

    def get_decay_parameter_names(self, model) -> list[str]:
        """Names of the parameters that get weight decay (not biases, not normalisation weights)."""
        return optim_utils.decay_parameter_names(model)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The LR schedule over `num_training_steps` optimizer steps, unless one was passed in."""
        if self.lr_scheduler is None:
            self.lr_scheduler = optim_utils.build_scheduler(self.args, optimizer or self.optimizer, num_training_steps)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def call_model_init(self, trial=None) -> nn.Module:
        """Build a model with `model_init` (with the trial when it takes one), as Trainer does."""
        params = len(inspect.signature(self.model_init).parameters)
        model = self.model_init() if params == 0 else self.model_init(trial)
        if model is None:
            raise RuntimeError("model_init returned None; it must return a model.")
        return model

    def _warn_if_loss_not_scaled_for_ga(self):
        """transformers#47688: warn once when accumulation will silently multiply the loss (README, "GA")."""
        if (
            self.args.gradient_accumulation_steps > 1
            and self.loss_is_scaled_for_ga is None
            and self.compute_loss_func is None
            and self.model_accepts_loss_kwargs
            and not _model_uses_num_items(self.accelerator.unwrap_model(self.model))
            and not getattr(self, "_warned_ga", False)
        ):
            self._warned_ga = True
            warnings.warn(
                f"{type(self.model).__name__}.forward takes **kwargs but does not use num_items_in_batch, so (as in "
                "transformers.Trainer 5.24, transformers#47688) its loss is NOT divided by gradient_accumulation_steps: "
                "gradients and the logged loss are up to gradient_accumulation_steps times too large. Set "
                "`loss_is_scaled_for_ga = False` on a Trainer subclass for the mathematically correct average.",
                UserWarning,
                stacklevel=4,  # the caller of train() (past the `preemptible` wrapper)
            )

    # ============================================================================================ callbacks
    def add_callback(self, callback):
        """Add a `TrainerCallback` instance or class; it runs after the ones already there."""
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        """Remove a callback (instance or class) and return it."""
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback):
        """Remove a callback (instance or class)."""
        self.callback_handler.remove_callback(callback)

    def _stateful_callbacks(self) -> list:
        return [cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)]

    def is_local_process_zero(self) -> bool:
        """Whether this is the first process on its machine."""
        return self.args.local_process_index == 0

    def is_world_process_zero(self) -> bool:
        """Whether this is the main process (the one that writes files)."""
        return self.args.process_index == 0


# ------------------------------------------------------------------------------------------------ helpers
def _convert_arguments(args) -> TrainingArguments:
    import transformers

    if isinstance(args, transformers.TrainingArguments):
        return TrainingArguments.from_transformers(args)
    raise TypeError(f"args must be a looptrain.TrainingArguments (or transformers'), got {type(args).__name__}.")


def _steps_on_metrics(scheduler) -> bool:
    """ReduceLROnPlateau and transformers' GreedyLR step after evaluation, not after each optimizer step."""
    from transformers.optimization import GreedyLR

    return isinstance(scheduler, (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR))


def _loss_shifts_labels(model) -> bool:
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    config = getattr(model, "config", None)
    return LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss and not getattr(config, "is_encoder_decoder", False)


def _is_causal_lm(model) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def _model_uses_num_items(model) -> bool:
    """Heuristic: transformers models that normalise by `num_items_in_batch` route their loss through
    `self.loss_function(...)`; heads that build a `CrossEntropyLoss()` themselves ignore it."""
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return True  # cannot tell: do not warn
    return "loss_function" in source or "num_items_in_batch" in source
