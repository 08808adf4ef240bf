"""A misconfiguration fuzzer: invalid combinations generated systematically (each argument's invalid values and edges,
mismatched dataset / model / collator / optimizer / callback pairs), each given to looptrain.Trainer.

Each case must end in one of two ways:
  * a clear error: raised where the input enters (looptrain's code, or TrainingArguments' own validation), before any
    optimizer step changed a weight, with a message that names the offending object or value;
  * Trainer's exact behaviour: transformers.Trainer trains it too, and both runs log the same values and end with
    bit-identical weights that training changed (no silent no-op).
Anything else (a traceback from deep inside torch or datasets, a run that finishes having changed nothing, a
difference from Trainer) is "unexplained", and fails the test. The counts are printed (`pytest -s`) and, with
`python tests/test_fuzz_config.py`, written to stdout.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import tempfile
import traceback
from collections import Counter

import numpy as np
import torch
import transformers
from datasets import Dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import looptrain  # noqa: E402
from helpers import random_token_dataset, strip_timing, tiny_bert, tiny_gpt2, wordpiece_tokenizer  # noqa: E402

N = 8  # examples: two batches of 4; every run is at most 2 optimizer steps of a 2-layer, hidden-32 model

# ------------------------------------------------------------------------------------ the invalid argument values
# (argument, invalid values and edges); the names a clear error must mention are the argument and the value
ARGUMENT_CASES = {
    "learning_rate": [-1e-3, 0.0, float("nan")],
    "per_device_train_batch_size": [0, -1],
    "per_device_eval_batch_size": [0],
    "gradient_accumulation_steps": [0, -2],
    "max_steps": [0],
    "num_train_epochs": [0, -1],
    "warmup_steps": [-1],
    "adam_beta1": [-0.1, 1.0, 1.5],
    "adam_beta2": [1.0, 2.0],
    "adam_epsilon": [-1e-8],
    "logging_steps": [0, -1, 1.5],
    "save_steps": [0, -1],
    "eval_steps": [0, -1],
    "seed": [-1, 2**32],
    "data_seed": [-1],
    "label_smoothing_factor": [-0.1, 1.0, 1.5],
    "dataloader_num_workers": [-1],
    "save_total_limit": [0, -1],
    "eval_accumulation_steps": [0],
    "torch_empty_cache_steps": [0, -1],
    "lr_scheduler_type": ["nope"],
    "optim": ["nope"],
    "eval_strategy": ["sometimes"],
    "save_strategy": ["sometimes", "best"],
    "logging_strategy": ["sometimes"],
    "include_for_metrics": [["foo"]],
    "report_to": ["nope"],
    "metric_for_best_model": ["accuracy"],
    "max_grad_norm": [float("nan")],
    "weight_decay": [float("nan")],
    "dataloader_prefetch_factor": [2, 0],
    "warmup_steps_ratio": [1.5],  # warmup_steps as a ratio above 1 (encoded below)
}
# what each argument needs around it to be used at all
CONTEXT = {
    "save_steps": {"save_strategy": "steps"},
    "eval_steps": {"eval_strategy": "steps", "_eval": True},
    "per_device_eval_batch_size": {"eval_strategy": "steps", "eval_steps": 1, "_eval": True},
    "eval_accumulation_steps": {"eval_strategy": "steps", "eval_steps": 1, "_eval": True},
    "metric_for_best_model": {
        "eval_strategy": "steps",
        "eval_steps": 1,
        "_eval": True,
        "load_best_model_at_end": True,
        "save_strategy": "steps",
        "save_steps": 1,
    },
    "num_train_epochs": {"max_steps": -1},
    "torch_empty_cache_steps": {},
}


def argument_cases():
    for name, values in ARGUMENT_CASES.items():
        for value in values:
            args = dict(CONTEXT.get(name, {}))
            eval_data = args.pop("_eval", False)
            if name == "warmup_steps_ratio":
                args["warmup_steps"] = value
                mentions = ["warmup_steps", str(value)]
            else:
                args[name] = value
                mentions = [name, str(value)]
            yield f"{name}={value!r}", dict(args=args, eval=eval_data, mentions=mentions)


# ------------------------------------------------------------------------------------ mismatched pairs
def _data(labels=None, seq_len=8, **columns):
    data = random_token_dataset(N, 0, seq_len=seq_len, extra_columns=False)
    if labels is not None:
        data = data.remove_columns(["label"]).add_column("label", labels)
    for name, values in columns.items():
        data = data.add_column(name, values)
    return data


def _ragged():
    rng = np.random.default_rng(0)
    return Dataset.from_dict(
        {"input_ids": [rng.integers(5, 100, 4 + i).tolist() for i in range(N)], "label": [0, 1] * (N // 2)}
    )


def _token_classifier(num_labels=3):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return transformers.BertForTokenClassification(config)


def _mlm_collator():
    return transformers.DataCollatorForLanguageModeling(wordpiece_tokenizer(), mlm_probability=0.3)


class Callbackish:  # a plain object: no events
    pass


class NoLossModel(torch.nn.Module):
    """Returns a plain dict whose loss is None (it computes none)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.EmbeddingBag(100, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return {"loss": None, "logits": self.head(self.embed(input_ids))}


def _checkpoint(folder: str, damage: str) -> str:
    """A checkpoint to resume from: of a 3-class model ("other-head"), or with its weights deleted ("no-weights")."""
    out = os.path.join(folder, "earlier")
    args = looptrain.TrainingArguments(
        output_dir=out,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        max_steps=1,
        save_strategy="steps",
        save_steps=1,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        looptrain.Trainer(tiny_bert(num_labels=3 if damage == "other-head" else 2), args, train_dataset=_data()).train()
    checkpoint = os.path.join(out, "checkpoint-1")
    if damage == "no-weights":
        os.remove(os.path.join(checkpoint, "model.safetensors"))
    return checkpoint


def _other_model_optimizer():
    return torch.optim.AdamW(tiny_bert(seed=1).parameters())


PAIR_CASES = {
    # dataset x model head
    "text labels": dict(train=lambda: _data(["yes", "no"] * (N // 2)), mentions=["label", "text"]),
    "float labels, 2 classes": dict(train=lambda: _data([0.0, 1.0] * (N // 2)), mentions=["label", "float"]),
    "float labels, 3 classes": dict(
        model=lambda: tiny_bert(num_labels=3), train=lambda: _data([0.0, 1.0] * (N // 2)), mentions=["label"]
    ),
    "label 2 for 2 classes": dict(train=lambda: _data([0, 2] * (N // 2)), mentions=["label 2"]),
    "negative label": dict(train=lambda: _data([0, -1] * (N // 2)), mentions=["label -1"]),
    "no label column": dict(
        train=lambda: random_token_dataset(N, 0, extra_columns=False).remove_columns(["label"]),
        mentions=["no loss", "labels"],
    ),
    "labels under another name": dict(train=lambda: _data().rename_column("label", "target"), mentions=["label"]),
    "only a text column": dict(
        train=lambda: Dataset.from_dict({"text": ["a b c"] * N, "label": [0, 1] * (N // 2)}),
        mentions=["input_ids", "forward", "empty"],
    ),
    "sequences too long": dict(train=lambda: _data(seq_len=80), mentions=["80 tokens", "64"]),
    "token ids beyond the vocabulary": dict(
        train=lambda: Dataset.from_dict({"input_ids": [[5, 6, 500, 7]] * N, "label": [0, 1] * (N // 2)}),
        mentions=["token id 500", "vocabulary"],
    ),
    "ragged ids, no padding collator": dict(
        train=_ragged, collator=lambda: transformers.default_data_collator, mentions=["pad", "length"]
    ),
    "empty training set": dict(train=lambda: _data().select([]), mentions=["empty", "no batch"]),
    "per-example labels for a token classifier": dict(
        model=_token_classifier, train=lambda: _data([0, 1] * (N // 2)), mentions=["label", "shape", "Target"]
    ),
    "token labels beyond the classes": dict(
        model=_token_classifier,
        train=lambda: Dataset.from_dict({"input_ids": [[5, 6, 7, 8]] * N, "labels": [[0, 1, 5, -100]] * N}),
        mentions=["label 5"],
    ),
    "integer labels, multi-label head": dict(
        model=lambda: tiny_bert(num_labels=2, problem_type="multi_label_classification"),
        train=lambda: _data([0, 1] * (N // 2)),
        mentions=["label", "multi"],
    ),
    "classification data for a causal LM": dict(
        model=lambda: tiny_gpt2(vocab_size=100), train=lambda: _data([0, 1] * (N // 2)), mentions=["label", "shape"]
    ),
    # collators
    "MLM collator for a classifier": dict(
        train=lambda: random_token_dataset(N, 0, extra_columns=False).remove_columns(["label"]),
        collator=_mlm_collator,
        mentions=["label", "shape", "Target"],
    ),
    "collator that is not callable": dict(collator=lambda: "pad", mentions=["data_collator", "callable"]),
    # optimizers, schedulers, callbacks, paths
    "optimizer of another model": dict(optimizers=lambda: (_other_model_optimizer(), None), mentions=["optimizers"]),
    "scheduler without its optimizer": dict(
        optimizers=lambda: (None, torch.optim.lr_scheduler.LambdaLR(_other_model_optimizer(), lambda s: 1)),
        mentions=["scheduler"],
    ),
    "optimizer that is a list": dict(optimizers=lambda: ([torch.optim.SGD], None), mentions=["optimizer"]),
    "a function as callback": dict(callbacks=lambda: [print], mentions=["callbacks", "TrainerCallback"]),
    "a plain object as callback": dict(callbacks=lambda: [Callbackish()], mentions=["callbacks", "TrainerCallback"]),
    "callbacks not a list": dict(callbacks=lambda: transformers.PrinterCallback(), mentions=["callbacks"]),
    "output_dir is a file": dict(output_file=True, mentions=["output_dir"]),
    "all parameters frozen": dict(model=lambda: tiny_bert().requires_grad_(False), mentions=["requires_grad"]),
    "loss detached": dict(
        loss_func=lambda: lambda o, l, num_items_in_batch=None: o["logits"].mean().detach(), mentions=["loss"]
    ),
    "loss of the wrong shape": dict(
        loss_func=lambda: lambda o, l, num_items_in_batch=None: o["logits"], mentions=["loss", "single number"]
    ),
    "eval strategy without eval data": dict(
        args={"eval_strategy": "steps", "eval_steps": 1}, mentions=["eval_dataset"]
    ),
    "resume from a missing checkpoint": dict(resume="missing", mentions=["resume_from_checkpoint"]),
    "resume from a checkpoint of another head": dict(resume="other-head", mentions=["checkpoint", "different model"]),
    "resume from a checkpoint without weights": dict(resume="no-weights", mentions=["checkpoint", "weights"]),
    "collator adds a key the model does not take": dict(
        collator=lambda: lambda f: {**transformers.default_data_collator(f), "foo": torch.zeros(len(f))},
        mentions=["foo"],
    ),
    "float labels from a collator, single-label head": dict(
        model=lambda: tiny_bert(num_labels=2, problem_type="single_label_classification"),
        collator=lambda: lambda f: {**transformers.default_data_collator(f), "labels": torch.zeros(len(f))},
        mentions=["labels"],
    ),
    "a model whose loss is None": dict(model=lambda: NoLossModel(), mentions=["loss"]),
    "model_init and model": dict(model_init=True, mentions=["model_init"]),
}


def all_cases():
    yield from argument_cases()
    yield from PAIR_CASES.items()


# ------------------------------------------------------------------------------------ running one case
ENTRY_POINTS = (os.sep + "looptrain" + os.sep, os.path.join("transformers", "training_args.py"))
ARGUMENT_VALIDATION = os.path.join(
    "transformers", "training_args.py"
)  # its enums raise from transformers/utils/generic.py


def raised_where_it_enters(frames) -> bool:
    """Raised by looptrain's code, or by what it calls directly while taking the input in (TrainingArguments' own
    validation, whose enum fields raise one call deeper; transformers' `report_to` lookup)."""
    if not frames:
        return False
    if any(entry in frames[-1].filename for entry in ENTRY_POINTS):
        return True
    in_looptrain = [os.sep + "looptrain" + os.sep in f.filename for f in frames]
    constructing = any(inside and f.name == "__init__" for inside, f in zip(in_looptrain, frames))
    if len(frames) >= 2 and in_looptrain[-2] and constructing:  # one call below looptrain's constructor (or its phases)
        return True
    return frames[-1].filename.endswith(os.path.join("utils", "generic.py")) and any(
        ARGUMENT_VALIDATION in f.filename for f in frames
    )


def _run(library: str, case: dict, folder: str):
    """('ok', log, weights changed?, final weights) or ('error', exception)."""
    trainer_cls, args_cls = (
        (transformers.Trainer, transformers.TrainingArguments)
        if library == "hf"
        else (looptrain.Trainer, looptrain.TrainingArguments)
    )
    output_dir = os.path.join(folder, library)
    if case.get("output_file"):
        with open(output_dir, "w") as f:
            f.write("a file")
    try:
        base = dict(
            use_cpu=True,
            report_to="none",
            disable_tqdm=True,
            max_steps=2,
            logging_steps=1,
            per_device_train_batch_size=4,
            save_strategy="no",
            dataloader_pin_memory=False,
        )
        args = args_cls(output_dir=output_dir, **{**base, **case.get("args", {})})
        model = case.get("model", tiny_bert)()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        kwargs = dict(
            train_dataset=case.get("train", _data)(),
            eval_dataset=_data() if case.get("eval") else None,
            data_collator=case["collator"]() if "collator" in case else None,
            callbacks=case["callbacks"]() if "callbacks" in case else None,
            optimizers=case["optimizers"]() if "optimizers" in case else (None, None),
            compute_loss_func=case["loss_func"]() if "loss_func" in case else None,
        )
        if case.get("model_init"):
            kwargs["model_init"] = tiny_bert
        trainer = trainer_cls(model, args, **kwargs)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            resume = case.get("resume")
            if resume in ("other-head", "no-weights"):
                resume = (
                    _checkpoint(os.path.join(folder, library), resume)
                    if "checkpoint" not in case
                    else case["checkpoint"]
                )
            elif resume:
                resume = os.path.join(folder, "missing")
            trainer.train(resume_from_checkpoint=resume)
    except Exception as err:  # noqa: BLE001 - judged below
        return ("error", err)
    after = {n: p.detach() for n, p in trainer.model.named_parameters()}
    changed = any(not torch.equal(before[n], after[n]) for n in before if n in after)
    return ("ok", strip_timing(trainer.state.log_history), changed, after)


def _same_log(a, b):
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.keys() != y.keys():
            return False
        for k in x:
            if not (
                x[k] == y[k]
                or (isinstance(x[k], float) and isinstance(y[k], float) and math.isnan(x[k]) and math.isnan(y[k]))
            ):
                return False
    return True


def judge(name: str, case: dict, folder: str) -> tuple[str, str]:
    """('clear' | 'trainer-identical' | 'unexplained', a line saying why)."""
    lt = _run("lt", case, folder)
    if lt[0] == "error":
        err = lt[1]
        frames = traceback.extract_tb(err.__traceback__)
        where = frames[-1].filename if frames else ""
        text = str(err)
        at_entry = raised_where_it_enters(frames)
        named = any(m.lower() in text.lower() for m in case.get("mentions", []))
        line = (
            f"{type(err).__name__}: {text.splitlines()[0][:160] if text else ''} (raised in {os.path.basename(where)})"
        )
        return ("clear" if at_entry and named else "unexplained"), line
    hf = _run("hf", case, folder)
    if hf[0] == "error":
        return "unexplained", f"looptrain finished where Trainer raised {type(hf[1]).__name__}: {str(hf[1])[:160]}"
    if not lt[2]:
        return "unexplained", "looptrain finished without changing a weight (a silent no-op)"
    same = _same_log(lt[1], hf[1]) and all(torch.equal(lt[3][n], hf[3][n]) for n in lt[3])
    return ("trainer-identical" if same else "unexplained"), (
        "same logs and weights as Trainer" if same else "differs from Trainer"
    )


def run_fuzzer(verbose: bool = False) -> Counter:
    counts, unexplained = Counter(), []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i, (name, case) in enumerate(all_cases()):
                folder = os.path.join(tmp, str(i))
                os.makedirs(folder)
                verdict, line = judge(name, case, folder)
                counts[verdict] += 1
                if verbose:
                    print(f"  {verdict:<17} {name}: {line}")
                if verdict == "unexplained":
                    unexplained.append(f"{name}: {line}")
    finally:
        torch.set_num_threads(threads)
    counts["cases"] = sum(counts.values())
    print(
        f"misconfiguration fuzzer: {counts['cases']} cases, {counts['clear']} clear errors, "
        f"{counts['trainer-identical']} Trainer-identical, {counts['unexplained']} unexplained"
    )
    counts.unexplained = unexplained
    return counts


def test_every_misconfiguration_is_a_clear_error_or_trainers_exact_behaviour():
    counts = run_fuzzer(verbose=True)
    assert counts["cases"] >= 80
    assert not counts.unexplained, "\n".join(counts.unexplained)


if __name__ == "__main__":
    run_fuzzer(verbose=True)
