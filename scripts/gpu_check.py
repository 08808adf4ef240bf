"""fp16 and bf16 on a GPU: parity of looptrain against transformers.Trainer, and throughput of both.

    .venv/bin/python scripts/gpu_check.py                 # on a machine with one CUDA GPU (< 8 minutes on an H100)
    .venv/bin/python scripts/gpu_check.py --smoke         # tiny sizes; on a CPU-only machine runs bf16 only

What it does, for each precision (fp32 reference, bf16, fp16):
  * throughput (run first, before the parity runs switch deterministic algorithms on): a
    BERT-base-sized classifier (12 layers, hidden 768, sequence 128, batch 32) for a fixed number of
    steps with each library, default (non-deterministic) settings; samples/s over the steps after a
    warm-up, with the GPU synchronised at both ends;
  * parity: the semantics doc's reference run (tiny BERT, 40 examples, batch 8, GA 2, 2 epochs, eval
    each epoch) with both trainers and `full_determinism=True` (GPU kernels such as the embedding
    backward are otherwise non-deterministic, so two runs of the *same* library would differ).
    Compares every non-timing log value and every final parameter bit for bit. For fp16 it also
    reports the GradScaler's final scale, the steps whose gradient norm overflowed, and the steps that
    repeated the previous learning rate (a skipped step does so only with a non-fused optimizer; see
    README, "Mixed precision").

And a sharded section (FSDP2 and DeepSpeed ZeRO through accelerate; one GPU suffices: FSDP and ZeRO on one
process run the same save and load code as on several). It launches `tests/sharded_worker.py` with
`torch.distributed.run`, one process per GPU (on a CPU, 2 processes over gloo for FSDP, 1 for ZeRO): a tiny
BERT trained 4 optimizer steps by each library, checkpoint-3 written mid-epoch, then looptrain resumed from
its checkpoint and from Trainer's, and Trainer from looptrain's; the complete weights and optimizer state
(gathered from every shard) are compared after loading and at the end with the uninterrupted run's and with
Trainer's, with `full_determinism=True` on a GPU. FSDP with SHARDED_STATE_DICT and FULL_STATE_DICT; ZeRO-2
(Trainer's optimizer and schedule) and ZeRO-3 (DeepSpeed's), when `import deepspeed` works (the GPU image has
no DeepSpeed: bring `deepspeed-*-py3-none-any.whl` and its small dependencies hjson, msgpack, ninja,
py-cpuinfo, einops in .whl/; `pip wheel --no-deps deepspeed` builds it without its compiled ops, which these
runs do not use). `--smoke` on a CPU runs one setup of each.

    .venv/bin/python scripts/gpu_check.py --sharded-only [--smoke]   # only this section

And, with `--bench` (or `--bench-only`), `scripts/bench.py --gpu` in a subprocess (about 5 minutes on an H100: bf16
BERT-base and a 134M-parameter causal LM, bare torch / looptrain / Trainer, samples/s, CPU ms per step, host
syncs per step, weights compared; `--smoke` or no GPU: its `--quick` code path). Its table goes into the JSON
document ("bench") and to `bench_gpu.json` next to --out. bench.py needs `datasets` (the recipe's .whl/ has it).

    .venv/bin/python scripts/gpu_check.py --bench-only --out "$OUT/gpu_check.json"   # fits one device call

Prints one line per result and per check, and a final JSON document (also written to --out if given). Exit
status 1 if any parity or sharded check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

# Deterministic cuBLAS for the parity runs; it must be set before CUDA starts (a large workspace,
# so that the throughput runs are not slowed by it).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
import transformers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import looptrain  # noqa: E402
from helpers import accuracy, params_of, random_token_dataset, strip_timing, tiny_bert  # noqa: E402

LIBS = {
    "transformers": (transformers.Trainer, transformers.TrainingArguments),
    "looptrain": (looptrain.Trainer, looptrain.TrainingArguments),
}


def train(lib, model_fn, output_dir, train_ds, eval_ds=None, callbacks=None, **kwargs):
    trainer_cls, args_cls = LIBS[lib]
    args = args_cls(output_dir=output_dir, report_to="none", disable_tqdm=True, save_strategy="no", **kwargs)
    trainer = trainer_cls(
        model=model_fn(),
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        compute_metrics=accuracy if eval_ds is not None else None,
        callbacks=callbacks,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        result = trainer.train()
    return trainer, result


def parity(precision: str, use_cpu: bool, tmp: str) -> dict:
    flags = {"fp32": {}, "bf16": {"bf16": True}, "fp16": {"fp16": True}}[precision]
    runs = {}
    for lib in LIBS:
        start = time.time()
        trainer, result = train(
            lib,
            tiny_bert,
            os.path.join(tmp, f"parity-{precision}-{lib}"),
            random_token_dataset(40, 1),
            random_token_dataset(12, 2),
            per_device_train_batch_size=8,
            per_device_eval_batch_size=8,
            gradient_accumulation_steps=2,
            num_train_epochs=2,
            eval_strategy="epoch",
            logging_steps=1,
            seed=42,
            full_determinism=True,
            use_cpu=use_cpu,
            **flags,
        )
        scaler = getattr(trainer.accelerator, "scaler", None)
        runs[lib] = {
            "log": strip_timing(trainer.state.log_history),
            "params": params_of(trainer.accelerator.unwrap_model(trainer.model)),
            "training_loss": result.training_loss,
            "scale": scaler.get_scale() if scaler is not None else None,
            "seconds": round(time.time() - start, 2),
        }
    hf, lt = runs["transformers"], runs["looptrain"]
    logs_equal = hf["log"] == lt["log"]
    differ = [n for n in hf["params"] if not torch.equal(hf["params"][n], lt["params"][n])]
    lrs = [e["learning_rate"] for e in lt["log"] if "loss" in e]
    norms = [e["grad_norm"] for e in lt["log"] if "loss" in e]
    out = {
        "precision": precision,
        "device": str(trainer.args.device),
        "parity": logs_equal and not differ and hf["training_loss"] == lt["training_loss"],
        "logs_equal": logs_equal,
        "params_differing": differ[:5],
        "first_loss": lt["log"][0]["loss"],
        "training_loss": lt["training_loss"],
        "overflow_steps": [i + 1 for i, g in enumerate(norms) if not torch.isfinite(torch.tensor(g))],
        "repeated_lr_steps": [i + 1 for i in range(1, len(lrs)) if lrs[i] == lrs[i - 1]],
        "final_scale": lt["scale"],
        "seconds": {lib: r["seconds"] for lib, r in runs.items()},
    }
    if not logs_equal:
        out["first_log_difference"] = next(
            ({"transformers": a, "looptrain": b} for a, b in zip(hf["log"], lt["log"]) if a != b),
            {"lengths": [len(hf["log"]), len(lt["log"])]},
        )
    return out


class StepTimer(transformers.TrainerCallback):
    """Wall time of the optimizer steps after `warmup`, GPU synchronised at both ends."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self._sync()
            self.start = time.perf_counter()
        elif state.global_step > self.warmup:
            self._sync()
            self.end, self.steps = time.perf_counter(), state.global_step - self.warmup


