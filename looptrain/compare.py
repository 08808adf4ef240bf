"""`python -m looptrain compare SCRIPT [ARGS...]`: does a Trainer script run the same on looptrain?

The script runs twice, each time in a fresh process with the same arguments and environment: first as written
(transformers' Trainer), then with `transformers.Trainer` replaced by looptrain's (`ecosystem.use_in_transformers`).
Each process records, for every trainer the script builds (in construction order), its `state.log_history`
and its model's final weights; the output folders of the first run are moved aside before the second starts,
so each run starts from the same files. Then, in this order, the first difference is reported:

  1. the trainers built (how many, and that the second run's really run looptrain's loop);
  2. every non-timing `log_history` value (`runtime`, `per_second`, `_mem_`, `*_time` keys
     are skipped);
  3. every tensor of each model's final `state_dict()`, bit for bit;
  4. every file in each trainer's `output_dir`: checkpoints, weights, `trainer_state.json`, `*results.json`,
     the model card, predictions; JSON compared without timing keys, safetensors and torch files tensor by
     tensor, `.md`/`.txt` line by line with durations ("2.1 seconds") masked, everything else byte for byte. looptrain's documented differences are not differences:
     `training_args.json` instead of the pickled `training_args.bin`, and `looptrain_state.json` in checkpoints
     (README, "Deliberate differences"; docs/checkpoints.md).

Exit status: 0 identical, 1 different, 2 a run failed (its last lines are printed). docs/ecosystem.md has the
limits (one process; what is outside `output_dir` is not compared).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TIMING_MARKERS = ("runtime", "per_second", "model_preparation_time", "_mem_")
SIDES = ("transformers", "looptrain")
# looptrain's documented differences in what it writes (README, "Deliberate differences")
NOT_COMPARED = {"training_args.bin", "training_args.json", "looptrain_state.json"}
# a duration in a text file (sentence-transformers' model card: "Training: 2.1 seconds")
_TIMES = re.compile(r"\b\d+(\.\d+)?\s*(seconds|second|secs|sec|s|ms|minutes|minute|min|hours|hour|h)\b")
SKIPPED_FOLDERS = {"runs"}  # TensorBoard event files: wall-clock times in every record


def is_timing_key(key: str) -> bool:
    """Wall-clock values: Trainer's speed metrics, memory deltas, TRL's `step_time`."""
    return any(marker in key for marker in TIMING_MARKERS) or key.endswith("_time") or key == "time"


def without_timing(value):
    """A JSON value with every timing key removed, at any depth."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if not is_timing_key(str(k))}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


# ============================================================================================ one recorded run
class _StopAfter:
    """--max-steps: stops training after that many optimizer steps (both runs alike)."""

    def __init__(self, max_steps: int):
        self.max_steps = max_steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.max_steps:
            control.should_training_stop = True


def _fingerprint(model) -> str:
    import torch

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def record(side: str, record_dir: str, max_steps: int | None, target: str, argv: list[str], as_module: bool) -> None:
    """Run the script in this process on `side`'s Trainer and write what `compare` needs to `record_dir`."""
    import torch
    from transformers.trainer_callback import TrainerCallback

    from . import ecosystem
    from .trainer import Trainer as LooptrainTrainer

    if side == "looptrain":
        ecosystem.use_in_transformers()
        base = LooptrainTrainer
    else:
        base = ecosystem.transformers_trainer()
    record_dir = Path(record_dir)
    trainers, seen_dirs = [], {}
    init = base.__init__
    stopper = type("StopAfter", (_StopAfter, TrainerCallback), {})

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if any(t is self for t in trainers):
            return
        output_dir = os.path.abspath(self.args.output_dir)
        if side == SIDES[0] and output_dir not in seen_dirs and os.path.isdir(output_dir) and os.listdir(output_dir):
            # the folder had files before this run: the second run gets the same files (see `compare`)
            seen_dirs[output_dir] = str(record_dir / "before" / str(len(seen_dirs)))
            shutil.copytree(output_dir, seen_dirs[output_dir])
        seen_dirs.setdefault(output_dir, None)
        trainers.append(self)
        self._compare_initial = _fingerprint(self.model) if self.model is not None else None
        if max_steps:
            self.add_callback(stopper(max_steps))

    __init__.__wrapped__ = init
    base.__init__ = __init__
    try:
        ecosystem.run_target(target, argv, as_module)
    except SystemExit as stop:
        if stop.code not in (None, 0):
            raise

    entries = []
    for i, trainer in enumerate(trainers):
        weights = None
        if trainer.model is not None:
            weights = f"weights-{i}.pt"
            state = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
            torch.save(state, record_dir / weights)
        entries.append(
            {
                "class": _class_name(type(trainer)),
                "loop": "looptrain" if isinstance(trainer, LooptrainTrainer) else "transformers",
                "output_dir": os.path.abspath(trainer.args.output_dir),
                "log_history": trainer.state.log_history,
                "initial_weights": trainer._compare_initial,
                "weights": weights,
            }
        )
    backups = {d: b for d, b in seen_dirs.items() if b is not None}
    (record_dir / "record.json").write_text(json.dumps({"trainers": entries, "before": backups}, default=repr))


