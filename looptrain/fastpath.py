"""Fast paths: per-step work of accelerate, transformers and torch that cannot change a number, not paid.

Everything here is a saving, and nothing else is. Each function is called from one line of `trainer.py`
in place of the plain call named in its docstring, checks that the case it knows holds, and otherwise makes
exactly the plain call. Each says what it skips and why that cannot change a result; `tests/test_fastpath.py`
trains the parity cases with the savings on and off and asserts identical logs and weights against
`transformers.Trainer`.

The switch: `Trainer.fast_paths` (a class attribute, True unless the environment variable `LOOPTRAIN_PLAIN=1`
was set when looptrain was imported). False on the class, a subclass or an instance runs the plain path: the
calls Trainer makes. The callback handler reads it when `train()` starts (`start`).

What is saved, per optimizer step of a 2-layer BERT on one CPU thread (docs/performance.md, "Fast paths"):
  * `AcceleratedOptimizer.step` looks up the optional package `lomo_optim` twice per call with importlib
    (find_spec and the package metadata: about 1 ms once lomo-optim is installed, as the dev extra does);
  * `model.train()` walks every module through `nn.Module.__setattr__` on every micro-batch, usually to set
    flags that are already set (0.25 ms);
  * `Accelerator.clip_grad_norm_` parses torch's version and sorts every gradient by DTensor mesh before
    calling torch's clipping (0.03 ms);
  * `Accelerator.backward` divides the loss by its accumulation steps, which looptrain pins to 1 (one tensor op
    and one autograd node per micro-batch);
  * `CallbackHandler.call_event` calls every callback for every event, including the base class's empty methods;
  * `include_num_input_tokens_seen` counts all tokens with a round trip through the device (a host sync per
    micro-batch on a GPU) on one process;
  * `model.parameters()`, walked by clipping and by `model.zero_grad()` every step, goes through three nested
    generators and two memo sets (0.05 ms each time): the same walk as one loop (`_parameters`);
  * the NaN/inf loss filter spends three device operations per micro-batch on a loss that is almost never NaN:
    its check is deferred to where the loop reads the running loss (`add_step_loss`);
  * Trainer's count of a window's label tokens starts its sum at 0 (one device addition), and multiplies the loss
    by the number of processes, 1 here (one operation and one autograd node).
"""

from __future__ import annotations

import functools
import operator
import os
import sys
from typing import NamedTuple

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType
from torch import nn
from transformers import PreTrainedModel, trainer_callback

#: `LOOPTRAIN_PLAIN=1` (read once, at import) makes `Trainer.fast_paths` default to False.
PLAIN_ENV = "LOOPTRAIN_PLAIN"


def default_from(environ) -> bool:
    """True (savings on) unless LOOPTRAIN_PLAIN is set to something other than "" or "0"."""
    return environ.get(PLAIN_ENV, "").strip() in ("", "0")


DEFAULT = default_from(os.environ)


def start(trainer, loop) -> None:
    """At the start of `train()`: the callback handler follows the switch, and the NaN/inf filter's check is deferred
    unless a subclass replaced a method that sees the step loss or the running sum (`add_step_loss`)."""
    handler = trainer.callback_handler
    if isinstance(handler, CallbackHandler):
        handler.skip_idle = bool(trainer.fast_paths)
    loop.defer_nan_filter = bool(trainer.fast_paths) and all(
        _defined_in_looptrain(type(trainer), name) for name in ("training_step", "_maybe_log_save_evaluate")
    )


def _defined_in_looptrain(cls: type, name: str) -> bool:
    """The method `name` of `cls` is looptrain's own (not a subclass's)."""
    owner = next(klass for klass in cls.__mro__ if name in vars(klass))
    return owner.__module__.split(".")[0] == "looptrain"


# ------------------------------------------------------------------------------------------------ the module tree
# `nn.Module.parameters()` walks the tree through three nested generators, a memo set of modules and one of
# tensors (whose `__hash__` is a Python method): about 50 us for a 2-layer BERT, paid twice per optimizer step
# (clipping and `zero_grad`). `_parameters` is the same walk as one loop: pre-order over modules, each module and
# each parameter once (the first time it is met), in torch's order, which the gradient norm's summation follows.
# It is used only for trees whose every class walks and compares as nn.Module does; anything else (FSDP's
# wrappers, a module with a `parameters` of its own) gets torch's walk.
_WALK = ("named_modules", "_named_members", "named_parameters", "parameters")
# `train()` implementations known to do nothing but set `training` (recursively) when every module is already
# training: torch's, PreTrainedModel's (it re-applies kernels only when the mode changes) and DDP's (torch's).
_FLAG_ONLY_TRAIN = {nn.Module.train, PreTrainedModel.train, nn.parallel.DistributedDataParallel.train}


