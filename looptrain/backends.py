"""Setup and backends: what `Trainer.__init__` and the loop hand off so that `trainer.py` reads as the plain
single-process loop.

Each concern is one named seam, a method of `BackendMixin` (mixed into `looptrain.Trainer`):
  * the accelerator: `_setup_accelerator` (`create_accelerator_and_postprocess`, `_build_accelerator_args`) and the
    arguments' checks (`_validate_args`);
  * the model: `_setup_model` (checks, device placement), `_loss_conventions` (what the model's forward tells the
    loop about its loss and labels), `_move_model_to_device`, `_enable_activation_checkpointing`, `_wrap_model`,
    `_update_auto_batch_size`;
  * preparing for training: `_prepare_for_training` (optimizer, `accelerate.prepare`, schedule; DeepSpeed's and
    FSDP's orders);
  * parallelism: `_parallel_sizes` (tensor, context, sequence: the one place they are read), `get_tp_size`,
    `get_cp_size`, `get_sp_size`, `get_total_train_batch_size`, `_prepare_context_parallel_inputs`,
    `_sequence_parallel_loss`;
  * one micro-batch: `_prepare_input(s)` (device placement), `_backward_kwargs`, `_clip_grad_norm`, `_get_grad_norm`,
    `_warn_if_loss_not_scaled_for_ga`;
  * counting: `_track_num_input_tokens`, `floating_point_ops`, `store_flos`;
  * the end of a launched script (`looptrain run`, the job): `end_process_group`, a function.
The methods with Trainer's names keep Trainer's signatures and call sites (tests/test_surface.py).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    DistributedType,
    GradientAccumulationPlugin,
    TorchDynamoPlugin,
    release_memory,
)
from torch import nn
from transformers import PreTrainedModel
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
from transformers.trainer_utils import _is_peft_model, has_length, unwrap_peft_model, validate_quantization_for_training
from transformers.training_args import OptimizerNames, ParallelMode
from transformers.utils import can_return_loss, find_labels, logging

from . import checks, fastpath

logger = logging.get_logger(__name__)


class ParallelSizes(NamedTuple):
    """How many ranks share one batch along each model-parallel dimension (1 each without parallelism)."""

    tp: int  # tensor parallel
    cp: int  # context parallel
    sp: int  # sequence parallel

    @property
    def sharing_a_batch(self) -> int:
        """Ranks that see the same batch: the batch count divides by it."""
        return self.tp * self.cp * self.sp


class BackendTraits(NamedTuple):
    """What the loop asks of the backend on every micro-batch, decided once when the accelerator is built."""

    # Under DDP only a window's last micro-batch all-reduces gradients. Trainer: DeepSpeed marks the accumulation
    # boundary itself, and `sync_each_batch` asks for a sync every time.
    sync_each_micro_batch: bool
    # DeepSpeed sequence parallelism (Ulysses) computes the training loss itself (`_sequence_parallel_loss`).
    sequence_parallel_loss: bool


class BackendMixin:
    """Setup and backend plumbing of `looptrain.Trainer` (see the module docstring)."""

    # ================================================================================================ setup
    def _setup_accelerator(self) -> BackendTraits:
        """The accelerator (`create_accelerator_and_postprocess`), checked, and what the loop reads of it per step."""
        self.deepspeed = None  # Trainer: the DeepSpeed engine, once prepared
        self.create_accelerator_and_postprocess()
        checks.check_process_group(self.accelerator)  # looptrain: launched processes that did not connect
        checks.check_mixed_precision(self.args, self.accelerator)  # looptrain: fp16 where it would silently be float32
        pc = self._parallelism
        return BackendTraits(
            sync_each_micro_batch=self.accelerator.distributed_type == DistributedType.DEEPSPEED
            or bool(self.accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False)),
            sequence_parallel_loss=pc is not None and pc.sp_backend == "deepspeed" and pc.sp_enabled,
        )

    @property
    def _parallelism(self):
        """accelerate's ParallelismConfig (tensor/context/sequence parallel sizes), None without one."""
        return getattr(self.accelerator, "parallelism_config", None)

    @property
    def _parallel_sizes(self) -> ParallelSizes:
        """The tensor-, context- and sequence-parallel sizes (Trainer's `get_tp_size`, `get_cp_size`, `get_sp_size`)."""
        return ParallelSizes(self.get_tp_size(), self.get_cp_size(), self.get_sp_size())

    def _setup_model(self, model: nn.Module | None) -> nn.Module:
        """The model (given, or built by `model_init`); refuse one that cannot train here; decide whether it is placed
        on the device now, and place it."""
        args = self.args
        if model is None:
            if self.model_init is None:
                raise RuntimeError("Trainer needs a model or a model_init function.")
            model = self.call_model_init()
        elif self.model_init is not None:
            raise ValueError("Pass either model or model_init to Trainer, not both.")
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
                raise ValueError(
                    "fsdp only works in distributed training: start the script with `accelerate launch` or torchrun."
                )
        # Trainer: the model moves to the device now, unless something else places it (model parallel,
        # DeepSpeed, FSDP) or full-precision evaluation casts it first.
        if args.place_model_on_device is not None:
            self.place_model_on_device = args.place_model_on_device
        else:
            self.place_model_on_device = not (
                self.is_model_parallel
                or self.is_deepspeed_enabled
                or self.is_fsdp_enabled
                or args.fp16_full_eval
                or args.bf16_full_eval
            )
        if self.place_model_on_device and getattr(model, "quantization_method", None) != "bitsandbytes":
            self._move_model_to_device(model, args.device)
        if self.is_model_parallel:
            self.args._n_gpu = 1  # Trainer: no DataParallel over a model that is already spread over GPUs
        return model

    def _loss_conventions(self, model: nn.Module) -> tuple[bool, bool]:
        """What the model's forward tells the loop: (whether it takes `num_items_in_batch`, whether its loss
        shifts the labels). Sets Trainer's `label_names` and `can_return_loss`."""
        unwrapped = unwrap_peft_model(self.accelerator.unwrap_model(model))
        # Trainer: a forward that takes **kwargs gets `num_items_in_batch`, and its loss is then not divided by
        # the accumulation steps (see `training_step`). An `accepts_loss_kwargs` attribute overrides.
        if hasattr(unwrapped, "accepts_loss_kwargs"):
            accepts_loss_kwargs = unwrapped.accepts_loss_kwargs
        else:
            params = inspect.signature(unwrapped.forward).parameters.values()
            accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
        if self._backend.sequence_parallel_loss:
            accepts_loss_kwargs = False  # Trainer: sequence parallelism counts its own tokens
        inspected = unwrap_peft_model(model)
        self.label_names = find_labels(inspected.__class__) if self.args.label_names is None else self.args.label_names
        self.can_return_loss = can_return_loss(inspected.__class__)
        # Trainer: causal LM losses shift labels, so label counting (`num_items_in_batch`) skips position 0;
        # encoder-decoders align labels with their targets and count them all.
        shifts_labels = LOSS_MAPPING.get(getattr(inspected, "loss_type", None)) is ForCausalLMLoss and not getattr(
            getattr(inspected, "config", None), "is_encoder_decoder", False
        )
        return accepts_loss_kwargs, shifts_labels

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
                "follow: override create_optimizer (and create_scheduler) in a subclass instead."
            )
        if self.is_fsdp_enabled and (self.optimizer is not None or self.lr_scheduler is not None):
            raise RuntimeError(
                "Under FSDP the optimizer must be built on the sharded model: override create_optimizer (and "
                "create_scheduler) in a subclass instead of passing optimizers=."
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
        accelerator_args = {
            "mixed_precision": args.mixed_precision,
            "deepspeed_plugin": args.deepspeed_plugin,
            **kwargs,
        }
        if args.ddp_find_unused_parameters is not None:
            find_unused = args.ddp_find_unused_parameters
        elif isinstance(self.model, PreTrainedModel):
            # Trainer: DDP's unused-parameter search breaks activation checkpointing.
            find_unused = not (self.model.is_activation_checkpointing or args.activation_checkpointing)
        else:
            find_unused = True
        ddp_kwargs = {"find_unused_parameters": find_unused}
        for name, key in (
            ("ddp_bucket_cap_mb", "bucket_cap_mb"),
            ("ddp_broadcast_buffers", "broadcast_buffers"),
            ("ddp_static_graph", "static_graph"),
        ):
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
            **{
                k: accelerator_config.pop(k)
                for k in ("split_batches", "dispatch_batches", "even_batches", "use_seedable_sampler")
            }
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
        if (
            self.is_fsdp_enabled
            and self.accelerator.state.fsdp_plugin.activation_checkpointing
            and args.activation_checkpointing
        ):
            raise ValueError(
                "fsdp_config activation_checkpointing and the activation_checkpointing argument are both on: use FSDP's "
                "(fsdp_config) under FSDP."
            )
        if self.is_deepspeed_enabled and getattr(args, "hf_deepspeed_config", None) is None:
            from transformers.integrations.deepspeed import propagate_args_to_deepspeed

            propagate_args_to_deepspeed(self.accelerator, args)  # a DeepSpeed config that came from accelerate launch
        if args.save_only_model and (self.is_deepspeed_enabled or self.is_fsdp_enabled) and args.load_best_model_at_end:
            raise ValueError(
                "save_only_model with load_best_model_at_end cannot reload the best model under DeepSpeed/FSDP."
            )
        if (
            self.is_deepspeed_enabled
            and self.accelerator.state.deepspeed_plugin.zero_stage == 3
            and args.auto_find_batch_size
        ):
            raise ValueError("auto_find_batch_size does not work with DeepSpeed ZeRO-3; use ZeRO-1/2 or FSDP.")
        if (
            args.save_only_model
            and self.is_fsdp_enabled
            and "SHARDED_STATE_DICT" in str(self.accelerator.state.fsdp_plugin.state_dict_type)
        ):
            raise ValueError("save_only_model cannot save an FSDP SHARDED_STATE_DICT: use FULL_STATE_DICT.")

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """Build the optimizer, hand model and optimizer to `accelerate.prepare`, build the schedule, and load
        the checkpoint's optimizer, schedule and scaler state. Returns (the model to train, the dataloader)."""
        # Trainer: FSDP 1 shards the model before the optimizer is built on it (FSDP 2 keeps the parameters).
        delay_optimizer_creation = (
            self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2
        )
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
                model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
                    self.model, self.optimizer, self.lr_scheduler
                )
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
        if self._backend.sequence_parallel_loss:
            train_dataloader = self.accelerator.deepspeed_ulysses_dl_adapter(train_dataloader, model)
        if resume_from_checkpoint is not None:
            if self.is_deepspeed_enabled:
                from transformers.integrations.deepspeed import deepspeed_load_checkpoint

                deepspeed_load_checkpoint(
                    self.model_wrapped, resume_from_checkpoint, load_module_strict=not _is_peft_model(self.model)
                )
            elif self.is_fsdp_enabled:
                self._load_from_checkpoint(resume_from_checkpoint, self.model_wrapped)
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
            self._load_scaler(resume_from_checkpoint)
        for name in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, name, getattr(self, name))
        self.callback_handler.train_dataloader = train_dataloader
        return model, train_dataloader

    # ============================================================================ batch sizes and parallelism
    def get_total_train_batch_size(self, args) -> int:
        """Examples per optimizer step: micro-batch x accumulation x data-parallel ranks."""
        dp_world_size = args.world_size // self._parallel_sizes.sharing_a_batch
        return self._train_batch_size * args.gradient_accumulation_steps * dp_world_size

    def get_sp_size(self) -> int:
        """Sequence-parallel size (accelerate's ParallelismConfig), 1 without it."""
        pc = self._parallelism
        return 1 if pc is None else pc.sp_size

    def get_cp_size(self) -> int:
        """Context-parallel size (accelerate's ParallelismConfig), 1 without it."""
        pc = self._parallelism
        return 1 if pc is None else pc.cp_size

    def get_tp_size(self) -> int:
        """Tensor-parallel size: the model's, DeepSpeed AutoTP's, or accelerate's ParallelismConfig's; 1 without."""
        if (model_tp := getattr(self.model, "_tp_size", None)) is not None:
            return model_tp
        if self.is_deepspeed_enabled and (ds_config := getattr(self.args, "hf_deepspeed_config", None)):
            return ds_config.config.get("tensor_parallel", {}).get("autotp_size", 1)
        pc = self._parallelism
        return 1 if pc is None else pc.tp_size

    def _wrap_model(self, model, training: bool = True, dataloader=None):
        """Trainer: `nn.DataParallel` when one process drives several GPUs (`n_gpu > 1`); DDP, FSDP and
        DeepSpeed wrap the model in `accelerate.prepare` instead."""
        if self.accelerator.unwrap_model(model, keep_torch_compile=False) is not model:
            return model  # already wrapped by an earlier train()/evaluate()
        if (
            self.args.n_gpu > 1
            and not getattr(model, "is_loaded_in_8bit", False)
            and not getattr(model, "is_loaded_in_4bit", False)
        ):
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
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload
            )

    def _move_model_to_device(self, model, device) -> None:
        """Move the model to the device, unless device_map already spread it over several."""
        if getattr(model, "hf_device_map", None) is not None:
            logger.warning("The model is already on several devices (device_map); it is not moved.")
            return
        model = model.to(device)
        if self.args.parallel_mode == ParallelMode.TPU and hasattr(model, "tie_weights"):
            model.tie_weights()  # Trainer: moving to an XLA device unties weights

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
        pc = getattr(self.accelerator, "parallelism_config", None)  # (per micro-batch: no property call)
        if pc is None or not pc.cp_enabled:
            return contextlib.nullcontext, inputs
        if pc.cp_backend == "torch":
            if hasattr(model, "config") and model.config._attn_implementation != "sdpa":
                raise ValueError(
                    f"Context parallelism needs SDPA attention; the model uses {model.config._attn_implementation}."
                )
            if "shift_labels" not in inputs and "labels" in inputs:
                labels = nn.functional.pad(inputs["labels"], (0, 1), value=-100)
                inputs["shift_labels"] = labels[:, 1:].contiguous()
        if "position_ids" not in inputs:
            inputs["position_ids"] = torch.arange(
                inputs["input_ids"].size(1), device=inputs["input_ids"].device
            ).expand(inputs["input_ids"].size(0), -1)
        buffers = [inputs[k] for k in ("input_ids", "labels", "shift_labels") if k in inputs]
        if "attention_mask" in inputs:
            from transformers.trainer_pt_utils import is_attention_mask_causal

            if not self._attn_mask_causal_checked:
                if not is_attention_mask_causal(inputs["attention_mask"]):
                    raise ValueError("Context parallelism only supports causal attention masks.")
                self._attn_mask_causal_checked = True
            if inputs["attention_mask"].dim() == 2:
                buffers.append(inputs["attention_mask"])
        if inputs.get("position_ids") is not None:
            buffers.append(inputs["position_ids"])
        return functools.partial(
            self.accelerator.maybe_context_parallel,
            buffers=buffers,
            buffer_seq_dims=[1] * len(buffers),
            no_restore_buffers=set(buffers),
        ), inputs

    def _backward_kwargs(self) -> dict:
        """What `accelerator.backward` needs besides the loss: LOMO's learning rate, DeepSpeed's no-rescaling."""
        kwargs = {}
        if self.args.optim in (OptimizerNames.LOMO, OptimizerNames.ADALOMO):
            kwargs["learning_rate"] = self._get_learning_rate()  # LOMO steps inside backward
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            kwargs["scale_wrt_gas"] = False  # Trainer: the loss is already normalised for accumulation
        return kwargs

    def _sequence_parallel_loss(self, model, inputs, return_outputs):
        """Trainer: under DeepSpeed sequence parallelism (Ulysses) the loss is computed and reduced by transformers'
        `deepspeed_sp_compute_loss` (`compute_loss` hands over while training)."""
        from transformers.integrations.deepspeed import deepspeed_sp_compute_loss

        return deepspeed_sp_compute_loss(self.accelerator, model, inputs, return_outputs, self._parallelism)

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
                logger.warning(
                    "include_num_input_tokens_seen='non_padding': no attention mask or pad token; counting all tokens."
                )
            tokens = inputs[main_input].numel()
        self.state.num_input_tokens_seen += fastpath.tokens_seen(self, tokens)  # gather(...).sum().item()

    def _warn_if_loss_not_scaled_for_ga(self):
        """transformers#47688, and its multi-process twin: warn once when the loss of a model that takes **kwargs but
        ignores `num_items_in_batch` (BertForSequenceClassification, ...) is silently multiplied, as Trainer 5.24
        does: not divided by the accumulation steps, and multiplied by the number of processes
        (`average_tokens_across_devices`). README, "Deliberate differences" says why looptrain keeps it.
        Called at each window whose batches carry a label count (`num_items_in_batch`), the only ones in the hazard
        (sentence-transformers' batches, with `label`, have none: their loss is divided); decided once."""
        if (
            self.loss_is_scaled_for_ga is not None
            or self.compute_loss_func is not None
            or not self.model_accepts_loss_kwargs
        ):
            return
        if self._warned_loss_scale:
            return
        self._warned_loss_scale = True  # decided: the model's source is read once
        if _model_uses_num_items(self.accelerator.unwrap_model(self.model)):
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
            warnings.warn(
                f"{name}.forward takes **kwargs but does not use num_items_in_batch, so (as in transformers.Trainer 5.24) "
                + "; and ".join(hazards)
                + ".",
                UserWarning,
                stacklevel=5,  # the caller of train()
            )

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


def _model_uses_num_items(model) -> bool:
    """Heuristic: transformers models that normalise by `num_items_in_batch` route their loss through
    `self.loss_function(...)`; heads that build a `CrossEntropyLoss()` themselves ignore it."""
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return True  # cannot tell: do not warn
    return "loss_function" in source or "num_items_in_batch" in source


def end_process_group() -> None:
    """After a launched script has finished: wait for every process, then destroy the default process group, if one is
    up. Left to interpreter exit, gloo's threads can outlive the interpreter and abort the process ("terminate called
    without an active exception", exit -6), failing a launch whose work is done. `looptrain run` and the job call this
    once the script returned; a script that already destroyed its group is left as it is."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    # The barrier: no process tears down its connections while a peer still reads from them. If it fails (a peer
    # already gone, or the group's timeout), the launcher reports that process, not this one.
    with contextlib.suppress(Exception):
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()
