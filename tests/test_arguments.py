"""`looptrain.TrainingArguments`: transformers 5.24's own class (every field, default, check and flag), plus the
4.x spellings; transformers' arguments objects are used as they are; values looptrain cannot honour are refused."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import transformers

import looptrain
from helpers import random_token_dataset, tiny_bert

HF_FIELDS = {f.name: f for f in dataclasses.fields(transformers.TrainingArguments)}


def test_every_transformers_field_is_a_looptrain_field():
    """The arguments are transformers' (a subclass), so a new transformers field can never be missing."""
    assert issubclass(looptrain.TrainingArguments, transformers.TrainingArguments)
    assert issubclass(looptrain.Seq2SeqTrainingArguments, transformers.Seq2SeqTrainingArguments)
    ours = {f.name: f for f in dataclasses.fields(looptrain.TrainingArguments)}
    assert ours.keys() == HF_FIELDS.keys() and len(ours) == 114
    for name, f in HF_FIELDS.items():
        assert ours[name].default == f.default and ours[name].metadata == f.metadata, name
    seq2seq = {f.name for f in dataclasses.fields(looptrain.Seq2SeqTrainingArguments)}
    assert seq2seq == {f.name for f in dataclasses.fields(transformers.Seq2SeqTrainingArguments)}


def test_command_line_flags_are_transformers(tmp_path):
    ours = transformers.HfArgumentParser(looptrain.TrainingArguments).format_help()
    theirs = transformers.HfArgumentParser(transformers.TrainingArguments).format_help()
    assert ours == theirs
    (args,) = transformers.HfArgumentParser(looptrain.Seq2SeqTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--predict_with_generate", "--gradient_checkpointing", "--optim", "adafactor"]
    )
    assert isinstance(args, looptrain.Seq2SeqTrainingArguments) and args.predict_with_generate
    assert args.activation_checkpointing is True and args.optim == "adafactor"


def test_resolved_values_match_transformers(tmp_path):
    kwargs = dict(
        eval_strategy="steps",
        logging_steps=10,
        load_best_model_at_end=True,
        save_steps=20,
        warmup_steps=0.1,
        use_cpu=True,
        include_num_input_tokens_seen=True,
        bf16=True,
        seed=3,
    )
    lt = looptrain.TrainingArguments(output_dir=str(tmp_path), **kwargs)
    hf = transformers.TrainingArguments(output_dir=str(tmp_path), **kwargs)
    assert lt.to_dict() == hf.to_dict()
    for prop in (
        "train_batch_size",
        "eval_batch_size",
        "world_size",
        "process_index",
        "should_save",
        "mixed_precision",
    ):
        assert getattr(lt, prop) == getattr(hf, prop), prop
    assert lt.get_warmup_steps(25) == hf.get_warmup_steps(25) == 3


@pytest.mark.parametrize(
    "old,value,new,expected",
    [
        ("evaluation_strategy", "epoch", "eval_strategy", "epoch"),
        ("warmup_ratio", 0.1, "warmup_steps", 0.1),
        ("group_by_length", True, "train_sampling_strategy", "group_by_length"),
        ("no_cuda", True, "use_cpu", True),
    ],
)
def test_old_spellings_map_with_one_warning(tmp_path, old, value, new, expected):
    with pytest.raises(TypeError):  # what transformers 5.24 does
        transformers.TrainingArguments(output_dir=str(tmp_path), **{old: value})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = looptrain.TrainingArguments(output_dir=str(tmp_path), **{old: value})
    assert getattr(args, new) == expected
    ours = [w for w in caught if issubclass(w.category, FutureWarning) and old in str(w.message)]
    assert len(ours) == 1 and new in str(ours[0].message)


def test_old_and_new_spelling_disagree_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="evaluation_strategy.*eval_strategy"):
        looptrain.TrainingArguments(output_dir=str(tmp_path), evaluation_strategy="epoch", eval_strategy="steps")
    with pytest.warns(FutureWarning):  # agreeing is fine
        args = looptrain.TrainingArguments(output_dir=str(tmp_path), evaluation_strategy="epoch", eval_strategy="epoch")
    assert args.eval_strategy == "epoch"
    with pytest.raises(ValueError, match="warmup_ratio"):
        looptrain.TrainingArguments(output_dir=str(tmp_path), warmup_ratio=1.5)


def test_course_positional_output_dir():
    with pytest.warns(FutureWarning):
        args = looptrain.TrainingArguments("test-trainer", evaluation_strategy="epoch")
    assert args.output_dir == "test-trainer" and args.eval_strategy == "epoch"


