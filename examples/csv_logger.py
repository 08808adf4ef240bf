"""Recipe: a callback that writes every log entry to a CSV file.

Nothing about the loss or the loop changes, so no Trainer method is overridden: a `TrainerCallback` hears
every `log()` call through `on_log` (training losses, evaluation metrics, the final summary) with the
`TrainerState` that holds `global_step` and `epoch`. The same callback object works with
`transformers.Trainer` and `looptrain.Trainer`, which fire the same events with the same arguments.

    trainer = Trainer(..., callbacks=[CsvLoggerCallback("log.csv")])   # written to args.output_dir/log.csv

    python examples/csv_logger.py [--library transformers]

One row per `log()` call: `step` and `epoch` first, then the logged keys in the order they first appear.
A key first seen later (the eval metrics, the summary) adds a column and the file is rewritten, so it is
always a valid CSV with one header. Numbers are written with `repr`, which reads back to the same float.
"""

from __future__ import annotations

import csv
import os

from transformers import TrainerCallback


class CsvLoggerCallback(TrainerCallback):
    def __init__(self, filename: str = "log.csv"):
        self.filename = filename
        self.path = None
        self.columns: list[str] = []
        self.rows: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.rows = []  # a new train() starts a new file
        self.columns = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:  # with several processes, one writes
            return
        self.path = os.path.join(args.output_dir, self.filename)  # an absolute filename stays as it is
        row = {"step": state.global_step, "epoch": state.epoch, **(logs or {})}
        new_columns = [key for key in row if key not in self.columns]
        self.columns += new_columns
        self.rows.append(row)
        if new_columns or len(self.rows) == 1:
            self._write(self.rows, mode="w", header=True)
        else:
            self._write([row], mode="a", header=False)

    def _write(self, rows, mode, header):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
            if header:
                writer.writeheader()
            writer.writerows({key: _text(value) for key, value in row.items()} for row in rows)


def _text(value):
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else value


def read_csv_log(path: str) -> list[dict]:
    """The rows back, numbers as numbers and empty cells left out."""

    def number(text):
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    with open(path, newline="") as f:
        return [{key: number(value) for key, value in row.items() if value != ""} for row in csv.DictReader(f)]


def main(argv=None):
    import toy

    options = toy.recipe_options(__doc__.splitlines()[0], argv)
    Trainer, TrainingArguments = toy.trainer_classes(options.library)
    tokenizer = toy.toy_tokenizer()
    logger = CsvLoggerCallback("log.csv")
    trainer = Trainer(
        model=toy.tiny_bert(len(tokenizer)),
        args=toy.toy_arguments(TrainingArguments, options, eval_strategy="epoch"),
        train_dataset=toy.toy_sentiment(48, seed=1, tokenizer=tokenizer),
        eval_dataset=toy.toy_sentiment(16, seed=2, tokenizer=tokenizer),
        processing_class=tokenizer,
        callbacks=[logger],
    )
    trainer.train()
    with open(logger.path) as f:
        print(f"{logger.path}:\n{f.read()}")
    return trainer


if __name__ == "__main__":
    main()
