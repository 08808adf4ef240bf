"""Libraries built on transformers.Trainer, on looptrain's loop: TRL, sentence-transformers, SetFit (and PEFT through
TRL), stock against looptrain bit for bit; `python -m looptrain run` and `compare` themselves; and every Trainer
member those libraries touch, enumerated from their installed source.

Replacing transformers.Trainer is process-wide, so each side runs in a fresh process: the library cases through
`python -m looptrain compare` (tests/ecosystem/*_cases.py), which runs the script on transformers' Trainer and then on
looptrain's and compares every non-timing log_history value, every final weight and every output file.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import textwrap

import pytest
import transformers

import looptrain
from looptrain.trainer import NOT_CALLED

pytest.importorskip("trl")
pytest.importorskip("sentence_transformers")
pytest.importorskip("setfit")
pytest.importorskip("peft")

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
CASES = HERE / "ecosystem"
LIBRARIES = ["trl", "sentence_transformers", "setfit", "peft"]


def looptrain_cli(*args, cwd=None, timeout=600):
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    return subprocess.run(
        [sys.executable, "-m", "looptrain", *map(str, args)],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def summary(out: subprocess.CompletedProcess) -> dict:
    """The counts of `identical (N trainer(s), L log entries, T tensors, F files; ...)`."""
    assert out.returncode == 0, f"rc={out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    found = re.search(r"identical \((\d+) trainer\(s\), (\d+) log entries, (\d+) tensors, (\d+) files", out.stdout)
    assert found, out.stdout
    return dict(zip(("trainers", "logs", "tensors", "files"), map(int, found.groups())))


# ================================================================================= the libraries, bit for bit
def test_trl_trainers_match_transformers_bit_for_bit(tmp_path):
    """SFT (plain text, accumulation, evaluation, checkpoints) and its resume from a mid-run checkpoint; SFT with a
    PEFT LoRA adapter on prompt/completion; DPO; RewardTrainer; GRPO with sampled generations."""
    counts = summary(looptrain_cli("compare", CASES / "trl_cases.py", tmp_path / "out"))
    assert counts["trainers"] == 6  # sft, sft resumed, lora, dpo, reward, grpo
    assert counts["logs"] >= 30 and counts["tensors"] > 100 and counts["files"] > 40
    # what stays in output_dir is the looptrain run's
    assert (tmp_path / "out" / "sft" / "checkpoint-6" / "looptrain_state.json").is_file()


def test_sentence_transformers_and_setfit_match_transformers_bit_for_bit(tmp_path):
    """MultipleNegativesRankingLoss with an evaluator, accumulation (no false transformers#47688 warning: the script
    asserts it), checkpoints and the best model; CosineSimilarityLoss with an eval set; SetFit, whose classifier's
    predictions are written to its output folder."""
    counts = summary(looptrain_cli("compare", CASES / "st_cases.py", tmp_path / "out"))
    assert counts["trainers"] == 3 and counts["logs"] >= 15 and counts["files"] >= 10
    assert (tmp_path / "out" / "setfit" / "setfit_predictions.json").is_file()


# ================================================================================================ `run`
SCRIPT = """
    import json, sys
    import transformers, transformers.trainer, transformers.trainer_seq2seq
    import looptrain
    import neighbour  # a module next to the script

    class Mine(transformers.Trainer):
        pass

    json.dump({
        "argv": sys.argv, "name": __name__, "path0": sys.path[0], "neighbour": neighbour.VALUE,
        "replaced": [transformers.Trainer is looptrain.Trainer, transformers.trainer.Trainer is looptrain.Trainer,
                     transformers.Seq2SeqTrainer is looptrain.Seq2SeqTrainer,
                     transformers.trainer_seq2seq.Seq2SeqTrainer is looptrain.Seq2SeqTrainer,
                     issubclass(Mine, looptrain.Trainer)],
    }, open(sys.argv[1], "w"))
    sys.exit(int(sys.argv[2]))
