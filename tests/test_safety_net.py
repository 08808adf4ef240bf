"""Issue 21: every input checked where it enters (looptrain/validation.py), no silent no-op training, failed saves
that clean up, second machines' disks as Trainer leaves them, the job on SIGTERM and Ctrl-C, launch mismatches.

Each refusal here is of a setup transformers.Trainer cannot train either, or trains to nothing (the test shows which);
the setups next to them that Trainer does train, looptrain trains the same way.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers
from datasets import Dataset

import looptrain
from helpers import assert_parity, make_args, params_of, random_token_dataset, run_both, strip_timing, tiny_bert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(tmp_path, **kwargs):
    return make_args(looptrain.TrainingArguments, tmp_path, **{"save_strategy": "no", "max_steps": 2, **kwargs})


def _train(trainer):
    with contextlib.redirect_stdout(io.StringIO()):
        return trainer.train()


def written(folder) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


# ============================================================================================ datasets and labels
def test_integer_scores_for_a_regression_head_train_as_in_trainer(tmp_path):
    """STS-B-style 0..5 ratings stored as ints, num_labels=1: Trainer trains them (weights bit-identical to the same
    scores as floats); looptrain used to refuse them as out-of-range classes."""
    scores = [0, 1, 2, 3, 4, 5, 3, 2] * 2
    ints = random_token_dataset(16, 0).remove_columns(["label"]).add_column("label", scores)
    floats = ints.cast_column("label", ints.features["label"].__class__("float32"))
    args = dict(max_steps=3, per_device_train_batch_size=4, logging_steps=1, save_strategy="no")
    hf, lt = run_both(tmp_path, lambda: tiny_bert(num_labels=1), train_dataset=ints, args=args)
    assert_parity(hf, lt)
    _, lt_floats = run_both(tmp_path / "floats", lambda: tiny_bert(num_labels=1), train_dataset=floats, args=args)
    a, b = params_of(lt[0].model), params_of(lt_floats[0].model)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_text_labels_from_python_are_refused_with_the_fix(tmp_path):
    data = random_token_dataset(8, 0).remove_columns(["label"]).add_column("label", ["positive", "negative"] * 4)
    hf = transformers.Trainer(
        tiny_bert(), make_args(transformers.TrainingArguments, tmp_path / "hf", max_steps=1), train_dataset=data
    )
    with pytest.raises(
        ValueError, match="too many dimensions 'str'"
    ):  # Trainer: deep in the collator, naming no column
        _train(hf)
    trainer = looptrain.Trainer(
        tiny_bert(), _args(tmp_path / "lt", save_strategy="steps", save_steps=1), train_dataset=data
    )
    with pytest.raises(
        ValueError,
        match=r"'label' column holds text \('negative', 'positive'.*class_encode_column\('label'\).*num_labels",
    ):
        _train(trainer)
    assert written(tmp_path / "lt") == []
    encoded = data.class_encode_column("label")  # the fix the message gives, which trains
    names = encoded.features["label"].names
    model = tiny_bert(num_labels=len(names))
    assert _train(looptrain.Trainer(model, _args(tmp_path / "fixed"), train_dataset=encoded)).global_step == 2


def test_one_float_per_example_for_several_classes_is_refused(tmp_path):
    data = random_token_dataset(8, 0).remove_columns(["label"]).add_column("label", [0.0, 1.0] * 4)
    trainer = looptrain.Trainer(tiny_bert(num_labels=2), _args(tmp_path), train_dataset=data)
    with pytest.raises(
        ValueError, match=r"one float per example \(float64\).*num_labels=2.*cast_column\('label'.*num_labels=1"
    ):
        _train(trainer)


def test_labels_that_do_not_fit_the_head_behind_a_custom_collator_are_explained(tmp_path):
    """A custom collator could have made anything of them, so nothing is said before training; torch's shape error
    is explained at the first batch."""

    def collate(features):
        batch = transformers.default_data_collator(features)
        batch["labels"] = batch["labels"].float()
        return batch

    trainer = looptrain.Trainer(
        tiny_bert(num_labels=2), _args(tmp_path), train_dataset=random_token_dataset(8, 0), data_collator=collate
    )
    with pytest.raises(
        ValueError,
        match=r"labels do not fit BertForSequenceClassification's head: labels of shape \(8,\) \(torch.float32\)",
    ):
        _train(trainer)


# ============================================================================================ no silent no-op
def test_a_frozen_model_is_refused_before_training(tmp_path):
    model = tiny_bert().requires_grad_(False)
    with pytest.raises(ValueError, match="Every parameter of BertForSequenceClassification has requires_grad=False"):
        _train(looptrain.Trainer(model, _args(tmp_path), train_dataset=random_token_dataset(8, 0)))
    # a frozen body with a trainable head is a setup that trains
    hf, lt = run_both(
        tmp_path,
        _frozen_body,
        train_dataset=random_token_dataset(16, 0),
        args=dict(max_steps=2, logging_steps=1, save_strategy="no"),
    )
    assert_parity(hf, lt)


def _frozen_body():
    model = tiny_bert().requires_grad_(False)
    model.classifier.requires_grad_(True)
    return model


def test_learning_rate_zero_is_refused_but_warmup_from_zero_trains(tmp_path):
    initial = params_of(tiny_bert())
    hf = transformers.Trainer(
        tiny_bert(),
        make_args(transformers.TrainingArguments, tmp_path / "hf", max_steps=2, learning_rate=0.0, save_strategy="no"),
        train_dataset=random_token_dataset(16, 0),
    )
    _train(hf)
    assert all(torch.equal(initial[n], p) for n, p in params_of(hf.model).items())  # Trainer: a true no-op
    with pytest.raises(ValueError, match="learning_rate=0 with optim='adamw_torch.*leave the weights unchanged"):
        _train(
            looptrain.Trainer(
                tiny_bert(), _args(tmp_path / "lt", learning_rate=0.0), train_dataset=random_token_dataset(16, 0)
            )
        )
    # warmup: the first step's rate is 0, and the run trains
    hf, lt = run_both(
        tmp_path / "warmup",
        tiny_bert,
        train_dataset=random_token_dataset(16, 0),
        args=dict(max_steps=3, warmup_steps=2, logging_steps=1, save_strategy="no"),
    )
    assert_parity(hf, lt)
    assert lt[0].state.log_history[0]["learning_rate"] == 0.0
    optimizer = torch.optim.SGD(tiny_bert().parameters(), lr=0.0)
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"SGD\(lr=0\).*learning rate 0"):
        _train(
            looptrain.Trainer(
                model,
                _args(tmp_path / "sgd"),
                train_dataset=random_token_dataset(8, 0),
                optimizers=(torch.optim.SGD(model.parameters(), lr=0.0), None),
            )
        )
    del optimizer


def test_an_optimizer_of_another_model_or_a_scheduler_of_another_optimizer_is_refused(tmp_path):
    model, other = tiny_bert(), tiny_bert()
    optimizer = torch.optim.AdamW(other.parameters(), lr=1e-3)
    hf = transformers.Trainer(
        model,
        make_args(transformers.TrainingArguments, tmp_path / "hf", max_steps=2, save_strategy="no"),
        train_dataset=random_token_dataset(16, 0),
        optimizers=(optimizer, None),
    )
    before = params_of(model)
    _train(hf)
    assert all(torch.equal(before[n], p) for n, p in params_of(model).items())  # Trainer: trains nothing, silently
    with pytest.raises(
        ValueError,
        match=r"optimizers=\(AdamW, ...\) updates \d+ tensors, none of which is a parameter of this BertForSequenceClassification",
    ):
        looptrain.Trainer(tiny_bert(), _args(tmp_path / "lt"), optimizers=(optimizer, None))
    own = tiny_bert()
    own_optimizer = torch.optim.AdamW(own.parameters(), lr=1e-3)
    foreign = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW(other.parameters()), lambda s: 1.0)
    with pytest.raises(ValueError, match="the scheduler was built on another optimizer"):
        looptrain.Trainer(own, _args(tmp_path / "lt"), optimizers=(own_optimizer, foreign))
    with pytest.raises(
        ValueError, match=r"optimizers=\(None, LambdaLR\): the scheduler was built on an optimizer Trainer never uses"
    ):
        looptrain.Trainer(own, _args(tmp_path / "lt"), optimizers=(None, foreign))
    assert written(tmp_path / "lt") == []


def test_a_loss_that_does_not_reach_the_parameters_stops_at_the_first_step(tmp_path):
    # detached: torch fails in backward; the error says why
    trainer = looptrain.Trainer(
        tiny_bert(),
        _args(tmp_path, save_strategy="steps", save_steps=1),
        train_dataset=random_token_dataset(8, 0),
        compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs["logits"].mean().detach(),
    )
    with pytest.raises(RuntimeError, match="not connected to any trainable parameter.*detached"):
        _train(trainer)
    # a loss with a gradient that reaches no parameter: backward succeeds, and no optimizer step could change anything
    weight = torch.ones(2, requires_grad=True)
    trainer = looptrain.Trainer(
        tiny_bert(),
        _args(tmp_path, save_strategy="steps", save_steps=1),
        train_dataset=random_token_dataset(8, 0),
        compute_loss_func=lambda outputs, labels, num_items_in_batch=None: (outputs["logits"].detach() * weight).mean(),
    )
    with pytest.raises(
        RuntimeError,
        match="After the first backward pass none of the \\d+ tensors the optimizer updates has a gradient",
    ):
        _train(trainer)
    assert trainer.state.global_step == 0 and written(tmp_path) == []
    # the optimizer on frozen parameters of this model
    model = tiny_bert()
    model.bert.embeddings.requires_grad_(False)
    trainer = looptrain.Trainer(
        model,
        _args(tmp_path),
        train_dataset=random_token_dataset(8, 0),
        optimizers=(torch.optim.AdamW(model.bert.embeddings.parameters()), None),
    )
    with pytest.raises(RuntimeError, match="none of the 5 tensors the optimizer updates has a gradient"):
        _train(trainer)


# ============================================================================================ callbacks and paths
def test_callbacks_that_are_not_callbacks_are_refused_when_constructed(tmp_path):
    with pytest.raises(AttributeError, match="no attribute 'on_init_end'"):  # Trainer
        transformers.Trainer(tiny_bert(), make_args(transformers.TrainingArguments, tmp_path), callbacks=[print])
    with pytest.raises(
        TypeError, match="callbacks holds <built-in function print>, which is not a transformers.TrainerCallback"
    ):
        looptrain.Trainer(tiny_bert(), _args(tmp_path), callbacks=[print])
    with pytest.raises(TypeError, match="callbacks must be a list"):
        looptrain.Trainer(tiny_bert(), _args(tmp_path), callbacks=transformers.PrinterCallback())

    class DuckTyped:  # every event, no TrainerCallback base: Trainer runs it, and so does looptrain
        def __getattr__(self, name):
            if name.startswith("on_"):
                return lambda *args, **kwargs: None
            raise AttributeError(name)

    _train(
        looptrain.Trainer(
            tiny_bert(), _args(tmp_path), train_dataset=random_token_dataset(8, 0), callbacks=[DuckTyped()]
        )
    )


def test_output_dir_naming_a_file_is_one_error_before_anything_is_written(tmp_path):
    path = tmp_path / "results"
    path.write_text("not a folder")
    with pytest.raises(FileExistsError):  # Trainer: makedirs' error
        transformers.Trainer(tiny_bert(), make_args(transformers.TrainingArguments, path))
    with pytest.raises(ValueError, match="output_dir='.*results' is an existing file, not a folder"):
        looptrain.Trainer(tiny_bert(), _args(path))
    assert path.read_text() == "not a folder"


def test_arguments_that_cannot_mean_anything(tmp_path):
    for kwargs, message in (
        ({"learning_rate": -1e-3}, "learning_rate=-0.001 is negative"),
        ({"label_smoothing_factor": 1.5}, r"label_smoothing_factor=1.5 is outside \[0, 1\)"),
        ({"seed": -1}, r"seed=-1 is outside 0..2\*\*32-1"),
        ({"adam_beta1": 1.0}, r"adam_beta1=1.0 is outside \[0, 1\)"),
    ):
        with pytest.raises(ValueError, match=message):
            _args(tmp_path, **kwargs)
        hf_args = make_args(transformers.TrainingArguments, tmp_path, **kwargs)  # accepted there ...
        with pytest.raises(ValueError, match=message):  # ... and refused when looptrain gets it
            looptrain.Trainer(tiny_bert(), hf_args)


# ============================================================================================ saves
def test_a_save_that_fails_midway_removes_its_staging_folder(tmp_path):
    """A metric JSON cannot encode makes trainer_state.json fail, after the weights and optimizer were written."""
    trainer = looptrain.Trainer(
        tiny_bert(),
        _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2),
        train_dataset=random_token_dataset(16, 0),
        eval_dataset=random_token_dataset(8, 1),
        compute_metrics=lambda p: {"classes": {0, 1}},
    )
    with pytest.raises(TypeError, match="not JSON serializable"):
        _train(trainer)
    assert written(tmp_path) == []  # no .tmp-checkpoint-2 with weights and optimizer state inside


def test_a_killed_saves_leftovers_are_removed_by_the_next_run(tmp_path):
    for name in (".tmp-checkpoint-7", ".tmp-delete-checkpoint-3", ".tmp-notes", "checkpoint-5"):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "rng_state.pth").write_bytes(b"")
    os.symlink(tmp_path / ".tmp-notes", tmp_path / ".tmp-checkpoint-8")  # a link: never followed
    _train(looptrain.Trainer(tiny_bert(), _args(tmp_path, max_steps=1), train_dataset=random_token_dataset(8, 0)))
    assert written(tmp_path) == [
        ".tmp-checkpoint-8",
        ".tmp-notes",
        "checkpoint-5",
    ]  # only looptrain's staging folders went
    assert os.path.isfile(tmp_path / ".tmp-notes" / "rng_state.pth")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(folder) -> dict[str, object]:
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = path
    return found


def test_two_machines_with_their_own_disks_or_one_shared(tmp_path):
    """`torchrun --nnodes 2` twice on this host, each node in its own working directory (its own disk), one process
    each, save_on_each_node=False; then both nodes into one shared folder. Trainer and looptrain in each layout."""
    port, shared = free_port(), tmp_path / "shared"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    procs = []
    for rank in (0, 1):
        os.makedirs(tmp_path / f"node{rank}")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--node_rank",
            str(rank),
            "--nproc_per_node",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            os.path.join(ROOT, "tests", "machines_worker.py"),
            "--shared",
            str(shared),
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=tmp_path / f"node{rank}", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    # machine 1's own disk: what Trainer writes there, checkpoint-<N>/rng_state_1.pth, and no staging folder
    hf, lt = _files(tmp_path / "node1" / "own" / "hf"), _files(tmp_path / "node1" / "own" / "lt")
    assert sorted(hf) == ["checkpoint-2/rng_state_1.pth", "checkpoint-4/rng_state_1.pth"]
    assert sorted(lt) == sorted(hf)  # the planted .tmp-checkpoint-99 of a killed save is gone too
    for name in hf:
        a, b = torch.load(hf[name], weights_only=False), torch.load(lt[name], weights_only=False)
        assert torch.equal(a["cpu"], b["cpu"]) and a["python"] == b["python"], name
    # machine 0's disk and the shared folder: Trainer's files, but for the two looptrain writes instead of training_args.bin
    renamed = lambda names: sorted(n.replace("training_args.bin", "training_args.json") for n in names)  # noqa: E731
    for folder in (tmp_path / "node0" / "own", shared):
        hf, lt = _files(folder / "hf"), _files(folder / "lt")
        assert renamed(hf) == sorted(n for n in lt if not n.endswith("looptrain_state.json")), folder
    assert "checkpoint-4/rng_state_1.pth" in _files(shared / "lt")


# ============================================================================================ the launch
def test_a_launch_that_started_fewer_processes_than_asked_says_so(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        import looptrain
        from helpers import tiny_bert
        looptrain.Trainer(tiny_bert(), looptrain.TrainingArguments(output_dir={str(tmp_path / "out")!r}, report_to="none"))
    """)
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.accelerate_cli",
            "launch",
            "--cpu",
            "--num_processes",
            "2",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accelerate launch was asked for 2 processes (--num_processes 2), but 1 started" in result.stderr
    assert "accelerate launch --multi_gpu --num_processes 2" in result.stderr


