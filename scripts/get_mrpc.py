#!/usr/bin/env python
"""Save GLUE MRPC from the Hugging Face Hub as TSV files, once, for offline runs later.

    python scripts/get_mrpc.py MRPC        # online; writes MRPC/train.tsv, MRPC/dev.tsv, MRPC/test.tsv

The data is `datasets.load_dataset("nyu-mll/glue", "mrpc")` (the course's `load_dataset("glue", "mrpc")`):
columns `label`, `sentence1`, `sentence2`, tab-separated, unquoted, as the GLUE distribution's own files are.
Every reader of MRPC folders here takes them: `examples/seed_recipe.py --data MRPC`,
`scripts/compare_mrpc.py --data MRPC` (`make mrpc ARGS="--data MRPC"`) and
`scripts/train.py --task_name mrpc --train_file MRPC/train.tsv --validation_file MRPC/dev.tsv`.
The test split's labels are -1 (GLUE keeps them private).
"""

from __future__ import annotations

import os
import sys

HUB_ID, CONFIG = "nyu-mll/glue", "mrpc"
FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}  # Hub split -> GLUE's file name
COLUMNS = ("label", "sentence1", "sentence2")


def save_mrpc(folder: str) -> list[str]:
    """Download MRPC from the Hub and write one TSV file per split into `folder`; returns the paths."""
    import datasets

    data = datasets.load_dataset(HUB_ID, CONFIG)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for split, filename in FILES.items():
        path = os.path.join(folder, filename)
        with open(path, "w", encoding="utf-8", newline="") as f:
            # Unquoted, as GLUE's files: sentences hold lone `"`, and every reader here reads with quoting off.
            f.write("\t".join(COLUMNS) + "\n")
            for row in data[split]:
                fields = [str(row[c]) for c in COLUMNS]
                if any(("\t" in v or "\n" in v) for v in fields):
                    raise ValueError(
                        f"{split} row {row.get('idx')}: a tab or line break, which unquoted TSV cannot hold"
                    )
                f.write("\t".join(fields) + "\n")
        paths.append(path)
    return paths


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from job.glue import hub_offline_reason

    reason = hub_offline_reason()  # seconds, not minutes of download retries
    if reason is not None:
        print(
            f"get_mrpc.py: {HUB_ID} ({CONFIG}) comes from the Hugging Face Hub, but {reason}; run it where "
            "huggingface.co is reachable.",
            file=sys.stderr,
        )
        return 1
    try:
        paths = save_mrpc(argv[0])
    except Exception as err:  # offline, or the Hub failed: one line, not a traceback
        print(
            f"get_mrpc.py: cannot load {HUB_ID} ({CONFIG}) from the Hugging Face Hub "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); run it where "
            "huggingface.co is reachable.",
            file=sys.stderr,
        )
        return 1
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
