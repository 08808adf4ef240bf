"""One worker process of the multi-process parity tests (`tests/test_distributed.py`).

Launched as (2 CPU processes over gloo; the script's own arguments pass `use_cpu=True`):

    .venv/bin/accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no tests/dist_worker.py --case cls --out /tmp/result.json

(`accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.15: `--cpu` selects the
single-process launcher, which only spreads over several processes through mpirun with a hostfile.)
Without a launcher it runs as a single process, which the tests use as the 1-process reference.

Every case builds the same tiny model and data from seeds, trains or evaluates it with
`transformers.Trainer` and then with `looptrain.Trainer` in this same process, and writes what each
produced (non-timing `log_history`, a SHA-1 of the final parameters, metrics, the files it wrote) to
`<out>.rank<N>.json`, one file per rank. The test compares the two libraries value for value.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys

import numpy as np
import torch
import transformers
from datasets import Dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import looptrain  # noqa: E402
from helpers import accuracy, make_args, random_token_dataset, strip_timing, tiny_bert, tiny_gpt2  # noqa: E402
from looptrain.backends import end_process_group  # noqa: E402

LIBS = {
    "transformers": (transformers.Trainer, transformers.TrainingArguments),
    "looptrain": (looptrain.Trainer, looptrain.TrainingArguments),
}


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def fingerprint(model) -> dict:
    """SHA-1 of every parameter's bytes (in `named_parameters()` order) and of each one alone."""
    total, per_param = hashlib.sha1(), {}
    for name, p in model.named_parameters():
        data = p.detach().cpu().contiguous().numpy().tobytes()
        total.update(data)
        per_param[name] = hashlib.sha1(data).hexdigest()[:16]
    return {"sha1": total.hexdigest()[:16], "params": per_param}


def build(lib: str, model, output_dir: str, callbacks=None, trainer_cls=None, **kwargs):
    trainer_cls_, args_cls = LIBS[lib]
    args = make_args(args_cls, output_dir, **kwargs.pop("args"))
    return (trainer_cls or trainer_cls_)(model=model, args=args, callbacks=callbacks, **kwargs)


