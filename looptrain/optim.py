"""Optimisation: the optimizer over Trainer's decay / no-decay parameter groups, and the LR schedule.

Trainer 5.24: weight decay applies to every trainable parameter except biases and normalisation weights;
group 0 decays, group 1 does not, both in `named_parameters()` order. The optimizer class for each `optim`
name comes from transformers' own table (`transformers/trainer_optimizer.py`, 41 names: AdamW fused or not,
Adafactor, SGD, bitsandbytes, torchao, schedule-free, GaLore, Apollo, LOMO, ...). The default is
`torch.optim.AdamW(fused=True)`, whose CPU kernel gives different bits from the unfused one, so the choice
matters for parity.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn
from transformers.optimization import GreedyLR, get_scheduler
from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS, OptimizerContext, _parse_optim_args, has_mixed_dtensor, is_optimizer_factory
from transformers.trainer_pt_utils import get_parameter_names
from transformers.utils import logging

logger = logging.get_logger(__name__)

# A parameter whose lower-cased name matches one of these is never decayed (Trainer's list).
NO_DECAY_NAME_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def steps_on_metrics(scheduler) -> bool:
    """ReduceLROnPlateau and transformers' GreedyLR step after an evaluation, on its metric, not after each step."""
    return isinstance(scheduler, (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR))


class OptimizerMixin:
    """`create_optimizer`, `create_scheduler` and their helpers, as in `transformers.Trainer`."""

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        """Build both, as Trainer's hook of the same name (the loop calls the two halves itself)."""
        self.create_optimizer()
        self.create_scheduler(num_training_steps=num_training_steps)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The `optim` optimizer over Trainer's decay / no-decay groups, unless one was passed in."""
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            decay = set(self.get_decay_parameter_names(opt_model))
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
            ]
            if has_mixed_dtensor(p for group in groups for p in group["params"]):
                # Trainer: parameters on different device meshes cannot share one fused kernel call.
                from torch.distributed.tensor import DTensor

                split = []
                for group in groups:
                    by_mesh = defaultdict(list)
                    for p in group["params"]:
                        by_mesh[p.device_mesh if isinstance(p, DTensor) else None].append(p)
                    split.extend({**group, "params": params} for params in by_mesh.values())
                groups = split
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            if is_optimizer_factory(optimizer_cls):
                # Trainer: optimizers that split the model themselves (Muon, Dion) come as factories.
                self.optimizer = optimizer_cls()(opt_model, **optimizer_kwargs)
            else:
                optimizer_kwargs = dict(optimizer_kwargs)
                # Trainer: some handlers bring their own parameter layout (GaLore/Apollo groups, LOMO's model,
                # layer-wise optimizers' per-parameter dict).
                for key in ("params", "model", "optimizer_dict"):
                    if key in optimizer_kwargs:
                        groups = optimizer_kwargs.pop(key)
                self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            if "bitsandbytes" in str(optimizer_cls) and optimizer_kwargs.get("optim_bits", None) == 8:
                _keep_embeddings_in_32_bits(opt_model)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The LR schedule over `num_training_steps` optimizer steps, unless one was passed in."""
        if self.lr_scheduler is None:
            self.lr_scheduler = get_scheduler(
                self.args.lr_scheduler_type,
                optimizer=self.optimizer if optimizer is None else optimizer,
                num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
                num_training_steps=num_training_steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None) -> tuple[Any, dict]:
        """(optimizer class, keyword arguments) for `args.optim`, from transformers' table of optimizers."""
        handler = _OPTIMIZER_HANDLERS.get(args.optim)
        if handler is None:
            raise ValueError(f"optim={args.optim!r} is not an optimizer transformers knows.")
        ctx = OptimizerContext(
            args=args,
            model=model,
            optimizer_kwargs={"lr": args.learning_rate},
            adam_kwargs={"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon},
            optim_args=_parse_optim_args(args.optim_args),
        )
        return handler(ctx)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Names of the parameters that get weight decay: not inside an nn.LayerNorm, no bias/norm in the name."""
        return get_parameter_names(model, [nn.LayerNorm], NO_DECAY_NAME_PATTERNS)

    def _get_learning_rate(self) -> float:
        """The learning rate of the first parameter group, as the schedule set it for the last step."""
        if self.is_deepspeed_enabled:
            try:  # Trainer: DeepSpeed's fp16 loss-scale warm-up may not have stepped the schedule yet
                lr = self.lr_scheduler.get_last_lr()[0]
            except AssertionError as err:
                if "need to call step" not in str(err):
                    raise
                logger.warning("The learning rate is read before the schedule stepped; logging 0.")
                lr = 0
        elif steps_on_metrics(self.lr_scheduler):
            lr = self.optimizer.param_groups[0]["lr"]
        else:
            lr = self.lr_scheduler.get_last_lr()[0]
        return lr.item() if torch.is_tensor(lr) else lr


def _keep_embeddings_in_32_bits(model: nn.Module) -> None:
    """Trainer: with 8-bit bitsandbytes optimizers, embedding weights keep 32-bit optimizer state."""
    import bitsandbytes

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})
