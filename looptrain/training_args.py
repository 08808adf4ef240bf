"""`TrainingArguments`: transformers 5.24's own class, with the 4.x spellings still accepted.

looptrain does not redefine the arguments: `looptrain.TrainingArguments` *is* a
`transformers.TrainingArguments` (a subclass), so every one of its fields, defaults, help texts, checks,
properties, methods and command-line flags is transformers' own, and a `transformers.TrainingArguments`
object can be handed to `looptrain.Trainer` as it is. What this subclass adds, for code written against 4.x
(the Hugging Face course among it):
  * the old keywords `evaluation_strategy=`, `warmup_ratio=`, `group_by_length=` and `no_cuda=` are
    translated to their 5.x fields with one FutureWarning (transformers 5.24 raises a TypeError for them);
  * an unknown keyword is a TypeError that suggests the closest field name.

`unsupported_settings(args)` lists the settings looptrain refuses (with the reason and what to do instead),
so that no argument is accepted and then silently ignored. `Trainer.__init__` raises on them, whichever
class the arguments are.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from dataclasses import fields

import transformers

# Old keyword -> (new field, how to translate the value). transformers 5.x raises a TypeError for these.
_LEGACY_KWARGS = {
    "evaluation_strategy": ("eval_strategy", lambda v: v),
    "warmup_ratio": ("warmup_steps", lambda v: v),  # 5.x reads warmup_steps < 1 as a ratio
    "group_by_length": ("train_sampling_strategy", lambda v: "group_by_length" if v else "random"),
    "no_cuda": ("use_cpu", lambda v: v),
}


class _LegacyKeywords:
    """The keyword handling both argument classes share (mixed in before the transformers class)."""

    def __init__(self, *args, **kwargs):
        kwargs = _translate_legacy_keywords(kwargs)
        known = {f.name for f in fields(type(self)) if f.init}
        for name in kwargs:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"{type(self).__name__} got an unexpected keyword argument {name!r}.{hint}")
        super().__init__(*args, **kwargs)

    def __post_init__(self):
        super().__post_init__()
        check_values(self)
        check_supported(self)


class TrainingArguments(_LegacyKeywords, transformers.TrainingArguments):
    """transformers 5.24's `TrainingArguments` (every field, default, check and flag is transformers' own; see its
    documentation), which also accepts the 4.x keywords `evaluation_strategy`, `warmup_ratio`, `group_by_length`
    and `no_cuda`."""

    __signature__ = inspect.signature(transformers.TrainingArguments)


class Seq2SeqTrainingArguments(_LegacyKeywords, transformers.Seq2SeqTrainingArguments):
    """transformers 5.24's `Seq2SeqTrainingArguments` (`predict_with_generate`, `generation_max_length`,
    `generation_num_beams`, `generation_config`, `sortish_sampler` on top of every `TrainingArguments` field),
    which also accepts the 4.x keywords."""

    __signature__ = inspect.signature(transformers.Seq2SeqTrainingArguments)


def _translate_legacy_keywords(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    for old, (new, translate) in _LEGACY_KWARGS.items():
        if old not in kwargs:
            continue
        value = kwargs.pop(old)
        if old == "warmup_ratio" and not 0 <= value < 1:
            raise ValueError(f"warmup_ratio={value} must be in [0, 1); for a count of steps use warmup_steps={value}.")
        translated = translate(value)
        if new in kwargs and kwargs[new] != translated:
            raise ValueError(
                f"Both {old}={value!r} and {new}={kwargs[new]!r} were given and they disagree. "
                f"{old} is the pre-5.x spelling of {new}: pass only {new}."
            )
        warnings.warn(
            f"TrainingArguments({old}=...) is the pre-5.x spelling; use {new}={translated!r} instead "
            "(transformers 5.x raises a TypeError for it).",
            FutureWarning,
            stacklevel=4,
        )
        kwargs[new] = translated
    return kwargs


# ---------------------------------------------------------------------------------------------- refusals
def unsupported_settings(args) -> list[str]:
    """Settings that transformers.Trainer honours and looptrain cannot: each entry says why and what to do.

    An empty list means every field of `args` is honoured. (`tests/test_arguments.py` lists every field of
    transformers.TrainingArguments with the test that proves it honoured, or with its entry here.)
    """
    from transformers.utils import is_sagemaker_dp_enabled, is_sagemaker_mp_enabled

    problems = []
    fsdp_config = getattr(args, "fsdp_config", None) or {}
    if isinstance(fsdp_config, dict) and (fsdp_config.get("xla") or fsdp_config.get("xla_fsdp_v2")):
        problems.append(
            "fsdp_config={'xla': True, ...}: PyTorch/XLA's own FSDP is not implemented by looptrain. On TPUs, use "
            "accelerate's FSDP through `accelerate launch` instead, or transformers.Trainer."
        )
    if is_sagemaker_mp_enabled() or is_sagemaker_dp_enabled():
        problems.append(
            "SageMaker model/data parallelism (SM_HP_MP_PARAMETERS / SM_FRAMEWORK_PARAMS in the environment) is not "
            "implemented by looptrain; use accelerate's DDP/FSDP, or transformers.Trainer."
        )
    return problems


def _unsupported_message(problems: list[str]) -> str:
    return "Not implemented by looptrain:\n  - " + "\n  - ".join(problems)


def check_values(args) -> None:
    """Values transformers accepts and then mishandles (an error deep inside training, or a silent surprise):
    rejected up front, naming the argument and the fix. Run for transformers' own arguments objects too."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(args, name)}.")
    if args.max_steps == 0:  # transformers.Trainer would run one step
        raise ValueError("max_steps=0 trains nothing: set max_steps > 0, or -1 to train for num_train_epochs.")
    if args.max_steps < 0 and args.num_train_epochs <= 0:
        raise ValueError(
            f"num_train_epochs={args.num_train_epochs} trains nothing: set num_train_epochs > 0 or max_steps > 0."
        )
    if args.save_total_limit is not None and args.save_total_limit < 1:  # transformers reads it as "no limit"
        raise ValueError(
            f"save_total_limit={args.save_total_limit} would keep no checkpoint (transformers then keeps all of them). "
            "Keep the last N with save_total_limit=N >= 1, all with None, or save none with save_strategy='no'."
        )
    unknown = set(args.include_for_metrics) - {"inputs", "loss"}
    if unknown:  # transformers ignores them silently
        raise ValueError(f"include_for_metrics accepts 'inputs' and 'loss', got {sorted(unknown)}.")
    if args.eval_accumulation_steps is not None and args.eval_accumulation_steps < 1:
        raise ValueError(f"eval_accumulation_steps must be at least 1 (or None), got {args.eval_accumulation_steps}.")
    from .validation import check_argument_values  # (imported here: validation imports transformers' Trainer parts)

    check_argument_values(args)


def check_supported(args) -> None:
    """Raise NotImplementedError listing every setting of `args` that looptrain cannot honour."""
    problems = unsupported_settings(args)
    if problems:
        raise NotImplementedError(_unsupported_message(problems))


__all__ = ["TrainingArguments", "Seq2SeqTrainingArguments", "unsupported_settings", "check_supported", "check_values"]
