"""Checkpoints: Trainer's layout and save strategies, exact resume in a new process, interoperability with
`transformers.Trainer` both ways, no code from files, crash safety under SIGKILL, preemption by SIGTERM,
and clear errors.

"Exact" means: every `log_history` entry equal (timings left out) and every final parameter equal bit for
bit. One value is left out of the comparison of a resumed run with an uninterrupted one: `train_loss` in
the final summary, which (in Trainer and in looptrain) averages the steps run by the `train()` call that
logs it, like the summary's runtime and throughput.

Runs that must happen in a process of their own go through `resume_worker.Server` (a fork server, one
thread per run); every number compared is produced in this test session, none is pasted.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import signal
import time

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import looptrain
from helpers import (
    accuracy,
    assert_parity,
    assert_same_params,
    make_args,
    random_token_dataset,
    run_both,
    strip_timing,
    tiny_bert,
    tiny_gpt2,
)
from looptrain.checkpoint import last_checkpoint
from resume_worker import Server, checkpoint_fingerprint, read_result

TRAIN, EVAL = random_token_dataset(40, 1), random_token_dataset(12, 2)


# ============================================================================================ harness
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The in-process runs here use one thread too (restored afterwards): fast on a loaded machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


def comparable(log_history: list[dict]) -> list[dict]:
    """`log_history` without timings, and without the final summary's per-call `train_loss`."""
    log = strip_timing(log_history)
    if log and "train_loss" in log[-1]:
        log[-1] = {k: v for k, v in log[-1].items() if k != "train_loss"}
    return log


class Run:
    """A finished (or killed) worker run: its exit code, output folder and results."""

    def __init__(self, exit_code: int, output_dir: str, result_dir: str):
        self.exit_code, self.output_dir, self.result_dir = exit_code, output_dir, result_dir

    @property
    def result(self) -> dict:
        return read_result(self.result_dir)[0]

    @property
    def weights(self) -> dict:
        return read_result(self.result_dir)[1]

    @property
    def log(self) -> list[dict]:
        return comparable(self.result["log_history"])

    def checkpoints(self) -> list[str]:
        return sorted(
            (n for n in os.listdir(self.output_dir) if n.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1])
        )

    def log_text(self) -> str:
        with open(os.path.join(self.result_dir, "log.txt")) as f:
            return f.read()


class Runner:
    def __init__(self, server: Server, root):
        self.server, self.root, self.count = server, str(root), 0

    def spec(self, name, lib="looptrain", args=None, output_dir=None, **extra) -> dict:
        self.count += 1
        result_dir = os.path.join(self.root, f"{self.count:02d}-{name}")
        return dict(
            lib=lib,
            args=args or {},
            output_dir=output_dir or os.path.join(result_dir, "out"),
            result_dir=result_dir,
            **extra,
        )

    def run(self, name, **kwargs) -> Run:
        spec = self.spec(name, **kwargs)
        code = self.server.run(spec)
        return Run(code, spec["output_dir"], spec["result_dir"])


