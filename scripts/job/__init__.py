"""The fine-tuning job's own parts: what `scripts/train.py` adds around the library. Not part of looptrain.

`python scripts/train.py` and `accelerate launch scripts/train.py` put `scripts/` first on `sys.path`, so
the job imports this folder as `job`; tests and `scripts/compare_mrpc.py` add `scripts/` themselves.

  * `glue.py`: the GLUE tasks, data files, labels, metrics (scikit-learn and scipy, as GLUE's own),
    model names and the Hub check; every bad input is a `JobError`;
  * `embedded.py`: the offline default job's data, tokenizer and model, made in-process;
  * `results.py`: the files a run leaves in `output_dir`, the chart among them.

What they need beyond looptrain is the `job` extra: `pip install -e '.[job]'` (`make install` does it).
"""