# ============================================================================================ the job
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def _load_job():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script_21", os.path.join(ROOT, "scripts", "train.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def job():
    return _load_job()


class SignalAt(transformers.TrainerCallback):
    def __init__(self, step, how):
        self.step, self.how = step, how

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise KeyboardInterrupt


def _interrupting(step, how):
    class Interrupted(looptrain.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(SignalAt(step, how))

    return Interrupted


def _run_cli(job, argv, trainer_cls=None):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        job.cli(argv, trainer_cls)
        raise SystemExit(0)
    return exit_.value.code, err.getvalue()


def _job_result(out):
    from safetensors.torch import load_file

    with open(os.path.join(out, "trainer_state.json")) as f:
        log = strip_timing(json.load(f)["log_history"])
    with open(os.path.join(out, "eval_results.json")) as f:
        evaluation = {k: v for k, v in json.load(f).items() if not any(t in k for t in ("runtime", "per_second"))}
    return (
        [e for e in log if "train_runtime" not in e and "train_loss" not in e],
        evaluation,
        load_file(os.path.join(out, "model.safetensors")),
    )


def test_the_job_on_sigterm_saves_skips_the_rest_says_how_to_resume_and_exits_143(tmp_path, job):
    common = [
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "8",
        "--logging_steps",
        "1",
        "--disable_tqdm",
        "true",
        "--report_to",
        "none",
        "--save_strategy",
        "steps",
        "--save_steps",
        "100",
        "--max_eval_samples",
        "16",
        "--do_train",
        "--do_eval",
    ]
    out = str(tmp_path / "res")
    code, stderr = _run_cli(job, [*common, "--output_dir", out], _interrupting(2, "sigterm"))
    assert code == 143, stderr
    assert f"train.py: stopped by SIGTERM after step 2 of 4. The checkpoint is {out}/checkpoint-2" in stderr
    assert written(out) == ["checkpoint-2"]  # no final model, train_results.json, evaluation or chart
    command = shlex.split(stderr.strip().splitlines()[-1])
    assert command[:2] == ["python", sys.argv[0]] and command[-2:] == [
        "--resume_from_checkpoint",
        f"{out}/checkpoint-2",
    ]
    code, stderr = _run_cli(job, command[2:])
    assert code == 0, stderr
    uninterrupted = str(tmp_path / "whole")
    assert _run_cli(job, [*common, "--output_dir", uninterrupted])[0] == 0
    (log_r, eval_r, weights_r), (log_u, eval_u, weights_u) = _job_result(out), _job_result(uninterrupted)
    assert log_r == log_u and eval_r == eval_u
    assert all(torch.equal(weights_r[k], weights_u[k]) for k in weights_u)


def test_the_job_on_ctrl_c_names_the_last_checkpoint(tmp_path, job):
    out = str(tmp_path / "res")
    argv = [
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "8",
        "--disable_tqdm",
        "true",
        "--report_to",
        "none",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--do_train",
        "--output_dir",
        out,
    ]
    code, stderr = _run_cli(job, argv, _interrupting(3, "ctrl-c"))
    assert code == 130
    assert f"train.py: interrupted. The last checkpoint is {out}/checkpoint-2. Resume with:" in stderr
    assert stderr.strip().endswith(f"--resume_from_checkpoint {out}/checkpoint-2")


def test_the_job_with_an_output_dir_that_is_a_file_is_one_line(tmp_path, job):
    path = tmp_path / "res"
    path.write_text("")
    code, stderr = _run_cli(job, ["--output_dir", str(path), "--max_steps", "1"])
    assert (
        code == 2
        and stderr
        == f"train.py: error: --output_dir {path} is an existing file, not a folder; choose another --output_dir.\n"
    )


def test_checks_refuse_only_what_this_run_reads(tmp_path):
    """Unpadded sequences of varying length stack in batches of one; an evaluation set with text labels is not
    read by a run that never evaluates: Trainer trains both, and so does looptrain, identically."""
    rng = np.random.default_rng(0)
    ragged = Dataset.from_dict(
        {"input_ids": [rng.integers(5, 100, 4 + i).tolist() for i in range(6)], "label": [0, 1] * 3}
    )
    text_labels = random_token_dataset(8, 1).remove_columns(["label"]).add_column("label", ["yes", "no"] * 4)
    hf, lt = run_both(
        tmp_path,
        tiny_bert,
        train_dataset=ragged,
        eval_dataset=text_labels,
        args=dict(max_steps=3, per_device_train_batch_size=1, logging_steps=1, save_strategy="no"),
        trainer_kwargs=dict(data_collator=transformers.default_data_collator),
    )
    assert_parity(hf, lt)
    trainer = looptrain.Trainer(
        tiny_bert(),
        _args(tmp_path / "two", per_device_train_batch_size=2),
        train_dataset=ragged,
        data_collator=transformers.default_data_collator,
    )
    with pytest.raises(
        ValueError, match="'input_ids' sequences have 4 to 9 tokens, and default_data_collator does not pad"
    ):
        _train(trainer)
