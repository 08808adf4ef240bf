"""Evaluation and prediction: `evaluate()`, `predict()`, and the loop they share.

Trainer 5.24 (`trainer.py:2805-3300`). Two details decide parity:
  * every evaluation builds a new DataLoader iterator, which takes one draw from the global RNG, so
    an evaluation in the middle of training shifts every later dropout mask;
  * `eval_loss` is the float32 mean over *samples* of per-batch mean losses: each batch loss is repeated
    `eval_batch_size` times and the last batch is cut to the dataset's remainder by `gather_for_metrics`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping

import numpy as np
import torch
from accelerate.utils.memory import should_reduce_batch_size
from transformers.trainer_pt_utils import (
    EvalLoopContainer,
    IterableDatasetShard,
    find_batch_size,
    nested_concat,
    nested_detach,
    nested_numpify,
)
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    EvalLoopOutput,
    EvalPrediction,
    PredictionOutput,
    denumpify_detensorize,
    has_length,
    speed_metrics,
)
from transformers.utils import logging

from .checks import explaining_errors
from .optim import steps_on_metrics

logger = logging.get_logger(__name__)


class EvaluationMixin:
    """`evaluate`, `predict`, `evaluation_loop` and `prediction_step`, as in `transformers.Trainer`."""

    def evaluate(
        self, eval_dataset=None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Evaluate, log the metrics (adding `epoch`), fire `on_evaluate`, return them.

        A dict of datasets is evaluated one by one with prefixes `eval_<name>_...`.
        """
        override = eval_dataset is not None
        eval_dataset = eval_dataset if override else self.eval_dataset
        if isinstance(eval_dataset, dict):
            metrics = {}
            for name, dataset in eval_dataset.items():
                metrics.update(
                    self.evaluate(
                        dataset if override else name, ignore_keys, metric_key_prefix=f"{metric_key_prefix}_{name}"
                    )
                )
            return metrics

        self._memory_tracker.start()
        dataloader = self.get_eval_dataloader(eval_dataset)
        start_time = time.time()
        output = self.evaluation_loop(
            dataloader,
            description="Evaluation",
            # Trainer: without compute_metrics there is no reason to keep predictions.
            prediction_loss_only=True if self.compute_metrics is None else None,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        self._add_speed_metrics(output, metric_key_prefix, start_time)
        self.log(output.metrics)  # also adds "epoch" to the returned dict, as Trainer does
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, output.metrics)
        self._memory_tracker.stop_and_update_metrics(output.metrics)
        return output.metrics

    def predict(
        self, test_dataset, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test"
    ) -> PredictionOutput:
        """Predictions (numpy), labels if the data has them, and `test_*` metrics. Nothing is logged."""
        self._memory_tracker.start()
        dataloader = self.get_test_dataloader(test_dataset)
        start_time = time.time()
        output = self.evaluation_loop(
            dataloader, description="Prediction", ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )
        self._add_speed_metrics(output, metric_key_prefix, start_time)
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, output.metrics)
        self._memory_tracker.stop_and_update_metrics(output.metrics)
        return PredictionOutput(predictions=output.predictions, label_ids=output.label_ids, metrics=output.metrics)

    def _add_speed_metrics(self, output, prefix, start_time):
        prep = output.metrics.get(f"{prefix}_model_preparation_time")
        if prep is not None:
            start_time += prep
        batches = math.ceil(output.num_samples / (self.args.eval_batch_size * self.args.world_size))
        output.metrics.update(speed_metrics(prefix, start_time, num_samples=output.num_samples, num_steps=batches))

    def _evaluate(self, trial, ignore_keys_for_eval, skip_scheduler: bool = False) -> dict[str, float]:
        """Evaluation during training: report to a hyperparameter search; plateau-type schedulers step on its metric."""
        try:
            metrics = self.evaluate(ignore_keys=ignore_keys_for_eval)
        except RuntimeError as err:
            # Trainer: auto_find_batch_size only lowers the training batch size; an evaluation OOM must not retry training.
            # The message must not contain " out of memory.", which accelerate's should_reduce_batch_size looks for.
            if self.args.auto_find_batch_size and should_reduce_batch_size(err):
                raise RuntimeError(
                    "Evaluation hit an out-of-memory error. auto_find_batch_size only adjusts the training batch size: "
                    "lower per_device_eval_batch_size instead."
                ) from err
            raise
        self._report_to_hp_search(trial, self.state.global_step, metrics)
        if steps_on_metrics(self.lr_scheduler) and not skip_scheduler:
            key = self.args.metric_for_best_model
            key = key if key.startswith("eval_") else f"eval_{key}"
            if key not in metrics:
                raise KeyError(
                    f"The learning-rate scheduler steps on metric_for_best_model={key!r}, which the evaluation did not "
                    f"return ({list(metrics)}). Return it from compute_metrics, or change metric_for_best_model."
                )
            self.lr_scheduler.step(metrics[key])
        return metrics

    def _determine_best_metric(self, metrics: dict[str, float], trial) -> bool:
        """Trainer: compare `eval_<metric_for_best_model>` with the best so far; record step and value."""
        args = self.args
        if args.metric_for_best_model is None:
            return False
        key = args.metric_for_best_model
        key = key if key.startswith("eval_") else f"eval_{key}"
        if key not in metrics:
            raise KeyError(
                f"metric_for_best_model={args.metric_for_best_model!r} looks for {key!r}, which the evaluation did "
                f"not return; it returned {list(metrics)}. Return it from compute_metrics or change the argument."
            )
        better = np.greater if args.greater_is_better else np.less
        if self.state.best_metric is None:
            self.state.best_metric = float("-inf") if args.greater_is_better else float("inf")
        if better(metrics[key], self.state.best_metric):
            self.state.best_metric = metrics[key]
            if args.save_strategy in ("steps", "epoch", "best"):
                self.state.best_global_step = self.state.global_step
            return True
        return False

    def _update_best_model_checkpoint(self, run_dir: str) -> None:
        """Before a save: Trainer's best checkpoint is known once its folder exists (it may be the one being written)."""
        if self.args.save_strategy in ("steps", "epoch", "best") and self.state.best_global_step:
            self.accelerator.wait_for_everyone()
            best_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if os.path.exists(best_dir) or self.state.best_global_step == self.state.global_step:
                self.state.best_model_checkpoint = best_dir

    def evaluation_loop(
        self,
        dataloader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys=None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """Run `prediction_step` over `dataloader`, gather across processes, compute the metrics."""
        args = self.args
        prediction_loss_only = prediction_loss_only if prediction_loss_only is not None else args.prediction_loss_only
        if self.is_deepspeed_enabled and self.deepspeed is None:  # Trainer: evaluating before any training
            from transformers.integrations.deepspeed import deepspeed_init

            deepspeed_init(self, num_training_steps=0, inference=True)
        model = self._wrap_model(self.model, training=False)  # Trainer: DataParallel if n_gpu > 1; no DDP under no_grad
        if len(self.accelerator._models) == 0 and model is self.model:
            # Trainer: evaluating before training prepares the model here, and reports how long it took.
            start = time.time()
            if self.is_deepspeed_enabled or (self.is_fsdp_enabled and not args.torch_compile):
                model = self.accelerator.prepare(model)
            else:
                model = self.accelerator.prepare_model(model, evaluation_mode=True)
            self.model_preparation_time = round(time.time() - start, 4)
            if self.is_fsdp_enabled:
                self.model = model
            if model is not self.model:
                self.model_wrapped = model
            if self.is_deepspeed_enabled:
                self.deepspeed = self.model_wrapped
        # Trainer: fp16/bf16_full_eval cast the model itself (outside training) rather than autocast.
        if not self.is_in_train:
            if args.fp16_full_eval:
                model = model.to(dtype=torch.float16, device=args.device)
            elif args.bf16_full_eval:
                model = model.to(dtype=torch.bfloat16, device=args.device)
        batch_size = args.eval_batch_size
        examples = self.num_examples(dataloader) if has_length(dataloader) else "unknown"
        logger.info(f"***** Running {description} *****  examples={examples}, batch size={batch_size}")
        if hasattr(model, "eval") and callable(model.eval):
            model.eval()
        if hasattr(self.optimizer, "eval") and callable(self.optimizer.eval):
            self.optimizer.eval()  # schedule-free optimizers evaluate their averaged weights
        self.callback_handler.eval_dataloader = dataloader
        eval_dataset = getattr(dataloader, "dataset", None)

        containers = [BatchListContainer(args.eval_do_concat_batches, padding_index=-100) for _ in range(4)]
        all_losses, all_preds, all_labels, all_inputs = containers
        keep_predictions = not args.batch_eval_metrics or description == "Prediction"
        metrics, observed, labels_seen = None, 0, False
        for step, inputs in enumerate(dataloader):  # a new iterator: one global RNG draw, as in Trainer
            observed_batch = find_batch_size(inputs)
            if observed_batch is not None:
                observed += observed_batch
                if batch_size is None:  # a batch sampler: the size is known only now
                    batch_size = observed_batch
            with explaining_errors(self.accelerator, model, inputs):  # looptrain: name out-of-range labels, long inputs
                losses, logits, labels = self.prediction_step(
                    model, inputs, prediction_loss_only, ignore_keys=ignore_keys
                )
            main_input = getattr(self.model, "main_input_name", "input_ids")
            inputs_decode = self._prepare_input(inputs[main_input]) if "inputs" in args.include_for_metrics else None
            labels_seen = labels_seen or labels is not None

            if losses is not None:
                # Trainer: one loss per sample slot of the configured batch size; gather_for_metrics trims the
                # last batch to the dataset's remainder, so eval_loss weighs batches by size.
                losses = self.gather_function(losses.repeat(batch_size))
                all_losses.add(losses)
            if inputs_decode is not None:
                inputs_decode = self.accelerator.pad_across_processes(inputs_decode, dim=1, pad_index=-100)
                inputs_decode = self.gather_function(inputs_decode)
                if keep_predictions:
                    all_inputs.add(inputs_decode)
            if labels is not None:
                labels = self.accelerator.pad_across_processes(labels, dim=1, pad_index=-100)
            if logits is not None:
                logits = self.accelerator.pad_across_processes(logits, dim=1, pad_index=-100)
                if self.preprocess_logits_for_metrics is not None:
                    logits = self.preprocess_logits_for_metrics(logits, labels)
                logits = self.gather_function(logits)
                if keep_predictions:
                    all_preds.add(logits)
            if labels is not None:
                labels = self.gather_function(labels)
                if keep_predictions:
                    all_labels.add(labels)
            self.control = self.callback_handler.on_prediction_step(args, self.state, self.control)

            if args.batch_eval_metrics:
                # Streaming metrics: compute_metrics sees one batch at a time and returns its result on the last
                # (compute_result=True), so no prediction is kept.
                if self.compute_metrics is not None and logits is not None and labels is not None:
                    batch_kwargs = {
                        "losses": losses if "loss" in args.include_for_metrics else None,
                        "inputs": inputs if "inputs" in args.include_for_metrics else None,
                    }
                    metrics = self.compute_metrics(
                        EvalPrediction(predictions=logits, label_ids=labels, **batch_kwargs),
                        compute_result=self.accelerator.gradient_state.end_of_dataloader,
                    )
                del losses, logits, labels, inputs
            elif args.eval_accumulation_steps is not None and (step + 1) % args.eval_accumulation_steps == 0:
                for container in containers:  # move to host memory every N steps
                    container.to_cpu_and_numpy()
        # Trainer: after the loop gather_function is reset to the plain gather_for_metrics, so eval_use_gather_object
        # applies to the first evaluation loop of a Trainer only (trainer.py:3055-3056).
        self.gather_function = self.accelerator.gather_for_metrics

        # Trainer returns metrics without a loss here; looptrain names the cause when the dataset is the user's. A
        # subclass evaluating through an empty loader of its own with no eval_dataset at all (sentence-transformers,
        # whose `evaluator` does the evaluation) gets Trainer's result.
        if (
            observed == 0
            and has_length(eval_dataset)
            and len(eval_dataset) == 0
            and (description != "Evaluation" or self.eval_dataset is not None)
        ):
            raise ValueError(f"The {description.lower()} dataset is empty: there is nothing to evaluate.")
        all_losses, all_preds, all_labels, all_inputs = (c.get_arrays() for c in containers)
        if has_length(eval_dataset):
            num_samples = len(eval_dataset)
        elif isinstance(eval_dataset, IterableDatasetShard) and getattr(eval_dataset, "num_examples", 0) > 0:
            num_samples = eval_dataset.num_examples
        elif has_length(dataloader):
            num_samples = self.num_examples(dataloader)
        else:
            num_samples = observed
        if num_samples == 0 and observed > 0:
            num_samples = observed

        if (
            self.compute_metrics is not None
            and all_preds is not None
            and all_labels is not None
            and not args.batch_eval_metrics
        ):
            eval_kwargs = {
                "losses": all_losses if "loss" in args.include_for_metrics else None,
                "inputs": all_inputs if "inputs" in args.include_for_metrics else None,
            }
            metrics = self.compute_metrics(EvalPrediction(predictions=all_preds, label_ids=all_labels, **eval_kwargs))
        elif metrics is None:
            metrics = {}
            if (
                self.compute_metrics is not None
                and description == "Evaluation"
                and not prediction_loss_only
                and not labels_seen
            ):
                # Trainer calls compute_metrics only with labels, silently; looptrain says why it was not called.
                logger.warning(
                    f"compute_metrics was not called: the evaluation batches have no labels {self.label_names}. Add a "
                    "'label'/'labels' column to the eval dataset, or set TrainingArguments(label_names=[...])."
                )
        if not isinstance(metrics, Mapping):  # Trainer fails later, deep inside, without naming compute_metrics
            raise TypeError(
                f"compute_metrics returned a {type(metrics).__name__} ({str(metrics)[:80]!r}); it must return a dict of "
                "metric names to numbers, such as {'accuracy': 0.9}."
            )
        metrics = denumpify_detensorize(dict(metrics))
        losses = np.concatenate(all_losses) if isinstance(all_losses, list) and all_losses else all_losses
        if isinstance(losses, np.ndarray):
            finite = np.isfinite(losses)
            if args.logging_nan_inf_filter and finite.any():
                losses = losses[finite]
            metrics[f"{metric_key_prefix}_loss"] = losses.mean().item()  # float32 mean, as Trainer
        if hasattr(self, "model_preparation_time"):
            metrics[f"{metric_key_prefix}_model_preparation_time"] = self.model_preparation_time
        # Trainer: prefix every key; popping and re-inserting puts `<prefix>_loss` first.
        for key in list(metrics.keys()):
            if not key.startswith(f"{metric_key_prefix}_"):
                metrics[f"{metric_key_prefix}_{key}"] = metrics.pop(key)
        return EvalLoopOutput(predictions=all_preds, label_ids=all_labels, metrics=metrics, num_samples=num_samples)

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys: list[str] | None = None):
        """One batch without gradients: (loss, logits, labels), each possibly None."""
        has_labels = bool(self.label_names) and all(inputs.get(k) is not None for k in self.label_names)
        # Trainer: CLIP-like models return a loss without labels when `return_loss` is on.
        return_loss = inputs.get("return_loss")
        if return_loss is None:
            return_loss = self.can_return_loss
        loss_without_labels = len(self.label_names) == 0 and return_loss
        inputs = self._prepare_inputs(inputs)
        if ignore_keys is None:
            ignore_keys = (
                getattr(self.model.config, "keys_to_ignore_at_inference", ["cache"])
                if hasattr(self.model, "config")
                else []
            )
        # the labels are read first: computing the loss may pop them (label smoothing)
        if has_labels or loss_without_labels:
            labels = nested_detach(tuple(inputs.get(name) for name in self.label_names))
            labels = labels[0] if len(labels) == 1 else labels
        else:
            labels = None

        with torch.no_grad():
            if has_labels or loss_without_labels:
                # Trainer: counted before context parallelism splits the buffers in place.
                num_items_in_batch = self._get_num_items_in_batch([inputs], self.args.device)
                cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
                with self.compute_loss_context_manager(), cp_context():
                    if self.args.use_liger_kernel and prediction_loss_only:
                        inputs = {**inputs, "skip_logits": True}
                    loss, outputs = self.compute_loss(
                        model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
                    )
                loss = loss.detach().mean()
                logits = (
                    tuple(v for k, v in outputs.items() if k not in ignore_keys + ["loss"])
                    if isinstance(outputs, dict)
                    else outputs[1:]
                )
            else:
                loss = None
                with self.compute_loss_context_manager():
                    outputs = model(**inputs)
                logits = (
                    tuple(v for k, v in outputs.items() if k not in ignore_keys)
                    if isinstance(outputs, dict)
                    else outputs
                )

        if prediction_loss_only:
            return loss, None, None
        logits = nested_detach(logits)
        if len(logits) == 1:
            logits = logits[0]
        return loss, logits, labels


