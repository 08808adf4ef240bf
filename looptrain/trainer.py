"""The training loop: `transformers.Trainer` 5.24's semantics, written to be read top to bottom.

Reading order (each a method of `Trainer`, in this file, in this order):
  1. `__init__`                  seed, accelerator, model, collator, callbacks, state.
  2. `train`                     what happens once per call: model re-init, activation checkpointing, NEFTune,
                                 the checkpoint to resume from; then the loop, retried with a smaller batch
                                 under `auto_find_batch_size`.
  3. `_inner_training_loop`      the loop, as a few named phases:
       `set_initial_training_values`   how many micro-batches, optimizer steps and epochs (a `TrainingPlan`);
       `_init_training_state`          a fresh `TrainerState`, or the checkpoint's (checkpoint.py);
       `_prepare_for_training`         optimizer, accelerate.prepare, schedule (backends.py);
       `_run_epoch` (per epoch)        windows of `gradient_accumulation_steps` micro-batches; each window
                                       ends in `_optimizer_step`, then log / evaluate / save;
       `_finalize_training`            the summary log, the best model, `on_train_end`.
  4. `training_step`, `compute_loss`   one forward and backward.
  5. `_maybe_log_save_evaluate`, `log` what happens after an optimizer step.
Words: a micro-batch is one batch of the dataloader (Trainer's `step`, `steps_in_epoch`); a window is the
`gradient_accumulation_steps` micro-batches of one optimizer step (Trainer's `update_step`, `global_step`,
`max_steps`, `num_update_steps_per_epoch`).

The methods keep Trainer's names, signatures and call order, so a subclass written for `transformers.Trainer`
overrides the same points here. The plain single-process path reads without meeting a backend: setup and each
backend's special case sit behind a named method in `backends.py` (the accelerator, device placement,
DeepSpeed, FSDP, model parallelism). Around the loop, one module per concern: data (`data.py`), optimizer and
schedule (`optim.py`), evaluation (`evaluation.py`), checkpoints and resuming (`checkpoint.py`, where
`Resume` is the checkpoint a run continues from, read once), SIGTERM (`preemption.py`), the Hub (`hub.py`),
hyperparameter search (`search.py`), the arguments (`training_args.py`), bad input (`checks.py`).

Comments marked "Trainer:" name a behaviour copied from Trainer on purpose, usually because parity depends on
it; "looptrain:" marks where looptrain deliberately does something else. `../docs/how-trainer-works.md` walks
through the same code in more words.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from accelerate import skip_first_batches
from accelerate.utils.memory import clear_device_cache
from torch import nn
from transformers.debug_utils import DebugOption, DebugUnderflowOverflow
from transformers.integrations import get_reporting_integration_callbacks
from transformers.integrations.liger import apply_liger_kernel
from transformers.integrations.neftune import activate_neftune, deactivate_neftune
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.trainer_callback import (
    DefaultFlowCallback,
    ExportableState,
    PrinterCallback,
    ProgressCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)
from transformers.trainer_pt_utils import (
    LabelSmoother,
    get_learning_rates,
    get_model_param_count,
    get_num_trainable_parameters,
    get_optimizer_group,
    log_metrics,
    metrics_format,
    save_metrics,
    save_state,
)
from transformers.trainer_utils import (
    TrainerMemoryTracker,
    TrainOutput,
    _is_peft_model,
    align_special_tokens,
    enable_full_determinism,
    find_executable_batch_size,
    has_length,
    number_of_arguments,
    set_seed,
    speed_metrics,
    suppress_progress_bars,
)
from transformers.utils import logging

from . import checkpoint as ckpt
from . import checks, fastpath, validation
from .backends import BackendMixin
from .checkpoint import CheckpointMixin, EpochStart, LoopState
from .data import DataMixin, default_collator
from .evaluation import EvaluationMixin
from .hub import HubMixin
from .optim import OptimizerMixin, steps_on_metrics
from .preemption import Preemption
from .search import HyperparameterSearchMixin
from .training_args import TrainingArguments, check_supported, check_values

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class TrainingPlan:
    """How long the run is, as `set_initial_training_values` computes it (Trainer's tuple, in its order, named)."""

    num_train_epochs: int
    optimizer_steps_per_epoch: int  # Trainer's num_update_steps_per_epoch: windows per epoch
    num_examples: int
    num_train_samples: int  # examples the whole schedule trains on (for the speed metrics)
    total_train_batch_size: int  # examples per optimizer step: micro-batch x accumulation x data-parallel ranks
    micro_batches_per_epoch: int  # Trainer's steps_in_epoch: batches of the dataloader
    max_steps: int  # optimizer steps in all

    def describe(self, batch_size: int, args, trainable_parameters: int) -> str:
        """The line logged when training starts."""
        return (
            f"***** Running training *****  examples={self.num_examples:,} epochs={self.num_train_epochs:,} "
            f"batch={batch_size} x accumulation {args.gradient_accumulation_steps} x processes {args.world_size} = "
            f"{self.total_train_batch_size}; optimizer steps={self.max_steps:,}; trainable parameters={trainable_parameters:,}"
        )


class Trainer(
    BackendMixin, DataMixin, OptimizerMixin, EvaluationMixin, CheckpointMixin, HubMixin, HyperparameterSearchMixin
):
    """A training loop with `transformers.Trainer`'s constructor, methods, hooks and results.

    Subclasses written for `transformers.Trainer` work unchanged: every method Trainer calls keeps its name,
    signature and call site (`compute_loss`, `training_step`, `prediction_step`, `evaluation_loop`,
    `create_optimizer`, `get_train_dataloader`, `_save`, `_prepare_inputs`, ...). A subclass that overrides a
    Trainer method looptrain never calls is refused when constructed (`NOT_CALLED`).

    The attributes subclasses use are Trainer's: `args`, `model` (the unwrapped model), `model_wrapped` (the
    outermost wrapper: DDP, DeepSpeed, FSDP, compile), `accelerator`, `optimizer`, `lr_scheduler`, `state`,
    `control`, `callback_handler`, `processing_class`, `data_collator`, `train_dataset`, `eval_dataset`,
    `is_in_train`, `label_names`, `model_accepts_loss_kwargs`, and during training the running loss
    `_tr_loss`, `_total_loss_scalar` and `_globalstep_last_logged` (kept together in `self._loop`, a
    `checkpoint.LoopState`, which checkpoints save and restore).

    Differences from Trainer (README, "Deliberate differences"): `tokenizer=` is accepted as the old name of
    `processing_class`; checkpoints are written atomically and never unpickled; a resumed run continues
    exactly where the uninterrupted run was (Trainer's does not always); SIGTERM during `train()` saves a
    checkpoint at the next optimizer step and returns; bad input gets an error that names the fix.
    """

    # Trainer: helpers "not used in Trainer itself but available as methods for external use" (run_*.py use them).
    log_metrics = log_metrics
    metrics_format = metrics_format
    save_metrics = save_metrics
    save_state = save_state
    get_learning_rates = get_learning_rates
    get_num_trainable_parameters = get_num_trainable_parameters
    get_optimizer_group = get_optimizer_group

    # Trainer: None means "decide from the model" (see `training_step`); subclasses may set True/False.
    loss_is_scaled_for_ga: bool | None = None
    # looptrain: a run whose gradients become NaN/inf stops with an error naming the step and the last good
    # checkpoint (`checks.DivergenceGuard`). False: train on, as transformers.Trainer does.
    raise_on_divergence: bool = True
    # looptrain: skip per-step work that cannot change a number (fastpath.py); False runs Trainer's plain calls.
    fast_paths: bool = fastpath.DEFAULT

    # =================================================================================================== setup
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
        # ---- 1. Arguments and seed. Trainer: no args -> TrainingArguments(output_dir="tmp_trainer").
        self.args = args = _checked_arguments(args)
        _check_overrides(type(self))
        processing_class = _processing_class(processing_class, tokenizer)
        # Trainer: the seed is set here, after the user built the model, before anything draws from the RNG.
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)

        # ---- 2. The accelerator: devices, processes, mixed precision, backends, compilation (backends.py).
        self.model = model  # Trainer: the accelerator reads the model (DDP's find_unused_parameters)
        self._backend = self._setup_accelerator()  # what each micro-batch asks of it (backends.BackendTraits)
        self._memory_tracker = TrainerMemoryTracker(args.skip_memory_metrics)
        self._memory_tracker.start()
        logging.set_verbosity(args.get_process_log_level())
        args._setup_devices  # noqa: B018 (Trainer: the property sets up the devices)

        # ---- 3. The model (given, or built by model_init), checked and placed on the device; its loss and labels.
        self.model_init = model_init
        self.model = self.model_wrapped = self._setup_model(model)
        self.model_accepts_loss_kwargs, self._loss_shifts_labels = self._loss_conventions(self.model)
        self.label_smoother = _label_smoother(args, self.model)

        # ---- 4. Data and user functions.
        self.data_collator = data_collator if data_collator is not None else default_collator(processing_class)
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.processing_class = processing_class
        self.neftune_noise_alpha = args.neftune_noise_alpha
        self.compute_loss_func = compute_loss_func
        self.compute_metrics = compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.optimizer, self.lr_scheduler = optimizers
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        self._validate_args()
        validation.check_constructor_inputs(self, callbacks)  # looptrain: callbacks, optimizers=, output_dir

        # ---- 5. Callbacks, the Hub repository, the output folder; the state shared with the callbacks.
        self._setup_callbacks_and_state(callbacks)

        # ---- 6. What the loop and the mixins keep between calls.
        self.is_in_train = False
        self.hp_name = self.hp_search_backend = self._trial = None  # set by hyperparameter_search() (search.py)
        self.current_flos = 0  # this process's FLOPs since the last store_flos()
        self._flops_model = self._flops_params = None  # the model whose parameters floating_point_ops counted
        self._signature_columns = None  # the model's forward arguments, read once (data.py)
        self._eval_dataloaders = {}  # dataloader_persistent_workers: one per eval set, kept (data.py)
        self._train_batch_size = args.train_batch_size  # auto_find_batch_size may lower it
        self._created_lr_scheduler = False
        self._loop = None  # the running loss and counters while training (checkpoint.LoopState)
        self._resume = None  # the checkpoint train() resumes from, read once (checkpoint.Resume)
        self._divergence = None  # the NaN/inf guard while training (checks.DivergenceGuard)
        self._initial_global_step = self._initial_num_input_tokens_seen = 0  # where this train() started
        self.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # the window being trained
        self.neftune_hook_handle = None
        self._attn_mask_causal_checked = self._warned_loss_scale = False  # one-time checks (backends.py)
        self._first_backward_checked = False  # validation.check_first_backward: once per train()
        self._preemption = Preemption()
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)
        # Trainer: caching key/values only wastes memory in training; the model is told so.
        if getattr(self.model, "config", None) is not None:
            self.model.config.use_cache = args.use_cache
        self._memory_tracker.stop_and_update_metrics()

    # ================================================================================================= train
    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial=None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> TrainOutput:
        """Train the model; return `TrainOutput(global_step, training_loss, metrics)` as Trainer does.

        `resume_from_checkpoint`: a checkpoint folder, or True for the newest one in `output_dir`.
        """
        self._memory_tracker.start()
        args = self.args
        self.is_in_train = True

        # Trainer: with model_init, every train() re-seeds and builds a new model (and a new optimizer).
        if self.model_init is not None:
            enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
            self.model = self.call_model_init(trial)
            self.optimizer, self.lr_scheduler = None, None
            if self.place_model_on_device:
                self._move_model_to_device(self.model, args.device)
            self.model_wrapped = self.model
        if args.use_liger_kernel:
            apply_liger_kernel(self.model, args.liger_kernel_config)
        if (args.fp16_full_eval or args.bf16_full_eval) and not self.is_model_parallel and self.model_init is None:
            self._move_model_to_device(self.model, args.device)  # __init__ left it for the eval cast
        if args.activation_checkpointing:
            self._enable_activation_checkpointing()
        # Trainer: new special tokens of the tokenizer (a chat's end-of-turn, say) are written to the model config.
        if isinstance(self.processing_class, (PreTrainedTokenizerBase, ProcessorMixin)) and hasattr(
            self.model, "config"
        ):
            align_special_tokens(self.model, self.processing_class)
        if self.neftune_noise_alpha is not None:  # NEFTune: noise on the input embeddings while training
            self.neftune_hook_handle = activate_neftune(self.model, self.neftune_noise_alpha, self.accelerator)
        self._hp_search_setup(trial)  # may change the arguments (and the seed), so it comes first
        if DebugOption.UNDERFLOW_OVERFLOW in args.debug:
            if args.n_gpu > 1:
                raise ValueError(
                    "debug='underflow_overflow' does not work under DataParallel; launch one process per GPU."
                )
            DebugUnderflowOverflow(self.model)

        # looptrain: every file of the checkpoint is read and checked before anything is changed.
        self._resume = self._resolve_checkpoint(resume_from_checkpoint)

        # looptrain: labels outside the model's classes, sequences longer than its positions, said before any step.
        eval_sets = (
            self.eval_dataset.items() if isinstance(self.eval_dataset, dict) else [("evaluation", self.eval_dataset)]
        )
        for description, dataset in [("training", self.train_dataset), *eval_sets]:
            checks.check_dataset_fits_model(self.model, dataset, self.data_collator, self.label_names, description)
        validation.check_before_training(
            self
        )  # looptrain: something to train, a rate that moves it; old staging folders

        # Trainer: under auto_find_batch_size an out-of-memory error restarts the loop with 90% of the batch size.
        inner_training_loop = find_executable_batch_size(
            self._inner_training_loop, self._train_batch_size, args.auto_find_batch_size
        )
        quiet = (
            suppress_progress_bars() if args.push_to_hub else contextlib.nullcontext()
        )  # Trainer: uploads print bars
        with quiet, self._preemption.while_training(self.accelerator):
            checkpoint = self._resume.path if self._resume is not None else None
            return inner_training_loop(
                args=args, resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval
            )

    def _inner_training_loop(
        self, batch_size=None, args=None, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None
    ) -> TrainOutput:
        """The loop: plan, state, prepare, the epochs, the summary."""
        self.accelerator.free_memory()  # Trainer: forget what an earlier train()/evaluate() prepared
        if args.auto_find_batch_size:
            self._update_auto_batch_size(batch_size)
        train_dataloader = self.get_train_dataloader()

        # ---- 1. Plan the run: micro-batches per epoch, optimizer steps per epoch and in all, epochs.
        plan = TrainingPlan(*self.set_initial_training_values(args, train_dataloader))
        # ---- 2. A fresh TrainerState, or the checkpoint's and where it left off (checkpoint.py).
        epochs_trained, micro_batches_to_skip = self._init_training_state(
            plan.max_steps, plan.optimizer_steps_per_epoch, plan.num_train_epochs, resume_from_checkpoint, trial
        )
        # ---- 3. Optimizer, accelerate.prepare, schedule, and the checkpoint's optimizer state (backends.py).
        model, train_dataloader = self._prepare_for_training(plan.max_steps, train_dataloader, resume_from_checkpoint)
        logger.info(plan.describe(self._train_batch_size, args, get_model_param_count(model, trainable_only=True)))

        # ---- 4. The running loss: a float32 sum on the device (no host sync per step) until the next log; with a
        # checkpoint, the loss it had summed since its last log, its last norm and lr (looptrain: Trainer loses them).
        start_time = time.time()
        self._initial_num_input_tokens_seen = self.state.num_input_tokens_seen
        self._initial_global_step = self.state.global_step
        self._loop = LoopState.start(self.state.global_step, args.device, self._resume, args.process_index)
        self._divergence = checks.DivergenceGuard(args.device)
        model.zero_grad()
        fastpath.start(self, self._loop)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        # Trainer: evaluate before the first step, logged at step 0 (costs one RNG draw); again after a checkpoint,
        # a draw the uninterrupted run did not take, which looptrain leaves out.
        if args.eval_on_start and self._resume is None:
            self._evaluate(trial, ignore_keys_for_eval, skip_scheduler=True)

        # ---- 5. The epochs.
        for epoch in range(epochs_trained, plan.num_train_epochs):
            self.control = self.callback_handler.on_epoch_begin(args, self.state, self.control)
            self._run_epoch(
                model=model,
                epoch=epoch,
                train_dataloader=train_dataloader,
                steps_in_epoch=plan.micro_batches_per_epoch,
                num_update_steps_per_epoch=plan.optimizer_steps_per_epoch,
                trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval,
                start_time=start_time,
                resume_from_checkpoint=resume_from_checkpoint,
                epochs_trained=epochs_trained,
                steps_trained_in_current_epoch=micro_batches_to_skip,
            )
            if self.control.should_training_stop or self._preemption.stopped:
                break

        # ---- 6. The summary.
        return self._finalize_training(trial, plan.num_train_samples, start_time)

    def set_initial_training_values(self, args, dataloader) -> tuple[int, int, int, int, int, int, int]:
        """(epochs, optimizer steps per epoch, examples, samples to train, total batch size, micro-batches per
        epoch, optimizer steps in all), computed as Trainer computes them."""
        max_steps = args.max_steps
        len_dataloader = len(dataloader) if has_length(dataloader) else None
        total_train_batch_size = self.get_total_train_batch_size(args)
        if self.get_sp_size() > 1 and len_dataloader is not None:
            len_dataloader *= self.get_sp_size()  # Trainer: the sequence-parallel adapter multiplies the batches
        if len_dataloader is not None:
            # Trainer: an epoch ends with a possibly shorter "remainder" window, so this is a ceil.
            num_update_steps_per_epoch = max(math.ceil(len_dataloader / args.gradient_accumulation_steps), 1)
            if max_steps < 0:
                max_steps = math.ceil(args.num_train_epochs * num_update_steps_per_epoch)  # fractional epochs too
        if len_dataloader:
            num_examples = self.num_examples(dataloader)
            if args.max_steps > 0:
                num_train_epochs = math.ceil(max_steps / num_update_steps_per_epoch)
                num_train_samples = max_steps * total_train_batch_size
            else:
                num_train_epochs = math.ceil(args.num_train_epochs)
                num_train_samples = self.num_examples(dataloader) * args.num_train_epochs  # (Trainer asks again)
        elif args.max_steps > 0:  # no length (an IterableDataset): run for max_steps, over as many passes as needed
            num_train_epochs = sys.maxsize
            num_update_steps_per_epoch = max_steps
            num_examples = num_train_samples = total_train_batch_size * args.max_steps
        elif len_dataloader == 0:
            raise ValueError(
                "The training dataloader yields no batch: the training dataset is empty, or dataloader_drop_last=True "
                "drops its only, incomplete batch."
            )
        else:
            raise ValueError("The training dataloader has no length: set TrainingArguments(max_steps=...).")
        steps_in_epoch = len_dataloader if len_dataloader is not None else max_steps * args.gradient_accumulation_steps
        return (
            num_train_epochs,
            num_update_steps_per_epoch,
            num_examples,
            num_train_samples,
            total_train_batch_size,
            steps_in_epoch,
            max_steps,
        )

    def _run_epoch(
        self,
        model,
        epoch,
        train_dataloader,
        steps_in_epoch,
        num_update_steps_per_epoch,
        trial,
        ignore_keys_for_eval,
        start_time,
        resume_from_checkpoint,
        epochs_trained,
        steps_trained_in_current_epoch,
    ):
        """One pass over the data: windows of `gradient_accumulation_steps` micro-batches, one optimizer step each,
        then the epoch's end. (Trainer's names: `steps_in_epoch` counts micro-batches, `num_update_steps_per_epoch`
        and `global_step` optimizer steps.)"""
        args = self.args
        micro_batches_per_step = args.gradient_accumulation_steps  # the size of a window
        start = EpochStart()  # a fresh epoch; or where the checkpoint left it (what to skip, when to restore the RNG)
        if resume_from_checkpoint is not None and epoch == epochs_trained:
            start = self._resume.epoch_start(steps_trained_in_current_epoch, steps_in_epoch)
        grad_norm, lr = start.replay_epoch_end(self.control, self._loop)  # (None, None) but at an epoch end
        epoch_iterator = self._epoch_iterator(train_dataloader, epoch, start, num_update_steps_per_epoch)
        step = start.micro_batches_to_skip - 1  # the micro-batch of this epoch last trained on
        last_window = steps_in_epoch % micro_batches_per_step or micro_batches_per_step  # the epoch's remainder
        for update_step in range(start.first_window, num_update_steps_per_epoch):
            # Trainer: fetch the whole window first, so that the loss can be normalised by its label count.
            num_batches = micro_batches_per_step if update_step != num_update_steps_per_epoch - 1 else last_window
            batch_samples, num_items_in_batch = self.get_batch_samples(epoch_iterator, num_batches, args.device)
            self.current_gradient_accumulation_steps = len(batch_samples)  # the remainder window may be shorter
            if num_items_in_batch is not None:  # looptrain: the hazard needs a label count; decided on the batches
                self._warn_if_loss_not_scaled_for_ga()
            if update_step == start.restore_rng_after_window:
                self._load_rng_state(start.checkpoint)  # overwrites the draw of the skipping iterator
            for i, inputs in enumerate(batch_samples):
                step += 1
                do_sync_step = (step + 1) % micro_batches_per_step == 0 or (step + 1) == steps_in_epoch
                # Trainer: with the window prefetched, accelerate is told itself when gradients synchronise.
                self.accelerator.gradient_state._set_sync_gradients(do_sync_step)
                if step % micro_batches_per_step == 0:
                    self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
                # Under DDP only the window's last micro-batch all-reduces gradients (see `_setup_accelerator`).
                all_reduce = i == len(batch_samples) - 1 or self._backend.sync_each_micro_batch
                sync_context = contextlib.nullcontext() if all_reduce else self.accelerator.no_sync(model=model)
                # looptrain: out-of-range labels and too-long sequences are named, not left to torch's message
                with sync_context, checks.explaining_errors(self.accelerator, model, inputs, trainer=self):
                    tr_loss_step = self.training_step(model, inputs, num_items_in_batch)
                if self._loop.tr_loss.device != tr_loss_step.device:
                    raise checks.loss_on_wrong_device(tr_loss_step, self._loop.tr_loss)
                if args.logging_nan_inf_filter:
                    # Trainer: tr_loss += the step loss, or tr_loss / steps_since_log if it is NaN/Inf (no sync here)
                    steps_since_log = 1 + self.state.global_step - self._loop.globalstep_last_logged
                    fastpath.add_step_loss(self, self._loop, tr_loss_step, steps_since_log)
                else:
                    self._loop.tr_loss += tr_loss_step
                self.current_flos += float(self.floating_point_ops(inputs))
                self._track_num_input_tokens(inputs)
                if do_sync_step:  # the window is complete
                    grad_norm, lr = self._optimizer_step(model, epoch + (step + 1) / steps_in_epoch, trial)
                    self._maybe_log_save_evaluate(
                        self._loop.tr_loss,
                        grad_norm,
                        model,
                        trial,
                        epoch,
                        ignore_keys_for_eval,
                        start_time,
                        learning_rate=lr,
                    )
                    if self._preemption.stop_after_save():  # after the save, so the checkpoint does not say "stopped"
                        return
                else:
                    self.control = self.callback_handler.on_substep_end(args, self.state, self.control)
                if self.control.should_epoch_stop or self.control.should_training_stop:
                    break
            if self.control.should_epoch_stop or self.control.should_training_stop:
                break
        yielded_nothing = step < 0 and epoch_iterator is not None
        self._end_epoch(model, trial, epoch, ignore_keys_for_eval, start_time, grad_norm, lr, yielded_nothing)

    def _optimizer_step(self, model, epoch: float, trial) -> tuple:
        """The optimizer step that ends a window, in Trainer's order: clip (and measure), step, read the lr, schedule,
        zero; then the step's bookkeeping and `on_step_end`. Returns (grad_norm, learning_rate), which the log shows."""
        args = self.args
        grad_norm = self._clip_grad_norm(model) if args.max_grad_norm > 0 else None
        grad_norm = self._get_grad_norm(model, grad_norm=grad_norm)
        self.control = self.callback_handler.on_pre_optimizer_step(args, self.state, self.control)
        fastpath.optimizer_step(self)  # self.optimizer.step()
        self.control = self.callback_handler.on_optimizer_step(args, self.state, self.control)
        learning_rate = self._get_learning_rate()  # the lr this step used
        # fp16: a step skipped for overflow does not advance the schedule; plateau-type schedulers step in `_evaluate`.
        step_was_skipped = self.accelerator.optimizer_step_was_skipped
        if not step_was_skipped and not steps_on_metrics(self.lr_scheduler):
            self.lr_scheduler.step()
        fastpath.zero_grad(self, model)  # model.zero_grad()
        self.state.global_step += 1
        self.state.epoch = epoch
        self._loop.grad_norm, self._loop.learning_rate = grad_norm, learning_rate  # looptrain_state.json
        # looptrain: the NaN/inf guard keeps the norm (no device op, no sync). fp16: see _stop_if_diverged.
        if self.raise_on_divergence and not step_was_skipped and self.accelerator.scaler is None:
            self._divergence.observe(grad_norm, self.state.global_step)
        self.control = self.callback_handler.on_step_end(args, self.state, self.control)
        if self._preemption.requested(self.accelerator):  # SIGTERM: save at this step boundary, then stop
            self.control.should_save = True
        self._stop_if_diverged(trial)
        return grad_norm, learning_rate

    def _epoch_iterator(self, train_dataloader, epoch: int, start: EpochStart, num_update_steps_per_epoch: int):
        """The epoch's batches from where it starts (None when only its end is left to run)."""
        if start.restore_rng_first:  # a checkpoint saved at an epoch boundary: its RNG, before the iterator draws
            self._load_rng_state(start.checkpoint)
        if start.first_window >= num_update_steps_per_epoch:
            return None
        if start.micro_batches_to_skip:
            # Trainer: skip the consumed batches at the sampler (never collated).
            train_dataloader = skip_first_batches(train_dataloader, start.micro_batches_to_skip)
        if hasattr(train_dataloader, "set_epoch"):
            train_dataloader.set_epoch(epoch)
        # Trainer: accelerate's set_epoch does not reach a batch sampler inside its BatchSamplerShard.
        inner_sampler = getattr(getattr(train_dataloader, "batch_sampler", None), "batch_sampler", None)
        if hasattr(inner_sampler, "set_epoch"):
            inner_sampler.set_epoch(epoch)
        # Trainer: a new iterator every epoch; creating it takes one draw from the global RNG.
        return iter(train_dataloader)

    def _end_epoch(
        self, model, trial, epoch, ignore_keys_for_eval, start_time, grad_norm, learning_rate, yielded_nothing
    ):
        """The epoch's end. Trainer: it also runs when max_steps or a callback stopped the epoch early; its log
        repeats the last optimizer step's norm and learning rate."""
        if yielded_nothing:
            logger.warning(
                f"The epoch yielded no batch; stopping at step {self.state.global_step}. (An IterableDataset with fewer "
                "examples than max_steps needs?)"
            )
            self.control.should_training_stop = True
        self.control = self.callback_handler.on_epoch_end(self.args, self.state, self.control)
        self._stop_if_diverged(trial)
        self._loop.at_epoch_end = True  # a checkpoint saved now leaves nothing of this epoch to a later run
        try:
            self._maybe_log_save_evaluate(
                self._loop.tr_loss,
                grad_norm,
                model,
                trial,
                epoch,
                ignore_keys_for_eval,
                start_time,
                learning_rate=learning_rate,
            )
        finally:
            self._loop.at_epoch_end = False

    # ============================================================================================== one step
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the loss that is added to the logged sum."""
        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with cp_context():
            fastpath.train_mode(
                self, model
            )  # model.train(). Trainer: before every micro-batch (an evaluation may switch)
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()  # schedule-free optimizers keep two sets of weights
            inputs = self._prepare_inputs(inputs)
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            del inputs
            if (
                self.args.torch_empty_cache_steps is not None
                and self.state.global_step % self.args.torch_empty_cache_steps == 0
            ):
                clear_device_cache()  # Trainer: return cached device memory every N steps
                if torch.backends.mps.is_available() and hasattr(torch.mps, "clear_graph_cache"):
                    torch.mps.clear_graph_cache()
            if self.args.n_gpu > 1:
                loss = loss.mean()  # nn.DataParallel returns one loss per GPU
            # Trainer: a loss that already saw `num_items_in_batch` is taken as normalised over the whole window;
            # any other is a per-batch mean, divided here by the window's actual size. (transformers#47688: a model
            # that takes **kwargs but ignores num_items_in_batch, like BertForSequenceClassification, is therefore
            # not divided at all. Set loss_is_scaled_for_ga=False on a subclass for the correct average.)
            if self.loss_is_scaled_for_ga is not None:
                loss_is_scaled_for_ga = self.loss_is_scaled_for_ga
            else:
                loss_is_scaled_for_ga = (
                    self.model_accepts_loss_kwargs and num_items_in_batch is not None
                ) or self.compute_loss_func is not None
            if not loss_is_scaled_for_ga:
                loss = loss / self.current_gradient_accumulation_steps
            # mixed-precision loss scaling happens in accelerate; LOMO and DeepSpeed need more (`_backward_kwargs`)
            fastpath.backward(self, loss, **self._backward_kwargs())  # self.accelerator.backward(loss, ...)
            return loss.detach()

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None
    ):
        """The model's own loss, or `compute_loss_func`'s, or the label smoother's."""
        if self._backend.sequence_parallel_loss and self.model.training:
            return self._sequence_parallel_loss(model, inputs, return_outputs)
        if (self.label_smoother is not None or self.compute_loss_func is not None) and "labels" in inputs:
            labels = inputs.pop("labels")
        else:
            labels = None
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs)
        if self.compute_loss_func is not None:
            if labels is None:
                logger.warning("compute_loss_func is called with labels=None: the batch has no 'labels'.")
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        elif labels is not None:
            unwrapped = self.accelerator.unwrap_model(model)
            name = unwrapped.base_model.model._get_name() if _is_peft_model(unwrapped) else unwrapped._get_name()
            shift = name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
            loss = self.label_smoother(outputs, labels, shift_labels=shift, num_items_in_batch=num_items_in_batch)
        else:
            if isinstance(outputs, dict) and "loss" not in outputs:
                raise ValueError(
                    f"The model returned no loss, only {', '.join(outputs.keys())}: the batch ({', '.join(inputs.keys())}) has "
                    f"no labels for it. {type(self.accelerator.unwrap_model(model)).__name__} takes its labels as "
                    f"{self.label_names or 'nothing'}: if your dataset holds them in another column, rename it "
                    "(dataset.rename_column('<your column>', 'label'); remove_unused_columns drops columns the model's "
                    "forward does not take). Or compute the loss yourself: Trainer(compute_loss_func=...) or a "
                    "compute_loss override."
                )
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]  # a tuple: the loss comes first
        if (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            # Trainer: the window's count was summed over processes, so each rank's loss is scaled back up; DDP's
            # gradient averaging then yields the global token mean. (Tensor-parallel ranks share their batch.)
            loss_scale = self.accelerator.num_processes // self.get_tp_size()
            loss = fastpath.rescale_loss(self, loss, loss_scale if self.args.n_gpu <= 1 else self.args.n_gpu)  # loss *=
        return (loss, outputs) if return_outputs else loss

    def compute_loss_context_manager(self):
        """Trainer's hook around the forward: the autocast context, if any (accelerate does autocast itself)."""
        stack = contextlib.ExitStack()
        autocast = self.autocast_smart_context_manager()
        if not isinstance(autocast, contextlib.nullcontext):
            stack.enter_context(autocast)
        return stack

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        """Trainer's autocast hook; a no-op, since accelerate wraps forward in autocast itself."""
        return contextlib.nullcontext()

    # ========================================================================================== after a step
    def _maybe_log_save_evaluate(
        self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time, learning_rate=None
    ):
        """Trainer's order: log, then evaluate (and track the best metric), then save."""
        if self.control.should_log and self.state.global_step > self._globalstep_last_logged:
            fastpath.settle_loss(self._loop)  # the NaN/inf filter, checked where the loss is read
            # Trainer: the loss logged is the float32 sum since the last log (mean over processes), divided by
            # the number of optimizer steps in between. Not rounded.
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
            if self.args.save_strategy == "best":
                self.control.should_save = is_new_best
        if self.control.should_save:
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

    # ============================================================================================ the end
    def _finalize_training(self, trial, num_train_samples, start_time) -> TrainOutput:
        """The summary log (Trainer's `train_loss` is the mean of the losses of this call), the best model,
        `on_train_end`."""
        self._stop_if_diverged(trial, at_the_end=True)  # no diverged model is returned
        fastpath.settle_loss(self._loop)
        self._total_loss_scalar += self._loop.tr_loss.item()
        num_steps = self.state.global_step - self._initial_global_step
        train_loss = self._total_loss_scalar / max(num_steps, 0.001)
        metrics = speed_metrics(
            "train",
            start_time,
            # Trainer: `num_train_samples` covers the whole schedule; this call ran only part of it.
            num_samples=num_train_samples * num_steps / max(self.state.max_steps, 1),
            num_steps=num_steps,
        )
        self.store_flos()
        metrics["total_flos"] = self.state.total_flos
        metrics["train_loss"] = train_loss
        self._memory_tracker.stop_and_update_metrics(metrics)
        self.log(metrics)
        preempted = self._preemption.stopped  # the newest checkpoint is the one to resume from: keep it, load nothing
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None and not preempted:
            self._load_best_model()
        run_dir = self._get_output_dir(trial)
        if not preempted:
            self._delete_non_best_checkpoints(run_dir)
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        self._finish_current_push()
        if self.neftune_noise_alpha is not None:
            deactivate_neftune(self.model, self.neftune_hook_handle, self.accelerator)
        self.is_in_train = False
        return TrainOutput(self.state.global_step, train_loss, metrics)

    def _stop_if_diverged(self, trial, at_the_end: bool = False) -> None:
        """looptrain: before a log, an evaluation or a save (where the loop synchronises anyway), and at the end, stop
        a run whose gradients became NaN/inf, so that no non-finite checkpoint is written (`checks.DivergenceGuard`)."""
        due = at_the_end or self.control.should_log or self.control.should_evaluate or self.control.should_save
        if self.raise_on_divergence and due:
            if self.accelerator.scaler is not None:
                self._divergence.observe_weights(self.model, self.state.global_step)
            self._divergence.check(lambda: ckpt.last_checkpoint(self._get_output_dir(trial)))

    @property
    def preempted(self) -> bool:
        """Whether the last `train()` stopped early on SIGTERM; its newest checkpoint is where to resume."""
        return self._preemption.stopped

    # ========================================================================================= step helpers
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
        """Trainer: labels != -100 summed over the window (shifted by one for causal LMs), summed over processes
        when `average_tokens_across_devices`, as a float tensor. Only counted when the model or
        `compute_loss_func` can use it."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        if not (self.model_accepts_loss_kwargs or self.compute_loss_func is not None):
            return None
        try:
            labels = [
                b["shift_labels"]
                if "shift_labels" in b
                else b["labels"][..., 1:]
                if self._loss_shifts_labels
                else b["labels"]
                for b in batch_samples
            ]
            num_items = fastpath.label_count(self, labels)  # sum(label.ne(-100).sum() for label in labels)
        except (TypeError, AttributeError):
            return None
        if self.args.average_tokens_across_devices:
            if self.args.world_size > 1:
                num_items = self.accelerator.gather(num_items.to(device)).sum()
        elif self.args.n_gpu > 1:
            num_items = num_items // self.args.n_gpu  # Trainer: DataParallel splits the batch over the GPUs
        if torch.is_tensor(num_items):
            num_items = num_items.to(device)
            if self.args.n_gpu > 1 and num_items.dim() == 0:
                num_items = num_items.unsqueeze(0).expand(self.args.n_gpu, -1)
            # Trainer: divided by the ranks that see the same batch (tensor/context/sequence parallel): a float.
            num_items = num_items / self._parallel_sizes.sharing_a_batch
        return num_items

    # ====================================================================================== model, callbacks
    def call_model_init(self, trial=None) -> nn.Module:
        """Build a model with `model_init` (with the trial when it takes one), as Trainer does."""
        argcount = number_of_arguments(self.model_init)
        if argcount == 0:
            model = self.model_init()
        elif argcount == 1:
            model = self.model_init(trial)
        else:
            raise RuntimeError("model_init must take no argument, or one (the hyperparameter-search trial).")
        if model is None:
            raise RuntimeError("model_init returned None; it must return a model.")
        return model

    def add_callback(self, callback):
        """Add a `TrainerCallback` instance or class; it runs after the ones already there."""
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        """Remove a callback (instance or class) and return it (None if absent)."""
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback):
        """Remove a callback (instance or class)."""
        self.callback_handler.remove_callback(callback)

    def _setup_callbacks_and_state(self, callbacks) -> None:
        """Trainer: DefaultFlowCallback, the reporting integrations, the user's, the progress bar; the Hub repository
        (`push_to_hub`) and the output folder; a fresh `TrainerControl` and `TrainerState`. (`enable_jit_checkpoint`:
        looptrain's SIGTERM handling is always on while training, see preemption.py.)"""
        args = self.args
        default_callbacks = [DefaultFlowCallback] + get_reporting_integration_callbacks(args.report_to)
        self.callback_handler = fastpath.CallbackHandler(
            default_callbacks + (callbacks or []), self.model, self.processing_class, self.optimizer, self.lr_scheduler
        )
        self.add_callback(PrinterCallback if args.disable_tqdm else ProgressCallback)
        self.hub_model_id = self.push_in_progress = None  # set by init_hf_repo(); the background upload (hub.py)
        if args.push_to_hub:
            self.init_hf_repo()
        if args.should_save:
            os.makedirs(args.output_dir, exist_ok=True)
        self.control = TrainerControl()
        self.state = TrainerState(
            is_local_process_zero=self.is_local_process_zero(),
            is_world_process_zero=self.is_world_process_zero(),
            stateful_callbacks=self._stateful_callbacks(),
        )

    def _stateful_callbacks(self) -> list:
        return [cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)]

    def is_local_process_zero(self) -> bool:
        """Whether this is the first process on its machine."""
        return self.args.local_process_index == 0

    def is_world_process_zero(self) -> bool:
        """Whether this is the main process (the one that writes files)."""
        return self.args.process_index == 0

    def end(self) -> None:
        """Finish the trackers and destroy the process group; call once, at the very end of a script."""
        self.accelerator.end_training()

    # Trainer keeps the running loss in three attributes, which subclasses read (a copied
    # `_maybe_log_save_evaluate` does); looptrain keeps them in one `LoopState`, which checkpoints save.
    @property
    def _tr_loss(self):
        # The loop itself reads `self._loop.tr_loss`; a subclass reading it between logs gets the NaN/inf filter's
        # deferred check done first, on the device, without a sync (fastpath.add_step_loss).
        fastpath.settle_loss(self._loop, read_now=False)
        return self._loop.tr_loss

    @_tr_loss.setter
    def _tr_loss(self, value):
        fastpath.settle_loss(self._loop, read_now=False)  # the kept step losses belong to the sum being replaced
        self._loop.tr_loss = value

    _total_loss_scalar = property(
        lambda self: self._loop.total_loss_scalar, lambda self, v: setattr(self._loop, "total_loss_scalar", v)
    )
    _globalstep_last_logged = property(
        lambda self: self._loop.globalstep_last_logged, lambda self, v: setattr(self._loop, "globalstep_last_logged", v)
    )


# ------------------------------------------------------------------------------------------------ helpers
# transformers.Trainer methods that looptrain never calls, each with the reason. A subclass that overrides one would
# be silently ignored, so it is refused when constructed (`_refuse_overrides_never_called`).
NOT_CALLED = {
    "_defer_fsdp_gradient_reduction": "models sharded at load time (distributed_config) are not implemented",
    "_sync_replicated_trainable_parameters": "models sharded at load time (distributed_config) are not implemented",
    "_mixed_mesh_grad_norm": "models sharded at load time (distributed_config) are not implemented",
    "_has_mixed_mesh_grads": "models sharded at load time (distributed_config) are not implemented",
}


def _checked_arguments(args):
    """The training arguments, checked (a transformers.TrainingArguments was not checked when it was built)."""
    if args is None:
        args = TrainingArguments(output_dir="tmp_trainer")
    elif not isinstance(args, transformers.TrainingArguments):
        raise TypeError(f"args must be a TrainingArguments (looptrain's or transformers'), got {type(args).__name__}.")
    check_values(args)
    check_supported(args)
    return args


def _processing_class(processing_class, tokenizer):
    """`tokenizer=` is the 4.x name of `processing_class` (transformers 5 raises TypeError); accepted, with a warning."""
    if tokenizer is None:
        return processing_class
    if processing_class is not None and processing_class is not tokenizer:
        raise ValueError("Both tokenizer= and processing_class= were given; pass only processing_class=.")
    warnings.warn("Trainer(tokenizer=...) is the pre-5.x name; use processing_class=.", FutureWarning, stacklevel=4)
    return tokenizer


def _label_smoother(args, model) -> LabelSmoother | None:
    """Trainer: `label_smoothing_factor` smooths the labels of the loss, except for multi-label classification."""
    if args.label_smoothing_factor == 0:
        return None
    if getattr(getattr(model, "config", None), "problem_type", None) == "multi_label_classification":
        warnings.warn("Label smoothing is not compatible with multi-label classification; it is disabled.", UserWarning)
        return None
    return LabelSmoother(epsilon=args.label_smoothing_factor)


# transformers.Trainer methods that neither Trainer 5.24 nor looptrain calls from the loop, with the methods that
# run instead. An override is allowed (a script may call it itself) but the loop would not run it: said at construction.
NOT_CALLED_BY_THE_LOOP = {"create_optimizer_and_scheduler": "create_optimizer and create_scheduler"}


def _check_overrides(cls) -> None:
    """Refuse overrides of methods looptrain never calls (`NOT_CALLED`); warn about those the loop never calls."""

    def overrides(name):
        return any(name in vars(c) for c in cls.__mro__ if c is not Trainer and issubclass(c, Trainer))

    for name, instead in NOT_CALLED_BY_THE_LOOP.items():
        if overrides(name):
            warnings.warn(
                f"{cls.__name__} overrides {name}, which train() never calls (neither does transformers.Trainer): "
                f"override {instead} instead; train() calls them.",
                UserWarning,
                stacklevel=4,
            )
    overridden = [name for name in NOT_CALLED if overrides(name)]
    if overridden:
        reasons = "; ".join(f"{name} ({NOT_CALLED[name]})" for name in overridden)
        raise TypeError(
            f"{cls.__name__} overrides transformers.Trainer methods that looptrain.Trainer never calls, so the override "
            f"would have no effect: {reasons}. Move the code to a method looptrain calls (see docs/subclassing.md)."
        )
