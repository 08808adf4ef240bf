"""Parity: `transformers.Seq2SeqTrainer` and `looptrain.Seq2SeqTrainer` on the same tiny T5 / BART in this run.

Each case trains with GA=2 and an evaluation every 3 steps, then calls `predict()` (and, in some, `evaluate()`
with generation keywords). Compared exactly: every non-timing `log_history` value, every final parameter,
the generated token ids and labels `predict()` returns, its metrics, and the model's generation config
after the run (the evaluation writes its defaults into it). The metrics decode the generated ids and also
log a checksum of them, so the ids of every evaluation during training are compared too.
The eval set (12 rows, batches of 8) ends with a short batch, where Seq2SeqTrainer's eval loss differs from
Trainer's.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import transformers
from transformers import DataCollatorForSeq2Seq, GenerationConfig

import looptrain
from helpers import TIMING_KEYS, assert_parity, assert_same_params, make_args, params_of

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import summarization  # noqa: E402

TOKENIZER = summarization.toy_tokenizer()


def tokenized(n: int, seed: int):
    return summarization.toy_summaries(n, seed, TOKENIZER).remove_columns(["text", "summary"])


TRAIN, EVAL, TEST = tokenized(24, 1), tokenized(12, 2), tokenized(10, 3)
# 24 rows in batches of 4 with GA=2: 3 steps per epoch, 6 in all; evaluations at steps 3 and 6.
BASE = dict(
    per_device_train_batch_size=4,
    per_device_eval_batch_size=8,
    gradient_accumulation_steps=2,
    num_train_epochs=2,
    learning_rate=5e-3,
    logging_steps=1,
    eval_strategy="steps",
    eval_steps=3,
    seed=42,
    save_strategy="no",
)
LIBRARIES = {
    "hf": (transformers.Seq2SeqTrainer, transformers.Seq2SeqTrainingArguments),
    "lt": (looptrain.Seq2SeqTrainer, looptrain.Seq2SeqTrainingArguments),
}


def t5():
    return summarization.tiny_t5(len(TOKENIZER))


def bart():
    """BART's layout (learned positions, eos as the decoder's first token) at T5-tiny size."""
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=len(TOKENIZER),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        decoder_start_token_id=1,
        forced_eos_token_id=1,
    )
    return transformers.BartForConditionalGeneration(config)


rouge = summarization.rouge1_and_exact_match(TOKENIZER)


def decoded_metrics_and_checksum(eval_pred):
    """ROUGE-1 and exact match on the decoded text, a position-weighted checksum of the raw ids, their width
    (padded to the generation config's max_length) and the most generated tokens in a row (T5's decoder
    starts with the pad id, which is not counted)."""
    predictions, labels = eval_pred
    weights = np.arange(1, predictions.shape[1] + 1)
    longest = int((predictions != TOKENIZER.pad_token_id).sum(-1).max())
    return {
        **rouge(eval_pred),
        "ids_checksum": float((predictions * weights).sum()),
        "width": predictions.shape[1],
        "longest": longest,
    }


def token_accuracy(eval_pred):
    """For evaluation without generation: the predictions are the logits (and the encoder's states)."""
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    labels = eval_pred.label_ids
    mask = labels != -100
    return {"token_accuracy": float((logits.argmax(-1)[mask] == labels[mask]).mean())}


def run(
    library,
    tmp_path,
    args,
    model_fn=t5,
    do_train=True,
    predict_kwargs=None,
    evaluate_kwargs=None,
    test_dataset=TEST,
    **trainer_kwargs,
):
    """Train with one library, then evaluate (when asked) and predict; return (trainer, train result, outputs)."""
    trainer_cls, args_cls = LIBRARIES[library]
    model = model_fn()
    targs = make_args(args_cls, tmp_path / library, **args)
    kwargs = dict(
        train_dataset=TRAIN, eval_dataset=EVAL, processing_class=TOKENIZER, compute_metrics=decoded_metrics_and_checksum
    )
    kwargs["data_collator"] = DataCollatorForSeq2Seq(TOKENIZER, model=model)  # builds decoder_input_ids
    trainer = trainer_cls(model=model, args=targs, **{**kwargs, **trainer_kwargs})
    outputs = {}
    with contextlib.redirect_stdout(io.StringIO()):
        result = trainer.train() if do_train else None
        if evaluate_kwargs is not None:
            outputs["evaluate"] = trainer.evaluate(**evaluate_kwargs)
        if predict_kwargs is not None:
            outputs["predict"] = trainer.predict(test_dataset, **predict_kwargs)
    return trainer, result, outputs


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING_KEYS)}