"""


def test_run_a_script_as_python_would(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.py").write_text(textwrap.dedent(SCRIPT))
    (folder / "neighbour.py").write_text("VALUE = 7\n")
    out = looptrain_cli("run", folder / "train.py", tmp_path / "result.json", "3", "--flag", cwd=tmp_path)
    assert out.returncode == 3, out.stderr[-3000:]  # the script's own exit status
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["argv"] == [str(folder / "train.py"), str(tmp_path / "result.json"), "3", "--flag"]
    assert result["name"] == "__main__" and result["path0"] == str(folder) and result["neighbour"] == 7
    assert result["replaced"] == [True] * 5


def test_run_a_module_as_python_m_would(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "neighbour.py").write_text("VALUE = 8\n")
    (package / "train.py").write_text(textwrap.dedent(SCRIPT).replace("import neighbour ", "from . import neighbour "))
    out = looptrain_cli("run", "-m", "pkg.train", "result.json", "0", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["argv"] == [str(package / "train.py"), "result.json", "0"]
    assert result["name"] == "__main__" and result["neighbour"] == 8 and result["replaced"] == [True] * 5


def test_a_trainer_imported_before_the_switch_is_named_and_refused(tmp_path):
    code = textwrap.dedent("""
        import warnings
        import transformers
        class Early(transformers.Trainer):
            pass
        import looptrain
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            looptrain.use_in_transformers()
        print("WARNING", [str(w.message) for w in caught if "Early" in str(w.message)])
        class Late(transformers.Trainer):
            pass
        print("LATE", issubclass(Late, looptrain.Trainer))
        Early()
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1 and "LATE True" in out.stdout
    assert "__main__.Early subclassed transformers.Trainer before looptrain.use_in_transformers()" in out.stdout
    assert "RuntimeError: __main__.Early subclasses transformers.Trainer, not looptrain's" in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIST_SCRIPT = """
    import json, os, sys
    sys.path.insert(0, {tests!r})
    from transformers import Trainer, TrainingArguments, set_seed
    from helpers import random_token_dataset, tiny_bert
    set_seed(0)
    args = TrainingArguments(sys.argv[1], max_steps=2, per_device_train_batch_size=2, logging_steps=1, use_cpu=True,
                             report_to="none", disable_tqdm=True, save_strategy="no")
    trainer = Trainer(tiny_bert(), args, train_dataset=random_token_dataset(16, 0))
    trainer.train()
    with open(os.path.join(sys.argv[1], f"rank{{args.process_index}}.json"), "w") as f:
        json.dump({{"loop": type(trainer).__module__, "world": args.world_size, "log": trainer.state.log_history}}, f)
"""


