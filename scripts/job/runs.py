"""What a run of the job finds in its output_dir, and what it prints once.

* `check_output_dir`: `checkpoint-<step>` folders already in output_dir belong to another run unless this one
  resumes them. Training beside them would mix two runs (`--resume_from_checkpoint true` later takes the highest
  step, whichever run wrote it; `save_total_limit` rotates them together), so the job stops in one line naming
  the ways forward, or, with `--overwrite_output_dir`, deletes them first. transformers.Trainer itself does
  neither (transformers 5 dropped `overwrite_output_dir` and run_glue.py's check); the library stays Trainer's.
* `logging_steps_of`: the logging interval a checkpoint's run used, so that a resumed job with the job's own
  ratio default logs as that run did, instead of Trainer warning that the two differ.
* `replica_warnings_off`: looptrain's warnings are about the configuration, the same in every process; the main
  process prints them, the others do not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings

from .glue import JobError

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR's folders


def checkpoints_in(folder: str) -> list[str]:
    """The `checkpoint-<step>` folders in `folder`, by step."""
    if not os.path.isdir(folder):
        return []
    found = [
        (int(m[1]), name)
        for name in os.listdir(folder)
        if (m := CHECKPOINT.match(name)) and os.path.isdir(os.path.join(folder, name))
    ]
    return [os.path.join(folder, name) for _, name in sorted(found)]


def check_output_dir(output_dir: str, resume, overwrite: bool, is_main: bool = True) -> None:
    """Before anything is loaded: stop when output_dir holds another run's checkpoints and this run does not resume
    them; with `overwrite`, delete them instead (the main process only). `resume`: what `check_resume` returned."""
    if overwrite and resume:
        raise JobError(
            "--overwrite_output_dir deletes the checkpoints that --resume_from_checkpoint resumes: give one of the two."
        )
    found = checkpoints_in(output_dir)
    if not found or resume:
        return
    if overwrite:
        if is_main:
            for path in found:
                shutil.rmtree(path)
        return
    names = ", ".join(os.path.basename(p) for p in found[-3:])
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    raise JobError(
        f"--output_dir {output_dir} holds another run's checkpoints ({names}{more}): resume it with "
        "--resume_from_checkpoint true, give a new --output_dir, or pass --overwrite_output_dir to delete "
        "them before training."
    )


def logging_steps_of(checkpoint: str) -> int | float | None:
    """The logging interval (in steps) stored in a checkpoint's trainer_state.json, or None."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            return json.load(f).get("logging_steps")
    except (OSError, ValueError, AttributeError):
        return None  # the resume itself reports an unusable checkpoint


# looptrain's warnings about the configuration, alike in every process. They are attributed to the caller's line
# (stacklevel), here scripts/train.py, so they are told apart by their text.
REPLICA_DUPLICATES = (
    r".*\.forward takes \*\*kwargs but does not use num_items_in_batch",  # Trainer._warn_if_loss_not_scaled_for_ga
    r"Label smoothing is not compatible with multi-label classification",
)


def replica_warnings_off() -> None:
    """On a process other than the main one: drop looptrain's warnings about the configuration (the accumulation
    and loss-scaling warning, the label-smoothing one), which every process would print alike. Other warnings,
    and other libraries', are left as they are."""
    for message in REPLICA_DUPLICATES:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