def assert_seq2seq_parity(hf, lt):
    (hf_trainer, hf_result, hf_out), (lt_trainer, lt_result, lt_out) = hf, lt
    assert_parity((hf_trainer, hf_result), (lt_trainer, lt_result))
    if "evaluate" in hf_out:
        assert list(without_timing(hf_out["evaluate"])) == list(without_timing(lt_out["evaluate"]))
        assert without_timing(hf_out["evaluate"]) == without_timing(lt_out["evaluate"])
    if "predict" in hf_out:
        a, b = hf_out["predict"], lt_out["predict"]
        for name in ("predictions", "label_ids"):
            x, y = getattr(a, name), getattr(b, name)
            if isinstance(x, tuple):
                assert len(x) == len(y) and all(np.array_equal(u, v) and u.dtype == v.dtype for u, v in zip(x, y))
            elif x is None:
                assert y is None, name
            else:
                assert x.dtype == y.dtype and np.array_equal(x, y), name
        assert list(without_timing(a.metrics)) == list(without_timing(b.metrics))
        assert without_timing(a.metrics) == without_timing(b.metrics)
    assert hf_trainer.model.generation_config.to_dict() == lt_trainer.model.generation_config.to_dict()


def run_both(tmp_path, args, **kwargs):
    return run("hf", tmp_path, args, **kwargs), run("lt", tmp_path, args, **kwargs)


GENERATE = dict(predict_with_generate=True)
CASES = [
    ("generate_greedy_max_length", t5, dict(GENERATE, generation_max_length=10), {}),
    ("generate_beams2", t5, dict(GENERATE, generation_max_length=10, generation_num_beams=2), {}),
    # No generation_max_length: the generation config's default (20) limits generation. An evaluation before
    # training prepares the model in the evaluation loop.
    ("generate_default_length_eval_on_start", t5, dict(GENERATE, eval_on_start=True), {}),
    # Shorter than some labels, which keep their length; predictions moved to the CPU after every batch.
    (
        "generate_shorter_than_labels_eval_accumulation",
        t5,
        dict(GENERATE, generation_max_length=3, eval_accumulation_steps=1),
        {},
    ),
    ("generate_label_smoothing", t5, dict(GENERATE, generation_max_length=10, label_smoothing_factor=0.1), {}),
    ("generate_without_metrics", t5, dict(GENERATE, generation_max_length=10), dict(compute_metrics=None)),
    ("no_generate_logits", t5, dict(), dict(compute_metrics=token_accuracy)),
    ("bart_generate_beams2", bart, dict(GENERATE, generation_max_length=8, generation_num_beams=2), {}),
    ("bart_no_generate", bart, dict(), dict(compute_metrics=token_accuracy)),
]


@pytest.mark.parametrize("case,model_fn,overrides,trainer_kwargs", CASES, ids=[c[0] for c in CASES])
def test_seq2seq_parity(tmp_path, case, model_fn, overrides, trainer_kwargs):
    hf, lt = run_both(tmp_path, {**BASE, **overrides}, model_fn=model_fn, predict_kwargs={}, **trainer_kwargs)
    assert_seq2seq_parity(hf, lt)
    log = [e for e in lt[0].state.log_history if "eval_loss" in e]
    assert len(log) == 2 + ("eval_on_start" in case)
    if overrides.get("predict_with_generate") and "compute_metrics" not in trainer_kwargs:
        # Trainer: padded to the model's generation config max_length (its default, 20), not to generation_max_length.
        assert lt[2]["predict"].predictions.shape == (len(TEST), 20)
        assert 0 < lt[2]["predict"].metrics["test_longest"] <= overrides.get("generation_max_length", 20) - 1
        assert "eval_rouge1" in log[-1] and "test_ids_checksum" in lt[2]["predict"].metrics


