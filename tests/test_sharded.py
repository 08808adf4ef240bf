"""FSDP and DeepSpeed ZeRO: the plugin / config each combination of arguments hands accelerate, and sharded
checkpoints that resume completely, looptrain against `transformers.Trainer` in the same launch.

Two launches of `tests/sharded_worker.py` (its docstring says what runs and under which CPU shims):
  * FSDP2 on 2 CPU processes over gloo (torch.distributed.run): SHARDED_STATE_DICT and FULL_STATE_DICT;
  * DeepSpeed ZeRO-2 (Trainer's optimizer and schedule) and ZeRO-3 (DeepSpeed's) on 1 CPU process: ZeRO on one
    process runs the same partitioning, save and load code as on several, with one partition.
Each setup trains 4 optimizer steps (GA=2, 2 epochs) with each library, saving checkpoint-3 mid-epoch; then
looptrain resumes from its checkpoint and from Trainer's, and Trainer from looptrain's. "Complete state" below
is the whole model and optimizer state gathered from every shard (FSDP: torch.distributed.checkpoint's full
state dicts; ZeRO: DeepSpeed's optimizer state dict, all partitions), fingerprinted tensor by tensor.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from test_distributed import free_port

import sharded_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "sharded_worker.py")
RESUMED = ("looptrain_from_looptrain", "looptrain_from_transformers", "transformers_from_looptrain")


def launch(tmp, mode: str, processes: int) -> dict:
    env = dict(
        os.environ,
        HF_HOME=str(tmp / "hf_home"),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(free_port()),
        WORKER,
        "--mode",
        mode,
        "--out",
        str(tmp / "result"),
        "--workdir",
        str(tmp / "work"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"{mode} launch failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")
    return {r: json.loads((tmp / f"result.rank{r}.json").read_text()) for r in range(processes)}


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("fsdp"), "fsdp", processes=2)


@pytest.fixture(scope="module")
def deepspeed(tmp_path_factory):
    pytest.importorskip("deepspeed", reason="DeepSpeed is in the dev extra: pip install -e '.[dev]'")
    return launch(tmp_path_factory.mktemp("deepspeed"), "deepspeed", processes=1)


def losses(run: dict) -> list:
    return [entry for entry in run["log"] if "loss" in entry]


def assert_resumes_completely(runs: dict) -> None:
    failed = [name for name, passed in sharded_worker.checks(runs) if not passed]  # gpu_check.py's checks
    assert not failed, failed
    hf, lt = runs["transformers"], runs["looptrain"]
    # looptrain's uninterrupted run equals Trainer's: every log value, the complete state at the save and at the end
    assert lt["log"] == hf["log"]
    assert lt["at_save"] == hf["at_save"]
    assert lt["end"] == hf["end"]
    for name in RESUMED:
        resumed = runs[name]
        # right after loading the checkpoint: exactly the complete state the uninterrupted run saved
        assert resumed["at_resume"]["optimizer"] == lt["at_save"]["optimizer"], name
        assert resumed["at_resume"]["weights"] == lt["at_save"]["weights"], name
        # and it continues as that run did, to the same final weights and optimizer state
        assert losses(resumed) == losses(lt), name
        assert resumed["end"] == lt["end"], name
    # the state compared is not trivial: it moved between the save and the end, and holds Adam's moments
    assert lt["end"]["optimizer"] != lt["at_save"]["optimizer"]
    assert any("exp_avg_sq" in key for key in lt["end"]["optimizer"])


def assert_same_files(runs: dict) -> None:
    hf_files = {f for f in runs["transformers"]["checkpoint_files"] if f != "training_args.bin"}
    lt_files = set(runs["looptrain"]["checkpoint_files"])
    assert hf_files <= lt_files, f"files Trainer writes and looptrain does not: {sorted(hf_files - lt_files)}"
    # looptrain's own: the loop's state, and the arguments as JSON where Trainer pickles them (when _save runs)
    own = {"looptrain_state.json"} | (
        {"training_args.json"} if "training_args.bin" in runs["transformers"]["checkpoint_files"] else set()
    )
    assert lt_files - hf_files == own
    assert runs["looptrain"]["leftovers"] == []  # the staging folder was renamed


# ------------------------------------------------------------------------------------------------ FSDP
def test_fsdp_plugin_equals_trainers_for_each_combination_of_arguments(fsdp):
    """fsdp=True / the 5.24 string and list forms / fsdp_config (dict, JSON file with fsdp_ prefixes; wrap policies,
    state dict type, activation checkpointing, offload, FSDP 1 options, bf16), and the environment that
    `accelerate launch --config_file examples/accelerate_configs/fsdp.yaml` sets: every field of the plugin."""
    plugins = fsdp[0]["plugins"]
    assert len(plugins) == 10
    for name, built in plugins.items():
        assert built["looptrain"] == built["transformers"], name
    # the combinations really differ (the comparison is not of ten defaults)
    assert plugins["version 1, hybrid_shard, prefetch"]["looptrain"]["fsdp_version"] == 1
    assert plugins["string shard_grad_op offload"]["looptrain"]["reshard_after_forward"] is False
    assert (
        plugins["bf16"]["looptrain"]["mixed_precision_policy"]
        != plugins["fsdp=True"]["looptrain"]["mixed_precision_policy"]
    )
    yaml_plugin = plugins["accelerate config file (fsdp.yaml)"]["looptrain"]
    assert yaml_plugin["transformer_cls_names_to_wrap"] == ["BertLayer"]
    assert yaml_plugin["state_dict_type"].endswith("FULL_STATE_DICT")


@pytest.mark.parametrize("state_dict_type", ["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
def test_fsdp_resume_restores_the_complete_optimizer_state(fsdp, state_dict_type):
    runs = fsdp[0][state_dict_type]
    assert runs["looptrain"]["is_fsdp_enabled"] and runs["looptrain"]["world_size"] == 2
    assert_resumes_completely(runs)
    # every rank computed the same gathered state
    for name in ("looptrain", *RESUMED):
        assert fsdp[1][state_dict_type][name]["end"] == runs[name]["end"]
    # each rank's own shard of the optimizer state differs: one rank's shard would not be the whole
    assert (
        fsdp[0][state_dict_type]["looptrain"]["local_optimizer_shard"]
        != fsdp[1][state_dict_type]["looptrain"]["local_optimizer_shard"]
    )


def test_fsdp_checkpoints_are_trainers(fsdp):
    sharded, full = fsdp[0]["SHARDED_STATE_DICT"], fsdp[0]["FULL_STATE_DICT"]
    for runs in (sharded, full):
        assert_same_files(runs)
    files = set(sharded["looptrain"]["checkpoint_files"])
    # torch.distributed.checkpoint: one file per rank, for the model and for the optimizer state
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert {f"{folder}/.metadata", f"{folder}/__0_0.distcp", f"{folder}/__1_0.distcp"} <= files
    assert {"rng_state_0.pth", "rng_state_1.pth", "scheduler.pt"} <= files
    assert "optimizer.pt" not in files and "model.safetensors" not in files  # as Trainer: shards only
    files = set(full["looptrain"]["checkpoint_files"])
    assert {"pytorch_model_fsdp.bin", "optimizer.bin", "model.safetensors", "config.json"} <= files


# ------------------------------------------------------------------------------------------------ DeepSpeed
def test_deepspeed_config_equals_trainers(deepspeed):
    """The DeepSpeed config after Trainer's filling-in ("auto" values from the arguments: batch sizes, accumulation,
    clipping, optimizer and schedule parameters, precision), for deepspeed=<dict> and for the environment of
    `accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml`."""
    results = deepspeed[0]
    for name in ("zero2", "zero3"):
        assert results[name]["looptrain"]["deepspeed_config"] == results[name]["transformers"]["deepspeed_config"], name
    config = results["zero3"]["looptrain"]["deepspeed_config"]
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 8 and config["gradient_clipping"] == 0.5
    assert config["optimizer"]["params"]["lr"] == 1e-3 and config["optimizer"]["params"]["weight_decay"] == 0.01
    assert (
        config["scheduler"]["params"]["total_num_steps"] == 4 and config["scheduler"]["params"]["warmup_num_steps"] == 1
    )
    from_file = results["config_file"]
    assert from_file["looptrain"]["enabled"] and from_file["looptrain"] == from_file["transformers"]
    config = from_file["looptrain"]["config"]
    assert config["zero_optimization"]["stage"] == 2 and config["bf16"]["enabled"]  # the file's
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["train_batch_size"] == 4  # the arguments'
    assert config["gradient_accumulation_steps"] == 1 and config["gradient_clipping"] == 1.0


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_resume_restores_the_complete_optimizer_state(deepspeed, stage):
    runs = deepspeed[0][stage]
    assert runs["looptrain"]["is_deepspeed_enabled"]
    assert_resumes_completely(runs)


def test_deepspeed_checkpoints_are_trainers(deepspeed):
    for stage in ("zero2", "zero3"):
        runs = deepspeed[0][stage]
        assert_same_files(runs)
        files = set(runs["looptrain"]["checkpoint_files"])
        assert {"latest", "rng_state.pth", "config.json"} <= files
        assert any(f.startswith("global_step3/") and f.endswith("optim_states.pt") for f in files)
    # ZeRO-2 with Trainer's schedule: scheduler.pt; ZeRO-3 with DeepSpeed's: inside DeepSpeed's files
    assert "scheduler.pt" in deepspeed[0]["zero2"]["looptrain"]["checkpoint_files"]
    assert "scheduler.pt" not in deepspeed[0]["zero3"]["looptrain"]["checkpoint_files"]
    # ZeRO-3 without stage3_gather_16bit_weights_on_model_save: no weights file, as Trainer (it cannot gather them)
    assert "model.safetensors" not in deepspeed[0]["zero3"]["looptrain"]["checkpoint_files"]
    assert "model.safetensors" in deepspeed[0]["zero2"]["looptrain"]["checkpoint_files"]


# ------------------------------------------------------------------------------------------------ reading them safely
class Payload:
    """Stands for a class that a tampered checkpoint file would name."""


def test_sharded_checkpoint_files_that_reference_code_are_refused(tmp_path):
    """torch.distributed.checkpoint's metadata is a plain pickle and DeepSpeed unpickles its files: a resume refuses
    either when it references anything but their own classes, before their loaders run."""
    # a well-formed torch.distributed.checkpoint folder passes
    import torch.distributed.checkpoint as dcp

    from looptrain.checkpoint import CheckpointError, check_sharded_files

    good = tmp_path / "good"
    dcp.save(
        {"model": {"w": torch.ones(3)}},
        storage_writer=dcp.FileSystemWriter(str(good / "pytorch_model_fsdp_0")),
        no_dist=True,
    )
    check_sharded_files(str(good))

    bad = tmp_path / "bad"
    (bad / "optimizer_0").mkdir(parents=True)
    (bad / "optimizer_0" / ".metadata").write_bytes(pickle.dumps(os.system))
    with pytest.raises(CheckpointError, match=r"optimizer_0/.metadata.*references posix.system|references os.system"):
        check_sharded_files(str(bad))

    ds = tmp_path / "ds"
    (ds / "global_step3").mkdir(parents=True)
    torch.save(
        {"module": {"w": torch.ones(2)}, "ds_version": "0.19"}, ds / "global_step3" / "mp_rank_00_model_states.pt"
    )
    check_sharded_files(str(ds))
    torch.save({"optimizer_state_dict": Payload()}, ds / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match="references .*Payload"):
        check_sharded_files(str(ds))


def test_fsdp_checkpoint_without_fsdp_is_refused(tmp_path):
    """Trainer's rule: FSDP-sharded weights resume only under FSDP; said before anything is loaded."""
    from helpers import tiny_bert
    from looptrain.checkpoint import CheckpointError, load_weights

    (tmp_path / "pytorch_model_fsdp_0").mkdir()
    with pytest.raises(CheckpointError, match="resume it under FSDP"):
        load_weights(str(tmp_path), tiny_bert(), accelerator=None, is_fsdp_enabled=False)
