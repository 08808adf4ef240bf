"""The training loop: `transformers.Trainer` 5.24's semantics, written to be read top to bottom.

Reading order (each a method of `Trainer`, in this file, in this order):
  1. `__init__`                  seed, accelerator, model, collator, callbacks, state.
  2. `train`                     what happens once per call: model re-init, activation checkpointing, NEFTune,
                                 the checkpoint to resume from; then the loop, retried with a smaller batch
                                 under `auto_find_batch_size`.
  3. `_inner_training_loop`      the loop, as a few named phases:
       `set_initial_training_values`   how many micro-batches, optimizer steps and epochs;
       `_init_training_state`          a fresh `TrainerState`, or the checkpoint's and where to resume;
       `_prepare_for_training`         optimizer, accelerate.prepare, schedule, the checkpoint's optimizer state;
       `_run_epoch` (per epoch)        windows of `gradient_accumulation_steps` micro-batches, one optimizer
                                       step each, then log / evaluate / save;
       `_finalize_training`            the summary log, the best model, `on_train_end`.
  4. `training_step`, `compute_loss`   one forward and backward.
  5. `_maybe_log_save_evaluate`, `log` what happens after an optimizer step.
The methods keep Trainer's names, signatures and call order, so a subclass written for `transformers.Trainer`
overrides the same points here. Around the loop, one module per concern: data (`data.py`), optimizer and
schedule (`optim.py`), evaluation (`evaluation.py`), checkpoints and resume (`checkpoint.py`), SIGTERM
(`preemption.py`), the Hub (`hub.py`), hyperparameter search (`search.py`), the arguments (`training_args.py`).

Comments marked "Trainer:" name a behaviour copied from Trainer on purpose, usually because parity depends on
it; "looptrain:" marks where looptrain deliberately does something else. `../docs/how-trainer-works.md` walks
through the same code in more words.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import sys
import time
import warnings
from typing import Any, Callable

import torch
import transformers
from accelerate import Accelerator, skip_first_batches
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    DistributedType,
    GradientAccumulationPlugin,
    TorchDynamoPlugin,
    release_memory,
)
from accelerate.utils.memory import clear_device_cache
from torch import nn
from transformers import PreTrainedModel
from transformers.debug_utils import DebugOption, DebugUnderflowOverflow
from transformers.integrations import get_reporting_integration_callbacks
from transformers.integrations.liger import apply_liger_kernel
from transformers.integrations.neftune import activate_neftune, deactivate_neftune
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
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
    compare_trainer_and_checkpoint_args,
    enable_full_determinism,
    find_executable_batch_size,
    has_length,
    number_of_arguments,
    set_seed,
    speed_metrics,
    suppress_progress_bars,
    unwrap_peft_model,
    validate_quantization_for_training,
)
from transformers.training_args import OptimizerNames, ParallelMode
from transformers.utils import can_return_loss, find_labels, logging

from . import checkpoint as ckpt
from . import checks
from . import fastpath
from .checkpoint import CheckpointMixin, LoopState
from .data import DataMixin, default_collator
from .evaluation import EvaluationMixin
from .hub import HubMixin
from .optim import OptimizerMixin, steps_on_metrics
from .preemption import Preemption
from .search import HyperparameterSearchMixin
from .training_args import TrainingArguments, check_supported, check_values

logger = logging.get_logger(__name__)


class Trainer(DataMixin, OptimizerMixin, EvaluationMixin, CheckpointMixin, HubMixin, HyperparameterSearchMixin):
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
        if args is None:
            args = TrainingArguments(output_dir="tmp_trainer")
        elif not isinstance(args, transformers.TrainingArguments):
            raise TypeError(f"args must be a TrainingArguments (looptrain's or transformers'), got {type(args).__name__}.")
        check_values(args)  # a transformers.TrainingArguments was not checked when it was built
        check_supported(args)
        _refuse_overrides_never_called(type(self))
        self.args = args
        if tokenizer is not None:  # the 4.x name; transformers 5 raises TypeError
            if processing_class is not None and processing_class is not tokenizer:
                raise ValueError("Both tokenizer= and processing_class= were given; pass only processing_class=.")
            warnings.warn("Trainer(tokenizer=...) is the pre-5.x name; use processing_class=.", FutureWarning, stacklevel=2)
            processing_class = tokenizer
        # Trainer: the seed is set here, after the user built the model, before anything draws from the RNG.
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)

        # ---- 2. The accelerator: devices, processes, mixed precision, DeepSpeed/FSDP, compilation.
        self.deepspeed = None
        self.model = model  # Trainer: the accelerator reads the model (DDP's find_unused_parameters)
        self.create_accelerator_and_postprocess()
        checks.check_process_group(self.accelerator)  # looptrain: launched processes that did not connect
        checks.check_mixed_precision(args, self.accelerator)  # looptrain: fp16 where it would silently be float32
        self._memory_tracker = TrainerMemoryTracker(args.skip_memory_metrics)
        self._memory_tracker.start()
        logging.set_verbosity(args.get_process_log_level())
        args._setup_devices

        # ---- 3. The model.
        if model is None:
            if model_init is None:
                raise RuntimeError("Trainer needs a model or a model_init function.")
            self.model_init = model_init
            model = self.call_model_init()
        else:
            if model_init is not None:
                raise ValueError("Pass either model or model_init to Trainer, not both.")
            self.model_init = None
        if model.__class__.__name__ in MODEL_MAPPING_NAMES:
            raise ValueError(
                f"{model.__class__.__name__} only computes hidden states and takes no labels, so it cannot be trained "
                "as is: load a model with a head for your task (an AutoModelForXxx class)."
            )
        validate_quantization_for_training(model)
        if getattr(model, "is_distributed_loading_by_transformers", False):
            raise NotImplementedError(
                "Models sharded at load time (from_pretrained(..., distributed_config=...)) are not implemented by "
                "looptrain: load the model whole and shard it with accelerate (FSDP), or use transformers.Trainer."
            )
        self.is_model_parallel = False
        if getattr(model, "hf_device_map", None) is not None:  # spread over devices by device_map="auto"
            devices = [d for d in set(model.hf_device_map.values()) if d not in ("cpu", "disk")]
            self.is_model_parallel = len(devices) > 1 or (len(devices) == 1 and args.device != torch.device(devices[0]))
        if args.fsdp:
            if self.is_deepspeed_enabled:
                raise ValueError("fsdp and deepspeed cannot be used together: choose one.")
            if args.parallel_mode != ParallelMode.DISTRIBUTED:
                raise ValueError("fsdp only works in distributed training: start the script with `accelerate launch` or torchrun.")
        # Trainer: the model moves to the device now, unless something else places it (model parallel,
        # DeepSpeed, FSDP) or full-precision evaluation casts it first.
        if args.place_model_on_device is not None:
            self.place_model_on_device = args.place_model_on_device
        else:
            self.place_model_on_device = not (
                self.is_model_parallel or self.is_deepspeed_enabled or self.is_fsdp_enabled
                or args.fp16_full_eval or args.bf16_full_eval
            )
        if self.place_model_on_device and getattr(model, "quantization_method", None) != "bitsandbytes":
            self._move_model_to_device(model, args.device)
        if self.is_model_parallel:
            self.args._n_gpu = 1  # Trainer: no DataParallel over a model that is already spread over GPUs
        self.model = self.model_wrapped = model

        # ---- 4. What the model tells us about its loss and labels.
        unwrapped = unwrap_peft_model(self.accelerator.unwrap_model(model))
        # Trainer: a forward that takes **kwargs gets `num_items_in_batch`, and its loss is then not divided by
        # the accumulation steps (see `training_step`). An `accepts_loss_kwargs` attribute overrides.
        if hasattr(unwrapped, "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = unwrapped.accepts_loss_kwargs
        else:
            params = inspect.signature(unwrapped.forward).parameters.values()
            self.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and pc.sp_backend == "deepspeed" and pc.sp_enabled:
            self.model_accepts_loss_kwargs = False  # Trainer: sequence parallelism counts its own tokens
        inspected = unwrap_peft_model(self.model)
        self.label_names = find_labels(inspected.__class__) if args.label_names is None else args.label_names
        self.can_return_loss = can_return_loss(inspected.__class__)
        # Trainer: causal LM losses shift labels, so label counting (`num_items_in_batch`) skips position 0;
        # encoder-decoders align labels with their targets and count them all.
        self._loss_shifts_labels = LOSS_MAPPING.get(getattr(inspected, "loss_type", None)) is ForCausalLMLoss and not getattr(
            getattr(inspected, "config", None), "is_encoder_decoder", False
        )
        self.label_smoother = None
        if args.label_smoothing_factor != 0:
            if getattr(getattr(self.model, "config", None), "problem_type", None) == "multi_label_classification":
                warnings.warn("Label smoothing is not compatible with multi-label classification; it is disabled.", UserWarning)
            else:
                self.label_smoother = LabelSmoother(epsilon=args.label_smoothing_factor)

        # ---- 5. Data and user functions.
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

        # ---- 6. Callbacks. Trainer: DefaultFlowCallback, the reporting integrations, the user's, the progress bar.
        # (`enable_jit_checkpoint`: looptrain's SIGTERM handling is always on while training, see preemption.py.)
        default_callbacks = [DefaultFlowCallback] + get_reporting_integration_callbacks(args.report_to)
        self.callback_handler = fastpath.CallbackHandler(
            default_callbacks + (callbacks or []), self.model, self.processing_class, self.optimizer, self.lr_scheduler
        )
        self.add_callback(PrinterCallback if args.disable_tqdm else ProgressCallback)

        # ---- 7. The Hub repository and the output folder.
        self.hub_model_id = None  # set by init_hf_repo()
        if args.push_to_hub:
            self.init_hf_repo()
        if args.should_save:
            os.makedirs(args.output_dir, exist_ok=True)

        # ---- 8. State, shared with the callbacks.
        self.control = TrainerControl()
        self.state = TrainerState(
            is_local_process_zero=self.is_local_process_zero(),
            is_world_process_zero=self.is_world_process_zero(),
            stateful_callbacks=self._stateful_callbacks(),
        )
        self.is_in_train = False
        self.hp_name = None  # set by hyperparameter_search()
        self.hp_search_backend = None
        self._trial = None
        self.current_flos = 0  # this process's FLOPs since the last store_flos()
        self._flops_model = self._flops_params = None  # the model whose parameters floating_point_ops counted
        self._signature_columns = None  # the model's forward arguments, read once (data.py)
        self._train_batch_size = args.train_batch_size  # auto_find_batch_size may lower it
        self._created_lr_scheduler = False
        self._loop = None  # the running loss and counters while training (checkpoint.LoopState)
        self._preemption = Preemption()
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)
        # Trainer: caching key/values only wastes memory in training; the model is told so.
        if getattr(self.model, "config", None) is not None:
            self.model.config.use_cache = args.use_cache
        self._memory_tracker.stop_and_update_metrics()

    def _validate_args(self) -> None:
        """Trainer's checks of the constructor's arguments, with errors that say what to do."""
        args = self.args
        if args.batch_eval_metrics and self.compute_metrics is not None:
            if "compute_result" not in inspect.signature(self.compute_metrics).parameters:
                raise ValueError(
                    "batch_eval_metrics=True calls compute_metrics once per batch: it must take a `compute_result` "
                    "argument (True on the last batch, when it returns the metrics)."
                )
        if args.eval_strategy != "no" and self.eval_dataset is None:
            raise ValueError(
                f"eval_strategy={args.eval_strategy.value!r} needs an eval_dataset: pass Trainer(eval_dataset=...) "
                "or set eval_strategy='no'."
            )
        if (args.save_strategy == "best" or args.load_best_model_at_end) and args.metric_for_best_model is None:
            raise ValueError("save_strategy='best' and load_best_model_at_end need metric_for_best_model.")
        if self.optimizer_cls_and_kwargs is not None and self.optimizer is not None:
            raise RuntimeError("Pass either optimizers= or optimizer_cls_and_kwargs=, not both.")
        if self.model_init is not None and (self.optimizer is not None or self.lr_scheduler is not None):
            raise RuntimeError(
                "model_init builds a new model each train(), which an optimizer passed with optimizers= would not "
                "follow: override create_optimizer_and_scheduler in a subclass instead."
            )
        if self.is_fsdp_enabled and (self.optimizer is not None or self.lr_scheduler is not None):
            raise RuntimeError(
                "Under FSDP the optimizer must be built on the sharded model: override create_optimizer_and_scheduler "
                "in a subclass instead of passing optimizers=."
            )
        if not callable(self.data_collator) and callable(getattr(self.data_collator, "collate_batch", None)):
            raise TypeError("The data_collator must be a callable (a function, or an object with __call__).")
        if self.train_dataset is not None and not has_length(self.train_dataset) and args.max_steps <= 0:
            raise ValueError(
                "The training dataset has no length (an IterableDataset?), so the number of steps is unknown: set "
                "TrainingArguments(max_steps=...)."
            )

    def _build_accelerator_args(self, **kwargs) -> dict[str, Any]:
        """The keyword arguments of `Accelerator(...)` that come from the training arguments (Trainer's)."""
        args = self.args
        accelerator_args = {"mixed_precision": args.mixed_precision, "deepspeed_plugin": args.deepspeed_plugin, **kwargs}
        if args.ddp_find_unused_parameters is not None:
            find_unused = args.ddp_find_unused_parameters
        elif isinstance(self.model, PreTrainedModel):
            # Trainer: DDP's unused-parameter search breaks activation checkpointing.
            find_unused = not (self.model.is_activation_checkpointing or args.activation_checkpointing)
        else:
            find_unused = True
        ddp_kwargs = {"find_unused_parameters": find_unused}
        for name, key in (("ddp_bucket_cap_mb", "bucket_cap_mb"), ("ddp_broadcast_buffers", "broadcast_buffers"),
                          ("ddp_static_graph", "static_graph")):
            if getattr(args, name) is not None:
                ddp_kwargs[key] = getattr(args, name)
        accelerator_args["kwargs_handlers"] = [DistributedDataParallelKwargs(**ddp_kwargs)]
        if args.parallelism_config is not None:
            accelerator_args["parallelism_config"] = args.parallelism_config
        model_tp_size = getattr(self.model, "tp_size", None) or 1
        if model_tp_size > 1:  # Trainer: a model loaded with tensor parallelism tells accelerate its mesh
            from accelerate import ParallelismConfig

            dp_size = self.model.config.distributed_config.dp_size
            if accelerator_args.get("parallelism_config") is None:
                accelerator_args["parallelism_config"] = ParallelismConfig(tp_size=model_tp_size, dp_shard_size=dp_size)
            else:
                accelerator_args["parallelism_config"].tp_size = model_tp_size
                accelerator_args["parallelism_config"].dp_shard_size = dp_size
        accelerator_args["dynamo_plugin"] = TorchDynamoPlugin(
            backend=args.torch_compile_backend,
            mode=args.torch_compile_mode,
            dynamic=False if args.torch_compile_backend == "neuron" else None,
        )
        return accelerator_args

    def create_accelerator_and_postprocess(self) -> None:
        """The one Accelerator, configured as Trainer configures it, and the flags derived from it.

        Gradient accumulation stays at 1 in accelerate: the loop accumulates itself, so that the remainder
        window and loss-kwargs models are normalised Trainer's way.
        """
        args = self.args
        grad_acc_kwargs = dict(args.accelerator_config.gradient_accumulation_kwargs or {})
        if "num_steps" in grad_acc_kwargs:
            if args.gradient_accumulation_steps > 1:
                raise ValueError(
                    "accelerator_config's gradient_accumulation_kwargs sets num_steps and gradient_accumulation_steps "
                    "is above 1: set only one of them."
                )
            args.gradient_accumulation_steps = grad_acc_kwargs["num_steps"]
        grad_acc_kwargs["num_steps"] = 1
        accelerator_config = args.accelerator_config.to_dict()
        dataloader_config = DataLoaderConfiguration(
            **{k: accelerator_config.pop(k) for k in ("split_batches", "dispatch_batches", "even_batches", "use_seedable_sampler")}
        )
        # Trainer: the seedable sampler orders epoch e by randperm(data_seed + e), never touching the global RNG.
        dataloader_config.data_seed = args.data_seed
        dataloader_config.non_blocking = accelerator_config.pop("non_blocking")
        if dataloader_config.non_blocking and not args.dataloader_pin_memory:
            logger.warning("accelerator_config non_blocking=True works best with dataloader_pin_memory=True.")
        fsdp_plugin = None
        if args.fsdp_plugin_args is not None:
            from accelerate.utils import FullyShardedDataParallelPlugin

            fsdp_plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
        self.accelerator = Accelerator(
            **self._build_accelerator_args(
                dataloader_config=dataloader_config,
                fsdp_plugin=fsdp_plugin,
                gradient_accumulation_plugin=GradientAccumulationPlugin(**grad_acc_kwargs),
            )
        )
        # Trainer: evaluation gathers with gather_for_metrics, as Python objects with eval_use_gather_object.
        self.gather_function = functools.partial(
            self.accelerator.gather_for_metrics, use_gather_object=args.eval_use_gather_object
        )
        self.is_deepspeed_enabled = getattr(self.accelerator.state, "deepspeed_plugin", None) is not None
        self.is_fsdp_enabled = getattr(self.accelerator.state, "fsdp_plugin", None) is not None
        if self.is_fsdp_enabled and self.accelerator.state.fsdp_plugin.activation_checkpointing and args.activation_checkpointing:
            raise ValueError(
                "fsdp_config activation_checkpointing and the activation_checkpointing argument are both on: use FSDP's "
                "(fsdp_config) under FSDP."
            )
        if self.is_deepspeed_enabled and getattr(args, "hf_deepspeed_config", None) is None:
            from transformers.integrations.deepspeed import propagate_args_to_deepspeed

            propagate_args_to_deepspeed(self.accelerator, args)  # a DeepSpeed config that came from accelerate launch
        if args.save_only_model and (self.is_deepspeed_enabled or self.is_fsdp_enabled) and args.load_best_model_at_end:
            raise ValueError("save_only_model with load_best_model_at_end cannot reload the best model under DeepSpeed/FSDP.")
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3 and args.auto_find_batch_size:
            raise ValueError("auto_find_batch_size does not work with DeepSpeed ZeRO-3; use ZeRO-1/2 or FSDP.")
        if args.save_only_model and self.is_fsdp_enabled and "SHARDED_STATE_DICT" in str(self.accelerator.state.fsdp_plugin.state_dict_type):
            raise ValueError("save_only_model cannot save an FSDP SHARDED_STATE_DICT: use FULL_STATE_DICT.")

    # ================================================================================================= train
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval: list[str] | None = None) -> TrainOutput:
        """Train the model; return `TrainOutput(global_step, training_loss, metrics)` as Trainer does.

        `resume_from_checkpoint`: a checkpoint folder, or True for the newest one in `output_dir`.
        """
        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
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
        if isinstance(self.processing_class, (PreTrainedTokenizerBase, ProcessorMixin)) and hasattr(self.model, "config"):
            align_special_tokens(self.model, self.processing_class)
        if self.neftune_noise_alpha is not None:  # NEFTune: noise on the input embeddings while training
            self.neftune_hook_handle = activate_neftune(self.model, self.neftune_noise_alpha, self.accelerator)
        self._hp_search_setup(trial)  # may change the arguments (and the seed), so it comes first
        if DebugOption.UNDERFLOW_OVERFLOW in args.debug:
            if args.n_gpu > 1:
                raise ValueError("debug='underflow_overflow' does not work under DataParallel; launch one process per GPU.")
            DebugUnderflowOverflow(self.model)

        if resume_from_checkpoint is not None:
            # looptrain: every file of the checkpoint is read and checked before anything is changed.
            resume_from_checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
            if not self.is_deepspeed_enabled and not self.is_fsdp_enabled:
                self._load_from_checkpoint(resume_from_checkpoint)  # before accelerate wraps the model
            saved_batch_size = self._checkpoint_file(resume_from_checkpoint, "trainer_state").get("train_batch_size")
            if saved_batch_size is not None and args.auto_find_batch_size:
                self._train_batch_size = saved_batch_size  # Trainer: the batch size that fitted before

        # looptrain: labels outside the model's classes, sequences longer than its positions, said before any step.
        eval_sets = self.eval_dataset.items() if isinstance(self.eval_dataset, dict) else [("evaluation", self.eval_dataset)]
        for description, dataset in [("training", self.train_dataset), *eval_sets]:
            checks.check_dataset_fits_model(self.model, dataset, self.data_collator, self.label_names, description)

        # Trainer: under auto_find_batch_size an out-of-memory error restarts the loop with 90% of the batch size.
        inner_training_loop = find_executable_batch_size(
            self._inner_training_loop, self._train_batch_size, args.auto_find_batch_size
        )
        quiet = suppress_progress_bars() if args.push_to_hub else contextlib.nullcontext()  # Trainer: uploads print bars
        with quiet, self._preemption.while_training(self.accelerator):
            return inner_training_loop(
                args=args, resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval
            )

    def _inner_training_loop(self, batch_size=None, args=None, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None) -> TrainOutput:
        """The loop: plan, state, prepare, the epochs, the summary."""
        self.accelerator.free_memory()  # Trainer: forget what an earlier train()/evaluate() prepared
        if args.auto_find_batch_size:
            self._update_auto_batch_size(batch_size)
        train_dataloader = self.get_train_dataloader()

        # ---- 1. Plan the run: micro-batches per epoch, optimizer steps per epoch and in all, epochs.
        (num_train_epochs, num_update_steps_per_epoch, num_examples, num_train_samples, total_train_batch_size,
         steps_in_epoch, max_steps) = self.set_initial_training_values(args, train_dataloader)
        # ---- 2. A fresh TrainerState, or the checkpoint's, and where in which epoch to resume.
        self._resume_plan = None
        epochs_trained, steps_trained_in_current_epoch = self._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        # ---- 3. Optimizer, accelerate.prepare, schedule (and the checkpoint's optimizer and schedule state).
        model, train_dataloader = self._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)

        logger.info(
            f"***** Running training *****  examples={num_examples:,} epochs={num_train_epochs:,} "
            f"batch={self._train_batch_size} x accumulation {args.gradient_accumulation_steps} x processes "
            f"{args.world_size} = {total_train_batch_size}; optimizer steps={max_steps:,}; trainable parameters="
            f"{get_model_param_count(model, trainable_only=True):,}"
        )
        if resume_from_checkpoint is not None:
            # looptrain: said at WARNING, Trainer's default verbosity, so that a resumed run never goes unnoticed.
            logger.warning(ckpt.describe_resume(resume_from_checkpoint, self.state.global_step, epochs_trained,
                                                steps_trained_in_current_epoch, steps_in_epoch))

        # ---- 4. The running loss: a float32 sum on the device (no host sync per step) until the next log.
        start_time = time.time()
        self._initial_num_input_tokens_seen = self.state.num_input_tokens_seen
        self._initial_global_step = self.state.global_step
        self._loop = LoopState.start(self.state.global_step, args.device)
        self._divergence = checks.DivergenceGuard(args.device)
        if resume_from_checkpoint is not None:  # looptrain: the loss summed since the last log, the last norm and lr
            self._loop.restore(self._checkpoint_file(resume_from_checkpoint, ckpt.LOOP_STATE_NAME), args.process_index)
        model.zero_grad()
        fastpath.start(self)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        # Trainer: evaluate before the first step, logged at step 0 (costs one RNG draw). Trainer evaluates again
        # when it resumes, a draw the uninterrupted run did not take; looptrain does not.
        if args.eval_on_start and resume_from_checkpoint is None:
            self._evaluate(trial, ignore_keys_for_eval, skip_scheduler=True)

        # ---- 5. The epochs.
        for epoch in range(epochs_trained, num_train_epochs):
            self.control = self.callback_handler.on_epoch_begin(args, self.state, self.control)
            self._run_epoch(
                model=model, epoch=epoch, train_dataloader=train_dataloader, steps_in_epoch=steps_in_epoch,
                num_update_steps_per_epoch=num_update_steps_per_epoch, trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval, start_time=start_time,
                resume_from_checkpoint=resume_from_checkpoint, epochs_trained=epochs_trained,
                steps_trained_in_current_epoch=steps_trained_in_current_epoch,
            )
            if self.control.should_training_stop or self._preemption.stopped:
                break

        # ---- 6. The summary.
        return self._finalize_training(trial, num_train_samples, start_time)

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
        return num_train_epochs, num_update_steps_per_epoch, num_examples, num_train_samples, total_train_batch_size, steps_in_epoch, max_steps

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial) -> tuple[int, int]:
        """A fresh `TrainerState`, or the checkpoint's; return (epochs done, micro-batches of the next epoch to skip).

        Resuming follows a plan computed from the checkpoint alone (`checkpoint.plan_resume`): Trainer's rule
        (`global_step // steps per epoch` epochs done, then `(global_step % steps per epoch) * GA` micro-batches),
        made exact where Trainer's is not. When the checkpoint was written after the step that ended an epoch but
        before that epoch's end ran (its evaluation, logs and save), the plan returns that epoch with all its
        micro-batches consumed: `_run_epoch` then runs only its end.
        """
        self.state = TrainerState(stateful_callbacks=self._stateful_callbacks())
        self.state.is_hyper_param_search = trial is not None
        self.state.train_batch_size = self._train_batch_size
        self.state.compute_steps(self.args, max_steps)  # resolves ratio logging/eval/save steps
        epochs_trained, steps_to_skip = 0, 0
        if resume_from_checkpoint is not None:
            self.state = ckpt.trainer_state_from_json(self._checkpoint_file(resume_from_checkpoint, "trainer_state"), resume_from_checkpoint)
            if self.state.best_model_checkpoint is not None and not os.path.isdir(self.state.best_model_checkpoint):
                logger.warning(f"The best checkpoint {self.state.best_model_checkpoint} no longer exists; it is forgotten.")
                self.state.best_model_checkpoint = None
            compare_trainer_and_checkpoint_args(self.args, self.state)
            self._load_callback_state()
            plan = ckpt.plan_resume(
                self.state,
                self._checkpoint_file(resume_from_checkpoint, ckpt.LOOP_STATE_NAME),
                num_update_steps_per_epoch=num_update_steps_per_epoch,
                max_steps=max_steps,
                gradient_accumulation_steps=self.args.gradient_accumulation_steps,
                ignore_data_skip=self.args.ignore_data_skip,
                trainer_saved_at_epoch_end=ckpt.trainer_saves_at_epoch_end(self.args),
            )
            epochs_trained, steps_to_skip = plan.epochs_trained, plan.steps_to_skip
            self._resume_plan = plan  # `_run_epoch` reads whether training had stopped, if it replays an epoch end
        self.state.init_training_references(self, max_steps, num_train_epochs, trial)
        return epochs_trained, steps_to_skip

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """Build the optimizer, hand model and optimizer to `accelerate.prepare`, build the schedule, and load
        the checkpoint's optimizer, schedule and scaler state. Returns (the model to train, the dataloader)."""
        # Trainer: FSDP 1 shards the model before the optimizer is built on it (FSDP 2 keeps the parameters).
        delay_optimizer_creation = self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2
        if self._created_lr_scheduler:  # Trainer: a schedule built by an earlier train() restarts
            self.lr_scheduler, self._created_lr_scheduler = None, False
        if self.is_deepspeed_enabled:
            from transformers.integrations.deepspeed import deepspeed_init

            self.optimizer, self.lr_scheduler = deepspeed_init(self, num_training_steps=max_steps)
        if not delay_optimizer_creation:
            self.create_optimizer()
        model = self._wrap_model(self.model_wrapped)  # nn.DataParallel with several GPUs and one process
        if model is self.model:
            # Trainer: model and optimizer go through accelerate.prepare (DDP, FSDP, DeepSpeed, autocast,
            # compile); the scheduler does not, except DeepSpeed's own.
            if delay_optimizer_creation:
                model = self.accelerator.prepare(self.model)
                self.create_optimizer(model)
                self.optimizer = self.accelerator.prepare(self.optimizer)
            elif self.is_deepspeed_enabled and type(self.lr_scheduler).__name__ == "DummyScheduler":
                model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.model, self.optimizer, self.lr_scheduler)
            else:
                model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        else:
            self.optimizer = self.accelerator.prepare(self.optimizer)
        self.create_scheduler(num_training_steps=max_steps)
        self.model_wrapped = model
        if self.is_fsdp_enabled:
            self.model = model  # Trainer: under FSDP the sharded wrapper is the model (evaluation runs it too)
            if hasattr(self.model, "generate"):
                torch.distributed.fsdp.register_fsdp_forward_method(self.model, "generate")
        if self.is_deepspeed_enabled:
            self.deepspeed = self.model_wrapped
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and pc.sp_backend == "deepspeed" and pc.sp_enabled:
            train_dataloader = self.accelerator.deepspeed_ulysses_dl_adapter(train_dataloader, model)
        if resume_from_checkpoint is not None:
            if self.is_deepspeed_enabled:
                from transformers.integrations.deepspeed import deepspeed_load_checkpoint

                deepspeed_load_checkpoint(self.model_wrapped, resume_from_checkpoint, load_module_strict=not _is_peft_model(self.model))
            elif self.is_fsdp_enabled:
                self._load_from_checkpoint(resume_from_checkpoint, self.model_wrapped)
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
            self._load_scaler(resume_from_checkpoint)
        for name in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, name, getattr(self, name))
        self.callback_handler.train_dataloader = train_dataloader
        self._warn_if_loss_not_scaled_for_ga()
        return model, train_dataloader

    def _run_epoch(self, model, epoch, train_dataloader, steps_in_epoch, num_update_steps_per_epoch, trial,
                   ignore_keys_for_eval, start_time, resume_from_checkpoint, epochs_trained, steps_trained_in_current_epoch):
        """One pass over the data: windows of GA micro-batches, one optimizer step each, then the epoch's end."""
        args = self.args
        GA = args.gradient_accumulation_steps
        step, first_window, restore_rng_after_first_window = -1, 0, False
        grad_norm = learning_rate = None
        epoch_iterator = None

        # ---- resuming: skip what the checkpoint's run consumed of this epoch
        if epoch == epochs_trained and resume_from_checkpoint is not None:
            if steps_trained_in_current_epoch >= steps_in_epoch:
                # looptrain: the checkpoint precedes this epoch's end (see `_init_training_state`): nothing is left to
                # train in it. Its end runs from the checkpoint's RNG, with the last step's norm and learning rate.
                self._load_rng_state(resume_from_checkpoint)
                grad_norm, learning_rate = self._loop.grad_norm, self._loop.learning_rate
                first_window = num_update_steps_per_epoch
                # The control flags as the uninterrupted run had them after its save: the step's log, evaluation and
                # save were done; whether training was stopping is the checkpoint's.
                self.control.should_log = self.control.should_evaluate = self.control.should_save = False
                self.control.should_training_stop = self._resume_plan is not None and self._resume_plan.training_stopped
            elif steps_trained_in_current_epoch > 0:
                # Trainer: skip the consumed batches at the sampler (never collated); the checkpoint's RNG is
                # restored once the first resumed window is fetched (that overwrites the iterator's draw).
                train_dataloader = skip_first_batches(train_dataloader, steps_trained_in_current_epoch)
                step = steps_trained_in_current_epoch - 1
                first_window = steps_trained_in_current_epoch // GA
                restore_rng_after_first_window = True
            else:
                self._load_rng_state(resume_from_checkpoint)

        if first_window < num_update_steps_per_epoch:
            if hasattr(train_dataloader, "set_epoch"):
                train_dataloader.set_epoch(epoch)
            # Trainer: accelerate's set_epoch does not reach a batch sampler inside its BatchSamplerShard.
            inner_sampler = getattr(getattr(train_dataloader, "batch_sampler", None), "batch_sampler", None)
            if hasattr(inner_sampler, "set_epoch"):
                inner_sampler.set_epoch(epoch)
            # Trainer: a new iterator every epoch; creating it takes one draw from the global RNG.
            epoch_iterator = iter(train_dataloader)
        remainder = steps_in_epoch % GA or GA  # size of the epoch's last window

        for update_step in range(first_window, num_update_steps_per_epoch):
            # Trainer: fetch the whole window first, so that the loss can be normalised by its label count.
            num_batches = GA if update_step != num_update_steps_per_epoch - 1 else remainder
            batch_samples, num_items_in_batch = self.get_batch_samples(epoch_iterator, num_batches, args.device)
            self.current_gradient_accumulation_steps = len(batch_samples)  # the remainder window may be shorter
            if restore_rng_after_first_window:
                self._load_rng_state(resume_from_checkpoint)
                restore_rng_after_first_window = False

            for i, inputs in enumerate(batch_samples):
                step += 1
                do_sync_step = (step + 1) % GA == 0 or (step + 1) == steps_in_epoch
                # Trainer: with the window prefetched, accelerate is told itself when gradients synchronise.
                self.accelerator.gradient_state._set_sync_gradients(do_sync_step)
                if step % GA == 0:
                    self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
                # Under DDP only the window's last micro-batch all-reduces gradients. Trainer: DeepSpeed marks the
                # accumulation boundary itself, and `sync_each_batch` asks for a sync every time.
                if (
                    i == len(batch_samples) - 1
                    or self.accelerator.distributed_type == DistributedType.DEEPSPEED
                    or self.accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False)
                ):
                    sync_context = contextlib.nullcontext()
                else:
                    sync_context = self.accelerator.no_sync(model=model)
                # looptrain: out-of-range labels and too-long sequences are named, not left to torch's message
                with sync_context, checks.explaining_errors(self.accelerator, model, inputs):
                    tr_loss_step = self.training_step(model, inputs, num_items_in_batch)

                if args.logging_nan_inf_filter:
                    # Trainer: a NaN/Inf step loss counts as the running mean instead. The same values as Trainer's
                    # `if isnan or isinf`, without a host sync on every micro-batch.
                    running_mean = self._tr_loss / (1 + self.state.global_step - self._globalstep_last_logged)
                    tr_loss_step = torch.where(torch.isfinite(tr_loss_step), tr_loss_step, running_mean)
                if self._tr_loss.device != tr_loss_step.device:
                    raise ValueError(
                        f"training_step returned a loss on {tr_loss_step.device}; it must stay on {self._tr_loss.device}."
                    )
                self._tr_loss += tr_loss_step
                self.current_flos += float(self.floating_point_ops(inputs))
                self._track_num_input_tokens(inputs)

                if not do_sync_step:
                    self.control = self.callback_handler.on_substep_end(args, self.state, self.control)
                else:
                    # ---- the optimizer step, in Trainer's order: clip (and measure), step, read lr, schedule, zero
                    grad_norm = self._clip_grad_norm(model) if args.max_grad_norm > 0 else None
                    grad_norm = self._get_grad_norm(model, grad_norm=grad_norm)
                    self.control = self.callback_handler.on_pre_optimizer_step(args, self.state, self.control)
                    fastpath.optimizer_step(self)  # self.optimizer.step()
                    self.control = self.callback_handler.on_optimizer_step(args, self.state, self.control)
                    learning_rate = self._get_learning_rate()  # the lr this step used
                    # fp16: a step skipped for overflow does not advance the schedule. Plateau-type schedulers
                    # step on evaluation metrics instead (`_evaluate`).
                    step_was_skipped = self.accelerator.optimizer_step_was_skipped
                    if not step_was_skipped and not steps_on_metrics(self.lr_scheduler):
                        self.lr_scheduler.step()
                    model.zero_grad()
                    self.state.global_step += 1
                    self.state.epoch = epoch + (step + 1) / steps_in_epoch
                    self._loop.grad_norm, self._loop.learning_rate = grad_norm, learning_rate  # looptrain_state.json
                    if not step_was_skipped and self.accelerator.scaler is None:  # (fp16: see _stop_if_diverged)
                        self._divergence.observe(grad_norm, self.state.global_step)  # on the device, no sync
                    self.control = self.callback_handler.on_step_end(args, self.state, self.control)
                    if self._preemption.requested(self.accelerator):  # SIGTERM: save at this step boundary, then stop
                        self.control.should_save = True
                    self._stop_if_diverged(trial)
                    self._maybe_log_save_evaluate(
                        self._tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                        learning_rate=learning_rate,
                    )
                    if self._preemption.stop_after_save():  # after the save, so the checkpoint does not say "stopped"
                        return
                if self.control.should_epoch_stop or self.control.should_training_stop:
                    break
            if self.control.should_epoch_stop or self.control.should_training_stop:
                break

        if step < 0 and first_window < num_update_steps_per_epoch:
            logger.warning(
                f"The epoch yielded no batch; stopping at step {self.state.global_step}. (An IterableDataset with fewer "
                "examples than max_steps needs?)"
            )
            self.control.should_training_stop = True
        # ---- the epoch's end. Trainer: it also runs when max_steps or a callback stopped the epoch early.
        self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
        self._stop_if_diverged(trial)
        self._loop.at_epoch_end = True  # a checkpoint saved now leaves nothing of this epoch to a resumed run
        try:
            self._maybe_log_save_evaluate(
                self._tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time, learning_rate=learning_rate
            )
        finally:
            self._loop.at_epoch_end = False

    def _finalize_training(self, trial, num_train_samples, start_time) -> TrainOutput:
        """The summary log (Trainer's `train_loss` is the mean of the losses of this call), the best model,
        `on_train_end`."""
        self._stop_if_diverged(trial, at_the_end=True)  # no diverged model is returned
        self._total_loss_scalar += self._tr_loss.item()
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

    # ============================================================================================== one step
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the loss that is added to the logged sum."""
        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        with cp_context():
            fastpath.train_mode(self, model)  # model.train(). Trainer: before every micro-batch (an evaluation may switch)
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()  # schedule-free optimizers keep two sets of weights
            inputs = self._prepare_inputs(inputs)
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            del inputs
            if self.args.torch_empty_cache_steps is not None and self.state.global_step % self.args.torch_empty_cache_steps == 0:
                clear_device_cache()  # Trainer: return cached device memory every N steps
                if torch.backends.mps.is_available() and hasattr(torch.mps, "clear_graph_cache"):
                    torch.mps.clear_graph_cache()
            kwargs = {}
            if self.args.optim in (OptimizerNames.LOMO, OptimizerNames.ADALOMO):
                kwargs["learning_rate"] = self._get_learning_rate()  # LOMO steps inside backward
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
            if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
                kwargs["scale_wrt_gas"] = False  # Trainer: the loss is already normalised for accumulation
            fastpath.backward(self, loss, **kwargs)  # accelerator.backward; mixed-precision loss scaling happens in accelerate
            return loss.detach()

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        """The model's own loss, or `compute_loss_func`'s, or the label smoother's."""
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and pc.sp_backend == "deepspeed" and pc.sp_enabled and self.model.training:
            from transformers.integrations.deepspeed import deepspeed_sp_compute_loss

            return deepspeed_sp_compute_loss(self.accelerator, model, inputs, return_outputs, pc)
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
            loss *= loss_scale if self.args.n_gpu <= 1 else self.args.n_gpu
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
    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time, learning_rate=None):
        """Trainer's order: log, then evaluate (and track the best metric), then save."""
        if self.control.should_log and self.state.global_step > self._globalstep_last_logged:
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

    def store_flos(self) -> None:
        """Move this process's FLOP count into `state.total_flos` (summed over processes)."""
        if self.args.parallel_mode == ParallelMode.DISTRIBUTED:
            # Trainer (`distributed_broadcast_scalars`): a float32 tensor gathered and summed.
            flos = torch.tensor([self.current_flos], device=self.args.device)
            self.state.total_flos += self.accelerator.gather(flos).sum().item()
        else:
            self.state.total_flos += self.current_flos
        self.current_flos = 0

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """Trainer's estimate: 6 x tokens x non-embedding parameters."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input in inputs and hasattr(self.model, "num_parameters"):
            # Performance: Trainer counts the parameters again for every micro-batch (a walk over the whole model,
            # 0.7 ms per step for a 2-layer BERT on a CPU, docs/performance.md); the count is kept per model.
            # Not under DeepSpeed: ZeRO-3 partitions the parameters, and the count Trainer logs follows them.
            if self.is_deepspeed_enabled:
                return 6 * inputs[main_input].numel() * self.model.num_parameters(exclude_embeddings=True)
            if self._flops_model is not self.model:
                self._flops_model, self._flops_params = self.model, self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs[main_input].numel() * self._flops_params
        return 0

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
                b["shift_labels"] if "shift_labels" in b else b["labels"][..., 1:] if self._loss_shifts_labels else b["labels"]
                for b in batch_samples
            ]
            num_items = sum(label.ne(-100).sum() for label in labels)
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
            num_items = num_items / (self.get_tp_size() * self.get_cp_size() * self.get_sp_size())
        return num_items

    def _prepare_input(self, data):
        """Move a (nested) batch to the device; accelerate's loader usually already did."""
        if isinstance(data, dict) or hasattr(data, "items") and hasattr(data, "keys"):
            return type(data)({k: self._prepare_input(v) for k, v in data.items()})
        if isinstance(data, (tuple, list)):
            return type(data)(self._prepare_input(v) for v in data)
        if isinstance(data, torch.Tensor):
            kwargs = {"device": self.args.device}
            if self.is_deepspeed_enabled and (torch.is_floating_point(data) or torch.is_complex(data)):
                # Trainer: float inputs (audio, images) take DeepSpeed's dtype; token ids stay integers.
                kwargs["dtype"] = self.accelerator.state.deepspeed_plugin.hf_ds_config.dtype()
            return data.to(**kwargs)
        return data

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The batch on the device; an empty batch is an error that names the model's arguments."""
        inputs = self._prepare_input(inputs)
        if len(inputs) == 0:
            self._set_signature_columns_if_needed()
            raise ValueError(
                "A batch is empty: no column of the dataset is an argument of the model's forward "
                f"({', '.join(self._signature_columns)})."
            )
        return inputs

    def _prepare_context_parallel_inputs(self, model, inputs):
        """Trainer: under context parallelism (accelerate's ParallelismConfig cp_size > 1) the sequence dimension
        of the batch is split across ranks; returns (the context that splits it, the inputs)."""
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is None or not pc.cp_enabled:
            return contextlib.nullcontext, inputs
        if pc.cp_backend == "torch":
            if hasattr(model, "config") and model.config._attn_implementation != "sdpa":
                raise ValueError(f"Context parallelism needs SDPA attention; the model uses {model.config._attn_implementation}.")
            if "shift_labels" not in inputs and "labels" in inputs:
                labels = nn.functional.pad(inputs["labels"], (0, 1), value=-100)
                inputs["shift_labels"] = labels[:, 1:].contiguous()
        if "position_ids" not in inputs:
            inputs["position_ids"] = torch.arange(inputs["input_ids"].size(1), device=inputs["input_ids"].device).expand(
                inputs["input_ids"].size(0), -1
            )
        buffers = [inputs[k] for k in ("input_ids", "labels", "shift_labels") if k in inputs]
        if "attention_mask" in inputs:
            from transformers.trainer_pt_utils import is_attention_mask_causal

            if not getattr(self, "_attn_mask_causal_checked", False):
                if not is_attention_mask_causal(inputs["attention_mask"]):
                    raise ValueError("Context parallelism only supports causal attention masks.")
                self._attn_mask_causal_checked = True
            if inputs["attention_mask"].dim() == 2:
                buffers.append(inputs["attention_mask"])
        if inputs.get("position_ids") is not None:
            buffers.append(inputs["position_ids"])
        return functools.partial(
            self.accelerator.maybe_context_parallel, buffers=buffers, buffer_seq_dims=[1] * len(buffers),
            no_restore_buffers=set(buffers),
        ), inputs

    def _clip_grad_norm(self, model):
        """Clip to `max_grad_norm`; returns the norm before clipping."""
        return fastpath.clip_grad_norm(self, model, self.args.max_grad_norm)  # accelerator.clip_grad_norm_

    def _get_grad_norm(self, model, grad_norm=None):
        """The gradient norm to log. Trainer logs it even without clipping (`max_grad_norm=0`): then it is
        measured by a clip to infinity, which changes nothing."""
        if grad_norm is None:
            grad_norm = fastpath.clip_grad_norm(self, model, float("inf"))  # accelerator.clip_grad_norm_
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED and hasattr(grad_norm, "item"):
            grad_norm = grad_norm.item()
        return grad_norm

    def _track_num_input_tokens(self, inputs):
        """`include_num_input_tokens_seen`: count the batch's tokens (all, or the non-padding ones) on all processes."""
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
            if mode == "non_padding":
                logger.warning("include_num_input_tokens_seen='non_padding': no attention mask or pad token; counting all tokens.")
            tokens = inputs[main_input].numel()
        self.state.num_input_tokens_seen += fastpath.tokens_seen(self, tokens)  # gather(...).sum().item()

    def _warn_if_loss_not_scaled_for_ga(self):
        """transformers#47688, and its multi-process twin: warn once when the loss of a model that takes **kwargs but
        ignores `num_items_in_batch` (BertForSequenceClassification, ...) is silently multiplied, as Trainer 5.24
        does: not divided by the accumulation steps, and multiplied by the number of processes
        (`average_tokens_across_devices`). README, "Deliberate differences" says why looptrain keeps it."""
        if self.loss_is_scaled_for_ga is not None or self.compute_loss_func is not None or not self.model_accepts_loss_kwargs:
            return
        if getattr(self, "_warned_loss_scale", False) or _model_uses_num_items(self.accelerator.unwrap_model(self.model)):
            return
        name = type(self.accelerator.unwrap_model(self.model)).__name__
        hazards = []
        if self.args.gradient_accumulation_steps > 1:
            hazards.append(
                f"its loss is NOT divided by gradient_accumulation_steps={self.args.gradient_accumulation_steps}: gradients "
                "and the logged loss are up to that many times too large (transformers#47688; set "
                "`loss_is_scaled_for_ga = False` on a Trainer subclass for the correct average)"
            )
        if self.args.world_size > 1 and self.args.average_tokens_across_devices:
            hazards.append(
                f"with average_tokens_across_devices=True its loss is multiplied by the {self.args.world_size} processes: "
                f"the logged training and evaluation losses are {self.args.world_size} times the 1-process values (set "
                "average_tokens_across_devices=False for per-process means)"
            )
        if hazards:
            self._warned_loss_scale = True
            warnings.warn(
                f"{name}.forward takes **kwargs but does not use num_items_in_batch, so (as in transformers.Trainer 5.24) "
                + "; and ".join(hazards) + ".",
                UserWarning,
                stacklevel=5,  # the caller of train()
            )

    # ============================================================================ batch sizes and parallelism
    def get_total_train_batch_size(self, args) -> int:
        """Examples per optimizer step: micro-batch x accumulation x data-parallel ranks."""
        dp_world_size = args.world_size // self.get_tp_size() // self.get_cp_size() // self.get_sp_size()
        return self._train_batch_size * args.gradient_accumulation_steps * dp_world_size

    def get_sp_size(self) -> int:
        """Sequence-parallel size (accelerate's ParallelismConfig), 1 without it."""
        pc = getattr(self.accelerator, "parallelism_config", None)
        return 1 if pc is None else pc.sp_size

    def get_cp_size(self) -> int:
        """Context-parallel size (accelerate's ParallelismConfig), 1 without it."""
        pc = getattr(self.accelerator, "parallelism_config", None)
        return 1 if pc is None else pc.cp_size

    def get_tp_size(self) -> int:
        """Tensor-parallel size: the model's, DeepSpeed AutoTP's, or accelerate's ParallelismConfig's; 1 without."""
        if (model_tp := getattr(self.model, "_tp_size", None)) is not None:
            return model_tp
        if self.is_deepspeed_enabled and (ds_config := getattr(self.args, "hf_deepspeed_config", None)):
            return ds_config.config.get("tensor_parallel", {}).get("autotp_size", 1)
        pc = getattr(self.accelerator, "parallelism_config", None)
        return 1 if pc is None else pc.tp_size

    def _wrap_model(self, model, training: bool = True, dataloader=None):
        """Trainer: `nn.DataParallel` when one process drives several GPUs (`n_gpu > 1`); DDP, FSDP and
        DeepSpeed wrap the model in `accelerate.prepare` instead."""
        if self.accelerator.unwrap_model(model, keep_torch_compile=False) is not model:
            return model  # already wrapped by an earlier train()/evaluate()
        if self.args.n_gpu > 1 and not getattr(model, "is_loaded_in_8bit", False) and not getattr(model, "is_loaded_in_4bit", False):
            model = nn.DataParallel(model)
        return model

    def _update_auto_batch_size(self, batch_size):
        """`auto_find_batch_size` retries with `batch_size`: free the wrapped model and start from the plain one."""
        self._train_batch_size = batch_size
        release_memory(self.model_wrapped)
        if self.is_fsdp_enabled:
            from transformers.modeling_utils import unwrap_model

            self.model = unwrap_model(self.model, recursive=True)
        self.model_wrapped = self.model
        if self.is_deepspeed_enabled:
            from transformers.integrations.deepspeed import propagate_args_to_deepspeed

            original = self.args.per_device_train_batch_size
            self.args.per_device_train_batch_size = self._train_batch_size // max(1, self.args.n_gpu)
            propagate_args_to_deepspeed(self.accelerator, self.args, auto_find_batch_size=True)
            self.args.per_device_train_batch_size = original

    def _enable_activation_checkpointing(self):
        """Trainer: `activation_checkpointing` (the 5.x name of `gradient_checkpointing`) recomputes activations in
        the backward pass; `every_n_layers` and `offload` are Trainer's own keys, the rest go to torch."""
        kwargs = dict(self.args.activation_checkpointing_kwargs or {})
        every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
        if hasattr(self.model, "activation_checkpointing_enable"):
            self.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload
            )
        else:  # models outside PreTrainedModel with only the deprecated name (sentence-transformers)
            warnings.warn(
                f"{type(self.model).__name__} only defines gradient_checkpointing_enable, deprecated in transformers 5; "
                "define activation_checkpointing_enable.",
                FutureWarning,
            )
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload)

    def _move_model_to_device(self, model, device) -> None:
        """Move the model to the device, unless device_map already spread it over several."""
        if getattr(model, "hf_device_map", None) is not None:
            logger.warning("The model is already on several devices (device_map); it is not moved.")
            return
        model = model.to(device)
        if self.args.parallel_mode == ParallelMode.TPU and hasattr(model, "tie_weights"):
            model.tie_weights()  # Trainer: moving to an XLA device unties weights

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
    _tr_loss = property(lambda self: self._loop.tr_loss, lambda self, v: setattr(self._loop, "tr_loss", v))
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


def _refuse_overrides_never_called(cls) -> None:
    overridden = [name for name in NOT_CALLED if any(name in vars(c) for c in cls.__mro__ if c is not Trainer and issubclass(c, Trainer))]
    if overridden:
        reasons = "; ".join(f"{name} ({NOT_CALLED[name]})" for name in overridden)
        raise TypeError(
            f"{cls.__name__} overrides transformers.Trainer methods that looptrain.Trainer never calls, so the override "
            f"would have no effect: {reasons}. Move the code to a method looptrain calls (see docs/subclassing.md)."
        )


def _model_uses_num_items(model) -> bool:
    """Heuristic: transformers models that normalise by `num_items_in_batch` route their loss through
    `self.loss_function(...)`; heads that build a `CrossEntropyLoss()` themselves ignore it."""
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return True  # cannot tell: do not warn
    return "loss_function" in source or "num_items_in_batch" in source
