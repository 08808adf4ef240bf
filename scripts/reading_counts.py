"""Counts behind "a loop you can read": how much of `looptrain/trainer.py` names a backend or resuming, how long
its methods are, and where the loop starts. Run: `python scripts/reading_counts.py [path/to/trainer.py]`."""

from __future__ import annotations

import ast
import pathlib
import re
import sys

# A line "names a backend" when it mentions DeepSpeed, FSDP, tensor/context/sequence parallelism (or their sizes,
# their config `pc`), XLA/TPU or parallelism_config.
BACKEND = re.compile(
    r"deepspeed|fsdp|tensor[ _-]?parallel|context[ _-]?parallel|sequence[ _-]?parallel|\b(tp|cp|sp)_(size|enabled|backend)"
    r"|get_(tp|cp|sp)_size|\bpc\b|xla|\btpu\b|parallelism_config|ulysses",
    re.IGNORECASE,
)
RESUME = re.compile(r"resum", re.IGNORECASE)
LOOP_START = "def train("


def counts(path: pathlib.Path) -> dict:
    source = path.read_text()
    lines = source.splitlines()
    methods = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    methods.append((item.end_lineno - item.lineno + 1, f"{node.name}.{item.name}"))
    longest = max(methods)
    return {
        "lines": len(lines),
        "backend_lines": sum(bool(BACKEND.search(line)) for line in lines),
        "resume_lines": sum(bool(RESUME.search(line)) for line in lines),
        "longest_method": f"{longest[1]} ({longest[0]} lines)",
        "methods_over_80": sorted(name for n, name in methods if n > 80),
        "first_line_of_loop": next(i for i, line in enumerate(lines, 1) if line.strip().startswith(LOOP_START)),
    }


if __name__ == "__main__":
    target = pathlib.Path(
        sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parents[1] / "looptrain" / "trainer.py"
    )
    for key, value in counts(target).items():
        print(f"{key}: {value}")
