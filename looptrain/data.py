"""Data: which columns reach the model, which collator batches them, which sampler orders them.

Everything here reproduces `transformers.Trainer` 5.24 (`trainer.py:1007-1245`); the DataLoader itself is
handed to `accelerate.Accelerator.prepare`, which swaps the random sampler for its `SeedableRandomSampler`
(order of epoch e = `randperm(n, generator=manual_seed(seed + e))`) and shards batches across processes.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Callable

import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase, default_data_collator
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import RemoveColumnsCollator, seed_worker

try:
    import datasets
except ImportError:  # datasets is optional for users who bring torch datasets
    datasets = None


def default_collator(processing_class) -> Callable:
    """Trainer's default: pad with the tokenizer when there is one, else stack (`default_data_collator`)."""
    if isinstance(processing_class, (PreTrainedTokenizerBase, SequenceFeatureExtractor)):
        return DataCollatorWithPadding(processing_class)
    return default_data_collator


def signature_columns(model, label_names: list[str]) -> list[str]:
    """Columns the model can take: forward's parameters, the label names, and `label`/`label_ids`
    (the collator renames those to `labels`). Trainer 5.24 `_set_signature_columns_if_needed`."""
    columns = list(inspect.signature(model.forward).parameters)
    return columns + sorted(set(["label", "label_ids"] + list(label_names)))


def has_length(dataset) -> bool:
    """Whether `len(dataset)` works (an IterableDataset or a generator has no length)."""
    try:
        return len(dataset) is not None
    except TypeError:
        return False


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


def build_dataloader(trainer, dataset, batch_size: int, sampler, is_training: bool, description: str) -> DataLoader:
    """The DataLoader Trainer builds (`_get_dataloader`), prepared by accelerate.

    Unused columns of a `datasets.Dataset` are removed with `remove_columns` (a cheap view);
    other datasets get their feature dicts filtered by transformers' `RemoveColumnsCollator`.
    """
    args = trainer.args
    collator = trainer.data_collator
    if args.remove_unused_columns:
        keep = trainer._get_signature_columns()
        model_name = type(trainer.model).__name__
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            removed = [c for c in dataset.column_names if c not in keep]
            if len(removed) == len(dataset.column_names):
                raise ValueError(
                    f"No column of the {description} dataset ({', '.join(dataset.column_names)}) is an argument of "
                    f"{model_name}.forward ({', '.join(keep)}). Tokenize the data first, or set "
                    "remove_unused_columns=False."
                )
            dataset = dataset.remove_columns(removed)
            collator = ColumnCheckingCollator(collator, removed, model_name)
        else:
            collator = RemoveColumnsCollator(collator, keep, model_name=model_name, description=description)

    params = dict(
        batch_size=batch_size,
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory,
        persistent_workers=args.dataloader_persistent_workers,
        prefetch_factor=args.dataloader_prefetch_factor,
    )
    if not isinstance(dataset, IterableDataset):
        if sampler is not None:
            params["sampler"] = sampler
        params["drop_last"] = args.dataloader_drop_last
        if is_training:  # each worker re-seeds itself, as in Trainer
            params["worker_init_fn"] = partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index)
    return trainer.accelerator.prepare(DataLoader(dataset, **params))


def train_sampler(args, dataset, processing_class):
    """`RandomSampler` (accelerate replaces it with its seedable one), or sequential / length-grouped."""
    if dataset is None or not has_length(dataset):
        return None
    if args.train_sampling_strategy == "sequential":
        return SequentialSampler(dataset)
    if args.train_sampling_strategy == "group_by_length":
        return LengthGroupedSampler(
            args.train_batch_size * args.gradient_accumulation_steps,
            dataset=dataset,
            lengths=_lengths_column(args, dataset),
            model_input_name=processing_class.model_input_names[0] if processing_class is not None else None,
        )
    return RandomSampler(dataset)


def eval_sampler(args, dataset, processing_class):
    """Sequential on one process; on several, accelerate shards the data itself (None)."""
    if dataset is None or not has_length(dataset):
        return None
    if args.train_sampling_strategy == "group_by_length":  # Trainer groups eval batches too, with a fixed seed
        return LengthGroupedSampler(
            args.eval_batch_size,
            dataset=dataset,
            lengths=_lengths_column(args, dataset),
            model_input_name=processing_class.model_input_names[0] if processing_class is not None else None,
            generator=torch.Generator().manual_seed(args.data_seed if args.data_seed is not None else args.seed),
        )
    return SequentialSampler(dataset) if args.world_size <= 1 else None


def _lengths_column(args, dataset):
    if datasets is not None and isinstance(dataset, datasets.Dataset) and args.length_column_name in dataset.column_names:
        return dataset[args.length_column_name]
    return None


def first_example_keys(dataset) -> set[str] | None:
    """Keys of the first example, read without collating (so no RNG is consumed), or None if unknown."""
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        return set(dataset.column_names)
    if isinstance(dataset, IterableDataset) or not has_length(dataset) or len(dataset) == 0:
        return None
    example = dataset[0]
    return set(example.keys()) if hasattr(example, "keys") else None