class _Traits(NamedTuple):
    walks_plainly: bool  # nn.Module's walk, identity hashing: `_parameters` lists what `parameters()` would
    flag_only_train: bool  # `train()` only sets `training` (and nothing intercepts the attribute)


_traits: dict[type, _Traits] = {}
_TENSOR_HASH = torch.Tensor.__hash__


def _traits_of(cls: type) -> _Traits:
    known = _traits.get(cls)
    if known is None:
        known = _traits[cls] = _Traits(
            walks_plainly=all(getattr(cls, name) is getattr(nn.Module, name) for name in _WALK)
            and cls.__hash__ is object.__hash__
            and cls.__eq__ is object.__eq__,
            flag_only_train=cls.train in _FLAG_ONLY_TRAIN and cls.__setattr__ is nn.Module.__setattr__,
        )
    return known


def _parameters(model: nn.Module) -> list | None:
    """`list(model.parameters())`, or None when some module in the tree has a walk of its own (use torch's)."""
    params: dict[int, nn.Parameter] = {}  # by identity, as torch's memo set (Tensor.__hash__ is id)
    seen: set[int] = set()
    stack = [model]
    pop, push, known = stack.pop, stack.extend, _traits.get
    while stack:
        module = pop()
        if module is None or id(module) in seen:
            continue
        seen.add(id(module))
        cls = type(module)
        if not (known(cls) or _traits_of(cls)).walks_plainly:
            return None
        own = module._parameters
        if own:
            for p in own.values():
                if p is None:
                    continue
                if type(p).__hash__ is not _TENSOR_HASH:
                    return None
                params.setdefault(id(p), p)
        children = module._modules
        if children:
            push(reversed(children.values()))  # popped first to last: pre-order
    return list(params.values())


def zero_grad(trainer, model: nn.Module) -> None:
    """Plain: `model.zero_grad()` (Trainer, after every optimizer step): every parameter's gradient is set to None.
    The same, over `_parameters`' list instead of torch's generators. A model with a `zero_grad` of its own, a
    DataParallel replica (torch warns) or a tree `_parameters` does not know gets the plain call."""
    if trainer.fast_paths and type(model).zero_grad is nn.Module.zero_grad and not getattr(model, "_is_replica", False):
        params = _parameters(model)
        if params is not None:
            for p in params:
                if p.grad is not None:
                    p.grad = None
            return
    model.zero_grad()


# ------------------------------------------------------------------------------------------------ model.train()
def _all_training(model: nn.Module) -> bool:
    """Every module (the same tree `nn.Module.train` recurses into) is in training mode, with a `train()` that
    would only set the flag again."""
    stack = [model]
    pop, extend, traits = stack.pop, stack.extend, _traits.get
    while stack:
        module = pop()
        if module is None:
            continue
        known = traits(type(module)) or _traits_of(type(module))
        if not (module.training and known.flag_only_train) or "train" in module.__dict__:
            return False
        children = module._modules
        if children:
            extend(children.values())
    return True


def train_mode(trainer, model: nn.Module) -> None:
    """Plain: `model.train()` (Trainer calls it before every micro-batch, since an evaluation may have switched
    to eval mode). Skipped when every module is already training and would only have its flag set again: the
    walk that checks it costs a tenth of the call. Any module in eval mode (an evaluation, a callback, the
    user), or with a `train()` of its own (LeViT's clears a cache), gets the plain call."""
    if trainer.fast_paths and _all_training(model):
        return
    model.train()


# ------------------------------------------------------------------------------------------------ backward
def backward(trainer, loss: torch.Tensor, **kwargs) -> None:
    """Plain: `accelerator.backward(loss, **kwargs)`. Without DeepSpeed, Megatron, a loss scaler or LOMO's
    learning rate, accelerate computes `(loss / gradient_accumulation_steps).backward()`, and looptrain pins
    accelerate's accumulation steps to 1 (it accumulates itself, `create_accelerator_and_postprocess`). x / 1
    is x exactly in IEEE arithmetic, and so is the gradient through it, so `loss.backward()` gives the same
    bits without the extra op and autograd node."""
    acc = trainer.accelerator
    if (
        trainer.fast_paths
        and not kwargs
        and type(acc).backward is Accelerator.backward
        and "backward" not in acc.__dict__
        and acc.scaler is None
        and acc.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
        and acc.gradient_state.num_steps == 1
    ):
        loss.backward()
        return
    acc.backward(loss, **kwargs)


