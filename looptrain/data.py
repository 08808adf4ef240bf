"""Data: which columns reach the model, which collator batches them, which sampler orders them.

Everything here reproduces `transformers.Trainer` 5.24's data methods, with their names (`_get_dataloader`,
`_remove_unused_columns`, `_get_train_sampler`, ...), so subclasses that override them are honoured. The
DataLoader itself is handed to `accelerate.Accelerator.prepare`, which swaps the random sampler for its
`SeedableRandomSampler` (order of epoch e = `randperm(n, generator=manual_seed(seed + e))`) and shards
batches across processes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase, default_data_collator
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.trainer_pt_utils import BatchRebalanceSampler, IterableDatasetShard, LengthGroupedSampler
from transformers.trainer_utils import RemoveColumnsCollator, _is_peft_model, has_length, seed_worker
from transformers.utils import logging

try:
    import datasets
except ImportError:  # datasets is optional for users who bring torch datasets
    datasets = None

logger = logging.get_logger(__name__)


def default_collator(processing_class) -> Callable:
    """Trainer's default: pad with the tokenizer when there is one, else stack (`default_data_collator`)."""
    if isinstance(processing_class, (PreTrainedTokenizerBase, SequenceFeatureExtractor)):
        return DataCollatorWithPadding(processing_class)
    return default_data_collator


