"""`hyperparameter_search`: real optuna searches run by `transformers.Trainer` and `looptrain.Trainer` in this test
run, with the same seeded sampler. Compared: every trial (number, state, parameters, reported objectives, final
objective), the best run, and what each trial left in `output_dir/<run name>/` (checkpoint folders, their files,
weights and state). Ray Tune and W&B are not installed here: asking for them is a clear error naming the package.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import transformers
from safetensors.torch import load_file

import looptrain
from helpers import accuracy, assert_same_params, make_args, random_token_dataset, strip_timing, tiny_bert

optuna = pytest.importorskip("optuna")
optuna.logging.set_verbosity(optuna.logging.WARNING)

TRAIN, EVAL = random_token_dataset(16, 1), random_token_dataset(8, 2)
LIBS = {
    "hf": (transformers.Trainer, transformers.TrainingArguments),
    "lt": (looptrain.Trainer, looptrain.TrainingArguments),
}


@pytest.fixture(autouse=True)
def frozen_gc():
    """Each trial runs `gc.collect()` several times (accelerate's `release_memory`, as Trainer's search calls it);
    over the test process's millions of objects that was most of these tests' time. The objects that exist
    before a test are set aside from collection for its duration (`gc.freeze`), for both libraries alike."""
    gc.freeze()
    yield
    gc.unfreeze()


class PruneTrial(optuna.pruners.BasePruner):
    """Prunes one given trial at its first report (optuna's own pruners decide from earlier trials' numbers)."""

    def __init__(self, number):
        self.number = number

    def prune(self, study, trial):
        return trial.number == self.number


def make_trainer(lib, tmp_path, model_init, compute_metrics=None, **overrides):
    trainer_cls, args_cls = LIBS[lib]
    args = dict(max_steps=2, eval_strategy="steps", eval_steps=1, save_steps=1, logging_steps=1, seed=3)
    args.update(overrides)
    targs = make_args(args_cls, tmp_path / lib, **args)
    return trainer_cls(
        model_init=model_init, args=targs, train_dataset=TRAIN, eval_dataset=EVAL, compute_metrics=compute_metrics
    )


def search(lib, tmp_path, model_init, trainer_args=None, **search_kwargs):
    """Run the search; return the best run, every trial of the study, and the trainer."""
    trainer = make_trainer(lib, tmp_path, model_init, **(trainer_args or {}))
    storage = optuna.storages.InMemoryStorage()
    with contextlib.redirect_stdout(io.StringIO()):
        best = trainer.hyperparameter_search(
            storage=storage, study_name=lib, sampler=optuna.samplers.TPESampler(seed=0), **search_kwargs
        )
    trials = [
        (t.number, t.state.name, t.params, t.value, t.intermediate_values)
        for t in optuna.load_study(study_name=lib, storage=storage).trials
    ]
    return best, trials, trainer


def assert_same_trial_folders(tmp_path):
    """The same run folders and checkpoints; in each, Trainer's files (but for looptrain's designed differences:
    training_args.json for training_args.bin, and looptrain_state.json), the same weights and trainer state."""
    hf_root, lt_root = tmp_path / "hf", tmp_path / "lt"
    runs = sorted(os.listdir(hf_root))
    assert sorted(os.listdir(lt_root)) == runs
    for run in runs:
        checkpoints = sorted(os.listdir(hf_root / run))
        assert sorted(os.listdir(lt_root / run)) == checkpoints, run
        for checkpoint in checkpoints:
            hf_dir, lt_dir = hf_root / run / checkpoint, lt_root / run / checkpoint
            hf_files = set(os.listdir(hf_dir))
            expected = hf_files - {"training_args.bin"} | {"training_args.json", "looptrain_state.json"}
            assert set(os.listdir(lt_dir)) == expected, f"{run}/{checkpoint}"
            assert_same_params(load_file(hf_dir / "model.safetensors"), load_file(lt_dir / "model.safetensors"))
            hf_state, lt_state = (
                json.loads((d / "trainer_state.json").read_text().replace(str(root), "<output_dir>"))
                for d, root in ((hf_dir, hf_root), (lt_dir, lt_root))
            )
            for state in (hf_state, lt_state):
                state["log_history"] = strip_timing(state["log_history"])
            assert lt_state == hf_state, f"{run}/{checkpoint}"
    return runs


def learning_rate_and_batch(trial):
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),
        "per_device_train_batch_size": trial.suggest_categorical("per_device_train_batch_size", [4, 8]),
    }


def test_optuna_search_with_pruning_matches_trainer(tmp_path):
    """Minimise the evaluation loss over 3 trials; trial 1 is pruned at its first evaluation (before any save)."""
    results = {
        lib: search(
            lib,
            tmp_path,
            lambda: tiny_bert(),
            hp_space=learning_rate_and_batch,
            n_trials=3,
            backend="optuna",
            pruner=PruneTrial(1),
        )
        for lib in LIBS
    }
    (hf_best, hf_trials, _), (lt_best, lt_trials, lt_trainer) = results["hf"], results["lt"]
    assert [t[1] for t in hf_trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert len({t[2]["learning_rate"] for t in hf_trials}) == 3  # the sampler did vary the values
    assert hf_best.run_id in ("0", "2") and hf_best.objective == min(hf_trials[0][3], hf_trials[2][3])
    assert lt_trials == hf_trials
    assert lt_best == hf_best
    assert assert_same_trial_folders(tmp_path) == ["run-0", "run-2"]  # the pruned trial saved nothing
    assert sorted(os.listdir(tmp_path / "lt" / "run-0")) == ["checkpoint-1", "checkpoint-2"]
    assert lt_trainer.hp_search_backend is None  # the search is over: train() trains normally again


def test_hp_name_compute_objective_and_a_model_init_taking_the_trial(tmp_path):
    """Maximise a custom objective; run folders named by hp_name; model_init(trial) suggests the dropout;
    the default backend (optuna, the one installed)."""

    def model_init(trial):
        dropout = trial.suggest_float("dropout", 0.0, 0.3) if trial is not None else 0.1
        return tiny_bert(hidden_dropout_prob=dropout)

    def space(trial):
        return {
            "seed": trial.suggest_int("seed", 1, 100),
            "weight_decay": trial.suggest_float("weight_decay", 0.0, 0.1),
        }

    def objective(metrics):
        return metrics["eval_accuracy"] - metrics["eval_loss"]

    results = {
        lib: search(
            lib,
            tmp_path,
            model_init,
            trainer_args=dict(compute_metrics=accuracy, save_steps=2),
            hp_space=space,
            n_trials=2,
            direction="maximize",
            hp_name=lambda trial: f"seed{trial.params['seed']}",
            compute_objective=objective,
        )
        for lib in LIBS
    }
    (hf_best, hf_trials, _), (lt_best, lt_trials, _) = results["hf"], results["lt"]
    assert [set(t[2]) for t in hf_trials] == [{"dropout", "seed", "weight_decay"}] * 2
    assert all(set(t[4]) == {1, 2} for t in hf_trials)  # an objective reported at each evaluation
    assert lt_trials == hf_trials
    assert lt_best == hf_best and hf_best.objective == max(t[3] for t in hf_trials)
    assert assert_same_trial_folders(tmp_path) == sorted(f"seed{t[2]['seed']}" for t in hf_trials)


@pytest.mark.parametrize("backend, package", [("ray", "'ray[tune]'"), ("wandb", "wandb")])
def test_a_backend_that_is_not_installed_is_named(tmp_path, backend, package):
    if importlib.util.find_spec(backend) is not None:
        pytest.skip(f"{backend} is installed")
    for lib in LIBS:
        trainer = make_trainer(lib, tmp_path, lambda: tiny_bert())
        message = f"You picked the {backend} backend, but it is not installed. Run `pip install {package}`."
        with pytest.raises(RuntimeError, match=re.escape(message)):
            trainer.hyperparameter_search(backend=backend, n_trials=1)


@pytest.mark.parametrize("backend", ["ray", "wandb"])
def test_ray_and_wandb_trials_set_the_arguments_as_trainer(tmp_path, backend):
    """Ray Tune and W&B hand the trial as a dict of values (these packages are not needed to check that part):
    each value is cast to its field's type, an unknown name is skipped, Ray's "wandb" entry is no value."""
    from transformers.trainer_utils import HPSearchBackend

    seen = {}
    for lib in LIBS:
        trainer = make_trainer(lib, tmp_path, lambda: tiny_bert())
        trainer.hp_search_backend = HPSearchBackend(backend)
        trial = {
            "learning_rate": "0.25",
            "seed": 7.0,
            "per_device_train_batch_size": 4.0,
            "not_a_field": 1,
            "wandb": {"project": "p"},
        }
        trainer._hp_search_setup(trial)
        args = json.loads(trainer.args.to_json_string().replace(str(tmp_path / lib), "<output_dir>"))
        seen[lib] = (args, trial, trainer._train_batch_size)
    args, trial, batch_size = seen["hf"]
    assert (args["learning_rate"], args["seed"], batch_size) == (0.25, 7, 4)
    assert ("wandb" in trial) == (backend == "wandb")
    assert seen["lt"] == seen["hf"]


def test_a_search_needs_model_init(tmp_path):
    args = looptrain.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = looptrain.Trainer(model=tiny_bert(), args=args, train_dataset=TRAIN)
    with pytest.raises(RuntimeError, match=r"pass Trainer\(model_init=...\)"):
        trainer.hyperparameter_search(backend="optuna", n_trials=1)


def test_search_and_hub_never_load_the_trainer_module(tmp_path):
    """In a fresh interpreter: a one-trial optuna search, then push_to_hub() to the fake Hub; transformers.trainer
    stays unloaded (the modules these paths use: transformers.modelcard, .hyperparameter_search, .integrations)."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import optuna
        from huggingface_hub import constants
        import looptrain
        from fake_hub import FakeHub
        from helpers import random_token_dataset, tiny_bert
        hub = FakeHub().start()
        constants.ENDPOINT, constants.HF_HUB_OFFLINE = hub.url, False
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        args = looptrain.TrainingArguments(output_dir={str(tmp_path / "model")!r}, use_cpu=True, max_steps=1,
                                           eval_strategy="steps", eval_steps=1, save_strategy="no", disable_tqdm=True,
                                           report_to="none", push_to_hub=True, hub_token="hf_x")
        t = looptrain.Trainer(model_init=lambda: tiny_bert(), args=args, train_dataset=random_token_dataset(8, 0),
                              eval_dataset=random_token_dataset(4, 1))
        t.hyperparameter_search(n_trials=1, hp_space=lambda trial: {{"seed": trial.suggest_int("seed", 1, 9)}})
        t.train()
        t.push_to_hub()
        assert [c.message for c in hub.commits()] == ["End of training"]
        hub.stop()
        print("LOADED", sorted(m for m in sys.modules if m == "transformers.trainer" or m.startswith("transformers.trainer.")))
    """)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "0"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout
