"""Recipe: your own optimizer and learning-rate schedule, through `create_optimizer` and `create_scheduler`.

Fine-tuning often gives the layers near the input smaller steps than the new head ("layer-wise learning
rate decay"), and long runs often prefer an inverse-square-root schedule to Trainer's linear decay to zero.
`train()` calls `create_optimizer()` once, before the model is prepared, and then
`create_scheduler(num_training_steps, optimizer)` once it knows how many optimizer steps the run has:
those are the two hooks. Both keep Trainer's contract: build only when `self.optimizer` /
`self.lr_scheduler` is still None (a pair passed as `Trainer(optimizers=...)` wins), store and return it.

    python examples/custom_optimizer.py [--library transformers]
"""

from __future__ import annotations

import math
import re

import torch

LAYER_INDEX = re.compile(r"\.(?:layer|layers|h)\.(\d+)\.")  # BERT: encoder.layer.3., GPT-2: transformer.h.3.


def layer_depth(name: str, num_layers: int) -> int:
    """0 for embeddings, i + 1 for transformer block i, num_layers + 1 for the rest (pooler, head)."""
    found = LAYER_INDEX.search(name)
    if found:
        return int(found.group(1)) + 1
    if "embed" in name or ".wte." in name or ".wpe." in name:
        return 0
    return num_layers + 1


class LayerwiseLrMixin:
    """AdamW with layer-wise learning-rate decay, and inverse-square-root decay after a linear warmup."""

    layer_lr_decay = 0.5  # each block down from the head trains at half the learning rate of the one above

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            num_layers = model.config.num_hidden_layers
            decays = set(self.get_decay_parameter_names(model))  # Trainer's rule: no decay for biases and norms
            groups = {}
            for name, param in model.named_parameters():
                if not param.requires_grad:
                    continue
                depth = layer_depth(name, num_layers)
                key = (depth, name in decays)
                if key not in groups:
                    groups[key] = {
                        "params": [],
                        "lr": self.args.learning_rate * self.layer_lr_decay ** (num_layers + 1 - depth),
                        "weight_decay": self.args.weight_decay if name in decays else 0.0,
                    }
                groups[key]["params"].append(param)
            # Head first: Trainer logs the learning rate of param_groups[0].
            ordered = [groups[key] for key in sorted(groups, key=lambda k: (-k[0], not k[1]))]
            betas = (self.args.adam_beta1, self.args.adam_beta2)
            self.optimizer = torch.optim.AdamW(
                ordered, lr=self.args.learning_rate, betas=betas, eps=self.args.adam_epsilon
            )
        return self.optimizer

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            warmup = max(self.args.get_warmup_steps(num_training_steps), 1)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer if optimizer is None else optimizer, lambda step: inverse_sqrt(step, warmup)
            )
        return self.lr_scheduler


def inverse_sqrt(step: int, warmup: int) -> float:
    """The factor on each group's learning rate at optimizer step `step` (0-based): linear up to 1 at
    `warmup`, then sqrt(warmup / step)."""
    if step < warmup:
        return (step + 1) / warmup
    return math.sqrt(warmup / max(step, 1))


def layerwise_trainer_class(base):
    return type(f"Layerwise{base.__name__}", (LayerwiseLrMixin, base), {})


def main(argv=None):
    import toy

    options = toy.recipe_options(__doc__.splitlines()[0], argv)
    Trainer, TrainingArguments = toy.trainer_classes(options.library)
    tokenizer = toy.toy_tokenizer()
    trainer = layerwise_trainer_class(Trainer)(
        model=toy.tiny_bert(len(tokenizer)),
        args=toy.toy_arguments(TrainingArguments, options, warmup_steps=3, weight_decay=0.01),
        train_dataset=toy.toy_sentiment(64, seed=1, tokenizer=tokenizer),
        processing_class=tokenizer,
    )
    trainer.train()
    for group in trainer.optimizer.param_groups:
        print(f"  lr {group['lr']:.2e}  weight_decay {group['weight_decay']}  tensors {len(group['params'])}")
    print(
        "logged learning rates:",
        [f"{e['learning_rate']:.2e}" for e in trainer.state.log_history if "learning_rate" in e],
    )
    return trainer


if __name__ == "__main__":
    main()
