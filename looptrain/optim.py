"""Optimisation: the optimizer over Trainer's decay / no-decay parameter groups, and the LR schedule.

Trainer 5.24: weight decay applies to every trainable parameter except biases and normalisation weights;
group 0 decays, group 1 does not, both in `named_parameters()` order. The optimizer class for each `optim`
name comes from transformers' own table (`transformers/trainer_optimizer.py`, 41 names: AdamW fused or not,
Adafactor, SGD, bitsandbytes, torchao, schedule-free, GaLore, Apollo, LOMO, ...). The default is
`torch.optim.AdamW(fused=True)`, whose CPU kernel gives different bits from the unfused one, so the choice
matters for parity.

Most of those optimizers come from optional packages (bitsandbytes, torchao, galore-torch, ...; README, "Optional
packages"). Where Trainer fails without saying why (a missing package, CUDA-only code on a CPU machine, some
`optim_args` handed on as strings), looptrain fails at the same point or earlier and names the fix.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections import defaultdict
from typing import Any

import torch
from packaging import version
from torch import nn
from transformers.optimization import GreedyLR, get_scheduler
from transformers.trainer_optimizer import (
    _APOLLO_OPTIMIZERS,
    _BITSANDBYTES_OPTIMIZERS,
    _GALORE_OPTIMIZERS,
    _OPTIMIZER_HANDLERS,
    _SCHEDULE_FREE_OPTIMIZERS,
    _TORCHAO_OPTIMIZERS,
    OptimizerContext,
    _parse_optim_args,
    has_mixed_dtensor,
    is_optimizer_factory,
)
from transformers.trainer_pt_utils import get_parameter_names
from transformers.training_args import OptimizerNames
from transformers.utils import logging

logger = logging.get_logger(__name__)

# A parameter whose lower-cased name matches one of these is never decayed (Trainer's list).
NO_DECAY_NAME_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


# The module each optional `optim` imports, and how to get it.
OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {
    **dict.fromkeys(_BITSANDBYTES_OPTIMIZERS, ("bitsandbytes", "pip install bitsandbytes")),
    **dict.fromkeys(_TORCHAO_OPTIMIZERS, ("torchao", "pip install 'torchao>=0.4'")),
    **dict.fromkeys(_GALORE_OPTIMIZERS, ("galore_torch", "pip install galore-torch")),
    **dict.fromkeys(_APOLLO_OPTIMIZERS, ("apollo_torch", "pip install apollo-torch")),
    **dict.fromkeys(_SCHEDULE_FREE_OPTIMIZERS, ("schedulefree", "pip install schedulefree")),
    OptimizerNames.LOMO: ("lomo_optim", "pip install lomo-optim"),
    OptimizerNames.ADALOMO: ("lomo_optim", "pip install lomo-optim"),
    OptimizerNames.GROKADAMW: ("grokadamw", "pip install grokadamw"),
    OptimizerNames.STABLE_ADAMW: ("optimi", "pip install torch-optimi"),
    OptimizerNames.ADAMW_TORCH_XLA: ("torch_xla", "pip install torch-xla, on a TPU machine"),
    OptimizerNames.ADAMW_TORCH_NPU_FUSED: ("torch_npu", "pip install torch-npu, on an Ascend NPU machine"),
    OptimizerNames.ADAMW_ANYPRECISION: ("torchdistx", "not on PyPI, build it from the pytorch/torchdistx repository"),
}

# Optimizers whose package (checked up to the version given) calls CUDA whatever the device, so that without CUDA
# Trainer fails with "Torch not compiled with CUDA enabled": (distribution, version, what calls CUDA, CPU alternative).
NEEDS_CUDA: dict[str, tuple[str, str, str, str]] = {
    **dict.fromkeys(
        [OptimizerNames.GALORE_ADAMW_8BIT, OptimizerNames.GALORE_ADAMW_8BIT_LAYERWISE],
        ("galore-torch", "1.0", "GaLoreAdamW8bit.step calls torch.cuda.synchronize()", "galore_adamw"),
    ),
    OptimizerNames.ADALOMO: ("lomo-optim", "0.1.1", "AdaLomo creates its state with .cuda()", "lomo"),
}
_BNB_RMSPROP = [name for name in _BITSANDBYTES_OPTIMIZERS if "rmsprop" in name]


class OptimizerPackageError(ImportError, ValueError):
    """An `optim` whose package is missing. Trainer raises ImportError for some and ValueError for others: this is
    both, so code written for either catches it."""


def check_optim_runs_here(optim: str, optim_args: dict[str, str], model=None) -> None:
    """Refuse, naming the fix, an `optim` that cannot run here: its package is missing, or it needs CUDA, or
    transformers' handler passes torchao's block_size on as text."""
    if optim in OPTIONAL_PACKAGES:
        module, how = OPTIONAL_PACKAGES[optim]
        if importlib.util.find_spec(module) is None:
            raise OptimizerPackageError(f"optim={optim!r} needs the `{module}` package, which is not installed: {how}.")
    if optim in NEEDS_CUDA and not torch.cuda.is_available():
        dist, last_checked, what, alternative = NEEDS_CUDA[optim]
        try:
            installed = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # a source checkout of unknown version: let it try
            installed = None
        if installed is not None and version.parse(installed) <= version.parse(last_checked):
            raise RuntimeError(
                f"optim={optim!r} needs a CUDA GPU, which this machine does not have: {dist} {installed}'s {what} "
                f"(transformers.Trainer fails the same way). On CPU, use optim={alternative!r}."
            )
    if optim in _TORCHAO_OPTIMIZERS and "block_size" in optim_args and model is not None:
        # Trainer: the handler passes block_size on as a string; torchao uses it for every tensor of 4,096 or more
        # elements, and then fails at the first step.
        if any(p.numel() >= 4096 for p in model.parameters() if p.requires_grad):
            raise ValueError(
                f"optim={optim!r} cannot take block_size from optim_args: transformers passes it to torchao as the "
                f"string {optim_args['block_size']!r}, which fails at the first step (so does transformers.Trainer). "
                "Leave it out (torchao's default is 256), or pass optimizer_cls_and_kwargs=(torchao.optim.AdamW8bit, "
                "{'block_size': ...}) to the Trainer."
            )


def _bnb_rmsprop_message(args, err: Exception) -> str:
    return (
        f"optim={OptimizerNames(args.optim).value!r} cannot take optim_args={args.optim_args!r}: transformers passes "
        f"them to bitsandbytes' RMSprop as strings, which it rejects (transformers.Trainer fails the same way: {err}). "
        "Use optim='rmsprop' (torch's RMSprop reads momentum, alpha, eps, weight_decay and centered from optim_args), "
        "or give the Trainer optimizer_cls_and_kwargs=(bitsandbytes.optim.RMSprop, {...})."
    )


def _parse_optim_args_clearly(optim_args: str | None) -> dict[str, str]:
    """Trainer's parsing of "key=value,key=value", with an error that shows the expected form."""
    try:
        return _parse_optim_args(optim_args)
    except ValueError as err:
        raise ValueError(f"optim_args={optim_args!r} is not of the form 'key=value,key=value'.") from err


