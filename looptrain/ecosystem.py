"""Libraries built on `transformers.Trainer` (TRL, sentence-transformers, SetFit, ...), run on looptrain's loop.

Such a library subclasses `transformers.Trainer` when it is imported (`class SFTTrainer(Trainer)`), so the
switch has to happen before that import: `use_in_transformers()` makes the names `transformers.Trainer`,
`transformers.trainer.Trainer`, `transformers.Seq2SeqTrainer` and `transformers.trainer_seq2seq.Seq2SeqTrainer`
point to looptrain's classes, for the rest of the process. A library imported afterwards subclasses looptrain's
loop without a line of it changed.

    import looptrain
    looptrain.use_in_transformers()      # first, before `import trl` / `sentence_transformers` / `setfit`
    from trl import SFTTrainer           # now a subclass of looptrain.Trainer

`python -m looptrain run SCRIPT` does the same for a script (`looptrain/__main__.py`).

`TrainingArguments` stays transformers' class: looptrain.Trainer takes it as it is and checks it when constructed,
and the libraries' own argument classes (SFTConfig, SentenceTransformerTrainingArguments) subclass it.

A class that subclassed transformers' Trainer before the call (the library was imported first) would still run
transformers' loop; the call warns about it with the fix, and constructing such a trainer afterwards raises, so
a run never silently goes through transformers' loop when looptrain's was asked for.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings

__all__ = ["stale_trainer_classes", "use_in_transformers"]

_ORIGINALS: dict[str, type] = {}  # "Trainer" / "Seq2SeqTrainer": transformers' classes, once replaced

# The modules that define the two names. looptrain's one import of transformers' trainer module (tests/test_structure.py).
_TRAINER_MODULE, _SEQ2SEQ_MODULE = "transformers.trainer", "transformers.trainer_seq2seq"


def use_in_transformers() -> None:
    """Make `transformers.Trainer` and `transformers.Seq2SeqTrainer` be looptrain's, for this process.

    Call it before importing a library that subclasses `transformers.Trainer` (TRL, sentence-transformers,
    SetFit, your own module): the library's trainers then run looptrain's loop. Calling it again does nothing.
    If such a class was created before the call, a warning names it and the fix (call this first: at the top of
    the script, or restart the notebook's kernel), and constructing that class raises a RuntimeError.
    """
    from .seq2seq import Seq2SeqTrainer
    from .trainer import Trainer

    if _ORIGINALS:
        return
    stale = stale_trainer_classes()  # before the trainer module is imported below: none if it was never loaded
    trainer_module = importlib.import_module(_TRAINER_MODULE)
    seq2seq_module = importlib.import_module(_SEQ2SEQ_MODULE)
    _ORIGINALS["Trainer"] = trainer_module.Trainer
    _ORIGINALS["Seq2SeqTrainer"] = seq2seq_module.Seq2SeqTrainer
    tops = _module_objects("transformers")
    for module in (*tops, trainer_module):
        module.Trainer = Trainer
    for module in (*tops, seq2seq_module):
        module.Seq2SeqTrainer = Seq2SeqTrainer
    _refuse_constructing(_ORIGINALS["Trainer"])
    if stale:
        names = ", ".join(f"{cls.__module__}.{cls.__qualname__}" for cls in stale)
        warnings.warn(
            f"{names} subclassed transformers.Trainer before looptrain.use_in_transformers() was called, so it would run "
            "transformers' loop and constructing it will raise: call looptrain.use_in_transformers() before importing "
            "the library (first line of the script, or restart the kernel), or run the script with "
            "`python -m looptrain run`.",
            RuntimeWarning,
            stacklevel=2,
        )


def is_active() -> bool:
    """True once `use_in_transformers()` has replaced transformers' classes in this process."""
    return bool(_ORIGINALS)


def stale_trainer_classes() -> list[type]:
    """Classes defined outside transformers, already imported, that subclass transformers' own Trainer."""
    original = _ORIGINALS.get("Trainer") or getattr(sys.modules.get(_TRAINER_MODULE), "Trainer", None)
    if original is None:
        return []  # transformers' trainer module was never loaded: nothing can subclass it yet
    found = {}
    for value in _module_globals():
        if (
            isinstance(value, type)
            and value is not original
            and issubclass(value, original)
            and not value.__module__.startswith("transformers.")
        ):
            found[id(value)] = value
    return sorted(found.values(), key=lambda cls: (cls.__module__, cls.__qualname__))


def _module_objects(name: str) -> list:
    """Every live module object named `name`. transformers' lazy top-level module can be replaced in sys.modules
    while its first Trainer import runs, so a `transformers` imported before that is another object with the same
    name; code that did `import transformers` then reads the name from that one."""
    found = {id(sys.modules[name]): sys.modules[name]}
    for value in _module_globals():
        if isinstance(value, types.ModuleType) and value.__name__ == name:
            found[id(value)] = value
    return list(found.values())


def _module_globals():
    """Every global of every imported module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some modules' attributes warn when touched (deprecated aliases)
        for module in list(sys.modules.values()):
            yield from list(getattr(module, "__dict__", {}).values())


def _refuse_constructing(original: type) -> None:
    """transformers' Trainer (and what subclassed it before the switch) raises when constructed from now on, before
    any of the subclass's own `__init__` runs."""

    def __new__(cls, *args, **kwargs):
        raise RuntimeError(
            f"{cls.__module__}.{cls.__qualname__} subclasses transformers.Trainer, not looptrain's: it was imported before "
            "looptrain.use_in_transformers(). Call looptrain.use_in_transformers() before importing it (first line of "
            "the script, or restart the kernel), or run the script with `python -m looptrain run`."
        )

    original.__new__ = __new__


def transformers_trainer() -> type:
    """transformers' own `Trainer` class, also after `use_in_transformers()` replaced the name."""
    return _ORIGINALS.get("Trainer") or importlib.import_module(_TRAINER_MODULE).Trainer


def run_target(target: str, argv: list[str], as_module: bool = False) -> None:
    """Run a script (`python SCRIPT ARGS`) or a module (`python -m MODULE ARGS`) in this process, as the interpreter
    would: named `__main__`, `sys.argv` = [its path, *ARGS], and the script's folder first on `sys.path` (so its
    neighbours import), or the current folder for a module."""
    import os
    import runpy

    if as_module:
        sys.argv = [target, *argv]  # run_module replaces argv[0] with the module's file, as `python -m` does
        if os.getcwd() not in sys.path[:1]:
            sys.path.insert(0, os.getcwd())
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        if not os.path.isfile(target):
            raise FileNotFoundError(f"no such script: {target}")
        sys.argv = [target, *argv]
        sys.path[0] = os.path.dirname(os.path.realpath(target))  # as `python SCRIPT` (links resolved); not the cwd
        runpy.run_path(target, run_name="__main__")