def throughput(precision: str, use_cpu: bool, smoke: bool, tmp: str) -> dict:
    flags = {"fp32": {}, "bf16": {"bf16": True}, "fp16": {"fp16": True}}[precision]
    if smoke:
        size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        batch, seq, steps, warmup = 8, 16, 6, 2
    else:
        size = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
        batch, seq, steps, warmup = 32, 128, 60, 10

    def model_fn():
        torch.manual_seed(0)
        config = transformers.BertConfig(vocab_size=1000, max_position_embeddings=max(seq, 64), num_labels=2, **size)
        return transformers.BertForSequenceClassification(config)

    data = random_token_dataset(batch * steps, seed=1, seq_len=seq, extra_columns=False)
    out = {
        "precision": precision,
        "model": f"bert h{size['hidden_size']} L{size['num_hidden_layers']}",
        "batch": batch,
        "seq_len": seq,
        "steps_timed": steps - warmup,
    }
    for lib in LIBS:
        timer = StepTimer(warmup)
        _, result = train(
            lib,
            model_fn,
            os.path.join(tmp, f"speed-{precision}-{lib}"),
            data,
            callbacks=[timer],
            per_device_train_batch_size=batch,
            max_steps=steps,
            logging_steps=steps,
            seed=42,
            use_cpu=use_cpu,
            **flags,
        )
        elapsed = timer.end - timer.start
        out[lib] = {
            "samples_per_s": round(timer.steps * batch / elapsed, 1),
            "ms_per_step": round(1000 * elapsed / timer.steps, 2),
            "train_samples_per_second_incl_startup": result.metrics["train_samples_per_second"],
        }
    out["looptrain_vs_transformers"] = round(
        out["looptrain"]["samples_per_s"] / out["transformers"]["samples_per_s"], 3
    )
    return out


