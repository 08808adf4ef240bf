"""Recipe: your own order of the training examples, through `get_train_dataloader`.

A curriculum: the first epoch goes from the shortest example to the longest, later epochs are shuffled.
`train()` asks `get_train_dataloader()` for its batches once, at the start, and calls the loader's
`set_epoch(epoch)` before each epoch (accelerate hands that on to the sampler). There are two places to
put a sampler:

  * `ShortestFirstMixin` overrides `_get_train_sampler`, the method `get_train_dataloader` asks for its
    sampler. Everything else stays the Trainer's: unused columns removed, the collator, worker seeding,
    `accelerator.prepare` (device placement, sharding over processes). The usual choice; the method is
    private in both libraries, with the same signature.
  * `ShortestFirstLoaderMixin` overrides `get_train_dataloader` itself, the public hook, and so builds the
    DataLoader: it must drop the columns the model does not take and call `self.accelerator.prepare`.
    For when the loader itself must change (a batch sampler, your own collation).

    python examples/custom_sampler.py [--library transformers]
"""

from __future__ import annotations

import inspect

import torch
from torch.utils.data import DataLoader, Sampler


class ShortestFirstSampler(Sampler[int]):
    """Epoch 0: indices by increasing length (ties in index order). Epoch e > 0: `randperm(n)` from
    a generator seeded with `seed + e`, so a run is reproducible and resumable."""

    def __init__(self, lengths: list[int], seed: int = 0):
        self.lengths, self.seed, self.epoch = list(lengths), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        if epoch == 0:
            return sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], i))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.lengths), generator=generator).tolist()

    def __iter__(self):
        return iter(self.order(self.epoch))

    def __len__(self) -> int:
        return len(self.lengths)


def lengths_of(dataset, column: str = "input_ids") -> list[int]:
    return [len(ids) for ids in dataset[column]]


class ShortestFirstMixin:
    """The sampler through `_get_train_sampler`; `get_train_dataloader` does the rest."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        return ShortestFirstSampler(lengths_of(dataset), seed=self.args.seed)


class ShortestFirstLoaderMixin:
    """The whole training DataLoader, through `get_train_dataloader`."""

    def get_train_dataloader(self):
        dataset = self.train_dataset
        # What Trainer's `remove_unused_columns=True` does: keep what forward takes (and the labels).
        accepted = set(inspect.signature(self.model.forward).parameters) | {"label", "label_ids", "labels"}
        dataset = dataset.remove_columns([c for c in dataset.column_names if c not in accepted])
        loader = DataLoader(
            dataset,
            batch_size=self.args.per_device_train_batch_size,
            sampler=ShortestFirstSampler(lengths_of(dataset), seed=self.args.seed),
            collate_fn=self.data_collator,
            drop_last=self.args.dataloader_drop_last,
        )
        return self.accelerator.prepare(loader)


def with_mixin(mixin, base):
    return type(f"{mixin.__name__.removesuffix('Mixin')}{base.__name__}", (mixin, base), {})


def main(argv=None):
    import toy

    options = toy.recipe_options(__doc__.splitlines()[0], argv)
    Trainer, TrainingArguments = toy.trainer_classes(options.library)
    tokenizer = toy.toy_tokenizer()
    train = toy.toy_sentiment(48, seed=1, tokenizer=tokenizer)
    trainer = with_mixin(ShortestFirstMixin, Trainer)(
        model=toy.tiny_bert(len(tokenizer)),
        args=toy.toy_arguments(TrainingArguments, options),
        train_dataset=train,
        processing_class=tokenizer,
    )
    loader = trainer.get_train_dataloader()
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        widths = [batch["input_ids"].shape[1] for batch in loader]
        print(f"epoch {epoch}: padded batch widths {widths}")
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