def test_run_under_accelerate_launch_on_two_processes(tmp_path):
    """`accelerate launch ... -m looptrain run SCRIPT`: every process runs the script on looptrain's loop (DDP over
    gloo on CPU, as tests/test_distributed.py launches)."""
    (tmp_path / "dist.py").write_text(textwrap.dedent(DIST_SCRIPT.format(tests=str(HERE))))
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.accelerate_cli",
    ]  # make test's venv has no `accelerate` script
    config = ROOT / "examples" / "accelerate_configs" / "ddp.yaml"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [
            *launcher,
            "launch",
            "--config_file",
            str(config),
            "--main_process_port",
            str(_free_port()),
            "-m",
            "looptrain",
            "run",
            str(tmp_path / "dist.py"),
            str(tmp_path / "out"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["loop"] == "looptrain.trainer" and r["world"] == 2 for r in ranks)
    assert ranks[0]["log"][-1]["step"] == 2


GROUP_SCRIPT = """
    import atexit, sys
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1)
    # runs at interpreter exit, after `looptrain run` returned: the group is still up only if nobody ended it
    atexit.register(lambda: open(sys.argv[2], "w").write(str(dist.is_initialized())))
    if sys.argv[3] == "fail":
        raise ValueError("broken on purpose")
"""


@pytest.mark.parametrize("outcome", ["ok", "fail"])
def test_run_ends_the_process_group_of_a_script_that_finished(tmp_path, outcome):
    """Left to interpreter exit, gloo's threads can abort a finished process (exit -6, a failed launch), so `run`
    waits for every process and destroys the group once the script returned; after a failure it touches nothing."""
    (tmp_path / "group.py").write_text(textwrap.dedent(GROUP_SCRIPT))
    flag = tmp_path / "initialized_at_exit"
    out = looptrain_cli("run", tmp_path / "group.py", _free_port(), flag, outcome, cwd=tmp_path)
    assert out.returncode == (0 if outcome == "ok" else 1), out.stderr[-3000:]
    assert flag.read_text() == ("False" if outcome == "ok" else "True")


# ============================================================================================== `compare`
COMPARE_SCRIPT = """
    import sys
    sys.path.insert(0, {tests!r})
    from transformers import Trainer, TrainingArguments, set_seed
    from helpers import random_token_dataset, tiny_bert

    out, mode = sys.argv[1], sys.argv[2]
    if mode == "fail":
        raise ValueError("broken on purpose")
    learning_rate = 1e-3
    if mode == "differ" and Trainer.__module__.startswith("looptrain"):
        learning_rate = 2e-3  # the two runs really differ
    set_seed(0)
    args = TrainingArguments(out, max_steps=4, per_device_train_batch_size=4, logging_steps=1, save_steps=2,
                             learning_rate=learning_rate, use_cpu=True, report_to="none", disable_tqdm=True)
    Trainer(tiny_bert(), args, train_dataset=random_token_dataset(16, 0)).train()
"""


@pytest.fixture
def compare_script(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(COMPARE_SCRIPT.format(tests=str(HERE))))
    return path


def test_compare_an_unchanged_trainer_script_is_identical(tmp_path, compare_script):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("here before both runs\n")
    counts = summary(looptrain_cli("compare", "--max-steps", "2", compare_script, tmp_path / "out", "same"))
    assert counts == {
        "trainers": 1,
        "logs": 3,
        "tensors": counts["tensors"],
        "files": counts["files"],
    }  # 2 steps + summary
    assert counts["files"] >= 5  # checkpoint-2's files, the note
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == ["checkpoint-2", "notes.txt"]  # the looptrain run's folder, with the file it started from


def test_compare_reports_the_first_difference(tmp_path, compare_script):
    out = looptrain_cli("compare", compare_script, tmp_path / "out", "differ")
    assert out.returncode == 1, out.stdout + out.stderr[-3000:]
    assert (
        "different: trainer 1 (Trainer), log_history[0] (step 1): learning_rate: transformers 0.001, looptrain 0.002"
        in out.stdout
    )


def test_compare_reports_a_failed_run(tmp_path, compare_script):
    out = looptrain_cli("compare", compare_script, tmp_path / "out", "fail")
    assert out.returncode == 2
    assert "the transformers run failed" in out.stdout and "ValueError: broken on purpose" in out.stdout


# ============================================================================= the members libraries touch
def _library_trainer_classes():
    """Every class in the installed libraries that subclasses Trainer (or Seq2SeqTrainer), directly or through
    another of them, found by name in their source: {(file, class name): ast.ClassDef}."""
    trees = []
    for library in LIBRARIES:
        # each library's own folder: make test's venv holds them, the venv below it transformers
        folder = pathlib.Path(importlib.util.find_spec(library).origin).resolve().parent
        for path in sorted(folder.rglob("*.py")):
            try:
                trees.append((path, ast.parse(path.read_text())))
            except SyntaxError:
                continue
    names, found, changed = {"Trainer", "Seq2SeqTrainer"}, {}, True
    while changed:
        changed = False
        for path, tree in trees:
            for node in ast.walk(tree):
                if not isinstance(node, ast.ClassDef) or (path, node.name) in found:
                    continue
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", None) for b in node.bases}
                # setfit.Trainer is its own class (it drives a sentence-transformers trainer), not a Trainer subclass
                if bases & names and not (node.name == "Trainer" and "setfit" in path.parts):
                    found[(path, node.name)] = node
                    names.add(node.name)
                    changed = True
    return found


def _members_touched(classes) -> dict[str, set[str]]:
    """Names each class reads, writes or calls on `self` or `super()`, and the methods it defines (overrides)."""
    used = {}
    for (_, name), node in classes.items():
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute) and (
                (isinstance(sub.value, ast.Name) and sub.value.id == "self")
                or (isinstance(sub.value, ast.Call) and getattr(sub.value.func, "id", None) == "super")
            ):
                used.setdefault(sub.attr, set()).add(name)
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                used.setdefault(item.name, set()).add(name)
    return used


