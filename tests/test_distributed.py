"""Data parallel on 2 CPU processes over gloo, launched with `accelerate launch`: looptrain against
`transformers.Trainer` in the same launch, value for value.

One launch runs every case of `tests/dist_worker.py` (imports and gloo start-up are most of the cost);
each test below reads its case from the per-rank result files. The 1-process reference for the
eval-size test runs the same worker code in this process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import dist_worker
from helpers import tiny_bert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dist_worker.py")
CASES = ("cls", "clm", "evalsize", "resume")
LIBS = ("transformers", "looptrain")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_CONFIG = os.path.join(ROOT, "examples", "accelerate_configs", "ddp.yaml")


def accelerate_launch_cmd(port: int) -> list[str]:
    """The README's launch: `accelerate launch --config_file examples/accelerate_configs/ddp.yaml`, 2 processes.
    On a machine without a GPU accelerate's MULTI_GPU launch falls back to CPU processes over gloo.
    (`--cpu --num_processes 2` would start one process: accelerate 1.15's CPU launcher needs mpirun.)"""
    # The `accelerate` command of this interpreter, as a module: make test's .venv-test takes accelerate from .venv
    # (a .pth file), so it has no `accelerate` script of its own, and the launched processes run on sys.executable.
    return [
        sys.executable,
        "-m",
        "accelerate.commands.accelerate_cli",
        "launch",
        "--config_file",
        DDP_CONFIG,
        "--main_process_port",
        str(port),
    ]


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    """Run every case on 2 processes once; return {rank: {case: results}}."""
    tmp = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, HF_HOME=str(tmp / "hf_home"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = accelerate_launch_cmd(free_port()) + [WORKER, "--out", str(tmp / "result"), "--workdir", str(tmp / "work")]
    for case in CASES:
        cmd += ["--case", case]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"2-process launch failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return {r: json.loads((tmp / f"result.rank{r}.json").read_text()) for r in (0, 1)}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The eval-size case on one process (this one), with the launched workers' single thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = dist_worker.case_evalsize(str(tmp_path_factory.mktemp("single")))
    finally:
        torch.set_num_threads(threads)
    return json.loads(json.dumps(results))  # the same types as the launched workers' JSON


def assert_same_run(hf: dict, lt: dict):
    assert len(hf["log"]) == len(lt["log"]), f"{len(hf['log'])} vs {len(lt['log'])} log entries"
    for i, (a, b) in enumerate(zip(hf["log"], lt["log"])):
        assert list(a) == list(b), f"entry {i}: keys {list(a)} vs {list(b)}"
        assert a == b, f"entry {i} differs:\n  transformers: {a}\n  looptrain:    {b}"
    assert hf["training_loss"] == lt["training_loss"]
    assert hf["global_step"] == lt["global_step"]
    differ = [n for n in hf["weights"]["params"] if hf["weights"]["params"][n] != lt["weights"]["params"][n]]
    assert not differ, f"final parameters differ bit-wise: {differ[:5]}"
    assert hf["weights"]["sha1"] == lt["weights"]["sha1"]


# ------------------------------------------------------------------------------------------------ training parity
def test_two_process_sequence_classifier_parity(two_process):
    """BERT classifier, GA=2, eval every epoch on 13 examples: every non-timing log value and the weights."""
    hf, lt = two_process[0]["cls"]["transformers"], two_process[0]["cls"]["looptrain"]
    assert hf["world_size"] == lt["world_size"] == 2
    # 40 examples / (8 x 2 ranks): 3 micro-batches per rank (the last round wraps around), windows [2, 1]
    assert [e["step"] for e in lt["log"] if "loss" in e] == [1, 2, 3, 4]
    assert_same_run(hf, lt)
    # DDP keeps the replicas identical
    assert two_process[1]["cls"]["looptrain"]["weights"]["sha1"] == lt["weights"]["sha1"]


def test_two_process_causal_lm_ga2_parity(two_process):
    """GPT-2 with ragged -100 labels: num_items_in_batch is summed across ranks (the ranks' token counts
    differ), GA=2 with a remainder window, eval every epoch."""
    hf, lt = two_process[0]["clm"]["transformers"], two_process[0]["clm"]["looptrain"]
    assert [e["step"] for e in lt["log"] if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert_same_run(hf, lt)


def test_non_final_micro_batches_skip_gradient_sync(two_process):
    """Only the last micro-batch of each window all-reduces gradients (windows of 2, 2, 1 per epoch)."""
    for rank in (0, 1):
        runs = two_process[rank]["clm"]
        assert runs["looptrain"]["allreduces_per_micro_batch"] == [0, 1, 0, 1, 1] * 2
        assert runs["looptrain"]["allreduces_per_micro_batch"] == runs["transformers"]["allreduces_per_micro_batch"]


def test_logged_loss_is_the_mean_over_ranks(two_process):
    """Every rank logs the same (gathered) value; the train loss differs per rank before the gather."""
    for case in ("cls", "clm"):
        assert two_process[0][case]["looptrain"]["log"] == two_process[1][case]["looptrain"]["log"]


def test_only_the_main_process_prints_and_writes(two_process):
    for lib in LIBS:
        main, other = two_process[0]["cls"][lib], two_process[1]["cls"][lib]
        assert main["is_world_process_zero"] and not other["is_world_process_zero"]
        assert main["printed"] and other["printed"] == ""
    # one checkpoint folder, one RNG file per rank, no single-process rng_state.pth
    files = two_process[0]["cls"]["looptrain"]["files"]
    assert [f for f in files if "rng_state" in f] == ["checkpoint-4/rng_state_0.pth", "checkpoint-4/rng_state_1.pth"]
    assert not any(f.startswith(".tmp-") for f in files)
    hf_files = {f for f in two_process[0]["cls"]["transformers"]["files"] if not f.endswith("training_args.bin")}
    assert hf_files <= set(files)  # every file Trainer writes (looptrain may add its own)


def test_resume_restores_each_ranks_rng(two_process):
    """Each rank trains with its own dropout stream; resuming mid-epoch from step 2 reproduces the
    uninterrupted run only if every rank gets its own `rng_state_<rank>.pth` back."""
    for lib in LIBS:
        result = two_process[0]["resume"][lib]
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(result["checkpoint_files"])
        full, resumed = result["full"], result["resumed"]
        assert resumed["weights"]["sha1"] == full["weights"]["sha1"], lib
        # the resumed run's log continues the full run's (the summary's train_loss covers fewer steps)
        assert [e for e in resumed["log"] if "loss" in e] == [e for e in full["log"] if "loss" in e]
    assert_same_run(
        two_process[0]["resume"]["transformers"]["resumed"], two_process[0]["resume"]["looptrain"]["resumed"]
    )


# ------------------------------------------------------------------------------------------------ evaluation
@pytest.mark.parametrize("variant", list(dist_worker.EVAL_VARIANTS))
@pytest.mark.parametrize("n", dist_worker.EVAL_SIZES)
def test_eval_set_not_dividing_the_global_batch(two_process, one_process, variant, n):
    """13 or 12 eval examples, batch 4 per rank, 2 ranks (a global batch of 8).

    What is equal on 2 processes and on 1: every metric computed from predictions (each example is
    counted exactly once: gather_for_metrics drops the padding), and the predictions themselves,
    except the one example whose batch the padding changed, which matches within float rounding.

    What is not, in transformers.Trainer 5.24 and so in looptrain, and why (checked exactly here):
      * eval_loss is a mean over samples of *per-batch* mean losses. With 13 examples rank 1's last
        batch is [12, 0, 1, 2] (accelerate pads the last round from the start), and its mean loss
        stands in for example 12. With 12 examples the padded batch is dropped whole, so no effect.
      * a model whose forward takes **kwargs ("kwargs": BERT) has its loss multiplied by
        num_processes (`average_tokens_across_devices`) although it ignores num_items_in_batch
        (transformers#47688): its eval_loss on 2 processes is 2x the 1-process value.
    """
    key = f"{variant}-{n}"
    single, sharded = one_process["looptrain"][key], one_process["looptrain"][key]["sharded_batches"]
    scale = 2 if variant == "kwargs" else 1

    for lib in LIBS:
        one, two = one_process[lib][key], two_process[0]["evalsize"][lib][key]
        # exactly the eval set, once
        for metric in ("accuracy", "num_predictions", "label_sum"):
            assert two["metrics"][f"eval_{metric}"] == one["metrics"][f"eval_{metric}"], metric
        assert two["metrics"]["eval_num_predictions"] == n
        # predictions: the 2-process ones are exactly the logits of the batches the ranks ran
        expected = [row for batch in sharded for row in batch["logits"]][:n]
        assert two["predictions"] == expected
        # the example whose batch accelerate completed by wrapping around to the start of the data
        padded = [b["indices"][0] for b in sharded if b["indices"] != sorted(b["indices"])]
        for i in range(n):
            if i in padded:
                np.testing.assert_allclose(two["predictions"][i], one["predictions"][i], rtol=0, atol=1e-6)
            else:
                assert two["predictions"][i] == one["predictions"][i], i
        # eval_loss: float32 mean of [scale x batch mean] repeated per slot, cut to n (gather_for_metrics)
        per_slot = np.array([np.float32(b["loss"]) * scale for b in sharded for _ in b["indices"]], dtype=np.float32)[
            :n
        ]
        assert two["metrics"]["eval_loss"] == per_slot.mean().item()
        assert two["test_loss"] == two["metrics"]["eval_loss"]
        if n == 12:  # no padded example: only Trainer's num_processes factor remains, and it is exact
            assert two["metrics"]["eval_loss"] == scale * one["metrics"]["eval_loss"]
        else:
            assert padded == [12]

    # and looptrain equals Trainer on both process counts
    for results in (one_process, two_process[0]["evalsize"]):
        hf, lt = results["transformers"][key], results["looptrain"][key]
        assert (
            hf["metrics"] == lt["metrics"]
            and hf["predictions"] == lt["predictions"]
            and hf["test_loss"] == lt["test_loss"]
        )
    assert single["metrics"]["eval_num_predictions"] == n


# ------------------------------------------------------------------------------------------------ configuration
def test_ddp_find_unused_parameters_follows_trainer(tmp_path):
    """Trainer turns DDP's unused-parameter search off for a model with activation checkpointing."""
    import looptrain

    def find_unused(model, **kwargs):
        args = looptrain.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)
        return looptrain.Trainer(model=model, args=args).accelerator.ddp_handler.find_unused_parameters

    assert find_unused(tiny_bert()) is True
    checkpointing = tiny_bert()
    checkpointing.activation_checkpointing_enable()
    assert find_unused(checkpointing) is False
    assert find_unused(checkpointing, ddp_find_unused_parameters=True) is True


def test_example_accelerate_configs_load():
    """The README's example configs are valid `accelerate config` files."""
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "deepspeed_zero2.yaml": "DEEPSPEED"}
    for name, distributed_type in expected.items():
        config = load_config_from_file(os.path.join(ROOT, "examples", "accelerate_configs", name))
        assert config.distributed_type.value == distributed_type
    assert load_config_from_file(DDP_CONFIG).num_processes == 2
