"""`looptrain.TrainingArguments`: transformers 5.24's names and defaults, old spellings, no silent ignores."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import transformers

import looptrain
from helpers import random_token_dataset, tiny_bert

LT_FIELDS = {f.name: f for f in dataclasses.fields(looptrain.TrainingArguments) if f.init}
HF_FIELDS = {f.name: f for f in dataclasses.fields(transformers.TrainingArguments) if f.init}

REQUIRED = """output_dir per_device_train_batch_size per_device_eval_batch_size num_train_epochs max_steps learning_rate
weight_decay adam_beta1 adam_beta2 adam_epsilon optim lr_scheduler_type lr_scheduler_kwargs warmup_steps max_grad_norm
gradient_accumulation_steps logging_strategy logging_steps logging_first_step logging_nan_inf_filter eval_strategy
eval_steps eval_delay eval_on_start save_strategy save_steps save_total_limit save_only_model load_best_model_at_end
metric_for_best_model greater_is_better seed data_seed use_cpu fp16 bf16 dataloader_drop_last dataloader_num_workers
dataloader_pin_memory remove_unused_columns label_names train_sampling_strategy label_smoothing_factor
include_num_input_tokens_seen disable_tqdm report_to eval_accumulation_steps batch_eval_metrics
average_tokens_across_devices""".split()


def _declared_default(f):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def test_every_required_field_exists():
    missing = [name for name in REQUIRED if name not in LT_FIELDS]
    assert not missing


@pytest.mark.parametrize("name", sorted(LT_FIELDS))
def test_field_name_and_declared_default_match_transformers(name):
    assert name in HF_FIELDS, f"{name} is not a transformers 5.24 field"
    assert _declared_default(LT_FIELDS[name]) == _declared_default(HF_FIELDS[name])


def test_resolved_defaults_match_transformers(tmp_path):
    """After __post_init__ (enums, report_to, disable_tqdm, pin_memory...) the values agree too."""
    lt = looptrain.TrainingArguments(output_dir=str(tmp_path))
    hf = transformers.TrainingArguments(output_dir=str(tmp_path))
    different = {n: (getattr(lt, n), getattr(hf, n)) for n in LT_FIELDS if getattr(lt, n) != getattr(hf, n)}
    assert not different
    for prop in ("train_batch_size", "eval_batch_size", "world_size", "process_index", "should_save", "mixed_precision"):
        assert getattr(lt, prop) == getattr(hf, prop), prop
    assert lt.get_warmup_steps(25) == hf.get_warmup_steps(25)


def test_resolved_values_match_for_non_default_settings(tmp_path):
    kwargs = dict(eval_strategy="steps", logging_steps=10, load_best_model_at_end=True, save_steps=20,
                  warmup_steps=0.1, use_cpu=True, include_num_input_tokens_seen=True, bf16=True, seed=3)
    lt = looptrain.TrainingArguments(output_dir=str(tmp_path), **kwargs)
    hf = transformers.TrainingArguments(output_dir=str(tmp_path), **kwargs)
    for name in LT_FIELDS:
        assert getattr(lt, name) == getattr(hf, name), name
    assert lt.eval_steps == 10 and lt.metric_for_best_model == "loss" and lt.greater_is_better is False
    assert lt.get_warmup_steps(25) == 3 and lt.mixed_precision == "bf16" and lt.dataloader_pin_memory is False


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
    with pytest.raises(TypeError, match="'push_to_hub'"):  # a transformers feature looptrain does not have
        looptrain.TrainingArguments(output_dir=str(tmp_path), push_to_hub=True)


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


def test_transformers_arguments_are_converted(tmp_path):
    hf = transformers.TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, eval_strategy="epoch",
                                        use_cpu=True, gradient_accumulation_steps=3)
    trainer = looptrain.Trainer(tiny_bert(), hf, eval_dataset=random_token_dataset(4, 0))
    assert isinstance(trainer.args, looptrain.TrainingArguments)
    assert trainer.args.learning_rate == 1e-3 and trainer.args.eval_strategy == "epoch"
    assert trainer.args.gradient_accumulation_steps == 3


def test_unsupported_transformers_fields_are_listed(tmp_path):
    hf = transformers.TrainingArguments(output_dir=str(tmp_path), neftune_noise_alpha=5.0, torch_empty_cache_steps=3, use_cpu=True)
    with pytest.raises(ValueError) as err:
        looptrain.Trainer(tiny_bert(), hf)
    assert "neftune_noise_alpha=5.0" in str(err.value) and "torch_empty_cache_steps=3" in str(err.value)


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
    message = str(err.value)
    assert any(name in message for name in kwargs), f"the message does not name the argument: {message}"


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(optim="adafactor"), "optim='adafactor'"),
        (dict(train_sampling_strategy="batch_rebalance"), "batch_rebalance"),
        (dict(per_device_train_batch_size=0), "per_device_train_batch_size"),
        (dict(max_steps=0), "max_steps"),
        (dict(save_strategy="best"), "metric_for_best_model"),
        (dict(include_for_metrics=["logits"]), "include_for_metrics"),
    ],
)
def test_unimplemented_or_impossible_values_say_why(tmp_path, kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        looptrain.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **kwargs)


def test_to_dict_is_json(tmp_path):
    import json

    args = looptrain.TrainingArguments(output_dir=str(tmp_path), eval_strategy="epoch")
    data = json.loads(args.to_json_string())
    assert data["eval_strategy"] == "epoch" and data["optim"] == "adamw_torch_fused"
