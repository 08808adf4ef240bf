"""One training run of the checkpoint tests, in a process of its own, described by a JSON spec.

    python tests/resume_worker.py SPEC.json      # run one spec
    python tests/resume_worker.py --serve        # fork server: one JSON spec per stdin line (see `Server`)

A run builds the same tiny model and data from seeds (tiny_bert, 40 training and 12 evaluation examples),
trains with looptrain or transformers.Trainer, and writes into spec["result_dir"]:
`result.json` (log_history, global_step, training_loss) and `weights.safetensors` (every parameter).

A spec may make the process die at one moment (`die`): at a callback event, or inside a checkpoint save
(model written, a `.pt` file half written, `trainer_state.json` half written, just before or after the
rename, in the middle of deleting a rotated checkpoint). `how` is "sigkill" (the process SIGKILLs itself:
no handler, no cleanup, no flush) or "sigterm" (a preemption, which the trainer handles).

Importing torch and transformers takes seconds; the tests run dozens of short processes, so `--serve`
imports once and forks a fresh child per spec. The server itself never runs a tensor operation, so each
child starts as a new process would (same seeds, its own RNG and thread pool).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# One thread per run: the runs these tests compare bit for bit then do the same arithmetic whatever the
# machine's load (and a loaded 2-core machine is not slowed down further by spinning OpenMP threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import looptrain  # noqa: E402
import looptrain.checkpoint  # noqa: E402
from helpers import accuracy, make_args, random_token_dataset, strip_timing, tiny_bert  # noqa: E402

RUN_ARGS = dict(
    per_device_train_batch_size=8, per_device_eval_batch_size=8, num_train_epochs=2, logging_steps=1, seed=42
)
CALLBACK_EVENTS = (
    "on_train_begin",
    "on_epoch_begin",
    "on_step_begin",
    "on_substep_end",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_step_end",
    "on_log",
    "on_evaluate",
    "on_prediction_step",
    "on_save",
    "on_epoch_end",
    "on_train_end",
)


# ------------------------------------------------------------------------------------------------ dying
class _Dier:
    """Counts matching moments and dies at the nth one."""

    def __init__(self, die: dict | None):
        self.die = die or {}
        self.seen = 0

    def check(self, point: str, global_step: int | None = None) -> bool:
        if self.die.get("point") != point:
            return False
        if "step" in self.die and global_step is not None and self.die["step"] != global_step:
            return False
        self.seen += 1
        return self.seen == self.die.get("nth", 1)

    def now(self):
        sys.stdout.flush()
        sys.stderr.flush()
        how = self.die.get("how", "sigkill")
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer: it saves at the next step and returns
            return
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # never reached


class DieAtEvent(transformers.TrainerCallback):
    def __init__(self, dier: _Dier):
        self.dier = dier
        for event in CALLBACK_EVENTS:
            setattr(self, event, self._make(event))

    def _make(self, event):
        def handler(args, state, control, **kwargs):
            if self.dier.check(event, state.global_step):
                self.dier.now()

        return handler


def _install_save_hooks(dier: _Dier):
    """Die inside a checkpoint save. Patches this process only (it is a fresh child)."""
    point = dier.die.get("point")
    if point == "model_saved":  # model.safetensors + config.json written, nothing else yet
        original = looptrain.Trainer.save_model

        def save_model(self, output_dir=None, _internal_call=False):
            original(self, output_dir, _internal_call)
            if _internal_call and dier.check(point):
                dier.now()

        looptrain.Trainer.save_model = save_model
    elif point == "torch_save_partial":  # the nth .pt file of the run is half written
        original_save = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and dier.check(point):
                buffer = io.BytesIO()
                original_save(obj, buffer, *args, **kwargs)
                with open(f, "wb") as out:
                    out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                dier.now()
            return original_save(obj, f, *args, **kwargs)

        torch.save = save
    elif point == "state_json_partial":  # trainer_state.json half written
        original_json = transformers.TrainerState.save_to_json

        def save_to_json(self, json_path):
            if dier.check(point):
                text = json.dumps(__import__("dataclasses").asdict(self), indent=2, sort_keys=True)
                with open(json_path, "w") as f:
                    f.write(text[: len(text) // 2])
                dier.now()
            return original_json(self, json_path)

        transformers.TrainerState.save_to_json = save_to_json
    elif point in ("before_rename", "after_rename"):
        original_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            is_commit = os.path.basename(str(src)).startswith(".tmp-checkpoint-")
            if is_commit and point == "before_rename" and dier.check(point):
                dier.now()
            result = original_replace(src, dst, *args, **kwargs)
            if is_commit and point == "after_rename" and dier.check(point):
                dier.now()
            return result

        looptrain.checkpoint.os.replace = replace  # the module's `os` is the os module: patches os.replace
    elif point == "rotation":  # one file of a rotated-away checkpoint deleted, the rest not
        original_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if os.path.basename(str(path)).startswith(".tmp-delete-") and dier.check(point):
                first = sorted(os.listdir(path))[0]
                os.remove(os.path.join(path, first))
                dier.now()
            return original_rmtree(path, *args, **kwargs)

        looptrain.checkpoint.shutil.rmtree = rmtree


# ------------------------------------------------------------------------------------------------ fingerprints
def checkpoint_fingerprint(path: str) -> dict[str, str]:
    """sha256 of every file of a checkpoint; run-specific content (timings, the output folder) left out."""
    result = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            data = f.read()
        if name == "trainer_state.json":
            state = json.loads(data)
            state["log_history"] = strip_timing(state["log_history"])
            if state.get("best_model_checkpoint"):
                state["best_model_checkpoint"] = os.path.basename(state["best_model_checkpoint"])
            data = json.dumps(state, sort_keys=True).encode()
        elif name == "training_args.json":
            args = json.loads(data)
            args.pop("output_dir", None)
            data = json.dumps(args, sort_keys=True).encode()
        result[name] = hashlib.sha256(data).hexdigest()
    return result


class RecordCheckpoints(transformers.TrainerCallback):
    """In the uninterrupted run: the fingerprint of each checkpoint just after it is complete."""

    def __init__(self, output_dir: str, record: dict):
        self.output_dir, self.record = output_dir, record

    def on_save(self, args, state, control, **kwargs):
        name = f"checkpoint-{state.global_step}"
        self.record[name] = checkpoint_fingerprint(os.path.join(self.output_dir, name))


class WaitForSigterm(transformers.TrainerCallback):
    """At the end of step `step`, tell the test (a file appears) and wait until its SIGTERM has arrived."""

    def __init__(self, step: int, ready_file: str):
        self.step, self.ready_file, self.trainer = step, ready_file, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.step:
            return
        with open(self.ready_file, "w") as f:
            f.write(str(os.getpid()))
        deadline = time.monotonic() + 120  # a safety bound, not a measurement
        while not self.trainer._preemption.received and time.monotonic() < deadline:
            time.sleep(0.01)


# ------------------------------------------------------------------------------------------------ a run
def build_trainer(spec: dict, callbacks: list):
    lib = looptrain if spec.get("lib", "looptrain") == "looptrain" else transformers
    args = make_args(lib.TrainingArguments, spec["output_dir"], **{**RUN_ARGS, **spec.get("args", {})})
    if spec.get("early_stopping"):
        callbacks = [transformers.EarlyStoppingCallback(**spec["early_stopping"])] + callbacks
    return lib.Trainer(
        model=tiny_bert(),
        args=args,
        train_dataset=random_token_dataset(40, 1),
        eval_dataset=random_token_dataset(12, 2),
        compute_metrics=accuracy,
        callbacks=callbacks,
    )


def run(spec: dict) -> None:
    dier = _Dier(spec.get("die"))
    _install_save_hooks(dier)
    callbacks = [DieAtEvent(dier)]
    record: dict = {}
    if spec.get("record_checkpoints"):
        callbacks.append(RecordCheckpoints(spec["output_dir"], record))
    waiter = None
    if spec.get("wait_for_sigterm_at_step"):
        waiter = WaitForSigterm(spec["wait_for_sigterm_at_step"], os.path.join(spec["result_dir"], "ready"))
        callbacks.append(waiter)
    trainer = build_trainer(spec, callbacks)
    if waiter is not None:
        waiter.trainer = trainer
    resume = spec.get("resume")
    with contextlib.redirect_stdout(io.StringIO()):
        output = trainer.train(resume_from_checkpoint=resume)
    os.makedirs(spec["result_dir"], exist_ok=True)
    weights = {n: p.detach().clone().contiguous() for n, p in trainer.model.named_parameters()}
    safetensors.torch.save_file(weights, os.path.join(spec["result_dir"], "weights.safetensors"))
    result = {
        "log_history": trainer.state.log_history,
        "global_step": output.global_step,
        "training_loss": output.training_loss,
        "preempted": getattr(trainer, "preempted", None),
        "checkpoints": record,
    }
    with open(os.path.join(spec["result_dir"], "result.json"), "w") as f:
        json.dump(result, f)


def run_in_child(spec: dict) -> int:
    """Fork; the child runs `spec` with its output in result_dir/log.txt. Returns the child's pid."""
    os.makedirs(spec["result_dir"], exist_ok=True)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            log = os.open(os.path.join(spec["result_dir"], "log.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            torch.set_num_threads(1)
            run(spec)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def serve() -> None:
    """Read one JSON spec per line; answer {"pid": ...} when the child starts, then {"exit": code} when it
    ends (code is negative for a signal: -9 is SIGKILL)."""
    # transformers imports lazily: import what every run uses once, here (imports only, no tensor math)
    for name in ("BertForSequenceClassification", "Trainer", "TrainingArguments", "EarlyStoppingCallback"):
        getattr(transformers, name)
    for line in sys.stdin:
        if not line.strip():
            continue
        pid = run_in_child(json.loads(line))
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)


class Server:
    """The tests' side of `serve`: a worker process that has imported everything, forking one child per run."""

    def __init__(self):
        import subprocess

        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def start(self, spec: dict) -> int:
        """Start a run; return the pid of its process (for signals from outside)."""
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["pid"]

    def wait(self) -> int:
        """Wait for the started run; its exit code (negative: killed by that signal)."""
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the worker server died")
        return json.loads(line)["exit"]

    def run(self, spec: dict) -> int:
        self.start(spec)
        return self.wait()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def read_result(result_dir: str) -> tuple[dict, dict]:
    """(result.json, {parameter name: tensor}) of a finished run."""
    with open(os.path.join(result_dir, "result.json")) as f:
        result = json.load(f)
    return result, safetensors.torch.load_file(os.path.join(result_dir, "weights.safetensors"))


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        with open(sys.argv[1]) as f:
            run(json.load(f))
