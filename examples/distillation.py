"""Recipe: knowledge distillation, a small student learning from a trained teacher, through `compute_loss`.

The student's loss mixes the usual cross-entropy on the labels with the KL divergence between the
teacher's and the student's temperature-softened class distributions (Hinton et al., 2015):

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

Only the loss changes, so `compute_loss` is the hook. The teacher is an ordinary attribute of the trainer:
it is not given to the optimizer, not prepared by accelerate, runs in eval mode (no dropout, so it draws
nothing from the random generator) and under `torch.no_grad()`. The same mixin serves both libraries.

    python examples/distillation.py [--library transformers]
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def distillation_kl(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the softened distributions, averaged over the examples. The T^2 keeps
    its gradients on the scale of the cross-entropy's whatever the temperature."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")
    return kl * temperature**2


class DistillationMixin:
    """`Trainer(..., teacher_model=teacher, temperature=2.0, alpha=0.5)`."""

    loss_is_scaled_for_ga = False  # a per-batch mean: let training_step divide it over accumulation

    def __init__(self, *args, teacher_model, temperature: float = 2.0, alpha: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher_model.to(self.args.device).eval()
        self.teacher_model.requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)  # with labels in inputs, outputs.loss is the student's cross-entropy
        with torch.no_grad():
            teacher_logits = self.teacher_model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        kl = distillation_kl(outputs.logits, teacher_logits, self.temperature)
        loss = self.alpha * outputs.loss + (1 - self.alpha) * kl
        return (loss, outputs) if return_outputs else loss


def distillation_trainer_class(base):
    return type(f"Distillation{base.__name__}", (DistillationMixin, base), {})


def main(argv=None):
    import toy

    options = toy.recipe_options(__doc__.splitlines()[0], argv)
    Trainer, TrainingArguments = toy.trainer_classes(options.library)
    tokenizer = toy.toy_tokenizer()
    train = toy.toy_sentiment(128, seed=1, tokenizer=tokenizer)
    evals = toy.toy_sentiment(48, seed=2, tokenizer=tokenizer)

    def accuracy(eval_pred):
        logits, labels = eval_pred
        return {"accuracy": float((logits.argmax(-1) == labels).mean())}

    # 1. The teacher: a wider model, trained the ordinary way.
    teacher_trainer = Trainer(
        model=toy.tiny_bert(len(tokenizer), seed=1, hidden=64),
        args=toy.toy_arguments(TrainingArguments, options, "teacher", num_train_epochs=4),
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tokenizer,
        compute_metrics=accuracy,
    )
    teacher_trainer.train()
    print("teacher:", teacher_trainer.evaluate())

    # 2. The student: one layer, half the width, trained on the labels and the teacher's distributions.
    student_trainer = distillation_trainer_class(Trainer)(
        model=toy.tiny_bert(len(tokenizer), seed=2, layers=1, hidden=32),
        args=toy.toy_arguments(TrainingArguments, options, "student", num_train_epochs=4),
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tokenizer,
        compute_metrics=accuracy,
        teacher_model=teacher_trainer.model,
        temperature=2.0,
        alpha=0.5,
    )
    student_trainer.train()
    print("student:", student_trainer.evaluate())  # its eval_loss is the distillation loss too
    return student_trainer


if __name__ == "__main__":
    main()
