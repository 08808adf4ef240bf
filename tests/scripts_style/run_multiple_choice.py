"""Multiple choice (SWAG-like csv: `context`, `start`, `ending0`..`ending3`, `label`), in the manner of
transformers' example scripts. Each example becomes four (context, start + ending) pairs; a collator written
here pads the flattened pairs together and folds them back to (batch, 4, length) tensors.

    python run_multiple_choice.py --model_name_or_path DIR --train_file train.csv --validation_file dev.csv \
        --output_dir out --do_train --do_eval [--trainer_impl looptrain]
"""

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
import transformers
from datasets import load_dataset
from transformers import AutoModelForMultipleChoice, AutoTokenizer, HfArgumentParser, PreTrainedTokenizerBase, set_seed
from transformers.trainer_utils import get_last_checkpoint

# --- the only lines that differ between the runs tests/test_scripts_style.py compares ---------------------
_impl = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
_impl.add_argument("--trainer_impl", choices=["transformers", "looptrain", "mixed"], default="transformers")
TRAINER_IMPL, ARGV = _impl.parse_known_args()
if TRAINER_IMPL.trainer_impl == "transformers":
    from transformers import Trainer, TrainingArguments
elif TRAINER_IMPL.trainer_impl == "looptrain":
    from looptrain import Trainer, TrainingArguments
else:  # looptrain's Trainer driven by transformers' own TrainingArguments
    from transformers import TrainingArguments

    from looptrain import Trainer
# ----------------------------------------------------------------------------------------------------------

logger = logging.getLogger(__name__)
ENDINGS = [f"ending{i}" for i in range(4)]


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A local folder with a config, weights and a tokenizer."})
    cache_dir: str | None = None


@dataclass
class DataArguments:
    train_file: str | None = None
    validation_file: str | None = None
    max_seq_length: int = 64
    pad_to_max_length: bool = field(default=False, metadata={"help": "Pad every pair to max_seq_length up front."})


@dataclass
class ChoicesCollator:
    """Pads the (batch x choices) pairs of a batch to one length and returns (batch, choices, length) tensors."""

    tokenizer: PreTrainedTokenizerBase
    pad_to_multiple_of: int | None = None

    def __call__(self, features):
        labels = [feature.pop("label") for feature in features]
        n_choices = len(features[0]["input_ids"])
        flat = [{key: values[i] for key, values in feature.items()} for feature in features for i in range(n_choices)]
        batch = self.tokenizer.pad(flat, padding=True, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
        batch = {key: tensor.view(len(features), n_choices, -1) for key, tensor in batch.items()}
        batch["labels"] = torch.tensor(labels, dtype=torch.int64)
        return batch


def main():
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if len(ARGV) == 1 and ARGV[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(ARGV[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=ARGV)

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler(sys.stdout)]
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)

    set_seed(training_args.seed)

    files = {"train": data_args.train_file, "validation": data_args.validation_file}
    raw = load_dataset("csv", data_files={k: v for k, v in files.items() if v}, cache_dir=model_args.cache_dir)

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForMultipleChoice.from_pretrained(model_args.model_name_or_path)

    def tokenize_choices(batch):
        contexts = [context for context in batch["context"] for _ in ENDINGS]
        continuations = [f"{start} {batch[e][row]}" for row, start in enumerate(batch["start"]) for e in ENDINGS]
        encoded = tokenizer(
            contexts,
            continuations,
            truncation=True,
            max_length=data_args.max_seq_length,
            padding="max_length" if data_args.pad_to_max_length else False,
        )
        # Fold the flat list back into one list of four per example.
        return {
            key: [values[i : i + len(ENDINGS)] for i in range(0, len(values), len(ENDINGS))]
            for key, values in encoded.items()
        }

    with training_args.main_process_first(desc="tokenizing the choices"):
        tokenized = raw.map(tokenize_choices, batched=True, desc="Tokenizing")

    def accuracy(eval_pred):
        return {"accuracy": float((np.argmax(eval_pred.predictions, axis=1) == eval_pred.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"] if training_args.do_train else None,
        eval_dataset=tokenized["validation"] if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=ChoicesCollator(tokenizer, pad_to_multiple_of=8 if training_args.fp16 else None),
        compute_metrics=accuracy,
    )

    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics = train_result.metrics
        metrics["train_samples"] = len(tokenized["train"])
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(tokenized["validation"])
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    card = {"finetuned_from": model_args.model_name_or_path, "tasks": "multiple-choice"}
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)


if __name__ == "__main__":
    main()
