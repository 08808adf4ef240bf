"""Token classification (named entities) from json-lines files `{"tokens": [...], "tags": [...]}`, in the
manner of transformers' example scripts. Words are split into sub-tokens; the first sub-token of a word
carries the word's tag and the others -100 (ignored by the loss and the metrics).
`DataCollatorForTokenClassification` pads the labels with -100. With --do_predict the predicted tags are
written to predictions.txt, one sentence per line.

    python run_ner.py --model_name_or_path DIR --train_file train.json --validation_file dev.json \
        --test_file test.json --output_dir out --do_train --do_eval --do_predict [--trainer_impl looptrain]
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
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
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
    cache_dir: str | None = None


@dataclass
class DataArguments:
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    max_seq_length: int = 64
    label_all_tokens: bool = field(default=False, metadata={"help": "Tag every sub-token, not only a word's first."})


def entity_scores(true_tags: list[list[str]], predicted_tags: list[list[str]]) -> dict:
    """Tag accuracy, and precision/recall/F1 over the words not tagged "O"."""
    pairs = [(t, p) for ts, ps in zip(true_tags, predicted_tags) for t, p in zip(ts, ps)]
    hits = sum(t == p != "O" for t, p in pairs)
    predicted = sum(p != "O" for _, p in pairs)
    actual = sum(t != "O" for t, _ in pairs)
    precision = hits / predicted if predicted else 0.0
    recall = hits / actual if actual else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "accuracy": sum(t == p for t, p in pairs) / len(pairs),
    }


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

    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    raw = load_dataset("json", data_files={k: v for k, v in files.items() if v}, cache_dir=model_args.cache_dir)

    label_list = sorted({tag for tags in raw["train"]["tags"] for tag in tags})
    label_to_id = {tag: i for i, tag in enumerate(label_list)}
    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        num_labels=len(label_list),
        id2label=dict(enumerate(label_list)),
        label2id=label_to_id,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForTokenClassification.from_pretrained(model_args.model_name_or_path, config=config)

    def tokenize_and_align(batch):
        encoded = tokenizer(
            batch["tokens"], is_split_into_words=True, truncation=True, max_length=data_args.max_seq_length
        )
        all_labels = []
        for row, tags in enumerate(batch["tags"]):
            labels, previous_word = [], None
            for word in encoded.word_ids(batch_index=row):
                if word is None:  # [CLS], [SEP]
                    labels.append(-100)
                elif word != previous_word or data_args.label_all_tokens:
                    labels.append(label_to_id[tags[word]])
                else:
                    labels.append(-100)
                previous_word = word
            all_labels.append(labels)
        encoded["labels"] = all_labels
        return encoded

    with training_args.main_process_first(desc="tokenizing and aligning the tags"):
        tokenized = raw.map(
            tokenize_and_align, batched=True, remove_columns=raw["train"].column_names, desc="Tokenizing"
        )

    def to_tags(predictions, label_ids):
        predicted, true = [], []
        for pred_row, label_row in zip(np.argmax(predictions, axis=-1), label_ids):
            kept = label_row != -100
            predicted.append([label_list[p] for p in pred_row[kept]])
            true.append([label_list[t] for t in label_row[kept]])
        return predicted, true

    def compute_metrics(eval_pred):
        predicted, true = to_tags(eval_pred.predictions, eval_pred.label_ids)
        return entity_scores(true, predicted)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"] if training_args.do_train else None,
        eval_dataset=tokenized["validation"] if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=DataCollatorForTokenClassification(tokenizer),
        compute_metrics=compute_metrics,
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

    if training_args.do_predict:
        # Rows of different lengths come back padded with -100 to the longest one.
        predictions, label_ids, metrics = trainer.predict(tokenized["test"], metric_key_prefix="predict")
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        predicted, _ = to_tags(predictions, label_ids)
        if trainer.is_world_process_zero():
            with open(os.path.join(training_args.output_dir, "predictions.txt"), "w") as f:
                f.writelines(" ".join(tags) + "\n" for tags in predicted)

    card = {"finetuned_from": model_args.model_name_or_path, "tasks": "token-classification"}
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)


if __name__ == "__main__":
    main()