class BatchListContainer(EvalLoopContainer):
    """transformers' `EvalLoopContainer` (what Trainer keeps predictions in), with the same results built in one pass.

    Performance: Trainer concatenates each batch onto everything before it (`nested_concat`), so every
    batch copies all earlier predictions again (quadratic time) and the last one needs twice the final size.
    Here the batches are listed, and concatenated once when the arrays are read (`concat_batches`): the same
    arrays (padding, dtype, nesting), in linear time, at about the final size in memory.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._blocks = []  # what `to_cpu_and_numpy` moved to host memory so far, as numpy arrays

    def add(self, tensors) -> None:
        """Keep one batch of (nested) tensors."""
        if not self.do_nested_concat:
            return super().add(tensors)
        if self.tensors is None:
            self.tensors = []
        self.tensors.append(tensors)

    def to_cpu_and_numpy(self) -> None:
        """Concatenate what is kept so far and move it to host memory (eval_accumulation_steps)."""
        if not self.do_nested_concat:
            return super().to_cpu_and_numpy()
        if self.tensors is None:
            return
        # Trainer: what was concatenated so far goes to the host, then joins the arrays moved before it.
        self._blocks.append(nested_numpify(concat_batches(self.tensors, self.padding_index)))
        self.tensors = None

    def get_arrays(self):
        """Everything kept, as the numpy arrays Trainer's container returns."""
        if not self.do_nested_concat:
            return super().get_arrays()
        self.to_cpu_and_numpy()
        if self._blocks:
            self.arrays = concat_batches(self._blocks, self.padding_index)
        return self.arrays