def _class_name(cls) -> str:
    """The trainer's class; transformers' and looptrain's own (Trainer, Seq2SeqTrainer) by their shared name."""
    if cls.__module__.split(".")[0] in ("transformers", "looptrain"):
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


# ============================================================================================ the comparison
class Difference(Exception):
    """The first difference between the two runs, as one message."""


def _equal(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _first_json_difference(a, b, where: str = ""):
    """(path, value a, value b) of the first difference between two JSON values, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return f"{where}.{key}", a.get(key, "<missing>"), b.get(key, "<missing>")
            found = _first_json_difference(a[key], b[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_json_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return (f"{where} length", len(a), len(b)) if len(a) != len(b) else None
    return None if _equal(a, b) else (where or "value", a, b)


def compare_logs(i: int, name: str, a: list, b: list) -> int:
    """Trainer `i`'s two log histories without timing keys; returns how many entries were compared."""
    a, b = without_timing(a), without_timing(b)
    for n, (x, y) in enumerate(zip(a, b)):
        found = _first_json_difference(x, y)
        if found:
            key, vx, vy = found
            raise Difference(
                f"trainer {i} ({name}), log_history[{n}] (step {x.get('step')}): {key.lstrip('.')}: "
                f"transformers {vx!r}, looptrain {vy!r}"
            )
    if len(a) != len(b):
        n = min(len(a), len(b))
        extra = a[n] if len(a) > n else b[n]
        raise Difference(
            f"trainer {i} ({name}): log_history has {len(a)} entries on transformers, {len(b)} on looptrain; the first "
            f"extra one: {extra}"
        )
    return len(a)


def _first_tensor_difference(a: dict, b: dict) -> str | None:
    import torch

    for name in list(a) + [n for n in b if n not in a]:
        if name not in a or name not in b:
            return f"{name}: only in the {'transformers' if name in a else 'looptrain'} run"
        x, y = a[name], b[name]
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            found = (
                _first_json_difference(x, y)
                if not (isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor))
                else ("", x, y)
            )
            if found:
                return f"{name}{found[0]}: transformers {found[1]!r}, looptrain {found[2]!r}"
            continue
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{name}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}"
        if not torch.equal(x, y):
            diff = (x.double() - y.double()).abs().max().item() if x.is_floating_point() else "n/a"
            return f"{name}: values differ (largest difference {diff})"
    return None


