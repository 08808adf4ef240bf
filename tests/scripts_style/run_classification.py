"""Sentence(-pair) classification from csv or json-lines files, written the way transformers' example scripts
are: arguments as dataclasses (command line or one JSON file), tokenization in `dataset.map`, then
train / evaluate / predict with a Trainer, results and predictions written next to the model.

    python run_classification.py --model_name_or_path DIR --train_file train.csv --validation_file dev.csv \
        --test_file test.csv --output_dir out --do_train --do_eval --do_predict [--trainer_impl looptrain]
    python run_classification.py args.json [--trainer_impl looptrain]

A file needs a `label` column and one (`sentence`) or two (`sentence1`, `sentence2`) text columns.
"""

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import numpy as np
import transformers
from datasets import load_dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    set_seed,
)
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


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A local folder with a config, weights and a tokenizer."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where `datasets` keeps what it prepares."})


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "csv or json lines"})
    validation_file: str | None = None
    test_file: str | None = field(default=None, metadata={"help": "Labels in it, if any, are ignored."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = None

    def __post_init__(self):
        if self.train_file is None and self.validation_file is None:
            raise ValueError("Give at least --train_file or --validation_file.")


def parse_arguments():
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if len(ARGV) == 1 and ARGV[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(ARGV[0]))
    return parser.parse_args_into_dataclasses(args=ARGV)


def accuracy(eval_pred):
    predictions = np.argmax(eval_pred.predictions, axis=-1)
    return {"accuracy": float((predictions == eval_pred.label_ids).mean())}


def main():
    model_args, data_args, training_args = parse_arguments()

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler(sys.stdout)]
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"Training arguments: {training_args}")

    # An output folder holding checkpoints means an interrupted run: continue it.
    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
            logger.info(f"Resuming from {last_checkpoint}.")

    set_seed(training_args.seed)

    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    files = {split: path for split, path in files.items() if path is not None}
    extension = next(iter(files.values())).rsplit(".", 1)[-1]
    raw = load_dataset("json" if extension == "jsonl" else extension, data_files=files, cache_dir=model_args.cache_dir)

    labeled = raw["train"] if "train" in raw else raw["validation"]
    label_list = sorted(set(labeled["label"]))
    label_to_id = {label: i for i, label in enumerate(label_list)}
    text_columns = ("sentence1", "sentence2") if "sentence2" in labeled.column_names else ("sentence", None)

    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        num_labels=len(label_list),
        label2id={str(label): i for label, i in label_to_id.items()},
        id2label={i: str(label) for label, i in label_to_id.items()},
    )
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, config=config)
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)

    def tokenize(batch):
        first, second = text_columns
        texts = (batch[first],) if second is None else (batch[first], batch[second])
        encoded = tokenizer(*texts, truncation=True, max_length=max_seq_length)
        if "label" in batch:
            encoded["label"] = [label_to_id.get(label, -1) for label in batch["label"]]
        return encoded

    with training_args.main_process_first(desc="tokenizing the splits"):
        raw = raw.map(tokenize, batched=True, desc="Tokenizing")

    train_dataset = raw["train"] if training_args.do_train else None
    if train_dataset is not None and data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    eval_dataset = raw["validation"] if training_args.do_eval else None

    # Dynamic padding: each batch is padded to its longest row (to a multiple of 8 in half precision).
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if training_args.fp16 else None)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=accuracy,
    )

    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.do_predict:
        test_dataset = raw["test"].remove_columns([c for c in ("label",) if c in raw["test"].column_names])
        output = trainer.predict(test_dataset, metric_key_prefix="predict")
        predicted = np.argmax(output.predictions, axis=-1)
        if trainer.is_world_process_zero():
            with open(os.path.join(training_args.output_dir, "predict_results.txt"), "w") as f:
                f.write("index\tprediction\n")
                for i, p in enumerate(predicted):
                    f.write(f"{i}\t{label_list[p]}\n")

    card = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-classification"}
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)


if __name__ == "__main__":
    main()