def run(trainer, **train_kwargs) -> dict:
    """Train; return the non-timing log, the final weights' fingerprint and what was printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = trainer.train(**train_kwargs)
    return {
        "log": strip_timing(trainer.state.log_history),
        "training_loss": result.training_loss,
        "global_step": result.global_step,
        "weights": fingerprint(trainer.accelerator.unwrap_model(trainer.model)),
        "printed": out.getvalue(),
        "is_world_process_zero": trainer.state.is_world_process_zero,
        "world_size": trainer.args.world_size,
    }


def files_under(folder: str) -> list[str]:
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(root, n), folder) for n in names]
    return sorted(found)


# ------------------------------------------------------------------------------------------------ cases
def case_cls(out_dir: str) -> dict:
    """Sequence classification, GA=2, eval each epoch on 13 examples (not a multiple of 2 x 4)."""
    train, evaluation = random_token_dataset(40, seed=1), random_token_dataset(13, seed=2)
    args = dict(
        per_device_train_batch_size=8,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
        eval_strategy="epoch",
        logging_steps=1,
        seed=42,
    )
    results = {}
    for lib in LIBS:
        folder = os.path.join(out_dir, lib)
        trainer = build(
            lib,
            tiny_bert(),
            folder,
            train_dataset=train,
            eval_dataset=evaluation,
            compute_metrics=accuracy,
            args=dict(args),
        )
        results[lib] = run(trainer)
        trainer.accelerator.wait_for_everyone()
        results[lib]["files"] = files_under(folder) if os.path.isdir(folder) else []
    return results


def lm_dataset(n: int, seed: int, seq_len: int = 16, vocab_size: int = 64) -> Dataset:
    """Right-padded token sequences of random length: labels are the ids, -100 on padding, so each
    rank's micro-batch holds a different number of label tokens (which `num_items_in_batch` sums)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab_size, (n, seq_len))
    lengths = rng.integers(4, seq_len + 1, n)
    mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
    labels = np.where(mask == 1, ids, -100)
    return Dataset.from_dict(
        {"input_ids": (ids * mask).tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
    )


def counting_sync(trainer_cls):
    """`trainer_cls` whose DDP model counts its gradient all-reduces (a comm hook that does the plain
    mean all-reduce) and records, per micro-batch, how many buckets it reduced."""

    class CountingSync(trainer_cls):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if not hasattr(self, "allreduces_per_micro_batch"):
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

                self.allreduces_per_micro_batch, self._buckets = [], {"n": 0}

                def hook(state, bucket):
                    state["n"] += 1
                    return allreduce_hook(None, bucket)

                model.register_comm_hook(self._buckets, hook)
            before = self._buckets["n"]
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.allreduces_per_micro_batch.append(self._buckets["n"] - before)
            return loss

    return CountingSync


def case_clm(out_dir: str) -> dict:
    """Causal LM (loss normalised by num_items_in_batch summed over ranks), GA=2, remainder window."""
    train, evaluation = lm_dataset(36, seed=3), lm_dataset(11, seed=4)
    args = dict(
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
        eval_strategy="epoch",
        logging_steps=1,
        seed=42,
        save_strategy="no",
    )
    results = {}
    for lib in LIBS:
        trainer = build(
            lib,
            tiny_gpt2(),
            os.path.join(out_dir, lib),
            train_dataset=train,
            eval_dataset=evaluation,
            args=dict(args),
            trainer_cls=counting_sync(LIBS[lib][0]),
        )
        results[lib] = run(trainer)
        results[lib]["allreduces_per_micro_batch"] = trainer.allreduces_per_micro_batch
    return results


def per_example_metrics(eval_pred):
    """Accuracy, plus what shows that every eval example was counted exactly once."""
    logits, labels = eval_pred
    return {
        "accuracy": float((np.argmax(logits, axis=-1) == labels).mean()),
        "num_predictions": int(len(labels)),
        "label_sum": int(labels.sum()),
        "logit_sum": float(np.float64(logits).sum()),
    }


EVAL_SIZES = (13, 12)  # 13 = 8 + 5: rank 1's last batch is padded; 12 = 8 + 4: a whole batch is dropped
# "kwargs": BERT as is (forward takes **kwargs, so Trainer scales its loss by num_processes);
# "plain": the same model with accepts_loss_kwargs=False (no num_items_in_batch, no scaling).
EVAL_VARIANTS = {"kwargs": None, "plain": False}


def case_evalsize(out_dir: str) -> dict:
    """evaluate() and predict() of an untrained classifier on eval sets that do not divide the global batch.

    On one process it also records the batches a 2-process evaluation runs (computed here batch by
    batch), from which the test rebuilds the 2-process `eval_loss` and predictions exactly.
    """
    results = {}
    for lib in LIBS:
        results[lib] = {}
        for variant, accepts_loss_kwargs in EVAL_VARIANTS.items():
            for n in EVAL_SIZES:
                evaluation = random_token_dataset(n, seed=2)
                model = tiny_bert()
                if accepts_loss_kwargs is not None:
                    model.accepts_loss_kwargs = accepts_loss_kwargs
                trainer = build(
                    lib,
                    model,
                    os.path.join(out_dir, lib),
                    eval_dataset=evaluation,
                    compute_metrics=per_example_metrics,
                    args=dict(per_device_eval_batch_size=4, seed=42),
                )
                with contextlib.redirect_stdout(io.StringIO()):
                    metrics = trainer.evaluate()
                    prediction = trainer.predict(evaluation)
                entry = {
                    "metrics": {
                        k: v
                        for k, v in metrics.items()
                        if not any(t in k for t in ("runtime", "per_second", "preparation"))
                    },
                    "predictions": prediction.predictions.tolist(),
                    "test_loss": prediction.metrics["test_loss"],
                }
                if lib == "looptrain" and trainer.args.world_size == 1:
                    entry["sharded_batches"] = sharded_batches(trainer, evaluation, world_size=2, batch_size=4)
                results[lib][f"{variant}-{n}"] = entry
    return results


def sharded_batches(trainer, dataset, world_size: int, batch_size: int) -> list[dict]:
    """Every batch a `world_size`-process evaluation runs, in the order gather_for_metrics concatenates
    them: its indices, its mean loss and its logits, computed on this one process.

    accelerate's `BatchSamplerShard(even_batches=True)` deals batch i to rank i % world_size and
    completes the last round by wrapping around to the first indices of the dataset.
    """
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    per_rank = [
        list(BatchSamplerShard(BatchSampler(SequentialSampler(dataset), batch_size, False), world_size, r))
        for r in range(world_size)
    ]
    out = []
    for round_ in zip(*per_rank):
        for indices in round_:
            rows = [
                {k: v for k, v in dataset[i].items() if k in ("input_ids", "attention_mask", "label")} for i in indices
            ]
            loss, logits, _ = trainer.prediction_step(
                trainer.model, trainer.data_collator(rows), prediction_loss_only=False
            )
            out.append({"indices": list(indices), "loss": float(loss), "logits": logits.tolist()})
    return out


class SeedPerRank(transformers.TrainerCallback):
    """Give every rank its own dropout stream, so that a resume must restore each rank's RNG, not rank 0's."""

    def on_train_begin(self, args, state, control, **kwargs):
        torch.manual_seed(1000 + rank())


def case_resume(out_dir: str) -> dict:
    """Resume the run from its step-2 checkpoint (mid-epoch) on 2 processes: equal to the uninterrupted run."""
    train = random_token_dataset(72, seed=5)  # 9 batches of 4 per rank: windows 2, 2, 2, 2, 1
    args = dict(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=1,
        logging_steps=1,
        seed=42,
        save_strategy="steps",
        save_steps=2,
    )
    results = {}
    for lib in LIBS:
        full_dir, resumed_dir = os.path.join(out_dir, lib, "full"), os.path.join(out_dir, lib, "resumed")
        full = run(build(lib, tiny_bert(), full_dir, train_dataset=train, callbacks=[SeedPerRank()], args=dict(args)))
        checkpoint = os.path.join(full_dir, "checkpoint-2")
        files = files_under(checkpoint)
        resumed = run(
            build(lib, tiny_bert(), resumed_dir, train_dataset=train, callbacks=[SeedPerRank()], args=dict(args)),
            resume_from_checkpoint=checkpoint,
        )
        results[lib] = {"full": full, "resumed": resumed, "checkpoint_files": files}
    return results


CASES = {"cls": case_cls, "clm": case_clm, "evalsize": case_evalsize, "resume": case_resume}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", action="append", choices=sorted(CASES), required=True)
    parser.add_argument("--out", required=True, help="results go to <out>.rank<N>.json")
    parser.add_argument("--workdir", required=True, help="output_dir root for the trainers")
    opts = parser.parse_args()
    torch.set_num_threads(1)  # same kernels in launched and single-process runs
    results = {case: CASES[case](os.path.join(opts.workdir, case)) for case in opts.case}
    with open(f"{opts.out}.rank{rank()}.json", "w") as f:
        json.dump(results, f)
    end_process_group()  # gloo's threads must not outlive the interpreter: an abort at exit fails the launch


if __name__ == "__main__":
    main()
