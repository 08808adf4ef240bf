"""Count host-device synchronisations while some code runs, and say whose code asked for each.

On a GPU, reading a tensor's value on the host (`.item()`, `bool(t)`, `float(t)`, `.tolist()`, `.cpu()`,
`.numpy()`, `.nonzero()`, ...) waits until the device has finished everything queued before it. `counting()`
wraps those `torch.Tensor` methods for the duration of a `with` block (on any device, so a CPU run counts what
a GPU run would wait for) and records, for each call, its owner: the first caller outside torch, accelerate
and the standard library, classified as

    looptrain   looptrain's files
    trainer     transformers' Trainer files (trainer.py, trainer_pt_utils.py, trainer_callback.py, ...)
    model       the rest of transformers (the model's forward, its loss, masks)
    script      the file that runs the training (a benchmark's bare loop)
    other       anything else

unless torch itself reads the value: `data` (the DataLoader's sampler and seed, CPU tensors on any device),
`optimizer` (torch.optim: the non-fused Adam reads its step counters, CPU tensors unless capturable),
`scaler` (the fp16 GradScaler: with a non-fused optimizer it reads the overflow flag every step, a real
sync on a GPU). And whether the call happened at one of the loop's sync points (a log, an evaluation, a save, the end of
training), found by the function names on the stack (`POINTS`). Used by tests/test_syncs.py and by
`scripts/bench.py --gpu`.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys

# Tensor methods that make the host wait for the device (or copy to it synchronously).
METHODS = (
    "item",
    "tolist",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__complex__",
    "numpy",
    "cpu",
    "nonzero",
    "__array__",
)
# Functions of the loops (looptrain's and transformers.Trainer's) that are sync points by design.
POINTS = {
    "_maybe_log_save_evaluate",
    "_stop_if_diverged",
    "_finalize_training",
    "_evaluate",
    "evaluate",
    "predict",
    "evaluation_loop",
    "_save_checkpoint",
    "log",
    "store_flos",
    "_load_best_model",
}
_PASS_THROUGH = (os.sep + "torch" + os.sep, os.sep + "accelerate" + os.sep)
# torch's own reads, named after the part of torch that makes them (the innermost one wins).
_TORCH_OWNERS = (("/torch/utils/data/", "data"), ("/torch/optim/", "optimizer"), ("/torch/amp/", "scaler"))
_STDLIB = os.path.dirname(contextlib.__file__) + os.sep


def _passes_through(filename: str) -> bool:
    if any(part in filename for part in _PASS_THROUGH):
        return True
    return (
        (filename.startswith(_STDLIB) and "site-packages" not in filename)
        or filename.startswith("<")
        or filename == __file__
    )


def owner_of(filename: str, script: str | None = None) -> str:
    if script is not None and os.path.abspath(filename) == os.path.abspath(script):
        return "script"
    parts = filename.replace(os.sep, "/")
    if "/looptrain/" in parts:
        return "looptrain"
    if "/transformers/" in parts:
        name = parts.rsplit("/", 1)[-1]
        return (
            "trainer"
            if name.startswith(("trainer", "training_args")) and "/transformers/models/" not in parts
            else "model"
        )
    return "other"


class SyncCounter:
    """What `counting()` yields: `events`, a list of (owner, at_point, method) for every sync."""

    def __init__(self, script: str | None):
        self.script = script
        self.events: list[tuple[str, bool, str]] = []
        self.enabled = True

    def record(self, method: str, frame) -> None:
        owner, at_point, f = None, False, frame
        while f is not None:
            filename = f.f_code.co_filename
            if owner is None:
                unix = filename.replace(os.sep, "/")
                owner = next((name for part, name in _TORCH_OWNERS if part in unix), None)
            if owner is None and not _passes_through(filename):
                owner = owner_of(filename, self.script)
            if f.f_code.co_name in POINTS and owner_of(filename) in ("looptrain", "trainer"):
                at_point = True
                break
            f = f.f_back
        self.events.append((owner or "other", at_point, method))

    def count(self, owner: str | None = None, at_point: bool | None = None) -> int:
        return sum(
            1 for o, p, _ in self.events if (owner is None or o == owner) and (at_point is None or p == at_point)
        )

    def summary(self) -> dict:
        return dict(collections.Counter(f"{o}{' at a log/eval/save/end' if p else ''}: {m}" for o, p, m in self.events))


@contextlib.contextmanager
def counting(script: str | None = None):
    """Count the syncs made inside the block; `script`: the file whose calls count as "script"."""
    import torch

    counter = SyncCounter(script)
    originals = {name: getattr(torch.Tensor, name) for name in METHODS if hasattr(torch.Tensor, name)}
    own = {name for name in originals if name in vars(torch.Tensor)}  # the others are inherited from TensorBase

    def wrap(name, original):
        def wrapper(self, *args, **kwargs):
            if counter.enabled:
                counter.enabled = False  # a sync inside a sync (item() calling __index__ ...) counts once
                try:
                    counter.record(name, sys._getframe(1))
                    return original(self, *args, **kwargs)
                finally:
                    counter.enabled = True
            return original(self, *args, **kwargs)

        wrapper.__name__ = name
        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield counter
    finally:
        for name, original in originals.items():
            if name in own:
                setattr(torch.Tensor, name, original)
            else:
                delattr(torch.Tensor, name)
