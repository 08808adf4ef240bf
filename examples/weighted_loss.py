"""Recipe: a class-weighted cross-entropy, through `compute_loss`.

When one class is rare, weighting its examples up in the loss is the simplest counter-measure. The loss is
the one thing `compute_loss` decides, so that is the hook to override; everything else (accumulation,
clipping, logging, evaluation) stays the Trainer's. The same mixin makes a `transformers.Trainer` and a
`looptrain.Trainer` subclass:

    class WeightedTrainer(ClassWeightedLossMixin, looptrain.Trainer): ...
    trainer = WeightedTrainer(model, args, train_dataset=..., class_weights=[1.0, 6.0])

    python examples/weighted_loss.py [--library transformers]
"""

from __future__ import annotations

import torch
from torch import nn


class ClassWeightedLossMixin:
    """Cross-entropy with one weight per class. Put it before the Trainer class in the bases."""

    # The loss below is a mean over this micro-batch, so `training_step` must divide it by the number of
    # accumulated micro-batches. Left at None, Trainer would not: BERT's forward takes **kwargs, so Trainer
    # assumes the loss was already normalised with `num_items_in_batch` (transformers#47688).
    loss_is_scaled_for_ga = False

    def __init__(self, *args, class_weights=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.class_weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)  # the caller's batch is left as it was
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        loss = nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), weight=weight)
        return (loss, outputs) if return_outputs else loss


def weighted_trainer_class(base):
    """`ClassWeightedLossMixin` on top of `base` (`looptrain.Trainer`, `transformers.Trainer` or a subclass)."""
    return type(f"ClassWeighted{base.__name__}", (ClassWeightedLossMixin, base), {})


def class_weights_for(labels, num_classes: int) -> list[float]:
    """Inverse-frequency weights, scaled so that the most frequent class weighs 1."""
    counts = torch.bincount(torch.as_tensor(labels), minlength=num_classes).float().clamp(min=1)
    return (counts.max() / counts).tolist()


def main(argv=None):
    import toy

    options = toy.recipe_options(__doc__.splitlines()[0], argv)
    Trainer, TrainingArguments = toy.trainer_classes(options.library)
    tokenizer = toy.toy_tokenizer()
    train, evals = (
        toy.toy_sentiment(96, seed=1, tokenizer=tokenizer),
        toy.toy_sentiment(32, seed=2, tokenizer=tokenizer),
    )
    weights = class_weights_for(train["label"], num_classes=2)
    trainer = weighted_trainer_class(Trainer)(
        model=toy.tiny_bert(len(tokenizer)),
        args=toy.toy_arguments(TrainingArguments, options, eval_strategy="epoch", gradient_accumulation_steps=2),
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tokenizer,
        class_weights=weights,
    )
    trainer.train()
    print(
        f"{type(trainer).__name__}: class weights {[round(w, 2) for w in weights]}, "
        f"final eval_loss (weighted) {[e for e in trainer.state.log_history if 'eval_loss' in e][-1]['eval_loss']:.4f}"
    )
    return trainer


if __name__ == "__main__":
    main()
