"""Extractive question answering (SQuAD-like json: {"data": [{"id", "question", "context", "answers": {"text",
"answer_start"}}]}), in the manner of transformers' example scripts.

Long contexts are split into overlapping windows (`--doc_stride`); a model predicts start and end logits per
token; the metrics need answer *texts*, so evaluation and prediction go through a Trainer subclass,
`QuestionAnsweringTrainer`, which runs the evaluation loop without metrics, turns the logits of all windows
of an example into one answer (`answers_from_logits`, which also writes {eval,predict}_predictions.json)
and only then computes exact match and F1.

    python run_qa.py --model_name_or_path DIR --train_file train.json --validation_file dev.json \
        --test_file test.json --max_seq_length 64 --doc_stride 16 --output_dir out \
        --do_train --do_eval --do_predict [--trainer_impl looptrain]
"""

import argparse
import collections
import json
import logging
import math
import os
import re
import string
import sys
import time
from dataclasses import dataclass, field

import datasets
import numpy as np
import transformers
from datasets import load_dataset
from transformers import (
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    set_seed,
)
from transformers.debug_utils import DebugOption
from transformers.trainer_utils import PredictionOutput, get_last_checkpoint, speed_metrics

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


class QuestionAnsweringTrainer(Trainer):
    """evaluate()/predict() that post-process the logits into answers before computing the metrics."""

    def __init__(self, *args, eval_examples=None, post_process_function=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_examples = eval_examples
        self.post_process_function = post_process_function

    def _loop_without_metrics(self, dataloader, description, ignore_keys, metric_key_prefix):
        # compute_metrics needs the post-processed answers: switch it off for the loop, which then only
        # gathers the logits (and the loss, where the features carry labels).
        compute_metrics, self.compute_metrics = self.compute_metrics, None
        start_time = time.time()
        try:
            output = self.evaluation_loop(
                dataloader,
                description=description,
                prediction_loss_only=True if compute_metrics is None else None,
                ignore_keys=ignore_keys,
                metric_key_prefix=metric_key_prefix,
            )
        finally:
            self.compute_metrics = compute_metrics
        batches = math.ceil(output.num_samples / (self.args.eval_batch_size * self.args.world_size))
        output.metrics.update(
            speed_metrics(metric_key_prefix, start_time, num_samples=output.num_samples, num_steps=batches)
        )
        return output

    def _answer_metrics(self, examples, features, output, prefix):
        answers = self.post_process_function(examples, features, output.predictions, prefix)
        scores = self.compute_metrics(answers)
        return answers, {
            key if key.startswith(f"{prefix}_") else f"{prefix}_{key}": value for key, value in scores.items()
        }

    def evaluate(self, eval_dataset=None, eval_examples=None, ignore_keys=None, metric_key_prefix="eval"):
        self._memory_tracker.start()
        eval_dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        eval_examples = self.eval_examples if eval_examples is None else eval_examples
        output = self._loop_without_metrics(
            self.get_eval_dataloader(eval_dataset), "Evaluation", ignore_keys, metric_key_prefix
        )
        metrics = dict(output.metrics)
        # Only the process that saves writes the prediction files (and so computes the answer metrics).
        if self.post_process_function is not None and self.compute_metrics is not None and self.args.should_save:
            metrics.update(self._answer_metrics(eval_examples, eval_dataset, output, metric_key_prefix)[1])
        if self.args.should_log:
            self.log(metrics)
        if DebugOption.TPU_METRICS_DEBUG in self.args.debug:
            logger.warning("tpu_metrics_debug: there is no TPU metrics report outside a TPU.")
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics

    def predict(self, predict_dataset, predict_examples, ignore_keys=None, metric_key_prefix="test"):
        self._memory_tracker.start()
        output = self._loop_without_metrics(
            self.get_test_dataloader(predict_dataset), "Prediction", ignore_keys, metric_key_prefix
        )
        if self.post_process_function is None or self.compute_metrics is None:
            return output
        answers, scores = self._answer_metrics(predict_examples, predict_dataset, output, metric_key_prefix)
        metrics = {**output.metrics, **scores}
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return PredictionOutput(predictions=answers.predictions, label_ids=answers.label_ids, metrics=metrics)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A local folder with a config, weights and a tokenizer."})
    cache_dir: str | None = None


@dataclass
class DataArguments:
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    max_seq_length: int = field(default=384, metadata={"help": "Tokens per window (question + context)."})
    doc_stride: int = field(default=128, metadata={"help": "Tokens shared by consecutive windows of a context."})
    n_best_size: int = field(default=5, metadata={"help": "Start and end candidates considered per window."})
    max_answer_length: int = field(default=12, metadata={"help": "Longest answer, in tokens."})


def _normalize(text: str) -> list[str]:
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def exact_match_and_f1(eval_pred: EvalPrediction) -> dict:
    """SQuAD's two scores (in percent), against the best-matching reference answer."""
    exact, f1 = [], []
    for predicted, reference in zip(eval_pred.predictions, eval_pred.label_ids):
        guess = _normalize(predicted["prediction_text"])
        truths = [_normalize(t) for t in reference["answers"]["text"]]
        exact.append(max(float(guess == truth) for truth in truths))
        best = 0.0
        for truth in truths:
            common = sum((collections.Counter(guess) & collections.Counter(truth)).values())
            if common:
                precision, recall = common / len(guess), common / len(truth)
                best = max(best, 2 * precision * recall / (precision + recall))
        f1.append(best)
    return {"exact_match": 100 * float(np.mean(exact)), "f1": 100 * float(np.mean(f1))}


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
    raw = load_dataset(
        "json", data_files={k: v for k, v in files.items() if v}, field="data", cache_dir=model_args.cache_dir
    )

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForQuestionAnswering.from_pretrained(model_args.model_name_or_path)
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)

    def windows(batch):
        # One row per window of each context; the question is repeated, only the context is truncated.
        return tokenizer(
            [q.strip() for q in batch["question"]],
            batch["context"],
            truncation="only_second",
            max_length=max_seq_length,
            stride=data_args.doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding="max_length",
        )

    def train_features(batch):
        encoded = windows(batch)
        example_of = encoded.pop("overflow_to_sample_mapping")
        encoded["start_positions"], encoded["end_positions"] = [], []
        for i, offsets in enumerate(encoded.pop("offset_mapping")):
            answer = batch["answers"][example_of[i]]
            first_char = answer["answer_start"][0]
            last_char = first_char + len(answer["text"][0])
            context = [t for t, s in enumerate(encoded.sequence_ids(i)) if s == 1]
            if offsets[context[0]][0] <= first_char and offsets[context[-1]][1] >= last_char:
                start = max(t for t in context if offsets[t][0] <= first_char)
                end = min(t for t in context if offsets[t][1] >= last_char)
            else:  # the answer is not (entirely) in this window: point at [CLS]
                start = end = encoded["input_ids"][i].index(tokenizer.cls_token_id)
            encoded["start_positions"].append(start)
            encoded["end_positions"].append(end)
        return encoded

    def eval_features(batch):
        encoded = windows(batch)
        example_of = encoded.pop("overflow_to_sample_mapping")
        encoded["example_id"] = [batch["id"][j] for j in example_of]
        # Keep offsets for context tokens only, so that an answer can never start in the question.
        encoded["offset_mapping"] = [
            [span if s == 1 else None for span, s in zip(offsets, encoded.sequence_ids(i))]
            for i, offsets in enumerate(encoded["offset_mapping"])
        ]
        return encoded

    train_dataset = eval_examples = eval_dataset = predict_examples = predict_dataset = None
    if training_args.do_train:
        with training_args.main_process_first(desc="train windows"):
            train_dataset = raw["train"].map(
                train_features, batched=True, remove_columns=raw["train"].column_names, desc="Train windows"
            )
    if training_args.do_eval:
        eval_examples = raw["validation"]
        with training_args.main_process_first(desc="validation windows"):
            eval_dataset = eval_examples.map(
                eval_features, batched=True, remove_columns=eval_examples.column_names, desc="Validation windows"
            )
    if training_args.do_predict:
        predict_examples = raw["test"]
        with training_args.main_process_first(desc="test windows"):
            predict_dataset = predict_examples.map(
                eval_features, batched=True, remove_columns=predict_examples.column_names, desc="Test windows"
            )

    def answers_from_logits(examples, features, predictions, stage):
        """The best-scoring valid span over all windows of each example; written to {stage}_predictions.json."""
        start_logits, end_logits = predictions
        windows_of = collections.defaultdict(list)
        for i, example_id in enumerate(features["example_id"]):
            windows_of[example_id].append(i)
        answers = {}
        for example in examples:
            best_score, best_text = -math.inf, ""
            for i in windows_of[example["id"]]:
                offsets = features[i]["offset_mapping"]
                starts = np.argsort(start_logits[i])[::-1][: data_args.n_best_size]
                ends = np.argsort(end_logits[i])[::-1][: data_args.n_best_size]
                for s in starts:
                    for e in ends:
                        if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > data_args.max_answer_length:
                            continue
                        score = start_logits[i][s] + end_logits[i][e]
                        if score > best_score:
                            best_score, best_text = score, example["context"][offsets[s][0] : offsets[e][1]]
            answers[example["id"]] = best_text
        with open(os.path.join(training_args.output_dir, f"{stage}_predictions.json"), "w") as f:
            json.dump(answers, f, indent=2)
        return EvalPrediction(
            predictions=[{"id": k, "prediction_text": v} for k, v in answers.items()],
            label_ids=[{"id": ex["id"], "answers": ex["answers"]} for ex in examples],
        )

    trainer = QuestionAnsweringTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        eval_examples=eval_examples,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        post_process_function=answers_from_logits,
        compute_metrics=exact_match_and_f1,
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
        metrics = trainer.predict(predict_dataset, predict_examples, metric_key_prefix="predict").metrics
        metrics["predict_samples"] = len(predict_dataset)
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)

    card = {"finetuned_from": model_args.model_name_or_path, "tasks": "question-answering"}
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)


if __name__ == "__main__":
    main()
