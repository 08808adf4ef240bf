"""Bad input, found early and explained: what transformers.Trainer reports late, deep inside torch, or not at all.

Every check here is one that cannot refuse a setup that trains: it runs only where its verdict is certain
(a collator known to pass labels and token ids through unchanged, position embeddings known to be absolute),
and otherwise looptrain explains the error torch raises at the first batch that fails (`explain_forward_error`)
instead of guessing before it. None of them adds work to a training step: the dataset checks are one
vectorised pass before training, the divergence guard keeps its flag on the device and is read only where the
loop synchronises anyway (a log, an evaluation, a save).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    DefaultDataCollator,
    default_data_collator,
)
from transformers.utils import logging

from .validation import check_first_backward, warn_if_fewer_processes_than_asked

try:
    import datasets
except ImportError:
    datasets = None

logger = logging.get_logger(__name__)

# transformers' collators that hand `labels` (and `input_ids`) to the model as the dataset holds them, padding aside
_LABELS_UNCHANGED = (DataCollatorWithPadding, DataCollatorForTokenClassification, DefaultDataCollator)
# ... and those that pass `input_ids` through (their labels are made from the ids, or are target token ids)
_IDS_UNCHANGED = _LABELS_UNCHANGED + (DataCollatorForLanguageModeling, DataCollatorForSeq2Seq)


def loss_on_wrong_device(loss, running_loss) -> ValueError:
    """The error for a `training_step` override that returned its loss on another device than the running sum."""
    return ValueError(f"training_step returned a loss on {loss.device}; it must stay on {running_loss.device}.")


class TrainingDiverged(RuntimeError):
    """The gradients became NaN or infinite: the weights after that step are not a model anymore."""


# ------------------------------------------------------------------------------------------ processes
def check_process_group(accelerator) -> None:
    """A launcher that started N processes which did not join one process group (an FSDP or multi-GPU config on a
    machine accelerate cannot run it on) leaves each process training alone as "process 0", all writing the same
    output folder. Refused on every process, before anything is written."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and accelerator.num_processes == 1:
        wanted = (
            "FSDP"
            if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
            else ("DeepSpeed" if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" else "distributed")
        )
        raise RuntimeError(
            f"The launcher started {launched} processes (WORLD_SIZE={launched}, this one RANK={os.environ.get('RANK', '?')}), "
            f"but they are not connected: accelerate set up this process alone ({accelerator.distributed_type.value}, "
            f"device {accelerator.device}), so each would train the whole job and write the same output folder. The "
            f"{wanted} configuration needs devices this machine lacks. On CPUs, launch with `accelerate launch "
            "--multi_gpu --num_processes N` (gloo) or a DDP config with use_cpu: true; or run one process."
        )

    warn_if_fewer_processes_than_asked(accelerator)  # the opposite: fewer processes than the launch asked for


def check_mixed_precision(args, accelerator) -> None:
    """fp16 on a CPU: accelerate creates neither fp16 autocast nor a loss scaler there, so the run would be float32
    while the arguments say fp16."""
    if args.fp16 and accelerator.device.type == "cpu" and not accelerator.native_amp and accelerator.scaler is None:
        raise ValueError(
            "fp16=True on a CPU does nothing: accelerate has no fp16 autocast or loss scaling on CPUs, so training would "
            "run in float32 (transformers.Trainer does so without a word). For mixed precision on a CPU use bf16=True "
            "with use_cpu=True; otherwise set fp16=False, or train on a GPU."
        )


# ------------------------------------------------------------------------------------------ datasets
def check_dataset_fits_model(model, dataset, collator, label_names, description: str) -> None:
    """Before training: labels within the model's classes, sequences within its position embeddings.

    Only where the verdict is certain: a `datasets.Dataset`, collated by one of transformers' collators that pass
    labels and token ids through unchanged (a custom collator may remap or truncate them; then a failure is
    explained when it happens, `explain_forward_error`).
    """
    if datasets is None or not isinstance(dataset, datasets.Dataset) or len(dataset) == 0:
        return
    labels_unchanged = collator is default_data_collator or isinstance(collator, _LABELS_UNCHANGED)
    ids_unchanged = collator is default_data_collator or isinstance(collator, _IDS_UNCHANGED)
    config = getattr(model, "config", None)
    if config is None:
        return
    import pyarrow.compute as pc

    table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
    name = type(model).__name__
    # labels: one class index per example (sequence classification) or per token (token classification)
    label_column = next((c for c in ("label", "labels", *label_names) if c in dataset.column_names), None)
    num_labels = getattr(config, "num_labels", None)
    # Trainer: num_labels=1 with no problem_type is a regression, whose scores may be integers (STS-B's 0..5)
    problem_type = getattr(config, "problem_type", None)
    per_example = name.endswith("ForSequenceClassification") and (
        problem_type == "single_label_classification" or (problem_type is None and (num_labels or 0) > 1)
    )
    per_token = name.endswith("ForTokenClassification")
    if labels_unchanged and label_column is not None and num_labels and (per_example or per_token):
        column = table.column(label_column)
        if per_token and str(column.type).startswith(("list", "large_list")):
            column = pc.list_flatten(column)
        if str(column.type).startswith(("int", "uint")) and len(column):
            values = pc.filter(column, pc.not_equal(column, -100)) if per_token else column  # -100: ignored tokens
            extremes = pc.min_max(values)
            low, high = extremes["min"].as_py(), extremes["max"].as_py()
            if low is not None and (low < 0 or high >= num_labels):
                bad = high if high >= num_labels else low
                raise ValueError(
                    f"The {description} dataset has label {bad} in column {label_column!r}, but {name} has "
                    f"num_labels={num_labels} (classes 0..{num_labels - 1}). Load the model with the number of classes "
                    f"of your data (from_pretrained(..., num_labels={max(high + 1, num_labels)})), or map the labels "
                    f"to 0..{num_labels - 1}."
                )
    # sequence length: only absolute, learned position embeddings have a hard limit
    limit = position_limit(model)
    main_input = getattr(model, "main_input_name", "input_ids")
    if ids_unchanged and limit is not None and main_input in dataset.column_names:
        column = table.column(main_input)
        if str(column.type).startswith(("list", "large_list")):
            lengths = pc.list_value_length(column)
            longest = pc.max(lengths).as_py()
            if longest is not None and longest > limit:
                index = pc.index(lengths, longest).as_py()
                raise ValueError(
                    f"Example {index} of the {description} dataset has {longest} tokens, but {name}'s position "
                    f"embeddings cover {limit} (config.max_position_embeddings). Tokenize with truncation=True, "
                    f"max_length={limit}, or drop the longer examples."
                )


def position_limit(model) -> int | None:
    """The longest sequence a model with learned absolute position embeddings accepts, or None (rotary, relative,
    or unknown: no hard limit known)."""
    config = getattr(model, "config", None)
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return None
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and module_name.split(".")[-1] in ("position_embeddings", "wpe"):
            # RoBERTa-style embeddings number positions after the padding index
            offset = module.padding_idx + 1 if module.padding_idx is not None else 0
            return module.num_embeddings - offset
    return None


# ------------------------------------------------------------------------------------------ at the first failure
@contextlib.contextmanager
def explaining_errors(accelerator, model, inputs, trainer=None):
    """Around a forward (and backward): torch's IndexError/RuntimeError/ValueError for out-of-range labels, too-long
    sequences, labels of the wrong shape or a loss that reaches no parameter becomes an error that says so
    (`explain_forward_error`); any other error passes unchanged. With `trainer` (training), the first backward is
    checked for a gradient on what the optimizer updates (`validation.check_first_backward`)."""
    try:
        yield
    except (IndexError, RuntimeError, ValueError, TypeError) as err:
        clearer = explain_forward_error(err, accelerator.unwrap_model(model), inputs)
        if clearer is None:
            raise
        raise clearer from err
    if trainer is not None and not trainer._first_backward_checked:  # one attribute test per micro-batch after that
        check_first_backward(trainer, model)


def explain_forward_error(err: BaseException, model, inputs) -> Exception | None:
    """A clearer error for what torch raises on out-of-range labels or too-long sequences; None if it is neither."""
    text = str(err)
    config = getattr(model, "config", None)
    name = type(model).__name__
    labels = inputs.get("labels") if hasattr(inputs, "get") else None
    num_labels = getattr(config, "num_labels", None)
    if "Target" in text and "out of bounds" in text and torch.is_tensor(labels) and num_labels:
        valid = labels[labels != -100]
        high = int(valid.max()) if valid.numel() else 0
        return ValueError(
            f"A batch has label {high}, but {name} has num_labels={num_labels} (classes 0..{num_labels - 1}): {text}. "
            f"Load the model with the number of classes of your data (from_pretrained(..., num_labels=...)), or map "
            f"the labels to 0..{num_labels - 1}."
        )
    if "does not require grad and does not have a grad_fn" in text:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return RuntimeError(
            f"The training loss is not connected to any trainable parameter ({trainable:,} of {name}'s "
            f"{sum(p.numel() for p in model.parameters()):,} weights require grad): {text}. Either every parameter is "
            "frozen (set requires_grad=True on what should learn), or the loss was detached from the model's outputs "
            "(.detach(), .item(), torch.no_grad() or a new tensor in compute_loss / compute_loss_func)."
        )
    if isinstance(err, TypeError) and "'NoneType'" in text and "operand type" in text:
        import traceback

        frames = traceback.extract_tb(err.__traceback__)
        if frames and frames[-1].filename.endswith(
            os.path.join("looptrain", "trainer.py")
        ):  # the loop's loss arithmetic
            keys = ", ".join(inputs.keys()) if hasattr(inputs, "keys") else "?"
            return ValueError(
                f"The training loss is None: {name} returned no loss for a batch with {keys} ({text}). A model "
                "computes its loss when it receives labels: give the dataset a label column the model takes, or compute "
                "the loss yourself (Trainer(compute_loss_func=...) or a compute_loss override)."
            )
    if "expected target dtype to be Long" in text or "expected scalar type Long" in text:
        dtype = labels.dtype if torch.is_tensor(labels) else "?"
        return ValueError(
            f"The labels are {dtype}, but {name}'s loss takes class numbers (int64) for single-label classification: "
            f"{text}. Give integer labels (dataset.cast_column('label', datasets.Value('int64')), or .long() in the "
            "collator); for a score use num_labels=1 (regression)."
        )
    if "grad can be implicitly created only for scalar outputs" in text:
        return RuntimeError(
            f"The training loss is not a single number: {text}. {name} (or compute_loss / compute_loss_func) returned a "
            "tensor of several values where the loss is expected, e.g. per-example losses, or logits because the batch "
            "had no labels (a tuple output's first item is taken as the loss). Return the mean loss, or pass labels."
        )
    if "to match target batch_size" in text and torch.is_tensor(labels):
        return ValueError(
            f"The labels do not fit {name}'s output: labels of shape {tuple(labels.shape)}, and the loss compares them "
            f"with one prediction per {'token' if 'TokenClassification' in name or 'LM' in name else 'example'}: {text}. "
            "Sequence classifiers take one label per example, token classifiers and language models one per token (a "
            "collator such as DataCollatorForLanguageModeling makes token labels): give the model the labels of its task."
        )
    if "Target size" in text and "must be the same as input size" in text and torch.is_tensor(labels):
        return ValueError(
            f"The labels do not fit {name}'s head: labels of shape {tuple(labels.shape)} ({labels.dtype}) for "
            f"num_labels={num_labels}, problem_type={getattr(config, 'problem_type', None)!r}: {text}. Float labels make a "
            "classification model multi-label (one float per class per example); for one class per example give "
            "integer labels (dataset.cast_column('label', datasets.Value('int64'))), for a score num_labels=1."
        )
    main_input = getattr(model, "main_input_name", "input_ids")
    ids = inputs.get(main_input) if hasattr(inputs, "get") else None
    limit = position_limit(model)
    if torch.is_tensor(ids) and ids.dim() >= 2 and limit is not None and ids.shape[-1] > limit:
        return ValueError(
            f"A batch has sequences of {ids.shape[-1]} tokens, but {name}'s position embeddings cover {limit} "
            f"(config.max_position_embeddings): {text}. Tokenize with truncation=True, max_length={limit}, or drop "
            "the longer examples."
        )
    vocab = getattr(config, "vocab_size", None)
    if (
        "index out of range" in text
        and torch.is_tensor(ids)
        and not ids.is_floating_point()
        and vocab
        and int(ids.max()) >= vocab
    ):
        return ValueError(
            f"A batch has token id {int(ids.max())}, but {name}'s vocabulary has {vocab} entries: the tokenizer does not "
            "match the model (resize the embeddings with model.resize_token_embeddings(len(tokenizer)) after adding "
            f"tokens): {text}."
        )
    return None


# ------------------------------------------------------------------------------------------ divergence
class DivergenceGuard:
    """Watches the gradient norm of every optimizer step for NaN or infinity, on the device.

    `observe` keeps the step's norm (a list append); every `FOLD_EVERY` steps, and at `check`, the kept norms are
    folded into `first_bad_step` with a few tensor operations and no host synchronisation. `check` reads the flag,
    and the loop calls it only where it synchronises anyway (before a log, an evaluation or a save, and at the end),
    so a diverged run stops at the latest at its next log and never saves a non-finite checkpoint. Under fp16's
    loss scaler a non-finite gradient norm is an overflow, not divergence: there the weights are checked instead
    (`observe_weights`).
    """

    FOLD_EVERY = 256  # norms kept before they are folded (bounds what is held between two checks)

    def __init__(self, device):
        self.first_bad_step = torch.tensor(-1, device=device)
        self.what = "the gradient norm was NaN or infinite at optimizer step"
        self._norms: list[torch.Tensor] = []  # the norms of consecutive steps, from `_first_step`, not yet folded
        self._first_step = 0
        self._host_first_bad: int | None = None  # a norm that came as a Python float (DeepSpeed's) is checked here

    def observe_weights(self, model, step: int) -> None:
        """Under fp16's loss scaler a non-finite gradient norm is an overflow the scaler handles (with the fused AdamW
        it skips the update inside the kernel, where the loop cannot see it), so the weights themselves are checked
        instead; the loop does it only where it synchronises anyway."""
        finite = torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()
        if not bool(finite) and int(self.first_bad_step.item()) < 0:
            self.first_bad_step.fill_(step)
            self.what = "the weights were NaN or infinite by optimizer step"

    def observe(self, grad_norm, step: int) -> None:
        """After optimizer step `step`: keep its gradient norm (no device operation, no sync)."""
        if grad_norm is None:
            return
        if not torch.is_tensor(grad_norm):
            if self._host_first_bad is None and not math.isfinite(grad_norm):
                self._host_first_bad = step
            return
        if self._norms and step != self._first_step + len(self._norms):
            self._fold()
        if not self._norms:
            self._first_step = step
        self._norms.append(grad_norm)
        if len(self._norms) >= self.FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        """`first_bad_step` = the first kept step whose norm is not finite, unless an earlier one was (device ops)."""
        device = self.first_bad_step.device
        norms = torch.stack([n.reshape(()).to(device=device, dtype=torch.float32) for n in self._norms])
        bad = ~torch.isfinite(norms)
        first_bad = self._first_step + torch.argmax(bad.to(torch.uint8))  # argmax: the first maximum
        self.first_bad_step = torch.where((self.first_bad_step < 0) & bad.any(), first_bad, self.first_bad_step)
        self._norms = []

    def check(self, find_last_checkpoint) -> None:
        """Raise `TrainingDiverged` if a step was non-finite; `find_last_checkpoint()` names the last good checkpoint
        (asked only then)."""
        if self._norms:
            self._fold()
        steps = [s for s in (int(self.first_bad_step.item()), self._host_first_bad) if s is not None and s >= 0]
        if not steps:
            return
        step = min(steps)
        last_good_checkpoint = find_last_checkpoint()
        where = (
            f"the last checkpoint before it is {last_good_checkpoint}"
            if last_good_checkpoint
            else "no checkpoint was saved before it"
        )
        raise TrainingDiverged(
            f"Training diverged: {self.what} {step}, so the weights after it are not finite. Nothing after step "
            f"{step - 1} was saved; {where}. Lower the learning rate (or use "
            "max_grad_norm, warmup, bf16 instead of fp16) and resume or restart. (transformers.Trainer trains on in this "
            "case; set `raise_on_divergence = False` on a Trainer subclass for its behaviour.)"
        )
