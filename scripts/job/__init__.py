"""The fine-tuning job's own parts: what `scripts/train.py` adds around the library. Not part of looptrain.

`python scripts/train.py` and `accelerate launch scripts/train.py` put `scripts/` first on `sys.path`, so
the job imports this folder as `job`; tests and `scripts/compare_mrpc.py` add `scripts/` themselves.

  * `glue.py`: the GLUE tasks, data files, labels, metrics (scikit-learn and scipy, as GLUE's own),
    model names and the Hub check; every bad input is a `JobError`;
  * `embedded.py`: the offline default job's data, tokenizer and model, made in-process;
  * `chart.py`: the training-curves chart a run leaves in `output_dir`.
  * `runs.py`: another run's checkpoints in `output_dir`, and the warnings a run prints once.

What they need beyond looptrain is the `job` extra: `pip install -e '.[job]'` (`make install` does it).
"""

import importlib.util

# The `job` extra of pyproject.toml: module name -> package name.
REQUIREMENTS = {"yaml": "pyyaml", "matplotlib": "matplotlib", "sklearn": "scikit-learn", "scipy": "scipy"}


def missing_packages() -> list[str]:
    """The packages of the `job` extra that are not installed (checked without importing them)."""
    return [package for module, package in REQUIREMENTS.items() if importlib.util.find_spec(module) is None]