# ------------------------------------------------------------------------------------------------ clipping
def _dtensor_class():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def clip_grad_norm(trainer, model: nn.Module, max_norm: float):
    """Plain: `accelerator.clip_grad_norm_(model.parameters(), max_norm)`. Without FSDP, DeepSpeed, XLA or fp16's
    scaler (whose gradients accelerate unscales first), accelerate lists the parameters, checks torch's version,
    sorts the gradients by DTensor mesh and, when they are all on one mesh or none, calls
    `torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type=2)`: that call is made here directly. Any
    DTensor gradient (tensor parallelism) gets the plain call."""
    acc = trainer.accelerator
    if (
        trainer.fast_paths
        and type(acc).clip_grad_norm_ is Accelerator.clip_grad_norm_
        and "clip_grad_norm_" not in acc.__dict__
        and type(acc).unscale_gradients is Accelerator.unscale_gradients
        and not (acc.native_amp and acc.mixed_precision == "fp16")
        and acc.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA)
    ):
        parameters = _parameters(model)  # list(model.parameters())
        if parameters is None:
            parameters = list(model.parameters())
        dtensor = _dtensor_class()
        if dtensor is None or not any(isinstance(p.grad, dtensor) for p in parameters):
            return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type=2)
        return acc.clip_grad_norm_(parameters, max_norm)
    return acc.clip_grad_norm_(model.parameters(), max_norm)


# ------------------------------------------------------------------------------------------------ optimizer step
def _steps_through_accelerate_only(optimizer) -> bool:
    """`optimizer.step` is AcceleratedOptimizer.step, or torch's LR-scheduler wrapper around it (the schedule,
    built on the prepared optimizer, wraps its step to note that it was called) and nothing else."""
    step = optimizer.__dict__.get("step")
    if step is None:
        return True
    return (
        getattr(step, "_wrapped_by_lr_sched", False) and getattr(step, "__wrapped__", None) is AcceleratedOptimizer.step
    )


def optimizer_step(trainer) -> None:
    """Plain: `optimizer.step()`. accelerate's `AcceleratedOptimizer.step` looks the optional package `lomo_optim`
    up twice per call (importlib find_spec and metadata: about 1 ms when it is installed) and, with no loss
    scaler, no XLA and gradients synchronised (the loop set them so for this step), calls the wrapped
    optimizer's `step(None)`: that call is made here directly, after setting the flag torch's LR-scheduler
    wrapper sets. A LOMO optimizer (whose step is a no-op) is an instance of a class from `lomo_optim`, which
    is then imported: it gets the plain call."""
    opt = trainer.optimizer
    if trainer.fast_paths and type(opt) is AcceleratedOptimizer and _steps_through_accelerate_only(opt):
        inner = opt.optimizer
        lomo = sys.modules.get("lomo_optim")
        if (
            opt.scaler is None
            and opt.accelerator_state.distributed_type != DistributedType.XLA
            and opt.gradient_state.sync_gradients
            and not (lomo is not None and isinstance(inner, (lomo.Lomo, lomo.AdaLomo)))
        ):
            if "step" in opt.__dict__:
                opt._opt_called = True  # what the LR-scheduler wrapper records
            inner.step(None)
            return
    opt.step()


# ------------------------------------------------------------------------------------------------ loss bookkeeping
def label_count(trainer, labels: list) -> torch.Tensor:
    """Plain: `sum(label.ne(-100).sum() for label in labels)` (Trainer's count of a window's label tokens). Python's
    `sum` starts from 0, so it adds `0 + count` on the device first; integer sums are exact in any order, so
    adding the counts to each other gives the same integer, in the same dtype, one operation sooner."""
    counts = [label.ne(-100).sum() for label in labels]
    if trainer.fast_paths and counts:
        return functools.reduce(operator.add, counts)
    return sum(counts)


def rescale_loss(trainer, loss, factor):
    """Plain: `loss *= factor` (`compute_loss`: Trainer multiplies a loss averaged over the processes' tokens by the
    number of processes). On one process the factor is 1: x * 1 is x in IEEE arithmetic, and so is the gradient
    through it, so the operation and its autograd node are left out."""
    if trainer.fast_paths and type(factor) is int and factor == 1:
        return loss
    loss *= factor
    return loss


# ------------------------------------------------------------------------------------------------ the NaN/inf filter
UNCHECKED_LIMIT = 1024  # step losses kept unchecked at most (then checked on the device, without a sync)