def concat_batches(batches: list, padding_index: int = -100):
    """What `nested_concat` applied batch after batch returns, computed at once; `batches` is emptied.

    Tensors (or arrays) of one dtype are copied into one pre-allocated result, each batch released as soon as
    it is copied; rows shorter than the longest are padded with `padding_index` after their own length, as
    `torch_pad_and_concatenate` pads them. Lists, tuples and dicts are handled position by position; anything
    else (mixed dtypes or structures) falls back to Trainer's pairwise concatenation.
    """
    if len(batches) == 1:
        return batches.pop()  # Trainer: a single batch is kept as it came
    first = batches[0]
    same_type = all(type(b) is type(first) for b in batches)
    if same_type and isinstance(first, (list, tuple)) and all(len(b) == len(first) for b in batches):
        columns = [[b[i] for b in batches] for i in range(len(first))]
        batches.clear()
        return type(first)(concat_batches(column, padding_index) for column in columns)
    if same_type and isinstance(first, Mapping) and all(b.keys() == first.keys() for b in batches):
        columns = {key: [b[key] for b in batches] for key in first}
        batches.clear()
        return type(first)({key: concat_batches(column, padding_index) for key, column in columns.items()})
    if isinstance(first, (torch.Tensor, np.ndarray)):
        result = _fill_concatenated(batches, padding_index)
        if result is not None:
            return result
    result = batches[0]
    for batch in batches[1:]:
        result = nested_concat(result, batch, padding_index=padding_index)
    batches.clear()
    return result


