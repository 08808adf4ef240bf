"""No host-device synchronisation in looptrain's loop between its sync points.

Every `Tensor.item()`, `bool(t)`, `float(t)`, `.tolist()`, `.cpu()`, ... made while `train()` runs is recorded
with the file that asked for it (`scripts/host_syncs.py`; on a CPU nothing waits, but the same calls would
stall the host on a GPU). looptrain reads the device only at a log, an evaluation, a save and the end of
training; between them, zero per micro-batch, in float32, bf16 (CPU autocast) and fp16 (with the loss scaler
accelerate creates on a GPU, set up on the CPU as tests/test_mixed_precision.py does). transformers.Trainer,
counted the same way, makes two per micro-batch (its NaN/inf loss filter), which shows the counter sees syncs
inside a loop. The model's own syncs are listed in docs/performance.md.
"""

from __future__ import annotations

import os
import sys

import pytest
import transformers
from test_mixed_precision import LTTrainerFP16

import looptrain
from helpers import random_token_dataset, run_trainer, tiny_bert

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import host_syncs  # noqa: E402

TRAIN, EVAL = random_token_dataset(48, 1), random_token_dataset(8, 2)
# 6 micro-batches an epoch, GA 2: 3 optimizer steps; 2 epochs; a log every 2 steps, an evaluation and a save
# every 3 (so that micro-batches run between every two sync points).
ARGS = dict(
    per_device_train_batch_size=8,
    per_device_eval_batch_size=8,
    gradient_accumulation_steps=2,
    num_train_epochs=2,
    logging_steps=2,
    eval_strategy="steps",
    eval_steps=3,
    save_strategy="steps",
    save_steps=3,
    seed=42,
)
MICRO_BATCHES = 12


def count(trainer_cls, args_cls, tmp_path, **overrides):
    with host_syncs.counting() as counter:
        trainer, _ = run_trainer(trainer_cls, args_cls, tiny_bert, tmp_path, TRAIN, EVAL, args=dict(ARGS, **overrides))
    return trainer, counter


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "fp32_tokens_seen"])
def test_no_loop_sync_between_logs_evaluations_and_saves(tmp_path, precision):
    cls, flags = {
        "fp32": (looptrain.Trainer, {}),
        "bf16": (looptrain.Trainer, dict(bf16=True)),
        "fp16": (LTTrainerFP16, dict(fp16=True)),
        "fp32_tokens_seen": (looptrain.Trainer, dict(include_num_input_tokens_seen=True)),
    }[precision]
    # The fast paths on, whatever LOOPTRAIN_PLAIN says: the plain path counts tokens as Trainer does, with a sync.
    cls = type(cls.__name__, (cls,), {"fast_paths": True})
    trainer, counter = count(cls, looptrain.TrainingArguments, tmp_path, **flags)
    assert trainer.state.global_step == 6
    if precision == "fp16":
        assert trainer.accelerator.scaler is not None
    in_loop = [e for e in counter.events if e[0] == "looptrain" and not e[1]]
    assert in_loop == [], counter.summary()
    assert counter.count("looptrain", at_point=True) > 0  # the logs do read the loss: the counter sees them


def test_the_counter_sees_trainers_per_step_syncs(tmp_path):
    _, counter = count(transformers.Trainer, transformers.TrainingArguments, tmp_path)
    # Trainer's NaN/inf filter: torch.isnan(loss) or torch.isinf(loss) on the host, every micro-batch.
    assert counter.count("trainer", at_point=False) >= 2 * MICRO_BATCHES, counter.summary()
