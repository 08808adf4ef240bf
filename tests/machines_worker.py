"""One node of a two-machine run on one host (tests/test_safety_net.py launches two with torchrun --nnodes 2): trains
a tiny model with transformers.Trainer and with looptrain.Trainer, save_on_each_node=False, into `own/` (this node's
working directory: a disk of its own) and into `--shared` (one folder both nodes write)."""

import argparse
import contextlib
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import transformers  # noqa: E402

import looptrain  # noqa: E402
from helpers import random_token_dataset, tiny_bert  # noqa: E402
from looptrain.backends import end_process_group  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--shared", required=True)
cli = parser.parse_args()
torch.set_num_threads(1)
rank = int(os.environ["RANK"])
if rank == 1:  # a save a kill interrupted on this machine's own disk: the next looptrain run removes it
    os.makedirs("own/lt/.tmp-checkpoint-99", exist_ok=True)
    open("own/lt/.tmp-checkpoint-99/rng_state_1.pth", "wb").close()
for where in ("own", cli.shared):
    for name, trainer_cls, args_cls in (
        ("hf", transformers.Trainer, transformers.TrainingArguments),
        ("lt", looptrain.Trainer, looptrain.TrainingArguments),
    ):
        args = args_cls(
            output_dir=os.path.join(where, name),
            use_cpu=True,
            report_to="none",
            disable_tqdm=True,
            max_steps=4,
            save_steps=2,
            logging_steps=2,
            per_device_train_batch_size=4,
            save_on_each_node=False,
            dataloader_pin_memory=False,
        )
        trainer = trainer_cls(tiny_bert(), args, train_dataset=random_token_dataset(32, 0))
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
        trainer.accelerator.wait_for_everyone()
print(f"node {rank} done")
end_process_group()  # gloo's threads must not outlive the interpreter (an abort at exit failed a CI run)
