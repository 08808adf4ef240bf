"""Recipe: a TRL-style trainer for causal language models: a token-level loss normalised by
`num_items_in_batch`, and extra metrics merged into the logs.

Trainers in the style of TRL's SFTTrainer compute the loss themselves in `compute_loss` and report more
than the loss (here the share of next tokens the model predicts right). Two hooks:

  * `compute_loss(model, inputs, return_outputs, num_items_in_batch)`: before each accumulation window,
    `train()` counts the label tokens of the whole window (`labels != -100`, shifted by one for causal
    LMs) and passes that count to every micro-batch of the window. Dividing each micro-batch's *sum* of
    token losses by it makes the window's gradients those of one big batch: every token weighs the same,
    however the tokens are spread over micro-batches, and gradient accumulation does not change the
    result. `training_step` must then not divide again: Trainer decides that by itself (the model
    takes `**kwargs`, and `num_items_in_batch` was given), so `loss_is_scaled_for_ga` stays None.
    With several processes and `average_tokens_across_devices` (the default), the count covers all of
    them and the loss is scaled back up by the number of processes, as in Trainer's `compute_loss`.
    In evaluation Trainer passes the count of the batch alone: the loss is the batch's token mean.
  * `log(logs, start_time)`: metrics gathered in `compute_loss` are averaged and added to the entry
    before Trainer records it, `mean_token_accuracy` to training logs, `eval_mean_token_accuracy` to
    evaluation logs.

    python examples/trl_style.py [--library transformers]
"""

from __future__ import annotations

from torch.nn import functional as F


def token_loss_sum_and_counts(logits, labels):
    """Sum of next-token cross-entropies over the label tokens, their count, and how many were predicted right."""
    logits, labels = logits[:, :-1, :], labels[:, 1:]  # position t predicts token t + 1
    mask = labels != -100
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    correct = ((logits.argmax(-1) == labels) & mask).sum()
    return loss_sum, mask.sum(), correct


class TokenLevelLossMixin:
    """Token-mean causal-LM loss over each accumulation window, and token accuracy in the logs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._token_accuracy = {"train": [], "eval": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)  # no labels: the model computes no loss of its own
        loss_sum, num_tokens, correct = token_loss_sum_and_counts(outputs.logits, labels)
        if num_items_in_batch is not None:
            loss = loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices:
                # The count is then summed over all processes, and DDP averages the gradients over them:
                # scaling back up by the number of processes makes the result the global token mean, as
                # Trainer's own compute_loss does. A multiplication by 1 on one process.
                loss = loss * self.accelerator.num_processes
        else:
            loss = loss_sum / num_tokens.clamp(min=1)
        mode = "train" if model.training else "eval"
        self._token_accuracy[mode].append((correct / num_tokens.clamp(min=1)).item())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        values = self._token_accuracy[mode]
        if values:
            logs[("eval_" if mode == "eval" else "") + "mean_token_accuracy"] = sum(values) / len(values)
            values.clear()
        super().log(logs, start_time)


def token_level_trainer_class(base):
    return type(f"TokenLevel{base.__name__}", (TokenLevelLossMixin, base), {})


def main(argv=None):
    import toy

    options = toy.recipe_options(__doc__.splitlines()[0], argv)
    Trainer, TrainingArguments = toy.trainer_classes(options.library)
    trainer = token_level_trainer_class(Trainer)(
        model=toy.tiny_gpt2(),
        args=toy.toy_arguments(
            TrainingArguments,
            options,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=4,
            num_train_epochs=3,
            eval_strategy="epoch",
            learning_rate=5e-3,
        ),
        train_dataset=toy.toy_counting(64, seed=1),
        eval_dataset=toy.toy_counting(16, seed=2),
        data_collator=toy.pad_for_causal_lm,
    )
    trainer.train()
    for entry in trainer.state.log_history:
        shown = {k: round(v, 4) for k, v in entry.items() if "loss" in k or "accuracy" in k}
        if shown:
            print(f"step {entry['step']:3d}: {shown}")
    return trainer


if __name__ == "__main__":
    main()
