"""Summarization or translation with an encoder-decoder model, in the manner of transformers' example scripts:
`Seq2SeqTrainer`, `DataCollatorForSeq2Seq` (labels padded with -100, decoder inputs made by the model), and
with --predict_with_generate the evaluation and prediction *generate* text, which is scored (exact match and
word-overlap F1, plus the mean generated length) and written to generated_predictions.txt.

Summarization reads csv/json-lines columns `--text_column` / `--summary_column`; translation reads
`{"translation": {"<source_lang>": ..., "<target_lang>": ...}}` rows when --source_lang/--target_lang are given.

    python run_seq2seq.py --model_name_or_path DIR --train_file train.csv --validation_file dev.csv \
        --test_file test.csv --output_dir out --do_train --do_eval --do_predict --predict_with_generate \
        [--trainer_impl looptrain]
"""

import argparse
import collections
import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import numpy as np
import transformers
from datasets import load_dataset
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, HfArgumentParser, set_seed
from transformers.trainer_utils import get_last_checkpoint

# --- the only lines that differ between the runs tests/test_scripts_style.py compares ---------------------
_impl = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
_impl.add_argument("--trainer_impl", choices=["transformers", "looptrain", "mixed"], default="transformers")
TRAINER_IMPL, ARGV = _impl.parse_known_args()
if TRAINER_IMPL.trainer_impl == "transformers":
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments
elif TRAINER_IMPL.trainer_impl == "looptrain":
    from looptrain import Seq2SeqTrainer, Seq2SeqTrainingArguments
else:  # looptrain's Trainer driven by transformers' own Seq2SeqTrainingArguments
    from transformers import Seq2SeqTrainingArguments

    from looptrain import Seq2SeqTrainer
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
    text_column: str = "text"
    summary_column: str = "summary"
    source_lang: str | None = field(default=None, metadata={"help": "Translation: the key of the source text."})
    target_lang: str | None = None
    source_prefix: str = field(default="", metadata={"help": "Prepended to every source text (T5's task prefix)."})
    max_source_length: int = 64
    max_target_length: int = 16
    num_beams: int | None = field(default=None, metadata={"help": "Beams for evaluate/predict's generation."})


def overlap_scores(predictions: list[str], references: list[str]) -> dict:
    """Exact match and word-overlap F1 (in percent)."""
    exact, f1 = [], []
    for predicted, reference in zip(predictions, references):
        guess, truth = predicted.split(), reference.split()
        exact.append(float(guess == truth))
        common = sum((collections.Counter(guess) & collections.Counter(truth)).values())
        f1.append(2 * common / (len(guess) + len(truth)) if common else 0.0)
    return {"exact_match": 100 * float(np.mean(exact)), "overlap_f1": 100 * float(np.mean(f1))}


def main():
    parser = HfArgumentParser((ModelArguments, DataArguments, Seq2SeqTrainingArguments))
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
    files = {split: path for split, path in files.items() if path}
    extension = next(iter(files.values())).rsplit(".", 1)[-1]
    raw = load_dataset(
        "json" if extension in ("json", "jsonl") else extension, data_files=files, cache_dir=model_args.cache_dir
    )

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path)

    def pairs(batch):
        if data_args.source_lang is not None:
            sources = [row[data_args.source_lang] for row in batch["translation"]]
            targets = [row[data_args.target_lang] for row in batch["translation"]]
        else:
            sources, targets = batch[data_args.text_column], batch[data_args.summary_column]
        return [data_args.source_prefix + s for s in sources], targets

    def tokenize(batch):
        sources, targets = pairs(batch)
        encoded = tokenizer(sources, max_length=data_args.max_source_length, truncation=True)
        encoded["labels"] = tokenizer(text_target=targets, max_length=data_args.max_target_length, truncation=True)[
            "input_ids"
        ]
        return encoded

    tokenized = {}
    for split, wanted in (
        ("train", training_args.do_train),
        ("validation", training_args.do_eval),
        ("test", training_args.do_predict),
    ):
        if wanted:
            with training_args.main_process_first(desc=f"tokenizing {split}"):
                tokenized[split] = raw[split].map(
                    tokenize, batched=True, remove_columns=raw[split].column_names, desc=f"Tokenizing {split}"
                )

    # The model makes decoder_input_ids from the padded labels (shifted right).
    collator = DataCollatorForSeq2Seq(
        tokenizer, model=model, label_pad_token_id=-100, pad_to_multiple_of=8 if training_args.fp16 else None
    )

    def decode(ids):
        ids = np.where(ids != -100, ids, tokenizer.pad_token_id)  # padding between batches is -100
        return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def compute_metrics(eval_pred):
        predictions, labels = eval_pred
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        scores = overlap_scores(decode(predictions), decode(labels))
        generated = np.where(predictions != -100, predictions, tokenizer.pad_token_id)
        scores["gen_len"] = float(np.mean(np.count_nonzero(generated != tokenizer.pad_token_id, axis=1)))
        return {key: round(value, 4) for key, value in scores.items()}

    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized.get("train"),
        eval_dataset=tokenized.get("validation"),
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics if training_args.predict_with_generate else None,
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

    max_length = training_args.generation_max_length or data_args.max_target_length
    num_beams = data_args.num_beams or training_args.generation_num_beams
    if training_args.do_eval:
        metrics = trainer.evaluate(max_length=max_length, num_beams=num_beams, metric_key_prefix="eval")
        metrics["eval_samples"] = len(tokenized["validation"])
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.do_predict:
        output = trainer.predict(
            tokenized["test"], metric_key_prefix="predict", max_length=max_length, num_beams=num_beams
        )
        metrics = output.metrics
        metrics["predict_samples"] = len(tokenized["test"])
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        if trainer.is_world_process_zero() and training_args.predict_with_generate:
            with open(os.path.join(training_args.output_dir, "generated_predictions.txt"), "w") as f:
                f.write("\n".join(decode(output.predictions)))

    task = "translation" if data_args.source_lang is not None else "summarization"
    card = {"finetuned_from": model_args.model_name_or_path, "tasks": task}
    if data_args.source_lang is not None:
        card["language"] = [data_args.source_lang, data_args.target_lang]
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)


if __name__ == "__main__":
    main()
