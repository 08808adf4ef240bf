"""Causal language modelling on plain-text files, in the manner of transformers' example scripts: the text is
tokenized, concatenated and cut into blocks of `--block_size` tokens, and `DataCollatorForLanguageModeling`
with `mlm=False` makes the labels. Evaluation reports the next-token accuracy (the logits are reduced to
their argmax before they are gathered, with `preprocess_logits_for_metrics`) and the perplexity.

    python run_clm.py --model_name_or_path DIR --train_file train.txt --validation_file dev.txt \
        --block_size 16 --output_dir out --do_train --do_eval [--trainer_impl looptrain]
"""

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from itertools import chain

import datasets
import transformers
from datasets import load_dataset
from transformers import (
    AutoModelForCausalLM,
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
    train_file: str | None = field(default=None, metadata={"help": "Plain text, any number of lines."})
    validation_file: str | None = None
    block_size: int = field(default=64, metadata={"help": "Tokens per training example."})
    max_eval_samples: int | None = None


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
    if tokenizer.pad_token is None:  # the collator pads with it (and never needs to here: blocks are full)
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    block_size = min(data_args.block_size, tokenizer.model_max_length)

    with training_args.main_process_first(desc="tokenizing the text"):
        tokenized = raw.map(
            lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"], desc="Tokenizing"
        )

    def into_blocks(batch):
        # Concatenate every row of the batch and cut the stream into full blocks; the tail is dropped.
        stream = {key: list(chain.from_iterable(batch[key])) for key in batch}
        usable = (len(stream["input_ids"]) // block_size) * block_size
        return {key: [ids[i : i + block_size] for i in range(0, usable, block_size)] for key, ids in stream.items()}

    with training_args.main_process_first(desc="grouping into blocks"):
        blocks = tokenized.map(into_blocks, batched=True, desc=f"Grouping into blocks of {block_size}")

    train_dataset = blocks["train"] if training_args.do_train else None
    eval_dataset = None
    if training_args.do_eval:
        eval_dataset = blocks["validation"]
        if data_args.max_eval_samples is not None:
            eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))

    def argmax_logits(logits, labels):
        # Keep only the predicted ids: gathering full-vocabulary logits for a whole eval set costs memory.
        return logits.argmax(dim=-1)

    def next_token_accuracy(eval_pred):
        predictions, labels = eval_pred
        predictions, labels = predictions[:, :-1].reshape(-1), labels[:, 1:].reshape(-1)  # position t predicts t+1
        keep = labels != -100
        return {"accuracy": float((predictions[keep] == labels[keep]).mean())}

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        compute_metrics=next_token_accuracy if training_args.do_eval else None,
        preprocess_logits_for_metrics=argmax_logits if training_args.do_eval else None,
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
        try:
            metrics["perplexity"] = math.exp(metrics["eval_loss"])
        except OverflowError:
            metrics["perplexity"] = float("inf")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    card = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-generation"}
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)


if __name__ == "__main__":
    main()