def test_generation_keywords_of_evaluate_and_predict(tmp_path):
    """evaluate(max_new_tokens=...) and predict(num_beams=..., max_length=...) override the arguments."""
    args = {**BASE, **GENERATE, "generation_max_length": 10}
    hf, lt = run_both(
        tmp_path,
        args,
        evaluate_kwargs=dict(max_new_tokens=4, metric_key_prefix="short"),
        predict_kwargs=dict(num_beams=2, max_length=6),
    )
    assert_seq2seq_parity(hf, lt)
    out = lt[2]
    assert out["evaluate"]["short_width"] == 20 and out["evaluate"]["short_longest"] <= 4
    assert out["predict"].predictions.shape == (len(TEST), 20)
    assert (out["predict"].predictions[:, 6:] == TOKENIZER.pad_token_id).all()


def test_predict_without_labels(tmp_path):
    """looptrain: data without labels (DataCollatorForSeq2Seq then sets labels=None) is generated for, with no
    loss, labels or metrics; Trainer fails in the forward pass. The ids equal Trainer's on the labelled data."""
    args = {**BASE, **GENERATE, "generation_max_length": 10}
    hf = run("hf", tmp_path, args, do_train=False, predict_kwargs=dict(num_beams=2))[2]["predict"]
    lt = run(
        "lt",
        tmp_path,
        args,
        do_train=False,
        predict_kwargs=dict(num_beams=2),
        test_dataset=TEST.remove_columns(["labels"]),
    )[2]["predict"]
    assert np.array_equal(hf.predictions, lt.predictions) and hf.label_ids is not None
    assert lt.label_ids is None and list(without_timing(lt.metrics)) == []


@pytest.mark.parametrize("form", ["object", "folder", "file"])
def test_generation_config_argument(tmp_path, form):
    """args.generation_config replaces the model's, as a GenerationConfig, a folder or a file path."""
    config = GenerationConfig(max_length=7, num_beams=2, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    if form == "object":
        value = config
    else:
        config.save_pretrained(tmp_path / "gen", config_file_name="custom.json" if form == "file" else None)
        value = str(tmp_path / "gen" / "custom.json") if form == "file" else str(tmp_path / "gen")
    args = {**BASE, **GENERATE, "generation_config": value}
    hf, lt = run_both(tmp_path, args, predict_kwargs={}, do_train=form == "object")
    assert_seq2seq_parity(hf, lt)
    assert lt[0].model.generation_config.num_beams == 2
    assert lt[2]["predict"].predictions.shape[1] == 7


def test_generation_config_path_from_the_command_line_saves_and_resumes(tmp_path):
    """`--generation_config DIR` arrives as a pathlib.Path: checkpoints still write training_args.json (as
    text) and the model's generation_config.json, and a resumed run ends with the uninterrupted run's weights."""
    GenerationConfig(max_length=7, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0).save_pretrained(
        tmp_path / "gen"
    )
    parser = transformers.HfArgumentParser(looptrain.Seq2SeqTrainingArguments)
    flags = [
        "--use_cpu",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--seed",
        "42",
        "--predict_with_generate",
        "--generation_config",
        str(tmp_path / "gen"),
    ]
    trainers = []
    for name in ("full", "resumed"):
        (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path / name), *flags])
        assert isinstance(args.generation_config, pathlib.Path)
        model = t5()
        trainer = looptrain.Seq2SeqTrainer(
            model=model,
            args=args,
            train_dataset=TRAIN,
            processing_class=TOKENIZER,
            data_collator=DataCollatorForSeq2Seq(TOKENIZER, model=model),
        )
        with contextlib.redirect_stdout(io.StringIO()):
            if name == "resumed":
                (tmp_path / "full" / "checkpoint-2").rename(tmp_path / name / "checkpoint-2")
                trainer.train(resume_from_checkpoint=str(tmp_path / name / "checkpoint-2"))
            else:
                trainer.train()
        trainers.append(trainer)
    import json

    saved = json.loads((tmp_path / "full" / "checkpoint-4" / "training_args.json").read_text())
    assert saved["generation_config"] == str(tmp_path / "gen")
    assert GenerationConfig.from_pretrained(tmp_path / "full" / "checkpoint-4").max_length == 7
    assert_same_params(params_of(trainers[0].model), params_of(trainers[1].model))


