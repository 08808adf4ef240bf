"""Which files of looptrain/ a reader opens to follow one optimizer step, one evaluation and one resume, measured
by tracing a tiny run: the looptrain functions each of them calls (directly or not), grouped by file, and how often
the call chain crosses from one file to another. Run against any checkout:
`PYTHONPATH=<checkout> python scripts/reading_trace.py` (from outside the checkout, so the path decides)."""

from __future__ import annotations

import collections
import contextlib
import io
import os
import sys
import tempfile

from transformers.utils import logging

import looptrain

PACKAGE = os.path.dirname(os.path.abspath(looptrain.__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
from helpers import random_token_dataset, tiny_bert  # noqa: E402


class Reports:
    def __init__(self):
        self.reports = []


class Tracer:
    """Record the looptrain functions called while active: (file, function), and file-to-file crossings."""

    def __init__(self):
        self.calls, self.crossed, self.active = [], set(), False

    def __call__(self, frame, event, arg):
        if event != "call" or not self.active:
            return
        code = frame.f_code
        if not code.co_filename.startswith(PACKAGE):
            return
        name = os.path.basename(code.co_filename)
        self.calls.append((name, code.co_qualname))
        caller = frame.f_back
        while caller is not None and not caller.f_code.co_filename.startswith(PACKAGE):
            caller = caller.f_back
        if caller is not None and os.path.basename(caller.f_code.co_filename) != name:
            self.crossed.add(
                (os.path.basename(caller.f_code.co_filename), caller.f_code.co_qualname, name, code.co_qualname)
            )


def traced(fn, *args, **kwargs):
    tracer = Tracer()
    sys.setprofile(tracer)
    tracer.active = True
    try:
        fn(*args, **kwargs)
    finally:
        tracer.active = False
        sys.setprofile(None)
    return tracer


def trainer(output_dir, **overrides):
    args = dict(
        output_dir=output_dir,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=1,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        logging_steps=1,
        save_steps=1,
        max_steps=4,
    )
    args.update(overrides)
    return looptrain.Trainer(
        tiny_bert(),
        looptrain.TrainingArguments(**args),
        train_dataset=random_token_dataset(16, 0),
        eval_dataset=random_token_dataset(8, 1),
    )


def report(title, tracer, only=None):
    functions = collections.defaultdict(set)
    for file, function in tracer.calls:
        if only is None or (file, function) in only:
            functions[file].add(function)
    crossings = {c for c in tracer.crossed if only is None or c[2:] in only}
    print(
        f"{title}: {len(functions)} files, {sum(map(len, functions.values()))} functions, "
        f"{len(crossings)} distinct calls from one file into another"
    )
    for file in sorted(functions):
        print(f"    {file}: {', '.join(sorted(functions[file]))}")


def main():
    logging.set_verbosity_error()
    quiet = Reports()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        # one optimizer step: a run of one step, with no log, evaluation or save
        t = trainer(os.path.join(tmp, "step"), max_steps=1, logging_strategy="no", save_strategy="no")
        original = type(t)._run_epoch
        tracer = Tracer()

        def run_epoch(self, *a, **k):
            sys.setprofile(tracer)
            tracer.active = True
            try:
                return original(self, *a, **k)
            finally:
                tracer.active = False
                sys.setprofile(None)

        t._run_epoch = run_epoch.__get__(t)
        t.train()
        quiet.reports.append(("one optimizer step (_run_epoch of a 1-step run, no log/evaluation/save)", tracer, None))

        t = trainer(os.path.join(tmp, "eval"), max_steps=1, save_strategy="no")
        t.train()
        quiet.reports.append(("one evaluation (evaluate())", traced(t.evaluate), None))

        # one resume: what a resumed train() calls that the same fresh train() does not
        trainer(os.path.join(tmp, "first")).train()
        fresh = traced(trainer(os.path.join(tmp, "fresh")).train)
        resumed = traced(
            trainer(os.path.join(tmp, "resumed")).train,
            resume_from_checkpoint=os.path.join(tmp, "first", "checkpoint-3"),
        )
        only = set(resumed.calls) - set(fresh.calls)
        quiet.reports.append(
            ("one resume (the functions a resumed train() calls and a fresh one does not)", resumed, only)
        )
    for title, tracer, only in quiet.reports:
        report(title, tracer, only)


if __name__ == "__main__":
    main()