def _flatten(value, prefix=""):
    """Nested dicts/lists of a torch file as {path: leaf}."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, (list, tuple)):
        out = {}
        for n, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{n}]"))
        return out
    return {prefix: value}


def _file_difference(a: Path, b: Path) -> str | None:
    """Why two files differ (None if they are the same, as this comparison defines it)."""
    raw_a, raw_b = a.read_bytes(), b.read_bytes()
    if raw_a == raw_b:
        return None
    if a.suffix == ".json":
        try:
            ja, jb = json.loads(raw_a), json.loads(raw_b)
        except ValueError:
            return "contents differ"
        found = _first_json_difference(without_timing(ja), without_timing(jb))
        return f"{found[0].lstrip('.')}: transformers {found[1]!r}, looptrain {found[2]!r}" if found else None
    if a.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _first_tensor_difference(load_file(a), load_file(b))
    if a.suffix in (".pt", ".pth", ".bin"):
        import torch

        try:
            ta, tb = (
                torch.load(a, weights_only=True, map_location="cpu"),
                torch.load(b, weights_only=True, map_location="cpu"),
            )
        except Exception:  # not a weights-only torch file: bytes decide
            return "contents differ"
        return _first_tensor_difference(_flatten(ta), _flatten(tb))
    if a.suffix in (".md", ".txt"):
        lines_a, lines_b = (_TIMES.sub("<time>", raw.decode(errors="replace")).splitlines() for raw in (raw_a, raw_b))
        for n, (x, y) in enumerate(zip(lines_a, lines_b), 1):
            if x != y:
                return f"line {n}: transformers {x.strip()!r}, looptrain {y.strip()!r}"
        return None if len(lines_a) == len(lines_b) else f"{len(lines_a)} lines vs {len(lines_b)}"
    return "contents differ"


def _files(folder: Path) -> set[str]:
    found = set()
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_file() and path.name not in NOT_COMPARED and not SKIPPED_FOLDERS & set(relative.parts[:-1]):
            found.add(relative.as_posix())
    return found


def compare_folders(i: int, a: Path, b: Path, shown: str) -> int:
    """The files of two output folders (`a` the transformers run's, `b` looptrain's); returns how many."""
    files_a, files_b = (_files(a) if a.is_dir() else set()), (_files(b) if b.is_dir() else set())
    if files_a != files_b:
        only_a, only_b = sorted(files_a - files_b), sorted(files_b - files_a)
        raise Difference(
            f"output_dir {shown} (trainer {i}) holds different files: only on transformers {only_a[:8]}, only on "
            f"looptrain {only_b[:8]}"
        )
    for name in sorted(files_a):
        why = _file_difference(a / name, b / name)
        if why:
            raise Difference(f"output_dir {shown}: {name} differs: {why}")
    return len(files_a)


def compare_records(work: Path) -> str:
    """Raise Difference at the first difference; return the summary of what was compared."""
    import torch

    runs = [json.loads((work / side / "record.json").read_text()) for side in SIDES]
    a, b = runs[0]["trainers"], runs[1]["trainers"]
    if len(a) != len(b):
        raise Difference(f"the script built {len(a)} trainers on transformers and {len(b)} on looptrain")
    logs = tensors = files = 0
    for i, (x, y) in enumerate(zip(a, b), 1):
        if x["class"] != y["class"]:
            raise Difference(f"trainer {i} is a {x['class']} on transformers and a {y['class']} on looptrain")
        name = x["class"].rsplit(".", 1)[-1]
        if x["initial_weights"] != y["initial_weights"]:
            raise Difference(
                f"trainer {i} ({name}) started from different weights in the two runs: the script builds its model "
                "before seeding (call transformers.set_seed(seed) before building it), or loads different files"
            )
        logs += compare_logs(i, name, x["log_history"], y["log_history"])
        if (x["weights"] is None) != (y["weights"] is None):
            raise Difference(f"trainer {i} ({name}) has a model in one run only")
        if x["weights"]:
            wa = torch.load(work / SIDES[0] / x["weights"], weights_only=True)
            wb = torch.load(work / SIDES[1] / y["weights"], weights_only=True)
            why = _first_tensor_difference(wa, wb)
            if why:
                raise Difference(f"trainer {i} ({name}), final weights: {why}")
            tensors += len(wa)
    moved = json.loads((work / "moved.json").read_text())
    for i, (x, y) in enumerate(zip(a, b), 1):
        if x["output_dir"] in moved:
            files += compare_folders(i, Path(moved.pop(x["output_dir"])), Path(y["output_dir"]), x["output_dir"])
    return f"{len(a)} trainer(s), {logs} log entries, {tensors} tensors, {files} files"


# ============================================================================================== the command
def _run(side: str, work: Path, max_steps, target, argv, as_module) -> subprocess.CompletedProcess:
    (work / side).mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "looptrain", "_record", side, str(work / side), str(max_steps or 0)]
    command += ["-m", target] if as_module else [target]
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")  # the same hash seed in both runs (set-iteration order)
    with open(work / side / "stdout.txt", "w") as out, open(work / side / "stderr.txt", "w") as err:
        return subprocess.run(command + list(argv), stdout=out, stderr=err, env=env)


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _outermost(folders):
    folders = sorted(set(folders))
    return [f for f in folders if not any(f != g and f.startswith(g.rstrip(os.sep) + os.sep) for g in folders)]


def _check_movable(folder: str, target: str, work: Path) -> None:
    """Never move aside a folder that holds the script, the current folder or the comparison itself."""
    inside = [
        p
        for p in (os.getcwd(), os.path.abspath(target), str(work))
        if (p + os.sep).startswith(folder.rstrip(os.sep) + os.sep)
    ]
    if inside:
        raise Difference(
            f"output_dir {folder} contains {inside[0]}: compare moves each run's output_dir aside, so the script needs an "
            "output_dir of its own"
        )


def main(argv: list[str]) -> int:
    """`python -m looptrain compare [--max-steps N] [--keep DIR] (SCRIPT | -m MODULE) [ARGS...]`; the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m looptrain compare",
        description="Run a Trainer script on transformers' Trainer, then on looptrain's, and compare the two runs.",
    )
    parser.add_argument("--max-steps", type=int, default=None, help="stop both runs after this many optimizer steps")
    parser.add_argument("--keep", metavar="DIR", help="keep both runs' records and the transformers run's output here")
    options, rest = parser.parse_known_args(argv[: _target_index(argv)])
    if rest:
        parser.error(f"unknown options {rest}")
    target, as_module, script_args = _target(parser, argv[_target_index(argv) :])
    work = Path(options.keep).resolve() if options.keep else Path(tempfile.mkdtemp(prefix="looptrain-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _compare(work, options.max_steps, target, as_module, script_args)
    finally:
        if not options.keep:
            shutil.rmtree(work, ignore_errors=True)


def _compare(work: Path, max_steps, target, as_module, script_args) -> int:
    moved = {}
    for n, side in enumerate(SIDES):
        print(f"run {n + 1}/2: {side}.Trainer ...", flush=True)
        done = _run(side, work, max_steps, target, script_args, as_module)
        if done.returncode != 0:
            print(
                f"the {side} run failed (exit status {done.returncode}); its last lines:\n{_tail(work / side / 'stderr.txt')}"
            )
            return 2
        if side == SIDES[0]:
            run = json.loads((work / side / "record.json").read_text())
            try:
                for i, folder in enumerate(_outermost(t["output_dir"] for t in run["trainers"])):
                    _check_movable(folder, target, work)
                    if os.path.exists(folder):
                        moved[folder] = str(work / "output" / str(i))
                        shutil.move(folder, moved[folder])
                    if folder in run["before"]:  # the files it had before run 1, for run 2
                        shutil.copytree(run["before"][folder], folder)
            except Difference as refusal:
                print(f"cannot compare: {refusal}")
                return 2
    (work / "moved.json").write_text(json.dumps(moved))
    record = json.loads((work / SIDES[1] / "record.json").read_text())
    if not record["trainers"]:
        print("the script built no Trainer: nothing to compare")
        return 2
    not_ours = [t["class"] for t in record["trainers"] if t["loop"] != "looptrain"]
    if not_ours:
        print(f"cannot compare: {not_ours[0]} did not run looptrain's loop in the second run")
        return 2
    try:
        summary = compare_records(work)
    except Difference as difference:
        print(f"different: {difference}")
        return 1
    print(f"identical ({summary}; timing values and looptrain's documented file differences not compared)")
    return 0


def _target_index(argv: list[str]) -> int:
    """Where the script (or `-m MODULE`) starts: the first argument that is not one of compare's own options."""
    i = 0
    while i < len(argv):
        if argv[i] in ("--max-steps", "--keep"):
            i += 2
        elif argv[i].startswith(("--max-steps=", "--keep=")) or argv[i] in ("-h", "--help"):
            i += 1
        else:
            break
    return i


def _target(parser, argv: list[str]):
    if not argv:
        parser.error("give a script (or -m MODULE) and its arguments")
    if argv[0] == "-m":
        if len(argv) < 2:
            parser.error("-m needs a module name")
        return argv[1], True, argv[2:]
    return argv[0], False, argv[1:]
