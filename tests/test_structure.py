"""looptrain is its own loop: it never imports `transformers.trainer` nor subclasses `transformers.Trainer`,
yet keeps Trainer's public method names and signatures so that subclasses written for Trainer work."""

from __future__ import annotations

import contextlib
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


HOOKS = [
    "compute_loss",
    "training_step",
    "prediction_step",
    "evaluation_loop",
    "create_optimizer",
    "create_scheduler",
    "create_optimizer_and_scheduler",
    "get_train_dataloader",
    "get_eval_dataloader",
    "get_test_dataloader",
    "log",
    "evaluate",
    "predict",
    "train",
    "save_model",
    "get_batch_samples",
    "floating_point_ops",
    "num_examples",
    "get_decay_parameter_names",
    "add_callback",
    "pop_callback",
    "remove_callback",
    "call_model_init",
    "compute_loss_context_manager",
    "store_flos",
    "is_world_process_zero",
    "is_local_process_zero",
]


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
    assert ours[: len(theirs)] == theirs and ours[len(theirs) :] == ["tokenizer"]


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


def _trainers_own_attributes() -> set[str]:
    import transformers

    trainer_source = pathlib.Path(inspect.getsourcefile(transformers.Trainer)).read_text()
    return set(re.findall(r"self\.(\w+)", trainer_source))


def _attribute_stores():
    """{class name: {method name: {attribute: first line}}} for every `self.X = ...` in looptrain/, and the names
    each class defines at class level (class attributes, properties, methods)."""
    import ast

    stores, class_level, bases = {}, {}, {}
    for path in sorted(PACKAGE.glob("*.py")):
        for cls in [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)]:
            methods, names = {}, set()
            for item in cls.body:
                if isinstance(item, ast.Assign):
                    names.update(t.id for t in item.targets if isinstance(t, ast.Name))
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(item.name)
                    found = methods.setdefault(item.name, {})
                    for node in ast.walk(item):
                        if (
                            isinstance(node, ast.Attribute)
                            and isinstance(node.ctx, ast.Store)
                            and isinstance(node.value, ast.Name)
                            and node.value.id == "self"
                        ):
                            found.setdefault(node.attr, f"{path.name}:{node.lineno}")
            stores[cls.name], class_level[cls.name] = methods, names
            bases[cls.name] = [b.id for b in cls.bases if isinstance(b, ast.Name)]
    return stores, class_level, bases


def _trainer_family(stores, bases) -> set[str]:
    """Trainer, the mixins it is made of, and its subclasses in looptrain/: one object, one `__init__`."""
    family = {"Trainer", *bases["Trainer"]}
    family |= {name for name, b in bases.items() if family & set(b)}
    return family & set(stores)


def test_every_attribute_is_first_assigned_in_init():
    """An attribute a method sets is created in `__init__` of the class that uses it (for Trainer and its mixins:
    `Trainer.__init__`, so each mixin can be read alone), or is one of transformers.Trainer's own public
    attributes, which Trainer also sets lazily. No attribute appears out of nowhere halfway through a run."""
    import importlib

    stores, class_level, bases = _attribute_stores()
    family = _trainer_family(stores, bases)
    public_of_trainer = {a for a in _trainers_own_attributes() if not a.startswith("_")}
    offenders = []
    for cls, methods in stores.items():
        in_init = set(methods.get("__init__", {}))
        defined = set(class_level[cls])
        if cls in family:
            in_init |= set(stores["Trainer"].get("__init__", {}))
            defined |= set().union(*(class_level[c] for c in family))
        else:  # a base outside looptrain (transformers' EvalLoopContainer) creates its attributes in its __init__
            module = next(m for m in PACKAGE.glob("*.py") if re.search(rf"^class {cls}\b", m.read_text(), re.M))
            klass = getattr(importlib.import_module(f"looptrain.{module.stem}"), cls)
            for base in klass.__mro__[1:]:
                if "__init__" in vars(base) and not base.__module__.startswith("looptrain"):
                    with contextlib.suppress(TypeError, OSError):
                        in_init |= set(re.findall(r"self\.(\w+)\s*=", inspect.getsource(base.__init__)))
        for method, attrs in methods.items():
            for attr, where in attrs.items():
                allowed = attr in in_init or attr in defined or (cls in family and attr in public_of_trainer)
                if method != "__init__" and not allowed:
                    offenders.append(f"{cls}.{method} sets self.{attr} ({where})")
    assert not offenders, "\n".join(sorted(offenders))


def test_state_shared_between_files_is_trainers_own_or_made_in_init():
    """An attribute that one module writes and another reads is transformers.Trainer's (the contract subclasses rely
    on too) or created, with a comment saying what it is, in `Trainer.__init__`."""
    import ast
    import collections

    stores, _, bases = _attribute_stores()
    family = _trainer_family(stores, bases)  # one object: `self` in another class (a callback, a dataclass) is not it
    writes, reads = collections.defaultdict(set), collections.defaultdict(set)
    for path in PACKAGE.glob("*.py"):
        for cls in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(cls, ast.ClassDef) and cls.name in family):
                continue
            for node in ast.walk(cls):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                    (writes if isinstance(node.ctx, ast.Store) else reads)[node.attr].add(path.name)
    shared = {attr for attr, files in writes.items() if reads.get(attr, set()) - files}
    assert shared - _trainers_own_attributes() - set(stores["Trainer"]["__init__"]) == set()


def test_no_hidden_state_behind_getattr():
    """`getattr(self, "_x", default)` reads an attribute that may not exist yet: every attribute is made in
    `__init__` instead, so the default is never needed."""
    pattern = re.compile(r"(getattr|hasattr)\(self,\s*[\"']_")
    offenders = [
        f"{path.name}:{n}: {line.strip()}"
        for path in PACKAGE.glob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders


def test_the_loop_reads_without_meeting_a_backend():
    """trainer.py is the loop, in reading order: few lines name a backend (they sit behind named methods in
    backends.py), no method is longer than a screen or two, and `train` comes right after `__init__`
    (scripts/reading_counts.py prints the same counts)."""
    sys.path.insert(0, str(PACKAGE.parent / "scripts"))
    try:
        from reading_counts import counts
    finally:
        sys.path.pop(0)
    found = counts(PACKAGE / "trainer.py")
    assert found["backend_lines"] <= 25, found
    assert found["methods_over_80"] == [], found
    source = (PACKAGE / "trainer.py").read_text()
    assert (
        source.index("    def __init__(")
        < source.index("    def train(")
        < source.index("    def _inner_training_loop(")
    )
    assert (
        source.index("    def _inner_training_loop(")
        < source.index("    def _run_epoch(")
        < source.index("    def training_step(")
    )
    order = ["training_step", "compute_loss", "_maybe_log_save_evaluate", "log", "_finalize_training"]
    assert [source.index(f"    def {name}(") for name in order] == sorted(
        source.index(f"    def {name}(") for name in order
    )