def _fill_concatenated(batches: list, padding_index: int):
    """One result for tensors (or arrays) of one type, dtype, device and trailing shape; None otherwise."""
    is_tensor = isinstance(batches[0], torch.Tensor)
    parts = [torch.atleast_1d(b) if is_tensor else np.atleast_1d(b) for b in batches]
    first = parts[0]
    if any(
        isinstance(p, torch.Tensor) != is_tensor
        or p.dtype != first.dtype
        or p.ndim != first.ndim
        or tuple(p.shape[2:]) != tuple(first.shape[2:])
        or (is_tensor and p.device != first.device)
        for p in parts
    ):
        return None
    rows = sum(p.shape[0] for p in parts)
    width = max(p.shape[1] for p in parts) if first.ndim > 1 else None
    shape = (rows,) if width is None else (rows, width, *first.shape[2:])
    result = torch.empty(shape, dtype=first.dtype, device=first.device) if is_tensor else np.empty(shape, first.dtype)
    batches.clear()  # from here `parts` holds the only references: each batch is freed once copied
    row = 0
    for i in range(len(parts)):
        part, parts[i] = parts[i], None
        n = part.shape[0]
        if width is None or part.shape[1] == width:
            result[row : row + n] = part
        else:
            result[row : row + n, : part.shape[1]] = part
            result[row : row + n, part.shape[1] :] = padding_index
        row += n
        del part
    return result
