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
    micro-batch on a GPU) on one process.
"""

from __future__ import annotations

import os
import sys

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


def start(trainer) -> None:
    """At the start of `train()`: the callback handler follows the switch."""
    handler = trainer.callback_handler
    if isinstance(handler, CallbackHandler):
        handler.skip_idle = bool(trainer.fast_paths)


# ------------------------------------------------------------------------------------------------ model.train()
# `train()` implementations known to do nothing but set `training` (recursively) when every module is already
# training: torch's, PreTrainedModel's (it re-applies kernels only when the mode changes) and DDP's (torch's).
_FLAG_ONLY_TRAIN = {nn.Module.train, PreTrainedModel.train, nn.parallel.DistributedDataParallel.train}
_plain_types: dict[type, bool] = {}


def _flag_only(cls: type) -> bool:
    known = _plain_types.get(cls)
    if known is None:
        known = _plain_types[cls] = cls.train in _FLAG_ONLY_TRAIN and cls.__setattr__ is nn.Module.__setattr__
    return known


def _all_training(model: nn.Module) -> bool:
    """Every module (the same tree `nn.Module.train` recurses into) is in training mode, with a `train()` that
    would only set the flag again."""
    stack = [model]
    pop, extend, known = stack.pop, stack.extend, _plain_types.get
    while stack:
        module = pop()
        if module is None:
            continue
        cls = type(module)
        flag_only = known(cls)
        if flag_only is None:
            flag_only = _flag_only(cls)
        if not (module.training and flag_only) or "train" in module.__dict__:
            return False
        extend(module._modules.values())
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