class _RecordReads(dict):
    """optim_args that remember which keys a handler looked at, to warn about the ones no handler reads."""

    def __init__(self, items):
        super().__init__(items)
        self.read = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def pop(self, key, *default):
        self.read.add(key)
        return super().pop(key, *default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)

    def __iter__(self):  # `dict.update(optim_args)` (bitsandbytes' RMSprop) reads every key
        self.read.update(super().keys())
        return super().__iter__()

    def keys(self):
        self.read.update(super().keys())
        return super().keys()


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
                try:
                    self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
                except (TypeError, NotImplementedError) as err:
                    if (
                        self.optimizer_cls_and_kwargs is None
                        and self.args.optim_args
                        and self.args.optim in _BNB_RMSPROP
                    ):
                        # Trainer: the handler hands optim_args to bitsandbytes' RMSprop as the strings given.
                        raise type(err)(_bnb_rmsprop_message(self.args, err)) from err
                    raise
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
        name = OptimizerNames(args.optim).value
        parsed = _parse_optim_args_clearly(args.optim_args)
        check_optim_runs_here(name, parsed, model)
        optim_args = _RecordReads(parsed)
        ctx = OptimizerContext(
            args=args,
            model=model,
            optimizer_kwargs={"lr": args.learning_rate},
            adam_kwargs={"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon},
            optim_args=optim_args,
        )
        try:
            optimizer_cls, optimizer_kwargs = handler(ctx)
        except ValueError as err:
            if name == OptimizerNames.GALORE_ADAFACTOR_LAYERWISE and "relative_step" in str(err):
                # transformers 5.24 builds the per-parameter GaLoreAdafactors before it sets relative_step=False.
                raise ValueError(
                    "optim='galore_adafactor_layerwise' fails inside transformers' own handler (transformers.Trainer "
                    "fails the same way): it builds the per-layer GaLoreAdafactor optimizers before turning "
                    "relative_step off, and GaLoreAdafactor refuses a learning rate with relative_step on. "
                    "Use optim='galore_adafactor' or 'galore_adamw_layerwise'."
                ) from err
            raise
        # Trainer ignores what a handler does not read; looptrain says so, since nothing else would.
        unread = [key for key in dict.keys(optim_args) if key not in optim_args.read]
        if unread:
            logger.warning(f"optim_args {unread} have no effect: optim={name!r} does not read them.")
        if args.optim_target_modules is not None and args.optim not in (*_GALORE_OPTIMIZERS, *_APOLLO_OPTIMIZERS):
            logger.warning(
                f"optim_target_modules has no effect: only GaLore and APOLLO optimizers use it, not {name!r}."
            )
        return optimizer_cls, optimizer_kwargs

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