def test_invalid_generation_config_is_refused_like_trainer(tmp_path):
    bad = GenerationConfig(max_length=7, do_sample=False, temperature=0.5)  # temperature needs sampling
    messages = []
    for library in LIBRARIES:
        trainer_cls, args_cls = LIBRARIES[library]
        args = args_cls(output_dir=str(tmp_path / library), use_cpu=True, report_to="none", generation_config=bad)
        with pytest.raises(ValueError, match="Fix these issues") as info:
            trainer_cls(model=t5(), args=args)
        messages.append(str(info.value))
    assert messages[0] == messages[1]


def test_dict_of_eval_datasets_keeps_the_generation_keywords(tmp_path):
    """looptrain: evaluate({name: dataset}, num_beams=2) generates every dataset with num_beams=2 (Trainer
    drops the keywords for a dict); the result equals Trainer evaluating each dataset with them."""
    args = {**BASE, **GENERATE, "generation_max_length": 10}
    hf = run("hf", tmp_path, args, do_train=False)[0]
    lt = run("lt", tmp_path, args, do_train=False)[0]
    with contextlib.redirect_stdout(io.StringIO()):
        expected = {}
        for name, dataset in (("a", EVAL), ("b", TEST)):
            expected.update(hf.evaluate(dataset, metric_key_prefix=f"eval_{name}", num_beams=2, max_length=5))
        got = lt.evaluate({"a": EVAL, "b": TEST}, num_beams=2, max_length=5)
        greedy = lt.evaluate({"a": EVAL, "b": TEST})
    assert without_timing(got) == without_timing(expected)
    assert got["eval_a_longest"] <= 4 and greedy["eval_a_longest"] > 4


def test_model_init_gets_the_generation_config(tmp_path):
    """looptrain: the model that train() rebuilds with model_init also gets args.generation_config (Trainer
    sets it only on the model built in __init__)."""
    config = GenerationConfig(max_length=6, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    args = looptrain.Seq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        max_steps=1,
        predict_with_generate=True,
        generation_config=config,
        disable_tqdm=True,
    )
    trainer = looptrain.Seq2SeqTrainer(
        model_init=t5,
        args=args,
        train_dataset=TRAIN,
        processing_class=TOKENIZER,
        data_collator=DataCollatorForSeq2Seq(TOKENIZER),
    )
    first = trainer.model
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
        predictions = trainer.predict(TEST).predictions
    assert trainer.model is not first and trainer.model.generation_config.max_length == 6
    assert predictions.shape == (len(TEST), 6)


def test_arguments_and_refusals(tmp_path, caplog):
    # transformers raises AttributeError for both: Trainer's default arguments have no generation fields.
    trainer = looptrain.Seq2SeqTrainer(model=t5())
    assert isinstance(trainer.args, looptrain.Seq2SeqTrainingArguments) and trainer.args.output_dir == "tmp_trainer"
    plain = looptrain.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(TypeError, match="Seq2SeqTrainingArguments"):
        looptrain.Seq2SeqTrainer(model=t5(), args=plain)
    # transformers' own arguments object is used as it is
    theirs = transformers.Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", predict_with_generate=True, generation_num_beams=0
    )
    trainer = looptrain.Seq2SeqTrainer(
        model=t5(), args=theirs, processing_class=TOKENIZER, data_collator=DataCollatorForSeq2Seq(TOKENIZER)
    )
    assert trainer.args is theirs
    with pytest.raises(ValueError, match="num_beams=0"):
        trainer.predict(TEST)
    args = looptrain.Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", sortish_sampler=True
    )
    with caplog.at_level("WARNING"):
        looptrain.Seq2SeqTrainer(model=t5(), args=args)
    assert "sortish_sampler=True has no effect" in caplog.text