def add_step_loss(trainer, loop, step_loss: torch.Tensor, divisor: int) -> None:
    """Plain: `loop.tr_loss += torch.where(torch.isfinite(step_loss), step_loss, loop.tr_loss / divisor)`: Trainer's
    `logging_nan_inf_filter`, under which a NaN/inf step loss counts as the running mean (the sum divided by
    `divisor`, 1 + the optimizer steps since the last log). Three of those four device operations per micro-batch
    serve a loss that is almost never NaN: here the step loss is added as it is and kept, and `settle_loss` checks
    the kept losses where the loop reads the sum (a log, a save, the end); if one of them was NaN/inf, it redoes the
    plain sum from where it was last checked. The same additions in the same order give the same bits, so the sum
    of a run without NaN is Trainer's exactly, and one with NaN is replaced by it. The deferral is decided at the
    start of `train()` (`start`): a `training_step` or `_maybe_log_save_evaluate` of a subclass (which could keep
    the step loss, or read the sum at any step) gets the plain sum."""
    if not loop.defer_nan_filter:
        loop.tr_loss += torch.where(torch.isfinite(step_loss), step_loss, loop.tr_loss / divisor)
        return
    if not loop.unchecked:
        loop.checked_tr_loss = loop.tr_loss.clone()
    loop.tr_loss += step_loss
    loop.unchecked.append((step_loss, divisor))
    if len(loop.unchecked) >= UNCHECKED_LIMIT:
        settle_loss(loop, read_now=False)


def settle_loss(loop, read_now: bool = True) -> None:
    """Make `loop.tr_loss` the plain filtered sum of `add_step_loss`. With `read_now` (the loop is about to read the
    sum, which synchronises anyway) the kept losses are checked on the host and the sum is redone only if one is
    NaN/inf; without, the sum is redone on the device, with no sync."""
    if not loop.unchecked:
        return
    if not read_now or not bool(torch.isfinite(torch.stack([x.reshape(()).float() for x, _ in loop.unchecked])).all()):
        total = loop.checked_tr_loss
        for step_loss, divisor in loop.unchecked:
            total += torch.where(torch.isfinite(step_loss), step_loss, total / divisor)
        loop.tr_loss.copy_(total)
    loop.unchecked, loop.checked_tr_loss = [], None


# ------------------------------------------------------------------------------------------------ token count
def tokens_seen(trainer, tokens) -> int:
    """Plain: `accelerator.gather(torch.as_tensor(tokens, device, int64)).sum().item()`, the batch's tokens summed
    over processes (`include_num_input_tokens_seen`). On one process, with the count already a Python int (all
    tokens: `numel()`), that round trip through the device returns the same int and, on a GPU, makes the host
    wait for the device on every micro-batch: the int is returned as it is. A count that is a tensor
    (non-padding tokens) is read as Trainer reads it."""
    if trainer.fast_paths and type(tokens) is int and trainer.accelerator.num_processes == 1:
        return tokens
    tokens = torch.as_tensor(tokens, device=trainer.args.device, dtype=torch.int64)
    return trainer.accelerator.gather(tokens).sum().item()


# ------------------------------------------------------------------------------------------------ callbacks
_BASE_EVENTS = {name: fn for name, fn in vars(trainer_callback.TrainerCallback).items() if name.startswith("on_")}


class CallbackHandler(trainer_callback.CallbackHandler):
    """transformers' handler, which calls every callback for every event. A callback whose method for the event
    is `TrainerCallback`'s own (an empty method that returns None, so the control is unchanged) is not called
    when `skip_idle` is True. A method defined on the instance, or a class that customises attribute access,
    is always called."""

    skip_idle = True

    def call_event(self, event, args, state, control, **kwargs):
        """transformers' dispatch (same arguments, same order, same control handling), minus the empty calls."""
        base = _BASE_EVENTS.get(event)
        if not self.skip_idle or base is None:
            return super().call_event(event, args, state, control, **kwargs)
        for callback in self.callbacks:
            cls = type(callback)
            if (
                getattr(cls, event, None) is base
                and cls.__getattribute__ is object.__getattribute__
                and event not in getattr(callback, "__dict__", ())
            ):
                continue  # TrainerCallback's empty method
            result = getattr(callback, event)(
                args,
                state,
                control,
                model=self.model,
                processing_class=self.processing_class,
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                train_dataloader=self.train_dataloader,
                eval_dataloader=self.eval_dataloader,
                **kwargs,
            )
            if result is not None:  # transformers: a callback may skip returning control when unchanged
                control = result
        return control
