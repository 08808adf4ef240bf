"""Masked language modelling on plain-text files, one example per non-empty line, in the manner of
transformers' example scripts. `DataCollatorForLanguageModeling` pads each batch and masks a fresh random
15% of its tokens every time it is called (so the masks follow torch's global random state, which both
trainers must advance in the same order). Evaluation reports the perplexity.

    python run_mlm.py --model_name_or_path DIR --train_file train.txt --validation_file dev.txt \
        --max_seq_length 16 --output_dir out --do_train --do_eval [--trainer_impl looptrain]
"""

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass, field

import datasets
import transformers
from datasets import load_dataset
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
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
    train_file: str | None = field(default=None, metadata={"help": "Plain text, one example per line."})
    validation_file: str | None = None
    max_seq_length: int = field(default=128, metadata={"help": "Longer lines are truncated."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Share of the tokens to mask."})


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
    raw = load_dataset("text", data_files={k: v for k, v in files.items() if v}, cache_dir=model_args.cache_dir)

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForMaskedLM.from_pretrained(model_args.model_name_or_path)

    def tokenize_lines(batch):
        lines = [line for line in batch["text"] if line.strip()]
        # The special-tokens mask tells the collator never to mask [CLS]/[SEP].
        return tokenizer(lines, truncation=True, max_length=data_args.max_seq_length, return_special_tokens_mask=True)

    with training_args.main_process_first(desc="tokenizing line by line"):
        tokenized = raw.map(tokenize_lines, batched=True, remove_columns=["text"], desc="Tokenizing")

    collator = DataCollatorForLanguageModeling(
        tokenizer,
        mlm_probability=data_args.mlm_probability,
        pad_to_multiple_of=8,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"] if training_args.do_train else None,
        eval_dataset=tokenized["validation"] if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=collator,
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
        metrics["perplexity"] = math.exp(metrics["eval_loss"]) if metrics["eval_loss"] < 700 else float("inf")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    card = {"finetuned_from": model_args.model_name_or_path, "tasks": "fill-mask"}
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)


if __name__ == "__main__":
    main()
