"""looptrain is its own loop: it never imports `transformers.trainer` nor subclasses `transformers.Trainer`,
yet keeps Trainer's public method names and signatures so that subclasses written for Trainer work."""

from __future__ import annotations

import inspect
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "looptrain"


def test_source_never_imports_the_trainer_module():
    pattern = re.compile(r"transformers\.trainer\b(?!_)|from\s+transformers\s+import\s+[^\n]*\bTrainer\b(?!\w)")
    # ecosystem.py is the one seam that names it: to replace transformers.Trainer with looptrain's, on request
    offenders = [
        f"{path.name}:{n}: {line.strip()}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "ecosystem.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders


def test_training_never_loads_the_trainer_module(tmp_path):
    """In a fresh interpreter: import looptrain, train, evaluate, predict, save; transformers.trainer stays unloaded."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
        import looptrain
        from helpers import random_token_dataset, tiny_bert, accuracy
        args = looptrain.TrainingArguments(output_dir={str(tmp_path)!r}, use_cpu=True, max_steps=2, save_steps=1,
                                           eval_strategy="steps", eval_steps=1, disable_tqdm=True)
        t = looptrain.Trainer(tiny_bert(), args, train_dataset=random_token_dataset(16, 0),
                              eval_dataset=random_token_dataset(4, 1), compute_metrics=accuracy)
        t.train(); t.evaluate(); t.predict(random_token_dataset(4, 2)); t.save_model()
        loaded = sorted(m for m in sys.modules if m == "transformers.trainer" or m.startswith("transformers.trainer."))
        print("LOADED", loaded)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout


def test_not_a_subclass_of_transformers_trainer():
    import transformers

    import looptrain

    assert not issubclass(looptrain.Trainer, transformers.Trainer)


HOOKS = ["compute_loss", "training_step", "prediction_step", "evaluation_loop", "create_optimizer", "create_scheduler",
         "create_optimizer_and_scheduler", "get_train_dataloader", "get_eval_dataloader", "get_test_dataloader", "log",
         "evaluate", "predict", "train", "save_model", "get_batch_samples", "floating_point_ops", "num_examples",
         "get_decay_parameter_names", "add_callback", "pop_callback", "remove_callback", "call_model_init",
         "compute_loss_context_manager", "store_flos", "is_world_process_zero", "is_local_process_zero"]


@pytest.mark.parametrize("name", HOOKS)
def test_public_hooks_keep_trainer_signatures(name):
    import transformers

    import looptrain

    ours = inspect.signature(getattr(looptrain.Trainer, name))
    theirs = inspect.signature(getattr(transformers.Trainer, name))
    assert list(ours.parameters) == list(theirs.parameters)
    for p in theirs.parameters.values():
        assert ours.parameters[p.name].default == p.default, f"{name}({p.name}=...)"


def test_constructor_accepts_trainer_keywords_in_order():
    import transformers

    import looptrain

    theirs = list(inspect.signature(transformers.Trainer.__init__).parameters)
    ours = list(inspect.signature(looptrain.Trainer.__init__).parameters)
    assert ours[: len(theirs)] == theirs and ours[len(theirs):] == ["tokenizer"]


# ------------------------------------------------------------------------------------------------ the house
def _module_imports(path: pathlib.Path) -> set[str]:
    """looptrain modules a module imports (`from . import x`, `from .x import y`, `import looptrain.x`)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("looptrain."):
            found.add(node.module.split(".")[1])
    return {name.split(".")[0] for name in found}


def test_imports_inside_the_package_go_one_way():
    """The import graph of looptrain/ has no cycle (trainer.py imports the modules around the loop, never back)."""
    graph = {p.stem: _module_imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert all(dep in graph for deps in graph.values() for dep in deps), graph
    state = {}

    def visit(node, path):
        state[node] = "visiting"
        for dep in graph[node]:
            assert state.get(dep) != "visiting", f"import cycle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert graph["trainer"] >= {"checkpoint", "data", "evaluation", "optim", "training_args"}
    # only the Seq2Seq delta builds on the loop, and the seam that puts it under other libraries (ecosystem; compare
    # records its runs); nothing the loop imports imports it back
    assert {name for name, deps in graph.items() if "trainer" in deps} == {"seq2seq", "ecosystem", "compare"}
    assert not graph["trainer"] & {"ecosystem", "compare", "__main__"}


def test_state_shared_between_files_is_trainers_own():
    """No module writes an attribute that another module reads unless transformers.Trainer has the same attribute
    (the contract subclasses rely on too) or it is the loop's one declared running state, `_loop` (a LoopState that
    checkpoints save and restore)."""
    import ast
    import collections

    import transformers

    writes, reads = collections.defaultdict(set), collections.defaultdict(set)
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                (writes if isinstance(node.ctx, ast.Store) else reads)[node.attr].add(path.name)
    trainer_source = pathlib.Path(inspect.getsourcefile(transformers.Trainer)).read_text()
    trainers_own = set(re.findall(r"self\.(\w+)", trainer_source))
    shared = {attr for attr, files in writes.items() if reads.get(attr, set()) - files}
    assert shared - trainers_own == {"_loop"}