def _assigned(*sources: str) -> set[str]:
    """Attributes the code assigns on `self` (`self.x = ...`, `self.a, self.b = ...`, `setattr(self, "x", ...)`)."""
    found = set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and getattr(node.value, "id", None) == "self"
            ):
                found.add(node.attr)
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "setattr"
                and len(node.args) > 1
                and getattr(node.args[0], "id", None) == "self"
                and isinstance(node.args[1], ast.Constant)
            ):
                found.add(node.args[1].value)
    return found


TRAINER_SOURCE = pathlib.Path(inspect.getsourcefile(transformers.Trainer)).read_text()
LOOPTRAIN_ASSIGNED = _assigned(*(p.read_text() for p in (ROOT / "looptrain").glob("*.py")))
CLASSES = _library_trainer_classes()
USED = _members_touched(CLASSES)
# Trainer's members: what the class defines, and the attributes its source assigns on self
TRAINERS_OWN = set(dir(transformers.Trainer)) | _assigned(TRAINER_SOURCE)
TOUCHED = sorted(n for n in USED if n in TRAINERS_OWN and (not n.startswith("__") or n == "__init__"))


def test_the_enumeration_reads_the_installed_libraries():
    names = {name for _, name in CLASSES}
    assert {
        "SFTTrainer",
        "DPOTrainer",
        "RewardTrainer",
        "GRPOTrainer",
        "SentenceTransformerTrainer",
        "CrossEncoderTrainer",
        "SparseEncoderTrainer",
        "BCSentenceTransformersTrainer",
    } <= names
    assert {
        "_get_train_sampler",
        "_prepare_inputs",
        "_save_checkpoint",
        "_load_from_checkpoint",
        "_save",
        "log",
        "compute_loss",
        "_maybe_log_save_evaluate",
        "create_model_card",
        "_set_signature_columns_if_needed",
        "_remove_unused_columns",
        "accelerator",
        "_signature_columns",
    } <= set(TOUCHED)


@pytest.mark.parametrize("name", TOUCHED)
def test_every_trainer_member_a_library_touches_is_looptrains(name):
    """Methods: looptrain has them with Trainer's parameters (names, order, defaults, kinds) and calls them (not in
    NOT_CALLED). Attributes: looptrain's class has them or its source assigns them, as Trainer's does."""
    users = ", ".join(sorted(USED[name])[:4])
    theirs = inspect.getattr_static(transformers.Trainer, name, None)
    if inspect.isfunction(theirs) or isinstance(theirs, staticmethod):
        assert name not in NOT_CALLED, f"{name} (used by {users}) is never called by looptrain"
        assert hasattr(looptrain.Trainer, name), f"looptrain.Trainer has no {name} (used by {users})"
        ours_sig, theirs_sig = (
            inspect.signature(getattr(looptrain.Trainer, name)),
            inspect.signature(getattr(transformers.Trainer, name)),
        )
        assert list(ours_sig.parameters)[: len(theirs_sig.parameters)] == list(theirs_sig.parameters), name
        for p in theirs_sig.parameters.values():
            assert ours_sig.parameters[p.name].default == p.default, f"{name}({p.name}=...)"
            assert ours_sig.parameters[p.name].kind == p.kind, f"{name}({p.name}) kind"
        extra = list(ours_sig.parameters)[len(theirs_sig.parameters) :]
        assert all(ours_sig.parameters[e].kind == inspect.Parameter.KEYWORD_ONLY for e in extra), f"{name}: {extra}"
    else:
        assert hasattr(looptrain.Trainer, name) or name in LOOPTRAIN_ASSIGNED, (
            f"looptrain never sets {name}, which {users} use(s) and transformers.Trainer sets"
        )