def test_arguments_are_transformers_own():
    """Every Seq2SeqTrainingArguments field, default and command-line flag is transformers'."""
    import dataclasses

    ours = {f.name: f.default for f in dataclasses.fields(looptrain.Seq2SeqTrainingArguments)}
    theirs = {f.name: f.default for f in dataclasses.fields(transformers.Seq2SeqTrainingArguments)}
    assert ours == theirs
    for name in (
        "sortish_sampler",
        "predict_with_generate",
        "generation_max_length",
        "generation_num_beams",
        "generation_config",
    ):
        assert name in ours
    parser = transformers.HfArgumentParser(looptrain.Seq2SeqTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            "x",
            "--predict_with_generate",
            "--generation_max_length",
            "12",
            "--generation_num_beams",
            "3",
            "--generation_config",
            "some/folder",
            "--sortish_sampler",
        ]
    )
    assert (args.predict_with_generate, args.generation_max_length, args.generation_num_beams) == (True, 12, 3)
    assert str(args.generation_config) == "some/folder" and args.sortish_sampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = GenerationConfig(max_length=5)
        as_dict = looptrain.Seq2SeqTrainingArguments(output_dir="x", generation_config=config).to_dict()
    assert as_dict["generation_config"]["max_length"] == 5  # JSON-ready, as transformers' to_dict makes it


def test_public_methods_keep_seq2seq_trainer_signatures():
    import inspect

    for name in (
        "__init__",
        "evaluate",
        "predict",
        "prediction_step",
        "load_generation_config",
        "_pad_tensors_to_max_len",
    ):
        ours = inspect.signature(getattr(looptrain.Seq2SeqTrainer, name))
        theirs = inspect.signature(getattr(transformers.Seq2SeqTrainer, name))
        expected = [p for p in theirs.parameters.values()]
        got = [p for p in ours.parameters.values() if p.name != "tokenizer"]  # looptrain's 4.x keyword, keyword-only
        assert [p.name for p in got] == [p.name for p in expected], name
        assert [p.default for p in got] == [p.default for p in expected], name
        assert [p.kind for p in got] == [p.kind for p in expected], name
    assert isinstance(inspect.getattr_static(looptrain.Seq2SeqTrainer, "load_generation_config"), staticmethod)
    assert issubclass(looptrain.Seq2SeqTrainer, looptrain.Trainer)


def test_seq2seq_never_loads_the_trainer_module(tmp_path):
    """In a fresh interpreter: train, evaluate and predict with generation, save; transformers.trainer (and
    transformers.trainer_seq2seq) stay unloaded."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(EXAMPLES)!r})
        import looptrain, summarization as s
        from transformers import DataCollatorForSeq2Seq
        tok = s.toy_tokenizer(); model = s.tiny_t5(len(tok))
        args = looptrain.Seq2SeqTrainingArguments(output_dir={str(tmp_path)!r}, use_cpu=True, max_steps=2, eval_strategy="steps",
                                                  eval_steps=1, predict_with_generate=True, disable_tqdm=True, report_to="none")
        data = s.toy_summaries(8, 0, tok).remove_columns(["text", "summary"])
        t = looptrain.Seq2SeqTrainer(model, args, DataCollatorForSeq2Seq(tok, model=model), data, data, tok,
                                     compute_metrics=s.rouge1_and_exact_match(tok))
        t.train(); t.evaluate(num_beams=2); t.predict(data); t.save_model()
        print("LOADED", sorted(m for m in sys.modules if m == "transformers.trainer" or m.startswith("transformers.trainer.")
                              or m == "transformers.trainer_seq2seq"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout


def test_summarization_example_runs(tmp_path, capsys):
    """`python examples/summarization.py --max_steps 4`: trains, evaluates with generation, predicts, prints."""
    trainer, prediction = summarization.main(["--output_dir", str(tmp_path), "--max_steps", "4", "--num_beams", "2"])
    assert isinstance(trainer, looptrain.Seq2SeqTrainer) and trainer.state.global_step == 4
    assert prediction.predictions.shape == (48, 20) and "test_rouge1" in prediction.metrics
    assert "reference" in capsys.readouterr().out


def test_summarization_example_parity(tmp_path):
    """The example's setup (its data, model, collator and metrics) on both libraries, a few steps."""
    results = {}
    for library in ("transformers", "looptrain"):
        with contextlib.redirect_stdout(io.StringIO()):
            trainer, prediction = summarization.main(
                ["--library", library, "--output_dir", str(tmp_path / library), "--max_steps", "6"]
            )
        results[library] = (trainer, prediction)
    (hf, hf_pred), (lt, lt_pred) = results["transformers"], results["looptrain"]
    assert_parity((hf, None), (lt, None))
    assert np.array_equal(hf_pred.predictions, lt_pred.predictions)
    assert without_timing(hf_pred.metrics) == without_timing(lt_pred.metrics)