@pytest.fixture(scope="module")
def runner(server, tmp_path_factory):
    return Runner(server, tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def reference(runner):
    """Uninterrupted runs, one per (library, arguments), shared by the tests of this module."""
    cache = {}

    def get(args: dict, lib: str = "looptrain") -> Run:
        key = (lib, json.dumps(args, sort_keys=True))
        if key not in cache:
            run = runner.run(f"reference-{lib}", lib=lib, args=args)
            assert run.exit_code == 0, run.log_text()
            cache[key] = run
        return cache[key]

    return get


def assert_same_run(resumed: Run, uninterrupted: Run):
    assert resumed.exit_code == 0, resumed.log_text()
    a, b = uninterrupted.log, resumed.log
    assert len(a) == len(b), f"{len(a)} vs {len(b)} log entries:\n{a}\n{b}"
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"log entry {i} differs:\n  uninterrupted: {x}\n  resumed:       {y}"
    assert_same_params(uninterrupted.weights, resumed.weights)


def differs(resumed: Run, uninterrupted: Run) -> bool:
    if resumed.log != uninterrupted.log:
        return True
    wa, wb = uninterrupted.weights, resumed.weights
    return any(not torch.equal(wa[n], wb[n]) for n in wa)


def stop_after_save(step: int) -> dict:
    """Run B's first process: SIGKILLed right after checkpoint-<step> is written (a crash)."""
    return {"point": "on_save", "step": step, "how": "sigkill"}


def interrupted(runner, name, args, k, lib="looptrain", die=None) -> Run:
    run = runner.run(f"{name}-to-{k}", lib=lib, args=args, die=die or stop_after_save(k))
    assert run.exit_code == -signal.SIGKILL, run.log_text()
    return run


def resumed(runner, name, args, first: Run, k, lib="looptrain") -> Run:
    """Run B's second process: a new process resumes from checkpoint-<k> and trains to the end."""
    return runner.run(
        f"{name}-from-{k}",
        lib=lib,
        args=args,
        output_dir=first.output_dir,
        resume=os.path.join(first.output_dir, f"checkpoint-{k}"),
    )


# ============================================================================================ layout and strategies
GA2_EVAL = dict(gradient_accumulation_steps=2, eval_strategy="epoch")  # 3 steps per epoch, 6 in all


def test_checkpoint_layout_and_content_match_trainer(reference):
    """Same folders, same file names (but the arguments as JSON), same weights, optimizer, schedule, RNG
    and trainer state as transformers.Trainer writes."""
    args = {**GA2_EVAL, "save_steps": 2}
    hf, lt = reference(args, "transformers"), reference(args)
    assert_same_run(lt, hf)
    assert hf.checkpoints() == lt.checkpoints() == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for name in lt.checkpoints():
        a, b = os.path.join(hf.output_dir, name), os.path.join(lt.output_dir, name)
        assert set(os.listdir(a)) - {"training_args.bin"} == set(os.listdir(b)) - {
            "training_args.json",
            "looptrain_state.json",
        }
        assert set(os.listdir(a)) == {
            "config.json",
            "model.safetensors",
            "optimizer.pt",
            "scheduler.pt",
            "rng_state.pth",
            "trainer_state.json",
            "training_args.bin",
        }
        wa, wb = (
            safetensors.torch.load_file(f"{a}/model.safetensors"),
            safetensors.torch.load_file(f"{b}/model.safetensors"),
        )
        assert all(torch.equal(wa[n], wb[n]) for n in wa) and wa.keys() == wb.keys()
        for file in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            _assert_nested_equal(
                torch.load(f"{a}/{file}", weights_only=False), torch.load(f"{b}/{file}", weights_only=False), file
            )
        sa, sb = (json.load(open(f"{d}/trainer_state.json")) for d in (a, b))
        sa["log_history"], sb["log_history"] = strip_timing(sa["log_history"]), strip_timing(sb["log_history"])
        assert sa == sb
        with open(f"{b}/training_args.json") as f:
            assert json.load(f)["save_steps"] == 2


def _assert_nested_equal(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_nested_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_nested_equal(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


STRATEGIES = [
    ("no", dict(save_strategy="no")),
    ("steps_limit_2", dict(save_strategy="steps", save_steps=2, save_total_limit=2)),
    ("steps_ratio", dict(save_strategy="steps", save_steps=0.25)),
    ("epoch", dict(save_strategy="epoch", eval_strategy="epoch")),
    ("only_model", dict(save_steps=3, save_only_model=True)),
    (
        "best_accuracy",
        dict(save_strategy="best", eval_strategy="steps", eval_steps=2, metric_for_best_model="accuracy"),
    ),
    (
        "best_loss_limit_1_load_best",
        dict(
            save_strategy="steps",
            save_steps=2,
            eval_strategy="steps",
            eval_steps=2,
            save_total_limit=1,
            load_best_model_at_end=True,
            learning_rate=3e-3,
        ),
    ),
    (
        "best_protected_limit_2",
        dict(
            save_strategy="epoch",
            eval_strategy="epoch",
            num_train_epochs=4,
            save_total_limit=2,
            load_best_model_at_end=True,
            metric_for_best_model="accuracy",
            greater_is_better=True,
            learning_rate=3e-3,
        ),
    ),
]


@pytest.mark.parametrize("case,overrides", STRATEGIES, ids=[c for c, _ in STRATEGIES])
def test_save_strategies_match_trainer(tmp_path, case, overrides):
    """Which checkpoints exist at the end (rotation, the best one protected, the final deletion with
    save_total_limit=1), what each holds, the best-model bookkeeping, and the weights loaded at the end."""
    args = {**dict(per_device_train_batch_size=8, num_train_epochs=2, logging_steps=1, seed=42), **overrides}
    hf, lt = run_both(tmp_path, tiny_bert, TRAIN, EVAL, args=args, trainer_kwargs=dict(compute_metrics=accuracy))
    assert_parity(hf, lt)
    names = lambda d: sorted(n for n in os.listdir(d) if not n.startswith("."))  # noqa: E731
    assert names(tmp_path / "hf") == names(tmp_path / "lt")
    for name in names(tmp_path / "lt"):
        files_hf = set(os.listdir(tmp_path / "hf" / name)) - {"training_args.bin"}
        files_lt = set(os.listdir(tmp_path / "lt" / name)) - {"training_args.json", "looptrain_state.json"}
        assert files_hf == files_lt, name
        sa, sb = (json.load(open(tmp_path / lib / name / "trainer_state.json")) for lib in ("hf", "lt"))
        for s in (sa, sb):
            s["log_history"] = strip_timing(s["log_history"])
            s["best_model_checkpoint"] = s["best_model_checkpoint"] and os.path.basename(s["best_model_checkpoint"])
        assert sa == sb, name
    for attr in ("best_metric", "best_global_step"):
        assert getattr(hf[0].state, attr) == getattr(lt[0].state, attr)
    best = hf[0].state.best_model_checkpoint, lt[0].state.best_model_checkpoint
    assert (best[0] and os.path.basename(best[0])) == (best[1] and os.path.basename(best[1]))
    if case == "no":
        assert names(tmp_path / "lt") == []
    if case == "only_model":
        assert "optimizer.pt" not in os.listdir(tmp_path / "lt" / "checkpoint-3")
    if overrides.get("load_best_model_at_end"):  # the best checkpoint survived rotation
        assert lt[0].state.best_model_checkpoint is not None and os.path.isdir(lt[0].state.best_model_checkpoint)


def test_save_model_matches_trainer(tmp_path):
    """`Trainer.save_model()`: the same model files as Trainer's, loadable with from_pretrained."""
    args = dict(per_device_train_batch_size=8, max_steps=2, logging_steps=1, save_strategy="no")
    (hf, _), (lt, _) = run_both(tmp_path, tiny_bert, TRAIN, args=args)
    hf.save_model(str(tmp_path / "hf_model"))
    lt.save_model(str(tmp_path / "lt_model"))
    assert set(os.listdir(tmp_path / "hf_model")) - {"training_args.bin"} == set(os.listdir(tmp_path / "lt_model")) - {
        "training_args.json"
    }
    wa = safetensors.torch.load_file(tmp_path / "hf_model" / "model.safetensors")
    wb = safetensors.torch.load_file(tmp_path / "lt_model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "lt_model")
    assert all(torch.equal(p, lt.model.state_dict()[n]) for n, p in reloaded.state_dict().items())
    with open(tmp_path / "lt_model" / "training_args.json") as f:
        assert json.load(f)["max_steps"] == 2


# ============================================================================================ exact resume
# (name, arguments, k): run A straight through; run B to checkpoint-k, SIGKILL it, resume it in a new process.
RESUME_CASES = [
    ("mid_epoch", dict(save_steps=1, eval_strategy="epoch"), 2),  # 5 steps per epoch
    ("epoch_boundary", dict(save_steps=1), 5),
    ("ga2_mid_epoch", dict(GA2_EVAL, save_steps=1), 1),
    ("eval_every_epoch_save_before_eval", dict(GA2_EVAL, save_steps=3), 3),  # Trainer: not exact
    ("eval_every_epoch_save_epoch", dict(GA2_EVAL, save_strategy="epoch"), 3),
    ("checkpoint_at_max_steps_end_of_epoch", dict(GA2_EVAL), 6),  # Trainer: not exact
    ("checkpoint_at_max_steps_mid_epoch", dict(GA2_EVAL, max_steps=4), 4),  # Trainer: not exact
    (
        "logging_every_2_save_every_3",
        dict(logging_steps=2, save_steps=3, eval_strategy="epoch"),
        3,
    ),  # Trainer: not exact
    ("eval_on_start", dict(GA2_EVAL, save_steps=2, eval_on_start=True), 2),  # Trainer: not exact
]


@pytest.mark.parametrize("case,args,k", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resume_in_a_new_process_is_exact(runner, reference, case, args, k):
    a = reference(args)
    b = interrupted(runner, case, args, k)
    assert_same_run(resumed(runner, case, args, b, k), a)


def test_resume_inside_an_accumulation_window_is_exact(runner, reference):
    """GA=2: the process dies after the first micro-batch of step 5's window; resume=True takes checkpoint-4
    and runs that window again from its first batch."""
    args = dict(GA2_EVAL, save_steps=1)
    a = reference(args)
    b = interrupted(runner, "window", args, 4, die={"point": "on_substep_end", "step": 4})
    assert last_checkpoint(b.output_dir).endswith("checkpoint-4")
    c = runner.run("window-resume", args=args, output_dir=b.output_dir, resume=True)
    assert_same_run(c, a)


TRAINER_INEXACT = [
    c
    for c in RESUME_CASES
    if c[0]
    in (
        "eval_every_epoch_save_before_eval",
        "checkpoint_at_max_steps_end_of_epoch",
        "checkpoint_at_max_steps_mid_epoch",
        "logging_every_2_save_every_3",
        "eval_on_start",
    )
]


@pytest.mark.parametrize("case,args,k", TRAINER_INEXACT, ids=[c[0] for c in TRAINER_INEXACT])
def test_trainer_resume_is_not_exact_where_looptrain_is(runner, reference, case, args, k):
    """The same scenario with transformers.Trainer 5.24 for both halves of B: its resumed run differs from
    its own uninterrupted run (the uninterrupted runs of both libraries are equal); looptrain's does not
    (test above). What Trainer loses:
      * save before the epoch-end evaluation (item 8 of the semantics doc): the evaluation and its RNG draw;
      * checkpoint at max_steps: the final evaluation, or (max_steps inside an epoch) it trains one step more;
      * logging_steps not a multiple of save_steps: the loss summed since the last log;
      * eval_on_start: it evaluates again on resume (one more RNG draw)."""
    a_hf, a_lt = reference(args, "transformers"), reference(args)
    assert_same_run(a_lt, a_hf)
    b = interrupted(runner, f"hf-{case}", args, k, lib="transformers")
    c = resumed(runner, f"hf-{case}", args, b, k, lib="transformers")
    assert c.exit_code == 0, c.log_text()
    assert differs(c, a_hf)


# ============================================================================================ interoperability
INTEROP_CASES = [
    ("ga2_mid_epoch", dict(GA2_EVAL, save_steps=1), 4),
    ("epoch_boundary_no_eval", dict(save_steps=1), 5),
    ("save_before_eval", dict(GA2_EVAL, save_steps=3), 3),
]


@pytest.mark.parametrize("case,args,k", INTEROP_CASES, ids=[c[0] for c in INTEROP_CASES])
def test_trainer_checkpoint_resumes_exactly_in_looptrain(runner, reference, case, args, k):
    """transformers.Trainer writes checkpoint-k (with its pickled training_args.bin, never opened);
    looptrain resumes it in a new process and ends exactly where both uninterrupted runs end. Without
    `looptrain_state.json`, looptrain tells a save before the epoch-end evaluation from the save strategy."""
    a_hf, a_lt = reference(args, "transformers"), reference(args)
    assert_same_run(a_lt, a_hf)
    b = interrupted(runner, f"hf-{case}", args, k, lib="transformers")
    assert "training_args.bin" in os.listdir(os.path.join(b.output_dir, f"checkpoint-{k}"))
    assert_same_run(resumed(runner, f"hf-to-lt-{case}", args, b, k, lib="looptrain"), a_hf)


INTEROP_TO_TRAINER = INTEROP_CASES[:2]  # Trainer's own resume is not exact for the third (test above)


@pytest.mark.parametrize("case,args,k", INTEROP_TO_TRAINER, ids=[c[0] for c in INTEROP_TO_TRAINER])
def test_looptrain_checkpoint_resumes_exactly_in_trainer(runner, reference, case, args, k):
    """looptrain writes checkpoint-k (training_args.json, no pickle); transformers.Trainer resumes it in a
    new process and ends exactly where both uninterrupted runs end."""
    a_hf, a_lt = reference(args, "transformers"), reference(args)
    assert_same_run(a_lt, a_hf)
    b = interrupted(runner, f"lt-{case}", args, k)
    assert "training_args.bin" not in os.listdir(os.path.join(b.output_dir, f"checkpoint-{k}"))
    assert_same_run(resumed(runner, f"lt-to-hf-{case}", args, b, k, lib="transformers"), a_lt)


# ============================================================================================ early stopping
EARLY = dict(
    num_train_epochs=4,
    eval_strategy="steps",
    eval_steps=1,
    save_steps=1,
    learning_rate=3e-3,
    load_best_model_at_end=True,
    metric_for_best_model="loss",
    save_total_limit=2,
    restore_callback_states_from_checkpoint=True,
)  # Trainer restores callback state only when asked


class Patience2(transformers.EarlyStoppingCallback):
    def __init__(self):
        super().__init__(early_stopping_patience=2)


def test_early_stopping_callback_parity(tmp_path):
    """transformers.EarlyStoppingCallback, unchanged, with load_best_model_at_end: same stop, same
    checkpoints (the best one protected from rotation), same weights loaded at the end."""
    args = dict(per_device_train_batch_size=8, logging_steps=1, seed=42, **EARLY)
    # a class, not an instance: each trainer gets its own callback object
    hf, lt = run_both(
        tmp_path,
        tiny_bert,
        TRAIN,
        EVAL,
        args=args,
        trainer_kwargs=dict(compute_metrics=accuracy, callbacks=[Patience2]),
    )
    assert_parity(hf, lt)
    state = lt[0].state
    assert state.global_step < state.max_steps, "early stopping should have ended the run"
    assert state.best_global_step < state.global_step
    best = f"checkpoint-{state.best_global_step}"
    assert (
        sorted(os.listdir(tmp_path / "hf"))
        == sorted(os.listdir(tmp_path / "lt"))
        == sorted([best, f"checkpoint-{state.global_step}"])
    )
    saved = safetensors.torch.load_file(tmp_path / "lt" / best / "model.safetensors")
    assert all(torch.equal(p, saved[n]) for n, p in lt[0].model.state_dict().items())


def test_resume_restores_early_stopping_patience(runner, reference):
    """Checkpoint-3 is written with one evaluation without improvement counted; resumed, the run stops
    where the uninterrupted one stopped (a fresh counter would train two steps longer)."""
    a = runner.run("early-reference", args=EARLY, early_stopping={"early_stopping_patience": 2})
    assert a.exit_code == 0 and a.result["global_step"] == 4, a.log_text()
    b = runner.run("early-to-3", args=EARLY, early_stopping={"early_stopping_patience": 2}, die=stop_after_save(3))
    assert b.exit_code == -signal.SIGKILL
    with open(os.path.join(b.output_dir, "checkpoint-3", "trainer_state.json")) as f:
        saved = json.load(f)["stateful_callbacks"]["EarlyStoppingCallback"]
    assert saved["attributes"]["early_stopping_patience_counter"] == 1
    c = runner.run(
        "early-from-3",
        args=EARLY,
        early_stopping={"early_stopping_patience": 2},
        output_dir=b.output_dir,
        resume=os.path.join(b.output_dir, "checkpoint-3"),
    )
    assert_same_run(c, a)


# ============================================================================================ crash safety
CRASH_ARGS = dict(GA2_EVAL, num_train_epochs=3, save_steps=2, save_total_limit=2)  # 9 steps; saves 2 4 6 8 9
# (moment, die spec). `nth` counts matching moments over the run; torch.save runs 3 times per checkpoint.
KILL_POINTS = [
    ("before_the_first_step", {"point": "on_step_begin", "step": 0}),
    ("inside_the_first_accumulation_window", {"point": "on_substep_end", "step": 0}),
    ("save_2_weights_written_nothing_else", {"point": "model_saved", "nth": 1}),
    ("save_2_optimizer_pt_half_written", {"point": "torch_save_partial", "nth": 1}),
    ("during_the_epoch_1_evaluation", {"point": "on_prediction_step", "step": 3}),
    ("save_4_trainer_state_json_half_written", {"point": "state_json_partial", "nth": 2}),
    ("save_4_complete_not_yet_renamed", {"point": "before_rename", "nth": 2}),
    ("save_4_renamed_not_yet_rotated", {"point": "after_rename", "nth": 2}),
    ("save_6_rotation_half_deleted_checkpoint_2", {"point": "rotation", "nth": 1}),
    ("after_the_epoch_2_evaluation_that_follows_save_6", {"point": "on_evaluate", "step": 6}),
    ("step_7_optimizer_stepped_schedule_not", {"point": "on_optimizer_step", "step": 6}),
    ("save_9_scheduler_pt_half_written", {"point": "torch_save_partial", "nth": 14}),
    ("save_9_renamed_not_yet_rotated", {"point": "after_rename", "nth": 5}),
    ("after_training_ended", {"point": "on_train_end"}),
]


def test_sigkill_at_any_moment_then_resume_is_exact(runner):
    """A training process is SIGKILLed at each of 14 moments (8 of them inside a checkpoint save); after
    each kill every `checkpoint-<N>` folder left is complete and byte-identical to the one the uninterrupted
    run wrote (timings aside); `resume_from_checkpoint=True` then continues in a new process to the same
    logs and the same final weights, and leaves the same checkpoints."""
    u = runner.run("crash-uninterrupted", args=CRASH_ARGS, record_checkpoints=True)
    assert u.exit_code == 0, u.log_text()
    recorded = u.result["checkpoints"]
    assert sorted(recorded) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8", "checkpoint-9"]
    assert u.checkpoints() == ["checkpoint-8", "checkpoint-9"]

    def assert_undamaged(output_dir, when):
        for name in os.listdir(output_dir):
            if name.startswith("checkpoint-"):
                assert checkpoint_fingerprint(os.path.join(output_dir, name)) == recorded[name], f"{name} {when}"

    outcomes = []
    for moment, die in KILL_POINTS:
        k = runner.run(f"kill-{moment}", args=CRASH_ARGS, die={**die, "how": "sigkill"})
        assert k.exit_code == -signal.SIGKILL, f"{moment}: the kill did not happen\n{k.log_text()}"
        assert_undamaged(k.output_dir, f"after the kill {moment}")
        newest = last_checkpoint(k.output_dir)
        r = runner.run(f"resume-{moment}", args=CRASH_ARGS, output_dir=k.output_dir, resume=True if newest else None)
        assert_same_run(r, u)
        assert_undamaged(r.output_dir, f"after resuming from the kill {moment}")
        assert r.checkpoints() == u.checkpoints(), moment
        assert not [n for n in os.listdir(r.output_dir) if n.startswith(".")], f"{moment}: temporary folders left"
        outcomes.append((moment, newest and os.path.basename(newest)))
    print("kill moment -> resumed from:", *outcomes, sep="\n  ")


def test_resume_true_takes_the_newest_complete_checkpoint(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", ".tmp-checkpoint-12", "checkpoint-14"):
        os.makedirs(tmp_path / name)
    for name in ("checkpoint-2", "checkpoint-10", ".tmp-checkpoint-12"):
        (tmp_path / name / "trainer_state.json").write_text("{}")
    # checkpoint-14 has no trainer_state.json: a save transformers.Trainer did not finish
    assert last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")


# ============================================================================================ preemption
def test_sigterm_from_outside_saves_at_the_next_step_and_exits_cleanly(runner, reference):
    args = dict(GA2_EVAL, save_steps=500)
    a = reference(args)
    spec = runner.spec("sigterm", args=args, wait_for_sigterm_at_step=2)
    pid = runner.server.start(spec)
    ready = os.path.join(spec["result_dir"], "ready")
    deadline = time.monotonic() + 300  # a bound on waiting for the child, not a timing assertion
    while not os.path.exists(ready) and time.monotonic() < deadline:
        time.sleep(0.02)
    reached = os.path.exists(ready)
    os.kill(pid, signal.SIGTERM if reached else signal.SIGKILL)
    p = Run(runner.server.wait(), spec["output_dir"], spec["result_dir"])  # always collected: the server stays in step
    assert reached, "the training process never reached step 2"
    assert p.exit_code == 0, p.log_text()
    assert p.result["preempted"] is True and p.result["global_step"] == 2
    assert p.checkpoints() == ["checkpoint-2"]
    r = runner.run("sigterm-resume", args=args, output_dir=p.output_dir, resume=True)
    assert_same_run(r, a)


@pytest.mark.parametrize(
    "moment,die",
    [
        ("inside_a_window", {"point": "on_substep_end", "step": 3}),  # saves checkpoint-4 when the window ends
        ("at_the_step_before_the_epoch_end_evaluation", {"point": "on_step_end", "step": 3}),
    ],
)
def test_sigterm_then_resume_is_exact(runner, reference, moment, die):
    args = dict(GA2_EVAL, save_steps=500)
    a = reference(args)
    p = runner.run(f"sigterm-{moment}", args=args, die={**die, "how": "sigterm"})
    assert p.exit_code == 0, p.log_text()
    step = 4 if moment == "inside_a_window" else 3
    assert p.result["preempted"] is True and p.result["global_step"] == step
    assert p.checkpoints() == [f"checkpoint-{step}"]
    r = runner.run(f"sigterm-{moment}-resume", args=args, output_dir=p.output_dir, resume=True)
    assert_same_run(r, a)


def test_sigterm_handler_is_restored_after_train(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    trainer = _trainer(tmp_path, max_steps=1)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    assert signal.getsignal(signal.SIGTERM) is before


# ============================================================================================ no code from files
def _trainer(tmp_path, model=None, **args):
    targs = make_args(
        looptrain.TrainingArguments, tmp_path / "out", per_device_train_batch_size=8, logging_steps=1, **args
    )
    return looptrain.Trainer(
        model=model or tiny_bert(), args=targs, train_dataset=TRAIN, eval_dataset=EVAL, compute_metrics=accuracy
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """checkpoint-2 of a short looptrain run and of a short transformers.Trainer run."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for lib, mod in (("looptrain", looptrain), ("transformers", transformers)):
        args = make_args(
            mod.TrainingArguments, root / lib, per_device_train_batch_size=8, max_steps=3, save_steps=2, logging_steps=1
        )
        trainer = mod.Trainer(model=tiny_bert(), args=args, train_dataset=TRAIN)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
        out[lib] = str(root / lib / "checkpoint-2")
    return out


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _plant(path, marker):
    """Replace a file with a pickle that would create `marker` when unpickled."""
    if path.endswith((".pt", ".pth", ".bin")):
        torch.save({"state": _Payload(marker)}, path)  # a real torch file whose pickle holds the payload
    else:
        with open(path, "wb") as f:
            pickle.dump(_Payload(marker), f)


def test_the_planted_payload_is_live(tmp_path):
    """The payload of the tests below does run code when a file is unpickled without weights_only."""
    marker = tmp_path / "pwned"
    _plant(str(tmp_path / "optimizer.pt"), marker)
    torch.load(tmp_path / "optimizer.pt", weights_only=False)
    assert marker.exists()


CHECKPOINT_FILES = [
    "model.safetensors",
    "config.json",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
    "training_args.json",
    "looptrain_state.json",
]


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_pickle_payload_in_any_file_is_refused_without_running(tmp_path, checkpoints, name):
    assert name in os.listdir(checkpoints["looptrain"])
    ckpt = str(tmp_path / "checkpoint-2")
    shutil.copytree(checkpoints["looptrain"], ckpt)
    marker = tmp_path / "pwned"
    _plant(os.path.join(ckpt, name), marker)
    trainer = _trainer(tmp_path, max_steps=3)
    before = {n: p.clone() for n, p in trainer.model.state_dict().items()}
    with pytest.raises(looptrain.CheckpointError, match=name.replace(".", r"\.")) as info:
        trainer.train(resume_from_checkpoint=ckpt)
    assert not marker.exists(), f"unpickling {name} ran code"
    assert_one_clear_error(info.value)
    after = trainer.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before), "the model was changed before the error"


def test_trainer_checkpoint_pickled_training_args_are_never_opened(tmp_path, checkpoints):
    """Trainer's checkpoints hold a pickled training_args.bin; looptrain resumes them without opening it."""
    ckpt = str(tmp_path / "checkpoint-2")
    shutil.copytree(checkpoints["transformers"], ckpt)
    marker = tmp_path / "pwned"
    _plant(os.path.join(ckpt, "training_args.bin"), marker)
    trainer = _trainer(tmp_path, max_steps=3)
    with contextlib.redirect_stdout(io.StringIO()):
        assert trainer.train(resume_from_checkpoint=ckpt).global_step == 3
    assert not marker.exists()


@pytest.mark.parametrize(
    "name", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "model.safetensors"]
)
def test_pickle_payload_in_a_trainer_checkpoint_is_refused(tmp_path, checkpoints, name):
    ckpt = str(tmp_path / "checkpoint-2")
    shutil.copytree(checkpoints["transformers"], ckpt)
    marker = tmp_path / "pwned"
    _plant(os.path.join(ckpt, name), marker)
    with pytest.raises(looptrain.CheckpointError, match=name.replace(".", r"\.")):
        _trainer(tmp_path, max_steps=3).train(resume_from_checkpoint=ckpt)
    assert not marker.exists()


# ============================================================================================ clear errors
def assert_one_clear_error(err: BaseException):
    """The error is the whole story: no chained traceback from deep inside torch, safetensors or json."""
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), repr(err.__context__)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _corrupt(path):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        for i in range(0, len(data), 7):
            data[i] ^= 0x5A
        f.seek(0)
        f.write(data)


ERRORS = [
    ("missing_folder", lambda c: os.path.join(c, "does-not-exist"), "does not exist"),
    ("a_file_not_a_folder", lambda c: os.path.join(c, "config.json"), "not a checkpoint folder"),
    ("no_trainer_state", lambda c: os.remove(os.path.join(c, "trainer_state.json")), "trainer_state.json"),
    ("truncated_safetensors", lambda c: _truncate(os.path.join(c, "model.safetensors")), "model.safetensors"),
    ("truncated_optimizer", lambda c: _truncate(os.path.join(c, "optimizer.pt")), "optimizer.pt"),
    ("truncated_trainer_state", lambda c: _truncate(os.path.join(c, "trainer_state.json")), "trainer_state.json"),
    ("corrupted_rng_state", lambda c: _corrupt(os.path.join(c, "rng_state.pth")), "rng_state.pth"),
    ("corrupted_scheduler", lambda c: _corrupt(os.path.join(c, "scheduler.pt")), "scheduler.pt"),
    ("corrupted_safetensors", lambda c: _corrupt(os.path.join(c, "model.safetensors")), "model.safetensors"),
    ("empty_optimizer", lambda c: open(os.path.join(c, "optimizer.pt"), "w").close(), "optimizer.pt"),
]


@pytest.mark.parametrize("case,damage,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_unusable_checkpoint_is_one_clear_error(tmp_path, checkpoints, case, damage, message):
    ckpt = str(tmp_path / "checkpoint-2")
    shutil.copytree(checkpoints["looptrain"], ckpt)
    target = damage(ckpt)
    target = target if isinstance(target, str) else ckpt
    trainer = _trainer(tmp_path, max_steps=3)
    with pytest.raises(looptrain.CheckpointError, match=message) as info:
        trainer.train(resume_from_checkpoint=target)
    assert_one_clear_error(info.value)
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("other", ["bert_3_labels", "bert_hidden_48", "gpt2"])
def test_checkpoint_of_a_different_model_is_a_clear_error(tmp_path, checkpoints, other):
    model = {
        "bert_3_labels": lambda: tiny_bert(num_labels=3),
        "bert_hidden_48": lambda: transformers.BertForSequenceClassification(
            transformers.BertConfig(
                vocab_size=100,
                hidden_size=48,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=64,
            )
        ),
        "gpt2": tiny_gpt2,
    }[other]()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    trainer = _trainer(tmp_path, model=model, max_steps=3)
    with pytest.raises(looptrain.CheckpointError, match="different model|'bert' model"):
        trainer.train(resume_from_checkpoint=checkpoints["looptrain"])
    assert all(torch.equal(before[n], p) for n, p in trainer.model.state_dict().items())


def test_resume_true_without_any_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(looptrain.CheckpointError, match="no complete checkpoint"):
        _trainer(tmp_path, max_steps=3).train(resume_from_checkpoint=True)


def test_a_search_trial_checkpoint_is_written_like_every_checkpoint(tmp_path):
    """One writer per file: a hyperparameter-search trial's checkpoint (Ray Tune's `_tune_save_checkpoint`) is written
    by the same code as a save during training: the same files (RNG and loop state included), the same bytes."""

    class TrialSaveToo(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # right after the save: the same state
            trainer._tune_save_checkpoint(str(tmp_path / "ray"))

    args = make_args(looptrain.TrainingArguments, tmp_path / "run", max_steps=2, save_steps=2, logging_steps=1)
    trainer = looptrain.Trainer(
        tiny_bert(), args, train_dataset=random_token_dataset(16, 0), callbacks=[TrialSaveToo()]
    )
    trainer.train()
    saved, trial = tmp_path / "run" / "checkpoint-2", tmp_path / "ray" / "checkpoint-2"
    names = sorted(os.listdir(saved))
    assert {
        "trainer_state.json",
        "looptrain_state.json",
        "training_args.json",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "model.safetensors",
    } <= set(names)
    assert sorted(os.listdir(trial)) == names
    for name in names:
        if name.endswith((".pt", ".pth")):  # pickled containers: compared by value (bytes hold object ids)
            a, b = (torch.load(folder / name, weights_only=False) for folder in (saved, trial))
            assert repr(a) == repr(b), name
        elif name == "trainer_state.json":  # on_save has reset control.should_save between the two: only that differs
            a, b = (json.loads((folder / name).read_text()) for folder in (saved, trial))
            assert a["stateful_callbacks"]["TrainerControl"]["args"].pop("should_save") is True
            assert b["stateful_callbacks"]["TrainerControl"]["args"].pop("should_save") is False
            assert a == b
        else:
            assert (saved / name).read_bytes() == (trial / name).read_bytes(), name
    assert not [n for n in os.listdir(tmp_path / "ray") if n.startswith(".tmp-")]  # written in a staging folder
