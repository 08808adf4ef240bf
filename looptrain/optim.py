"""Optimisation: AdamW with Trainer's decay / no-decay parameter groups, and the LR schedule.

Trainer 5.24 (`trainer.py:1259-1418`): weight decay applies to every trainable parameter except
biases and normalisation weights; group 0 decays, group 1 does not, both in `named_parameters()` order.
The default optimizer is `torch.optim.AdamW(fused=True)` (`optim="adamw_torch_fused"`), whose CPU
kernel gives different bits from the unfused one, so the choice matters for parity.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.optimization import get_scheduler
from transformers.trainer_pt_utils import get_parameter_names

# A parameter whose lower-cased name matches one of these is never decayed (Trainer's list).
NO_DECAY_NAME_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that get weight decay: not inside an nn.LayerNorm, no bias/norm in the name."""
    return get_parameter_names(model, [nn.LayerNorm], NO_DECAY_NAME_PATTERNS)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainer's two groups: [decayed parameters, the rest with weight_decay 0], trainable ones only."""
    decay = set(decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]


def optimizer_cls_and_kwargs(args) -> tuple[type[torch.optim.Optimizer], dict]:
    """AdamW with the arguments' hyper-parameters; `fused=True` for `adamw_torch_fused`."""
    kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    if args.optim == "adamw_torch_fused":
        kwargs["fused"] = True
    return torch.optim.AdamW, kwargs


def build_scheduler(args, optimizer, num_training_steps: int):
    """Any transformers schedule by name; "linear" warms up for `get_warmup_steps` then decays to 0."""
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