def test_unknown_keyword_is_a_type_error_with_a_suggestion(tmp_path):
    with pytest.raises(TypeError, match="'learning_rat'.*'learning_rate'"):
        looptrain.TrainingArguments(output_dir=str(tmp_path), learning_rat=1e-3)
    with pytest.raises(TypeError, match="'predict_with_generat'.*'predict_with_generate'"):
        looptrain.Seq2SeqTrainingArguments(output_dir=str(tmp_path), predict_with_generat=True)


def test_trainer_tokenizer_keyword(tmp_path):
    from helpers import wordpiece_tokenizer

    tok = wordpiece_tokenizer()
    args = looptrain.TrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    with pytest.warns(FutureWarning, match="processing_class"):
        trainer = looptrain.Trainer(tiny_bert(), args, tokenizer=tok)
    assert trainer.processing_class is tok
    assert isinstance(trainer.data_collator, transformers.DataCollatorWithPadding)
    with pytest.raises(ValueError, match="processing_class"):
        looptrain.Trainer(tiny_bert(), args, tokenizer=tok, processing_class=wordpiece_tokenizer())


def test_transformers_arguments_are_used_as_they_are(tmp_path):
    """A transformers.TrainingArguments (or Seq2SeqTrainingArguments, or a subclass) is not converted: code that
    reads `self.args.<any field>` (trainer_qa.py reads `debug`) sees the object it built."""

    class MyArgs(transformers.Seq2SeqTrainingArguments):
        pass

    hf = MyArgs(
        output_dir=str(tmp_path),
        learning_rate=1e-3,
        eval_strategy="epoch",
        use_cpu=True,
        gradient_accumulation_steps=3,
        predict_with_generate=True,
        debug="underflow_overflow",
    )
    trainer = looptrain.Trainer(tiny_bert(), hf, eval_dataset=random_token_dataset(4, 0))
    assert trainer.args is hf and trainer.args.debug == hf.debug and trainer.args.sortish_sampler is False


def test_settings_looptrain_cannot_honour_are_refused_by_name(tmp_path):
    hf = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    hf.fsdp_config = {"xla": True}  # PyTorch/XLA's FSDP: only on TPUs
    with pytest.raises(NotImplementedError, match="(?s)Not implemented by looptrain.*xla"):
        looptrain.Trainer(tiny_bert(), hf)


BOTH_REJECT = [
    dict(load_best_model_at_end=True, eval_strategy="epoch", save_strategy="steps"),
    dict(load_best_model_at_end=True, eval_strategy="steps", eval_steps=3, save_steps=5),
    dict(fp16=True, bf16=True),
    dict(logging_steps=2.5),
    dict(save_steps=7.5),
    dict(warmup_steps=-1),
    dict(lr_scheduler_type="reduce_lr_on_plateau"),
    dict(lr_scheduler_type="not_a_schedule"),
    dict(eval_strategy="sometimes"),
    dict(optim="not_an_optimizer"),
    dict(dataloader_prefetch_factor=2),
]


@pytest.mark.parametrize("kwargs", BOTH_REJECT, ids=[",".join(k) for k in BOTH_REJECT])
def test_invalid_combinations_fail_at_construction_like_transformers(tmp_path, kwargs):
    with pytest.raises((ValueError, TypeError)):
        transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **kwargs)
    with pytest.raises(ValueError) as err:
        looptrain.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **kwargs)
    message = str(err.value)  # transformers' own message: it names the argument or its value
    assert any(name in message or str(value) in message for name, value in kwargs.items()), message


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(per_device_train_batch_size=0), "per_device_train_batch_size"),
        (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
        (dict(max_steps=0), "max_steps"),
        (dict(num_train_epochs=0), "num_train_epochs"),
        (dict(include_for_metrics=["logits"]), "include_for_metrics"),
    ],
)
def test_values_transformers_mishandles_say_why(tmp_path, kwargs, needle):
    """transformers accepts these and fails later (or trains a step for max_steps=0); looptrain names them, for its
    own arguments and for transformers' handed to its Trainer."""
    hf = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **kwargs)
    with pytest.raises(ValueError, match=needle):
        looptrain.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **kwargs)
    with pytest.raises(ValueError, match=needle):
        looptrain.Trainer(tiny_bert(), hf)


def test_to_dict_is_json(tmp_path):
    args = looptrain.TrainingArguments(output_dir=str(tmp_path), eval_strategy="epoch")
    data = json.loads(args.to_json_string())
    assert data["eval_strategy"] == "epoch" and data["optim"] == "adamw_torch_fused"
