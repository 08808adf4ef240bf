"""Example-style scripts (tests/scripts_style/run_*.py: written for looptrain in the manner of transformers'
examples/pytorch Trainer scripts, not copies of them) run with `--trainer_impl transformers`, `looptrain` and
`mixed` (looptrain's Trainer fed transformers' own TrainingArguments). The flag only changes which classes a
script imports (test_only_the_import_lines_name_looptrain).

Each script runs in this process (runpy) on tiny models and data built here, and its outputs must equal the
transformers run's bit for bit: trainer_state.json (every non-timing log_history value, steps, flos, best
checkpoint), model.safetensors, every *results.json (non-timing keys), the prediction files, the model card
(README.md) and the list of files written. Also: a run stopped after its first checkpoint and started again
on the same folder (get_last_checkpoint -> train(resume_from_checkpoint=...)), and a run with the options
scripts often get (accumulation, length grouping, cosine warmup, load_best_model_at_end). The seq2seq setups
(summarization, translation) run looptrain's Seq2SeqTrainer.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import pathlib
import random
import runpy
import shutil
import sys

import datasets
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from helpers import TIMING_KEYS, WORDS, wordpiece_tokenizer

SCRIPTS = pathlib.Path(__file__).resolve().parent / "scripts_style"

# Common arguments: 8 optimizer steps of 4 rows, a log every 2 steps, an evaluation every 4.
COMMON = [
    "--do_train",
    "--do_eval",
    "--max_steps",
    "8",
    "--per_device_train_batch_size",
    "4",
    "--per_device_eval_batch_size",
    "8",
    "--learning_rate",
    "5e-4",
    "--seed",
    "42",
    "--report_to",
    "none",
    "--logging_steps",
    "2",
    "--eval_strategy",
    "steps",
    "--eval_steps",
    "4",
    "--save_strategy",
    "no",
    "--disable_tqdm",
    "true",
    "--use_cpu",
    "true",
]


# ------------------------------------------------------------------------------------------ tiny models, data
def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _sentence(rng, lo=3, hi=10):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


ENTITIES = {"alice": "PER", "bob": "PER", "paris": "LOC", "london": "LOC", "acme": "ORG"}
TARGET = {w: "x" + w[::-1] for w in WORDS}  # a made-up target language for translation: reversed words


def _wordlevel_tokenizer(specials: list[str], append_eos: bool, **special_tokens):
    """A whitespace word-level tokenizer built in-process (GPT-2 and T5 stand-ins)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(specials + WORDS + list(ENTITIES) + sorted(TARGET.values()) + [".", "?"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=special_tokens["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if append_eos:
        eos = special_tokens["eos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, vocab[eos])])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=128, **special_tokens)


def _build_models(root):
    """Tiny models saved with save_pretrained, as the scripts load them (hidden size 32, 2 layers)."""
    torch.manual_seed(0)
    tokenizer = wordpiece_tokenizer()
    tokenizer.model_max_length = 128
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    # The encoder with an MLM head: each script's task head is initialised by the script, after its set_seed.
    transformers.BertForMaskedLM(config).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")

    torch.manual_seed(0)
    eot = "<|endoftext|>"
    tokenizer = _wordlevel_tokenizer([eot], False, unk_token=eot, bos_token=eot, eos_token=eot)
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")

    torch.manual_seed(0)
    tokenizer = _wordlevel_tokenizer(
        ["<pad>", "</s>", "<unk>"], True, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    config = transformers.T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    transformers.T5ForConditionalGeneration(config).save_pretrained(root / "t5")
    tokenizer.save_pretrained(root / "t5")

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(root / "vit")
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / "vit")


def _write_json_lines(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _build_data(root, rng):
    """A few dozen rows per split, one folder per task."""
    splits = (("train", 32), ("validation", 12), ("test", 8))
    for name in ("classification", "lm", "ner", "qa", "choice", "summarization", "translation"):
        (root / name).mkdir()
    for split, n in splits:
        rows = []
        for _ in range(n):
            first, same = _sentence(rng), rng.random() < 0.5
            rows.append([first, first if same else _sentence(rng), int(same)])
        _write_csv(root / "classification" / f"{split}.csv", ["sentence1", "sentence2", "label"], rows)

        if split != "test":
            lines = [_sentence(rng, 5, 12) + " ." for _ in range(n)]
            lines.insert(3, "")  # the MLM script skips empty lines
            (root / "lm" / f"{split}.txt").write_text("\n".join(lines) + "\n")

        rows = []
        for _ in range(n):
            words = [
                rng.choice(list(ENTITIES)) if rng.random() < 0.3 else rng.choice(WORDS)
                for _ in range(rng.randint(3, 9))
            ]
            rows.append({"tokens": words, "tags": [f"B-{ENTITIES[w]}" if w in ENTITIES else "O" for w in words]})
        _write_json_lines(root / "ner" / f"{split}.json", rows)

        rows = []
        for i in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(10, 30))]  # some contexts need two windows
            at, answer = rng.randrange(len(words)), rng.choice(list(ENTITIES))
            words.insert(at, answer)
            rows.append(
                {
                    "id": f"{split}-{i}",
                    "question": f"who {rng.choice(WORDS)} the {rng.choice(WORDS)} ?",
                    "context": " ".join(words),
                    "answers": {"text": [answer], "answer_start": [len(" ".join(words[:at])) + (at > 0)]},
                }
            )
        (root / "qa" / f"{split}.json").write_text(json.dumps({"version": "tiny", "data": rows}))

        rows = [
            [_sentence(rng), _sentence(rng, 1, 3)] + [_sentence(rng, 2, 5) for _ in range(4)] + [rng.randrange(4)]
            for _ in range(n)
        ]
        _write_csv(
            root / "choice" / f"{split}.csv",
            ["context", "start", "ending0", "ending1", "ending2", "ending3", "label"],
            rows,
        )

        rows = []
        for _ in range(n):
            text = _sentence(rng, 8, 16) + " . " + _sentence(rng, 4, 8) + " ."
            rows.append([text, " ".join(text.split()[:4])])
        _write_csv(root / "summarization" / f"{split}.csv", ["text", "summary"], rows)

        rows = []
        for _ in range(n):
            words = _sentence(rng, 3, 7).split()
            rows.append({"translation": {"en": " ".join(words), "xx": " ".join(TARGET[w] for w in words)}})
        _write_json_lines(root / "translation" / f"{split}.json", rows)


def _build_images(root):
    """Two classes of small random RGB images (dark, light), as an image folder of PNG files."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("validation", 8)):
        for label, level in (("dark", 60), ("light", 190)):
            folder = root / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(n // 2):
                pixels = np.clip(rng.normal(level, 40, (12, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripts_style_assets")
    _build_models(root)
    _build_data(root, random.Random(0))
    _build_images(root)
    return root


# ------------------------------------------------------------------------------------------ running a script
@contextlib.contextmanager
def _isolated_logging():
    """Scripts set transformers' and datasets' verbosity and call logging.basicConfig (as the examples do):
    put all of it back afterwards."""
    levels = transformers.utils.logging.get_verbosity(), datasets.utils.logging.get_verbosity()
    root_handlers, root_level = logging.root.handlers[:], logging.root.level
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(levels[0])
        datasets.utils.logging.set_verbosity(levels[1])
        logging.root.handlers[:] = root_handlers
        logging.root.setLevel(root_level)


def run_script(script: str, argv: list[str], impl: str) -> None:
    """`python tests/scripts_style/<script> ARGV --trainer_impl IMPL`, in this process."""
    path = SCRIPTS / script
    saved_argv = sys.argv
    sys.argv = [str(path), *argv, "--trainer_impl", impl]
    try:
        with _isolated_logging(), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = saved_argv


# ------------------------------------------------------------------------------------------ comparing outputs
def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING_KEYS)}


# looptrain's one documented difference in what it writes (README: the arguments are saved as JSON, never pickled)
RENAMED = {"training_args.bin": "training_args.json"}
PREDICTION_FILES = ("predict_results.txt", "predictions.txt", "generated_predictions.txt")


def assert_same_outputs(reference: pathlib.Path, other: pathlib.Path) -> list[str]:
    """What the acceptance harness compares, plus the model card and the list of files, for two output
    folders. Returns the names of the files compared."""
    compared = []
    ref_state = json.loads((reference / "trainer_state.json").read_text())
    state = json.loads((other / "trainer_state.json").read_text())
    ref_log, log = (
        [_without_timing(e) for e in ref_state["log_history"]],
        [_without_timing(e) for e in state["log_history"]],
    )
    assert len(ref_log) == len(log), f"{len(ref_log)} vs {len(log)} log entries:\n{ref_log}\n{log}"
    for i, (a, b) in enumerate(zip(ref_log, log)):
        assert list(a) == list(b), f"log entry {i}: keys {list(a)} vs {list(b)}"
        assert a == b, f"log entry {i} differs:\n  transformers: {a}\n  looptrain:    {b}"
    for key in (
        "global_step",
        "epoch",
        "max_steps",
        "num_train_epochs",
        "total_flos",
        "train_batch_size",
        "best_metric",
        "best_global_step",
    ):
        assert ref_state[key] == state[key], f"trainer_state.json {key}: {ref_state[key]} vs {state[key]}"
    best = [s["best_model_checkpoint"] and pathlib.Path(s["best_model_checkpoint"]).name for s in (ref_state, state)]
    assert best[0] == best[1], f"best_model_checkpoint: {best[0]} vs {best[1]}"
    compared.append("trainer_state.json")

    ref_weights, weights = load_file(reference / "model.safetensors"), load_file(other / "model.safetensors")
    assert ref_weights.keys() == weights.keys()
    different = [
        n
        for n in ref_weights
        if ref_weights[n].dtype != weights[n].dtype or not torch.equal(ref_weights[n], weights[n])
    ]
    assert not different, f"model.safetensors differs in {different[:5]}"
    compared.append("model.safetensors")

    ref_results = sorted(p.name for p in reference.glob("*results.json"))
    assert ref_results == sorted(p.name for p in other.glob("*results.json"))
    for name in ref_results:
        a, b = json.loads((reference / name).read_text()), json.loads((other / name).read_text())
        assert _without_timing(a) == _without_timing(b), f"{name}:\n  transformers: {a}\n  looptrain:    {b}"
        compared.append(name)

    predictions = [
        p.name for p in reference.iterdir() if p.name in PREDICTION_FILES or p.name.endswith("predictions.json")
    ]
    predictions.append("README.md")  # the model card (create_model_card)
    for name in sorted(predictions):
        assert (other / name).is_file(), f"{name} missing"
        assert (reference / name).read_bytes() == (other / name).read_bytes(), f"{name} differs"
        compared.append(name)

    files = [sorted(RENAMED.get(p.name, p.name) for p in folder.iterdir()) for folder in (reference, other)]
    assert files[0] == files[1], f"the output folders hold different files: {files[0]} vs {files[1]}"
    return compared


# ------------------------------------------------------------------------------------------ the scripts
def _json_args(path: pathlib.Path, argv: list[str]) -> list[str]:
    """The same arguments as one JSON file (`script.py args.json`, read by HfArgumentParser.parse_json_file)."""

    def value(text):  # numbers and booleans as JSON values, everything else as a string
        try:
            return json.loads(text)
        except ValueError:
            return text

    args, i = {}, 0
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            args[argv[i][2:]], i = value(argv[i + 1]), i + 2
        else:  # a bare flag
            args[argv[i][2:]], i = True, i + 1
    path.write_text(json.dumps(args, indent=1))
    return [str(path)]


def _files(folder, ext, splits=("train", "validation", "test")):
    flags = {"train": "--train_file", "validation": "--validation_file", "test": "--test_file"}
    return [x for split in splits for x in (flags[split], str(folder / f"{split}.{ext}"))]


# setup -> (script, arguments beyond COMMON, whether they are given as a JSON file)
SETUPS = {
    "classification": lambda a: (
        "run_classification.py",
        [
            "--model_name_or_path",
            str(a / "bert"),
            *_files(a / "classification", "csv"),
            "--max_seq_length",
            "32",
            "--do_predict",
        ],
        False,
    ),
    "clm": lambda a: (
        "run_clm.py",
        [
            "--model_name_or_path",
            str(a / "gpt2"),
            *_files(a / "lm", "txt", ("train", "validation")),
            "--block_size",
            "16",
        ],
        False,
    ),
    "mlm": lambda a: (
        "run_mlm.py",
        [
            "--model_name_or_path",
            str(a / "bert"),
            *_files(a / "lm", "txt", ("train", "validation")),
            "--max_seq_length",
            "16",
        ],
        True,
    ),
    "ner": lambda a: (
        "run_ner.py",
        ["--model_name_or_path", str(a / "bert"), *_files(a / "ner", "json"), "--do_predict"],
        True,
    ),
    "qa": lambda a: (
        "run_qa.py",
        [
            "--model_name_or_path",
            str(a / "bert"),
            *_files(a / "qa", "json"),
            "--max_seq_length",
            "32",
            "--doc_stride",
            "8",
            "--do_predict",
        ],
        True,
    ),
    "multiple_choice": lambda a: (
        "run_multiple_choice.py",
        [
            "--model_name_or_path",
            str(a / "bert"),
            *_files(a / "choice", "csv", ("train", "validation")),
            "--max_seq_length",
            "32",
        ],
        False,
    ),
    "image": lambda a: (
        "run_image_classification.py",
        [
            "--model_name_or_path",
            str(a / "vit"),
            "--train_dir",
            str(a / "images" / "train"),
            "--validation_dir",
            str(a / "images" / "validation"),
            "--remove_unused_columns",
            "false",
        ],
        False,
    ),
    "summarization": lambda a: (
        "run_seq2seq.py",
        [
            "--model_name_or_path",
            str(a / "t5"),
            *_files(a / "summarization", "csv"),
            "--max_source_length",
            "48",
            "--max_target_length",
            "8",
            "--predict_with_generate",
            "--generation_max_length",
            "8",
            "--do_predict",
            "--source_prefix",
            "summarize: ",
        ],
        False,
    ),
    "translation": lambda a: (
        "run_seq2seq.py",
        [
            "--model_name_or_path",
            str(a / "t5"),
            *_files(a / "translation", "json"),
            "--source_lang",
            "en",
            "--target_lang",
            "xx",
            "--max_target_length",
            "10",
            "--predict_with_generate",
            "--do_predict",
            "--generation_max_length",
            "10",
            "--generation_num_beams",
            "2",
        ],
        True,
    ),
}
PREDICTIONS_WRITTEN = {
    "classification": ["predict_results.txt"],
    "ner": ["predictions.txt", "predict_results.json"],
    "qa": ["eval_predictions.json", "predict_predictions.json", "predict_results.json"],
    "summarization": ["generated_predictions.txt", "predict_results.json"],
    "translation": ["generated_predictions.txt", "predict_results.json"],
}


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """Runs each (setup, impl, variant) once per module; returns the output folder.

    `prepare(out)` may fill the output folder before the run (the resume case); `extra` adds arguments."""
    done = {}

    def run(setup: str, impl: str, variant: str = "", extra: tuple = (), prepare=None) -> pathlib.Path:
        key = setup, impl, variant
        if key not in done:
            root = tmp_path_factory.mktemp(f"{setup}_{impl}{variant}")
            script, argv, as_json = SETUPS[setup](assets)
            out = root / "out"  # the same folder name in every run: the model card names it
            if prepare is not None:
                prepare(out)
            argv = [*argv, *COMMON, *extra, "--output_dir", str(out), "--cache_dir", str(root / "cache")]
            run_script(script, _json_args(root / "args.json", argv) if as_json else argv, impl)
            done[key] = out
        return done[key]

    return run


@pytest.mark.parametrize("impl", ["looptrain", "mixed"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_script_matches_transformers(runs, setup, impl):
    compared = assert_same_outputs(runs(setup, "transformers"), runs(setup, impl))
    assert {"trainer_state.json", "model.safetensors", "all_results.json", "README.md"} <= set(compared)
    assert set(PREDICTIONS_WRITTEN.get(setup, ())) <= set(compared)


# Options scripts are often run with, together: accumulation, length-grouped sampling, a cosine schedule with
# warmup, and the best checkpoint (by the eval accuracy) loaded at the end, the other one deleted.
OPTIONS = (
    "--gradient_accumulation_steps",
    "2",
    "--train_sampling_strategy",
    "group_by_length",
    "--lr_scheduler_type",
    "cosine",
    "--warmup_steps",
    "0.25",
    "--load_best_model_at_end",
    "true",
    "--metric_for_best_model",
    "accuracy",
    "--save_strategy",
    "steps",
    "--save_steps",
    "4",
    "--save_total_limit",
    "1",
)


def test_script_options_match_transformers(runs):
    reference = runs("classification", "transformers", "_options", OPTIONS)
    # BERT ignores num_items_in_batch, so its accumulated loss is not averaged; looptrain says so (Trainer does not).
    with pytest.warns(UserWarning, match="num_items_in_batch"):
        other = runs("classification", "looptrain", "_options", OPTIONS)
    assert_same_outputs(reference, other)
    assert json.loads((other / "trainer_state.json").read_text())["best_global_step"] in (4, 8)
    assert len(list(other.glob("checkpoint-*"))) == 1


SAVE_EVERY_4 = ("--save_strategy", "steps", "--save_steps", "4")


@pytest.mark.parametrize("impl", ["looptrain", "mixed"])
def test_script_resumes_like_transformers(runs, impl):
    """The MLM script stopped after its checkpoint at step 4 and run again on the same output folder: it finds
    the checkpoint with get_last_checkpoint and passes it to train(resume_from_checkpoint=...). Each library
    resumes from its own checkpoint; the masks after the resume come from the restored random state."""

    def resumed(impl):
        full = runs("mlm", impl, "_save4", SAVE_EVERY_4)
        assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]

        def keep_first_checkpoint(out):
            shutil.copytree(full / "checkpoint-4", out / "checkpoint-4")

        return runs("mlm", impl, "_resumed", SAVE_EVERY_4, prepare=keep_first_checkpoint)

    reference, other = resumed("transformers"), resumed(impl)
    assert_same_outputs(reference, other)
    state = json.loads((other / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [2, 4, 6, 8]  # 2, 4 read from the checkpoint


def test_comparison_notices_differences(runs, tmp_path):
    """assert_same_outputs is not vacuous: one changed weight, log value, result or prediction fails it."""
    reference = runs("classification", "transformers")

    def altered(change):
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(reference, copy)
        change(copy)
        return copy

    def bump_weight(out):
        weights = load_file(out / "model.safetensors")
        name = sorted(weights)[0]
        weights[name] = weights[name].clone()
        weights[name].view(-1)[0] += 1e-7 if weights[name].view(-1)[0] != 0 else 1.0
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})

    def bump_loss(out):
        state = json.loads((out / "trainer_state.json").read_text())
        next(e for e in state["log_history"] if "loss" in e)["loss"] += 1e-9
        (out / "trainer_state.json").write_text(json.dumps(state))

    def bump_result(out):
        results = json.loads((out / "eval_results.json").read_text())
        results["eval_accuracy"] += 0.5
        (out / "eval_results.json").write_text(json.dumps(results))

    def flip_prediction(out):
        lines = (out / "predict_results.txt").read_text().splitlines()
        index, label = lines[1].split("\t")
        lines[1] = f"{index}\t{1 - int(label)}"
        (out / "predict_results.txt").write_text("\n".join(lines) + "\n")

    def extra_file(out):
        (out / "stray.txt").write_text("")

    assert_same_outputs(reference, altered(lambda out: None))
    for change in (bump_weight, bump_loss, bump_result, flip_prediction, extra_file):
        with pytest.raises(AssertionError):
            assert_same_outputs(reference, altered(change))


def test_only_the_import_lines_name_looptrain():
    """Outside the marked import block a script never mentions looptrain or the switch."""
    for path in sorted(SCRIPTS.glob("run_*.py")):
        text = path.read_text()
        begin = text.index("# --- the only lines that differ")
        end = text.index("# ---", begin + 1)
        block, rest = text[begin:end], text[:begin] + text[end:]
        assert "from looptrain import" in block, path.name
        assert "looptrain" not in rest.split('"""', 2)[-1] and "trainer_impl" not in rest.split('"""', 2)[-1], path.name