class DataMixin:
    """The DataLoaders of `looptrain.Trainer`: training, evaluation, test."""

    def get_train_dataloader(self) -> DataLoader:
        """The training DataLoader: shuffled (seeded), collated, prepared by accelerate."""
        if self.train_dataset is None:
            raise ValueError("Trainer.train() needs a train_dataset.")
        if has_length(self.train_dataset) and len(self.train_dataset) == 0:  # looptrain: Trainer fails in RandomSampler
            raise ValueError("The training dataset is empty: there is nothing to train on.")
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        """A sequential DataLoader over `eval_dataset` (a name picks one of a dict of eval sets)."""
        if eval_dataset is None and self.eval_dataset is None:
            raise ValueError("Trainer.evaluate() needs an eval_dataset (pass one to Trainer or to evaluate()).")
        # Trainer: with persistent workers, each eval set keeps its DataLoader (no new worker processes per evaluation).
        key = eval_dataset if isinstance(eval_dataset, str) else "eval"
        if self.args.dataloader_persistent_workers and key in self._eval_dataloaders:
            return self._eval_dataloaders[key]
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        elif eval_dataset is None:
            eval_dataset = self.eval_dataset
        return self._get_dataloader(
            dataset=eval_dataset,
            description="Evaluation",
            batch_size=self.args.eval_batch_size,
            sampler_fn=self._get_eval_sampler,
            dataloader_key=key,
        )

    def get_test_dataloader(self, test_dataset) -> DataLoader:
        """A sequential DataLoader over `test_dataset` (used by `predict`)."""
        return self._get_dataloader(
            dataset=test_dataset,
            description="test",
            batch_size=self.args.eval_batch_size,
            sampler_fn=self._get_eval_sampler,
        )

    def num_examples(self, dataloader) -> int:
        """Examples in the dataloader's dataset (estimated from its length when the dataset has none)."""
        try:
            dataset = dataloader.dataset
            if isinstance(dataset, IterableDatasetShard):
                return len(dataset.dataset)
            return len(dataset)
        except (NameError, AttributeError, TypeError):
            return len(dataloader) * self.args.per_device_train_batch_size

    def _get_dataloader(
        self, dataset, description, batch_size, sampler_fn=None, is_training=False, dataloader_key=None
    ) -> DataLoader:
        """The DataLoader Trainer builds: unused columns removed first (so the sampler never sees them), then the
        sampler, then `accelerate.prepare`."""
        args = self.args
        collator = self.data_collator
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            columns_before = dataset.column_names
            dataset = self._remove_unused_columns(dataset, description=description)
            removed = [c for c in columns_before if c not in dataset.column_names]
            if removed:  # looptrain: name the cause when the collator needs a removed column
                collator = ColumnCheckingCollator(collator, removed, type(self.model).__name__)
        else:
            collator = self._get_collator_with_removed_columns(collator, description=description)

        params = dict(
            batch_size=batch_size,
            collate_fn=collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers,
            multiprocessing_context=args.dataloader_multiprocessing_context,
            prefetch_factor=args.dataloader_prefetch_factor,
            in_order=args.dataloader_in_order,
        )
        sampler = None
        if not isinstance(dataset, IterableDataset):
            sampler = sampler_fn(dataset) if sampler_fn is not None else None
            if isinstance(sampler, BatchRebalanceSampler):  # it makes whole batches: batch_sampler, no batch_size
                params.pop("batch_size")
                params["batch_sampler"] = sampler
            else:
                if sampler is not None:
                    params["sampler"] = sampler
                params["drop_last"] = args.dataloader_drop_last
            if is_training:  # each worker re-seeds itself, as in Trainer
                params["worker_init_fn"] = partial(
                    seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index
                )
        dataloader = self.accelerator.prepare(DataLoader(dataset, **params))
        if isinstance(sampler, BatchRebalanceSampler):
            # Trainer: the sampler already gives each rank its own batches; accelerate must not shard them again.
            prepared = getattr(dataloader, "batch_sampler", None)
            if prepared is not None and getattr(prepared, "batch_sampler", None) is sampler:
                prepared.num_processes, prepared.process_index = 1, 0
        if dataloader_key is not None and args.dataloader_persistent_workers:
            self._eval_dataloaders[dataloader_key] = dataloader
        return dataloader

    def _get_train_sampler(self, train_dataset=None):
        """`RandomSampler` (accelerate swaps in its seedable one), sequential, length-grouped or batch-rebalancing."""
        args = self.args
        if train_dataset is None:
            train_dataset = self.train_dataset
        if train_dataset is None or not has_length(train_dataset):
            if train_dataset is not None and args.train_sampling_strategy in ("group_by_length", "batch_rebalance"):
                logger.warning(
                    f"train_sampling_strategy={args.train_sampling_strategy!r} is ignored: the training dataset has no "
                    "length (an IterableDataset), so examples come in its own order."
                )
            return None
        if args.train_sampling_strategy == "group_by_length":
            return LengthGroupedSampler(
                args.train_batch_size * args.gradient_accumulation_steps,
                dataset=train_dataset,
                lengths=self._length_column(train_dataset),
                model_input_name=self._model_input_name(),
            )
        if args.train_sampling_strategy == "batch_rebalance":
            lengths = self._length_column(train_dataset)
            if lengths is None:
                name = self._model_input_name() or "input_ids"
                first = train_dataset[0]
                if not hasattr(first, "keys") or name not in first:
                    raise ValueError(
                        f"train_sampling_strategy='batch_rebalance' needs lengths: a {args.length_column_name!r} column, "
                        f"or examples that are dicts with {name!r}."
                    )
                lengths = [len(example[name]) for example in train_dataset]
            elif isinstance(lengths, torch.Tensor):
                lengths = lengths.tolist()
            world_size = max(1, args.world_size)
            return BatchRebalanceSampler(
                lengths=lengths,
                effective_batch_size=args.train_batch_size * args.gradient_accumulation_steps * world_size,
                dp_size=world_size,
                grad_accum=args.gradient_accumulation_steps,
                rank=args.process_index if args.world_size > 1 else 0,
                drop_last=args.dataloader_drop_last,
            )
        if args.train_sampling_strategy == "sequential":
            return SequentialSampler(train_dataset)
        return RandomSampler(train_dataset)

    def _get_eval_sampler(self, eval_dataset):
        """Sequential on one process; on several, accelerate shards the data itself (None)."""
        args = self.args
        if eval_dataset is None or not has_length(eval_dataset):
            return None
        if args.train_sampling_strategy == "group_by_length":  # Trainer groups eval batches too, with a fixed seed
            return LengthGroupedSampler(
                args.eval_batch_size,
                dataset=eval_dataset,
                lengths=self._length_column(eval_dataset),
                model_input_name=self._model_input_name(),
                generator=torch.Generator().manual_seed(args.data_seed if args.data_seed is not None else args.seed),
            )
        return SequentialSampler(eval_dataset) if args.world_size <= 1 else None

    def _set_signature_columns_if_needed(self) -> None:
        """Columns the model can take: forward's parameters, the label names, and `label`/`label_ids` (the
        collator renames those to `labels`)."""
        if self._signature_columns is None:
            model = self.model
            if _is_peft_model(model):
                model = model.get_base_model() if hasattr(model, "get_base_model") else model.base_model.model
            self._signature_columns = list(inspect.signature(model.forward).parameters)
            self._signature_columns += list(set(["label", "label_ids"] + self.label_names))

    def _remove_unused_columns(self, dataset, description: str | None = None):
        """A `datasets.Dataset` without the columns the model's forward does not take (`remove_unused_columns`)."""
        if not self.args.remove_unused_columns:
            return dataset
        self._set_signature_columns_if_needed()
        ignored = [c for c in dataset.column_names if c not in self._signature_columns]
        if ignored:
            logger.info(
                f"The columns {', '.join(ignored)} of the {description or ''} set are not arguments of "
                f"{type(self.model).__name__}.forward and are removed."
            )
        if len(ignored) == len(dataset.column_names):
            raise ValueError(
                f"No column of the {description or ''} dataset ({', '.join(dataset.column_names)}) is an argument of "
                f"{type(self.model).__name__}.forward ({', '.join(self._signature_columns)}). Tokenize the data first, "
                "or set remove_unused_columns=False."
            )
        return dataset.remove_columns(ignored)

    def _get_collator_with_removed_columns(self, data_collator: Callable, description: str | None = None) -> Callable:
        """For datasets that are not `datasets.Dataset`: a collator that drops unused keys of each example."""
        if not self.args.remove_unused_columns:
            return data_collator
        self._set_signature_columns_if_needed()
        return RemoveColumnsCollator(
            data_collator=data_collator,
            signature_columns=self._signature_columns,
            logger=logger,
            description=description,
            model_name=type(self.model).__name__,
        )

    def _length_column(self, dataset):
        if (
            datasets is not None
            and isinstance(dataset, datasets.Dataset)
            and self.args.length_column_name in dataset.column_names
        ):
            return dataset[self.args.length_column_name]
        return None

    def _model_input_name(self):
        return self.processing_class.model_input_names[0] if self.processing_class is not None else None


class ColumnCheckingCollator:
    """Calls the collator; if it asks for a column that `remove_unused_columns` dropped, says so.

    Trainer fails here with a bare `KeyError: 'text'` from inside the collator.
    """

    def __init__(self, collator: Callable, removed: list[str], model_name: str):
        self.collator, self.removed, self.model_name = collator, set(removed), model_name

    def __call__(self, features):
        try:
            return self.collator(features)
        except KeyError as err:
            key = err.args[0] if err.args else None
            if key in self.removed:
                raise KeyError(
                    f"The data collator needs the column {key!r}, but remove_unused_columns=True dropped it "
                    f"because {self.model_name}.forward does not take it. Set "
                    "TrainingArguments(remove_unused_columns=False), or tokenize the column before training."
                ) from err
            raise

    def __getattr__(self, name):  # a collator's own attributes (tokenizer, ...) stay reachable
        if "collator" not in self.__dict__:  # being unpickled (DataLoader workers with spawn): no attributes yet
            raise AttributeError(name)
        return getattr(self.__dict__["collator"], name)
