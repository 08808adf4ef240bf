"""`python -m looptrain`: run a Trainer script on looptrain's loop, or compare it with transformers'.

    python -m looptrain run SCRIPT [ARGS...]              # as `python SCRIPT ARGS`, on looptrain's Trainer
    python -m looptrain run -m MODULE [ARGS...]           # as `python -m MODULE ARGS`
    accelerate launch --num_processes 2 -m looptrain run SCRIPT [ARGS...]   # several processes
    python -m looptrain compare [--max-steps N] [--keep DIR] SCRIPT [ARGS...]

`run` makes `transformers.Trainer` and `transformers.Seq2SeqTrainer` looptrain's (`looptrain.use_in_transformers`)
before the script imports anything, so the trainers of TRL, sentence-transformers, SetFit or the script itself
run looptrain's loop. `compare` is `looptrain/compare.py`. docs/ecosystem.md has both.
"""

from __future__ import annotations

import sys

USAGE = __doc__.split("\n\n")[1]


def main(argv: list[str]) -> int:
    """Dispatch `run`, `compare` (and `_record`, one run of compare); returns the exit status."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage:\n{USAGE}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        if not rest or (rest[0] == "-m" and len(rest) < 2):
            print(f"usage:\n{USAGE}", file=sys.stderr)
            return 2
        from .ecosystem import run_target, use_in_transformers

        use_in_transformers()
        as_module = rest[0] == "-m"
        target, script_args = (rest[1], rest[2:]) if as_module else (rest[0], rest[1:])
        status = _exit_code(lambda: run_target(target, script_args, as_module))
        if status == 0:
            from .backends import end_process_group

            end_process_group()
        return status
    if command == "compare":
        from .compare import main as compare

        return compare(rest)
    if command == "_record":  # one run of `compare`, in its own process: SIDE RECORD_DIR MAX_STEPS [-m] TARGET ARGS
        from .compare import record

        side, record_dir, max_steps, rest = rest[0], rest[1], int(rest[2]), rest[3:]
        as_module = rest[0] == "-m"
        target, script_args = (rest[1], rest[2:]) if as_module else (rest[0], rest[1:])
        return _exit_code(lambda: record(side, record_dir, max_steps or None, target, script_args, as_module))
    print(f"unknown command {command!r}; usage:\n{USAGE}", file=sys.stderr)
    return 2


def _exit_code(run) -> int:
    """The script's own `sys.exit(...)` status, as `python SCRIPT` would exit with it."""
    try:
        run()
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
