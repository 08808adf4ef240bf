"""Where one optimizer step of bench.py's item 1 goes, part by part, in looptrain and in the bare loop.

    .venv-test/bin/python scripts/step_breakdown.py [--steps 500] [--rounds 3]

Each part is timed with the process's CPU clock around its call (the wrappers cost about 1 us each), inside a
real `train()` of the tiny BERT of scripts/bench.py (one thread), and in a copy of bench.py's bare loop timed the
same way (a copy, with a clock read between its phases: a hook in `bench.bare_loop` would slow the floor it measures). The figures are CPU ms per optimizer step, averaged over the run; in looptrain's list, indented parts
are inside the part above them. Noisy on a shared machine: compare the two lists of one round, not rounds.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

clock = time.process_time


def looptrain_parts(steps: int) -> dict[str, float]:
    import looptrain
    from looptrain import fastpath
    from looptrain import trainer as trainer_module

    spent: dict[str, float] = {}
    patched = []

    def time_calls(owner, name, label):
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = clock()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + clock() - start

        setattr(owner, name, timed)
        patched.append((owner, name, original))
        spent[label] = 0.0  # printed in this order

    Trainer = trainer_module.Trainer
    for owner, name, label in (
        (Trainer, "get_batch_samples", "batches (accelerate's loader, the label count)"),
        (Trainer, "_get_num_items_in_batch", "  the label count"),
        (Trainer, "training_step", "training_step"),
        (fastpath, "train_mode", "  model.train() check"),
        (Trainer, "_prepare_inputs", "  _prepare_inputs"),
        (Trainer, "compute_loss", "  compute_loss (the forward)"),
        (fastpath, "backward", "  backward"),
        (Trainer, "_optimizer_step", "optimizer step, schedule, zero_grad, callbacks"),
        (fastpath, "clip_grad_norm", "  clipping"),
        (fastpath, "optimizer_step", "  optimizer.step"),
        (fastpath, "zero_grad", "  zero_grad"),
        (fastpath.CallbackHandler, "call_event", "callback events (all)"),
        (Trainer, "_maybe_log_save_evaluate", "log, save, evaluate"),
    ):
        time_calls(owner, name, label)
    try:
        model, dataset = bench.tiny_bert(0), bench.token_dataset(steps * 8, seed=1)
        step_clock = bench.step_clock()
        with tempfile.TemporaryDirectory() as out:
            args = looptrain.TrainingArguments(
                output_dir=out, use_cpu=True, report_to="none", save_strategy="no", num_train_epochs=1
            )
            trainer = looptrain.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[step_clock])
            with bench.quiet():
                trainer.train()
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)
    steady = bench.steady_ms_per_step(step_clock.times, steps // 10)["ms_per_step"]
    return {"whole step (steady state)": steady, **{k: v / steps * 1000 for k, v in spent.items()}}


def bare_parts(steps: int) -> dict[str, float]:
    import torch
    from torch.utils.data import DataLoader
    from transformers import default_data_collator, get_linear_schedule_with_warmup

    model, dataset = bench.tiny_bert(0), bench.token_dataset(steps * 8, seed=1)
    decay = [p for n, p in model.named_parameters() if not ("bias" in n or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}], lr=5e-5, fused=True
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps)
    loader = DataLoader(
        dataset,
        batch_size=8,
        shuffle=True,
        collate_fn=default_data_collator,
        generator=torch.Generator().manual_seed(42),
    )
    spent: dict[str, float] = {}
    times = []

    def done(label, start):
        now = clock()
        spent[label] = spent.get(label, 0.0) + now - start
        return now

    model.train()
    model.zero_grad()
    tr_loss = torch.zeros(())
    batches = iter(loader)
    for _ in range(steps):
        start = clock()
        batch = next(batches)
        start = done("batches (torch's DataLoader)", start)
        batch = {k: v.to("cpu", non_blocking=True) for k, v in batch.items()}
        loss = model(**batch).loss
        start = done("forward", start)
        loss.backward()
        start = done("backward", start)
        tr_loss += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        start = done("clipping", start)
        optimizer.step()
        start = done("optimizer.step", start)
        times.append(bench.clocks())
        scheduler.step()
        model.zero_grad()
        done("schedule and zero_grad", start)
    steady = bench.steady_ms_per_step(times, steps // 10)["ms_per_step"]
    return {"whole step (steady state)": steady, **{k: v / steps * 1000 for k, v in spent.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args(argv)
    bench.set_threads(1)
    for round_ in range(1, opts.rounds + 1):
        for name, parts in (("bare loop", bare_parts), ("looptrain", looptrain_parts)):
            print(f"round {round_}, {name}: CPU ms per optimizer step")
            for label, ms in parts(opts.steps).items():
                print(f"  {ms:7.3f}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
