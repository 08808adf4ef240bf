"""`Seq2SeqTrainer`: what generation adds to evaluation and prediction.

transformers 5.24's `Seq2SeqTrainer` (`transformers/trainer_seq2seq.py`), written as a small delta on
looptrain's `Trainer`. Training is untouched. What changes is evaluation and prediction, and only when
`Seq2SeqTrainingArguments(predict_with_generate=True)`:

  * `evaluate()` / `predict()` take generation keywords (`max_length=`, `num_beams=`, any `generate` argument),
    fill in `generation_max_length` / `generation_num_beams` from the arguments when the call does not set
    them, and keep them for the loop (`self._gen_kwargs`);
  * `prediction_step` runs `model.generate` on the batch and returns the generated token ids where `Trainer`
    returns logits, plus the loss of an ordinary forward pass on the labels;
  * generated tokens and labels are padded to the generation config's `max_length`, so that batches of
    different lengths concatenate into one array (with the tokenizer's pad id, which `batch_decode` skips);
  * `args.generation_config` (a `GenerationConfig`, a folder, a file, or a Hub name) replaces the model's
    generation config, validated strictly up front.

Without `predict_with_generate` the trainer evaluates like `Trainer`, except for one detail of the
evaluation loss that every `Seq2SeqTrainer` evaluation has (see `_use_plain_gather`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.distributed.fsdp import is_fsdp_managed_module
from transformers.generation.configuration_utils import GenerationConfig
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PredictionOutput
from transformers.utils import logging

from .trainer import Trainer
from .training_args import Seq2SeqTrainingArguments

logger = logging.get_logger(__name__)

# The fields Seq2SeqTrainer reads from its arguments (a plain TrainingArguments has none of them).
_GENERATION_FIELDS = ("predict_with_generate", "generation_max_length", "generation_num_beams", "generation_config")


class Seq2SeqTrainer(Trainer):
    """`Trainer` whose evaluation and prediction can generate (`transformers.Seq2SeqTrainer`'s constructor,
    methods and results). Use it with `Seq2SeqTrainingArguments(predict_with_generate=True)` to compute
    metrics such as ROUGE or BLEU on generated text."""

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Seq2SeqTrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        model_init: Callable[..., nn.Module] | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        preprocess_logits_for_metrics: Callable | None = None,
        *,
        tokenizer=None,
    ):
        if args is None:  # looptrain: Trainer's default TrainingArguments has no generation fields (AttributeError)
            args = Seq2SeqTrainingArguments(output_dir="tmp_trainer")
        missing = [name for name in _GENERATION_FIELDS if not hasattr(args, name)]
        if missing:
            raise TypeError(
                f"Seq2SeqTrainer reads {', '.join(missing)} from its arguments, which a {type(args).__name__} does not "
                "have: pass Seq2SeqTrainingArguments (looptrain's or transformers'), or use Trainer."
            )
        if args.sortish_sampler:
            # Trainer 5.24 has the field and never reads it; looptrain says so instead of ignoring it silently.
            logger.warning(
                "sortish_sampler=True has no effect: transformers' Seq2SeqTrainer does not read it either. For "
                "batches of similar lengths use train_sampling_strategy='group_by_length'."
            )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            model_init=model_init,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            tokenizer=tokenizer,
        )
        self._gen_kwargs = {}  # the generation keywords of the running evaluate()/predict()
        # Trainer: args.generation_config replaces the model's own. Priority when generating: the call's
        # keywords > model.generation_config > GenerationConfig's defaults. (A model built by model_init got
        # it in `call_model_init`.)
        if self.args.generation_config is not None and self.model_init is None:
            self.model.generation_config = self.load_generation_config(self.args.generation_config)

    def call_model_init(self, trial=None) -> nn.Module:
        """Build a model with `model_init`, and give it `args.generation_config` when one is set."""
        model = super().call_model_init(trial)
        # looptrain: Trainer sets args.generation_config only in __init__, so the model that train() rebuilds
        # with model_init would silently generate with its own config; every model built here gets it.
        if getattr(self.args, "generation_config", None) is not None:
            model.generation_config = self.load_generation_config(self.args.generation_config)
        return model

    @staticmethod
    def load_generation_config(gen_config_arg: str | GenerationConfig) -> GenerationConfig:
        """The `GenerationConfig` that `Seq2SeqTrainingArguments.generation_config` names: a copy of a
        `GenerationConfig`, or one loaded from a file, a folder, or a Hub name. Validated strictly."""
        if isinstance(gen_config_arg, GenerationConfig):
            gen_config = deepcopy(gen_config_arg)
        else:
            # Trainer: a path to a file loads that file; a folder or a Hub name loads its generation_config.json.
            path = Path(gen_config_arg)
            if path.is_file():
                gen_config = GenerationConfig.from_pretrained(path.parent, path.name)
            elif path.is_dir():
                gen_config = GenerationConfig.from_pretrained(path)
            else:
                gen_config = GenerationConfig.from_pretrained(gen_config_arg)
        # Trainer: strict validation now, because save_pretrained() at the end of training refuses a config
        # that only warns here.
        try:
            gen_config.validate(strict=True)
        except ValueError as exc:
            raise ValueError(str(exc) + "\n\nFix these issues to train your model.") from None
        return gen_config

    # ======================================================================================= entry points
    def evaluate(
        self, eval_dataset=None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval", **gen_kwargs
    ) -> dict[str, float]:
        """`Trainer.evaluate`, generating with `gen_kwargs` (e.g. `max_length=`, `num_beams=`) when
        `predict_with_generate` is set; the arguments' `generation_max_length`/`generation_num_beams` fill in."""
        datasets = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(datasets, dict):
            # looptrain: Trainer evaluates each dataset of a dict through evaluate() again, without the keywords
            # of this call, so they were silently dropped; here every dataset is generated with them.
            metrics = {}
            for name, dataset in datasets.items():
                metrics.update(
                    self.evaluate(
                        dataset if eval_dataset is not None else name,
                        ignore_keys,
                        f"{metric_key_prefix}_{name}",
                        **gen_kwargs,
                    )
                )
            return metrics
        self._gen_kwargs = self._generation_kwargs(gen_kwargs)
        self._use_plain_gather()
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def predict(
        self, test_dataset, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test", **gen_kwargs
    ) -> PredictionOutput:
        """`Trainer.predict`; with `predict_with_generate` the predictions are generated token ids (padded with
        the tokenizer's pad id), generated with `gen_kwargs` as in `evaluate`."""
        self._gen_kwargs = self._generation_kwargs(gen_kwargs)
        self._use_plain_gather()
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _generation_kwargs(self, gen_kwargs: dict) -> dict:
        """The call's generation keywords, with the arguments' `generation_max_length` and `generation_num_beams`
        where the call does not set them (Trainer: `max_new_tokens=` also stands for a length)."""
        gen_kwargs = dict(gen_kwargs)
        if (
            gen_kwargs.get("max_length") is None
            and gen_kwargs.get("max_new_tokens") is None
            and self.args.generation_max_length is not None
        ):
            gen_kwargs["max_length"] = self.args.generation_max_length
        if gen_kwargs.get("num_beams") is None and self.args.generation_num_beams is not None:
            gen_kwargs["num_beams"] = self.args.generation_num_beams
        beams = gen_kwargs.get("num_beams")
        if self.args.predict_with_generate and beams is not None and beams < 1:
            # looptrain: generate() would fail with a ZeroDivisionError or a negative tensor size.
            raise ValueError(
                f"num_beams={beams} (generation_num_beams, or num_beams= of this call) must be at least 1."
            )
        return gen_kwargs

    def _use_plain_gather(self) -> None:
        """Trainer: a Seq2SeqTrainer evaluation gathers with `accelerator.gather`, not `gather_for_metrics`
        ("we don't want to drop samples"); the loop resets it when done. So nothing is cut from the last batch:
        `eval_loss` counts the last batch's mean loss `eval_batch_size` times however few samples it holds,
        and across processes the samples accelerate repeated to even out the last round are kept."""
        self.gather_function = self.accelerator.gather

    # ====================================================================================== one batch
    def prediction_step(
        self,
        model,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
        **gen_kwargs,
    ):
        """With `predict_with_generate` (and predictions wanted): (loss, generated token ids, labels), both id
        tensors padded to the generation config's `max_length`. Otherwise `Trainer.prediction_step`."""
        if not self.args.predict_with_generate or prediction_loss_only:
            return super().prediction_step(
                model, inputs, prediction_loss_only=prediction_loss_only, ignore_keys=ignore_keys
            )

        # Trainer: the key `labels`, whatever `label_names` says. looptrain: a batch whose labels are None (what
        # DataCollatorForSeq2Seq makes of data without labels) has none; Trainer fails in the forward pass.
        has_labels = inputs.get("labels") is not None
        inputs = self._prepare_inputs(inputs)
        if len(gen_kwargs) == 0:
            gen_kwargs = self._gen_kwargs.copy()  # set by evaluate()/predict()
        for name in ("num_beams", "max_length"):  # None means "the model's generation config decides"
            if name in gen_kwargs and gen_kwargs[name] is None:
                gen_kwargs.pop(name)
        # Every process must run the same number of forward passes when the weights are sharded.
        gen_kwargs.setdefault("synced_gpus", is_deepspeed_zero3_enabled() or is_fsdp_managed_module(self.model))

        # DataCollatorForSeq2Seq(model=...) builds `decoder_input_ids` from the labels (shifted right). Given to
        # generate(), the model would continue after them instead of generating; they are left out.
        generation_inputs = inputs.copy()
        if (
            "labels" in generation_inputs
            and "decoder_input_ids" in generation_inputs
            and generation_inputs["labels"].shape == generation_inputs["decoder_input_ids"].shape
        ):
            generation_inputs = {
                k: v for k, v in inputs.items() if k not in ("decoder_input_ids", "decoder_attention_mask")
            }
        # FSDP (v1) shards the weights: generate() needs them whole.
        full_params = contextlib.nullcontext()
        if torch.distributed.is_available():
            from torch.distributed.fsdp import FullyShardedDataParallel

            if isinstance(self.model, FullyShardedDataParallel):
                full_params = FullyShardedDataParallel.summon_full_params(self.model)
        with full_params:
            generated_tokens = self.model.generate(**generation_inputs, **gen_kwargs)

        # Trainer: a generation config derived from the model config is marked as the user's after the first
        # batch (so generate() does not rebuild it every batch), and the defaults it left unset (max_length 20,
        # num_beams 1, ...) are written into it. Both change model.generation_config, which save_model() writes.
        gen_config = self.model.generation_config
        if gen_config._from_model_config:
            gen_config._from_model_config = False
        gen_config.update(**gen_config._get_default_generation_params(), defaults_only=True)
        generated_tokens = self._pad_to_generation_length(generated_tokens, gen_config)

        # The loss: an ordinary forward pass with the labels (not compute_loss, as in Trainer).
        loss = None
        if has_labels:
            with torch.no_grad():
                with self.compute_loss_context_manager():
                    outputs = model(**inputs)
                if self.label_smoother is not None:
                    loss = self.label_smoother(outputs, inputs["labels"]).detach().mean()
                else:
                    loss = (outputs["loss"] if isinstance(outputs, dict) else outputs[0]).detach().mean()
        if self.args.prediction_loss_only:
            return loss, None, None
        labels = self._pad_to_generation_length(inputs["labels"], gen_config) if has_labels else None
        return loss, generated_tokens, labels

    def _pad_to_generation_length(self, tensor: torch.Tensor, gen_config: GenerationConfig) -> torch.Tensor:
        """Trainer: right-pad token ids to `max_length` (or to `max_new_tokens + 1`, the decoder start token
        included), so that every batch has the same width; longer ones are left as they are."""
        if tensor.shape[-1] < gen_config.max_length:
            return self._pad_tensors_to_max_len(tensor, gen_config.max_length)
        if gen_config.max_new_tokens is not None and tensor.shape[-1] < gen_config.max_new_tokens + 1:
            return self._pad_tensors_to_max_len(tensor, gen_config.max_new_tokens + 1)
        return tensor

    def _pad_tensors_to_max_len(self, tensor: torch.Tensor, max_length: int) -> torch.Tensor:
        """Right-pad to `max_length` with the tokenizer's pad id (its EOS id if it has none), else the model's."""
        tokenizer = self.processing_class
        if tokenizer is not None and hasattr(tokenizer, "pad_token_id"):
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        elif getattr(self.model.config, "pad_token_id", None) is not None:
            pad_token_id = self.model.config.pad_token_id
        else:
            raise ValueError(
                "Generated tokens are padded to one length, which needs a pad token id: give the tokenizer "
                "(processing_class) a pad_token, or set model.config.pad_token_id."
            )
        padded = pad_token_id * torch.ones((tensor.shape[0], max_length), dtype=tensor.dtype, device=tensor.device)
        padded[:, : tensor.shape[-1]] = tensor
        return padded