def sharded(smoke: bool, tmp: str) -> list[dict]:
    """The sharded section: one launch of tests/sharded_worker.py per mode; one entry per check (None: skipped)."""
    import sharded_worker

    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    modes = [("fsdp", gpus or 2, ["SHARDED_STATE_DICT"] if smoke else list(sharded_worker.FSDP_SETUPS))]
    deepspeed_setups = ["zero2"] if smoke else list(sharded_worker.DEEPSPEED_SETUPS)
    if importlib.util.find_spec("deepspeed") is not None:
        modes.append(("deepspeed", gpus or 1, deepspeed_setups))
    entries = (
        []
        if len(modes) == 2
        else [{"check": f"deepspeed {s}: skipped, `import deepspeed` fails", "passed": None} for s in deepspeed_setups]
    )
    for mode, processes, setups in modes:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        out = os.path.join(tmp, f"sharded-{mode}")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(port),
            os.path.join(ROOT, "tests", "sharded_worker.py"),
            "--mode",
            mode,
            "--out",
            out,
            "--workdir",
            out + "-work",
        ]
        cmd += [a for setup in setups for a in ("--setup", setup)] + (["--deterministic"] if cuda else [])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        if cuda:
            env["DS_ACCELERATOR"] = (
                "cuda"  # a DeepSpeed wheel built on a CPU machine would otherwise default to its CPU
            )
        else:
            env["OMP_NUM_THREADS"] = "1"
        start = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
        if proc.returncode != 0:
            entries.append(
                {"check": f"{mode}: the launch failed (rc={proc.returncode}): {proc.stderr[-2000:]}", "passed": False}
            )
            continue
        results = json.load(open(f"{out}.rank0.json"))
        for setup in setups:
            for check, passed in sharded_worker.checks(results[setup]):
                entries.append(
                    {
                        "check": f"{mode} {setup} ({processes} process{'es' * (processes > 1)}): {check}",
                        "passed": passed,
                    }
                )
        entries.append(
            {"check": f"{mode}: {round(time.time() - start, 1)} s for {5 * len(setups)} runs", "passed": None}
        )
    return entries


def bench(smoke: bool, out: str | None) -> dict:
    """`scripts/bench.py --gpu` in a fresh process: its table and exit status."""
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--gpu"]
    if smoke or not torch.cuda.is_available():
        cmd.append("--quick")
    if out:
        cmd += ["--json", os.path.join(os.path.dirname(os.path.abspath(out)), "bench_gpu.json")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    start = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    except subprocess.TimeoutExpired as err:
        return {"passed": False, "table": f"timed out after 540 s: {(err.stderr or '')[-2000:]}"}
    return {
        "passed": proc.returncode == 0,
        "seconds": round(time.time() - start, 1),
        "table": proc.stdout[-8000:] if proc.returncode == 0 else proc.stderr[-4000:],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a quick check of the script itself)")
    parser.add_argument("--out", help="also write the JSON results here")
    parser.add_argument("--sharded-only", action="store_true", help="only the sharded (FSDP, DeepSpeed) section")
    parser.add_argument("--bench", action="store_true", help="also run scripts/bench.py --gpu (about 5 minutes)")
    parser.add_argument("--bench-only", action="store_true", help="only scripts/bench.py --gpu")
    opts = parser.parse_args()

    cuda = torch.cuda.is_available()
    use_cpu = not cuda
    precisions = ["fp32", "bf16", "fp16"] if cuda else ["fp32", "bf16"]
    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": __import__("accelerate").__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA GPU: fp16 skipped)",
    }
    print(json.dumps(env), flush=True)
    results = {"env": env, "parity": [], "throughput": [], "sharded": []}
    skip_checks = opts.bench_only
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        # Throughput first: the parity runs' full_determinism switches deterministic algorithms on for
        # the rest of the process. (The sharded section runs in launched processes of its own.)
        for precision in [] if opts.sharded_only or skip_checks else precisions:
            r = throughput(precision, use_cpu, opts.smoke or not cuda, tmp)
            results["throughput"].append(r)
            print("throughput", json.dumps(r), flush=True)
        for precision in [] if opts.sharded_only or skip_checks else precisions:
            r = parity(precision, use_cpu, tmp)
            results["parity"].append(r)
            print("parity", json.dumps(r), flush=True)
        for entry in [] if skip_checks else sharded(opts.smoke, tmp):
            results["sharded"].append(entry)
            verdict = {True: "PASS", False: "FAIL", None: "info"}[entry["passed"]]
            print(f"sharded {verdict} {entry['check']}", flush=True)
    if opts.bench or opts.bench_only:
        results["bench"] = bench(opts.smoke, opts.out)
        print(
            "bench", "PASS" if results["bench"]["passed"] else "FAIL", results["bench"]["table"], sep="\n", flush=True
        )
    results["seconds"] = round(time.time() - started, 1)
    results["all_parity"] = all(r["parity"] for r in results["parity"])
    results["all_sharded"] = all(e["passed"] is not False for e in results["sharded"])
    print(json.dumps(results, indent=1))
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(results, f, indent=1)
    bench_ok = results.get("bench", {}).get("passed", True)
    sys.exit(0 if results["all_parity"] and results["all_sharded"] and bench_ok else 1)


if __name__ == "__main__":
    main()
