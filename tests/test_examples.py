"""The subclassing cookbook (`docs/subclassing.md`, `examples/`), run on tiny models.

Each recipe's one body is mixed into `transformers.Trainer` and into `looptrain.Trainer`, both are trained
in this process, and every non-timing log value and final parameter must be equal (`helpers.assert_parity`).
Then what the recipe promises is checked: the weighted loss is the weighted cross-entropy, the optimizer
has the layer-wise groups and the schedule its formula, the sampler's order is the one it describes
(and the one the model is trained on), the CSV holds the logged rows, the student's loss includes the KL
term, and the TRL-style loss divides by `num_items_in_batch`, so that GA=2 equals GA=1. Last, every
recipe's `main()` runs for two steps on each library.
"""

from __future__ import annotations

import copy
import math
import pathlib
import sys

import pytest
import torch
import transformers

import looptrain
from helpers import assert_parity, params_of, run_both, run_trainer, strip_timing

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import csv_logger  # noqa: E402
import custom_optimizer  # noqa: E402
import custom_sampler  # noqa: E402
import distillation  # noqa: E402
import toy  # noqa: E402
import trl_style  # noqa: E402
import weighted_loss  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is as fast, and several spin for nothing when other
    processes share the cores (this file then takes several times longer). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TOKENIZER = toy.toy_tokenizer()
TRAIN = toy.toy_sentiment(24, seed=1, tokenizer=TOKENIZER)  # 3 batches of 8
EVAL = toy.toy_sentiment(8, seed=2, tokenizer=TOKENIZER)
BASE = dict(
    per_device_train_batch_size=8,
    per_device_eval_batch_size=8,
    num_train_epochs=2,
    logging_steps=1,
    seed=42,
    save_strategy="no",
)
TOKENIZED = dict(processing_class=TOKENIZER)


def bert():
    return toy.tiny_bert(len(TOKENIZER))


def both(factory):
    """The recipe's class for each library: (transformers', looptrain's)."""
    return dict(hf_trainer_cls=factory(transformers.Trainer), lt_trainer_cls=factory(looptrain.Trainer))


def a_batch(n=6):
    """n training examples collated as the trainer would, plus their labels."""
    features = [{k: TRAIN[i][k] for k in ("input_ids", "attention_mask")} for i in range(n)]
    batch = dict(TOKENIZER.pad(features, return_tensors="pt"))
    batch["labels"] = torch.tensor(TRAIN["label"][:n])
    return batch


# ----------------------------------------------------------------------------------- class-weighted loss
def test_weighted_loss_parity(tmp_path):
    args = {**BASE, "gradient_accumulation_steps": 2, "eval_strategy": "epoch"}
    hf, lt = run_both(
        tmp_path,
        bert,
        TRAIN,
        EVAL,
        args=args,
        trainer_kwargs={**TOKENIZED, "class_weights": [1.0, 6.0]},
        **both(weighted_loss.weighted_trainer_class),
    )
    assert_parity(hf, lt)
    # loss_is_scaled_for_ga=False: a window of two batch means is divided by 2, so the first logged loss is
    # about ln 2, not the 2 ln 2 Trainer logs for BERT by default (transformers#47688).
    assert strip_timing(lt[0].state.log_history)[0]["loss"] < 0.8


def test_weighted_loss_is_the_weighted_cross_entropy(tmp_path):
    trainer, _ = run_trainer(
        weighted_loss.weighted_trainer_class(looptrain.Trainer),
        looptrain.TrainingArguments,
        bert,
        tmp_path,
        TRAIN,
        args=BASE,
        trainer_kwargs={**TOKENIZED, "class_weights": [1.0, 6.0]},
        do_train=False,
    )
    model, batch = trainer.model.eval(), a_batch()
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    assert "labels" in batch  # the caller's batch is not changed
    logits, labels = outputs.logits, batch["labels"]
    weights = torch.tensor([1.0, 6.0])[labels]
    per_example = -torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
    expected = (weights * per_example).sum() / weights.sum()
    assert torch.allclose(loss, expected, atol=1e-6)
    trainer.class_weights = torch.tensor([1.0, 1.0])  # equal weights: the model's own loss
    with torch.no_grad():
        assert torch.allclose(trainer.compute_loss(model, batch), model(**batch).loss, atol=1e-6)
    assert weighted_loss.class_weights_for([0, 0, 0, 1], 2) == [1.0, 3.0]


# ----------------------------------------------------------------------------------- optimizer and schedule
def test_custom_optimizer_and_scheduler(tmp_path):
    args = {**BASE, "warmup_steps": 2, "weight_decay": 0.01, "learning_rate": 1e-3}
    hf, lt = run_both(
        tmp_path, bert, TRAIN, args=args, trainer_kwargs=TOKENIZED, **both(custom_optimizer.layerwise_trainer_class)
    )
    assert_parity(hf, lt)
    trainer = lt[0]
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert type(optimizer) is torch.optim.AdamW
    # Every trainable parameter in exactly one group; the head's group first; lr halves per block down.
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    assert (
        len(grouped) == len({id(p) for p in grouped}) == sum(1 for p in trainer.model.parameters() if p.requires_grad)
    )
    initial = sorted({g["initial_lr"] for g in optimizer.param_groups}, reverse=True)
    assert optimizer.param_groups[0]["initial_lr"] == 1e-3
    assert initial == [1e-3 * 0.5**k for k in range(4)]  # head, block 1, block 0, embeddings
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for group in optimizer.param_groups:
        no_decay = {("bias" in names[id(p)] or "LayerNorm" in names[id(p)]) for p in group["params"]}
        assert no_decay == {group["weight_decay"] == 0.0}
    # The logged learning rate is the head's, following the inverse square root after 2 warmup steps.
    logged = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert logged == pytest.approx([1e-3 * custom_optimizer.inverse_sqrt(s, 2) for s in range(len(logged))], rel=1e-12)
    assert logged[:4] == pytest.approx([5e-4, 1e-3, 1e-3 * math.sqrt(2 / 2), 1e-3 * math.sqrt(2 / 3)], rel=1e-12)


# ----------------------------------------------------------------------------------- sampler
class RecordsBatches:
    """Test-only: remember the length of every example the model is trained on, in order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen += inputs["attention_mask"].sum(1).tolist()
        return super().training_step(model, inputs, num_items_in_batch)


@pytest.mark.parametrize(
    "mixin",
    [custom_sampler.ShortestFirstMixin, custom_sampler.ShortestFirstLoaderMixin],
    ids=["_get_train_sampler", "get_train_dataloader"],
)
def test_custom_sampler_order(tmp_path, mixin):
    factory = lambda base: type("Recording", (RecordsBatches, mixin, base), {})  # noqa: E731
    hf, lt = run_both(tmp_path, bert, TRAIN, args=BASE, trainer_kwargs=TOKENIZED, **both(factory))
    assert_parity(hf, lt)
    lengths = custom_sampler.lengths_of(TRAIN)
    sampler = custom_sampler.ShortestFirstSampler(lengths, seed=42)
    epoch0 = [lengths[i] for i in sampler.order(0)]
    epoch1 = [lengths[i] for i in sampler.order(1)]
    assert epoch0 == sorted(lengths) and epoch1 != epoch0 and sorted(epoch1) == sorted(lengths)
    assert sorted(sampler.order(1)) == list(range(len(TRAIN)))
    assert sampler.order(1) == torch.randperm(len(TRAIN), generator=torch.Generator().manual_seed(43)).tolist()
    # What the model was trained on, in both libraries: epoch 0 shortest first, epoch 1 shuffled.
    assert hf[0].seen == lt[0].seen == epoch0 + epoch1
    # And the loader a user gets from the hook yields the same order.
    loader = lt[0].get_train_dataloader()
    loader.set_epoch(0)
    assert [n for batch in loader for n in batch["attention_mask"].sum(1).tolist()] == epoch0


# ----------------------------------------------------------------------------------- CSV callback
def test_csv_logger_callback(tmp_path):
    args = {**BASE, "eval_strategy": "epoch", "logging_steps": 2}
    runs = {}
    for name, trainer_cls, args_cls in (
        ("hf", transformers.Trainer, transformers.TrainingArguments),
        ("lt", looptrain.Trainer, looptrain.TrainingArguments),
    ):
        callback = csv_logger.CsvLoggerCallback("metrics/log.csv")
        kwargs = {**TOKENIZED, "callbacks": [callback]}
        runs[name] = run_trainer(trainer_cls, args_cls, bert, tmp_path / name, TRAIN, EVAL, args, kwargs)
        path = tmp_path / name / "metrics" / "log.csv"
        assert callback.path == str(path) and path.is_file()
    assert_parity(runs["hf"], runs["lt"])
    tables = {}
    for name, (trainer, _) in runs.items():
        rows = csv_logger.read_csv_log(str(tmp_path / name / "metrics" / "log.csv"))
        history = trainer.state.log_history
        assert len(rows) == len(history) == 6  # step 2, eval at 3, step 4, step 6, eval at 6, the summary
        header = (tmp_path / name / "metrics" / "log.csv").read_text().splitlines()[0].split(",")
        assert header[:5] == ["step", "epoch", "loss", "grad_norm", "learning_rate"] and "eval_loss" in header
        for row, entry in zip(rows, history):
            assert row == entry  # every logged value, read back exactly
        tables[name] = strip_timing(rows)
    assert tables["hf"] == tables["lt"]


# ----------------------------------------------------------------------------------- distillation
def teacher():
    """An untrained model's logits are all near 0; a teacher with a wide head has opinions to pass on."""
    model = toy.tiny_bert(len(TOKENIZER), seed=7, hidden=48)
    with torch.no_grad():
        model.classifier.weight.mul_(100.0)
    return model


def test_distillation_parity_and_teacher_untouched(tmp_path):
    teacher_model = teacher()
    before = params_of(teacher_model)
    args = {**BASE, "gradient_accumulation_steps": 2, "eval_strategy": "epoch"}
    kwargs = {**TOKENIZED, "teacher_model": teacher_model, "temperature": 2.0, "alpha": 0.5}
    student = lambda: toy.tiny_bert(len(TOKENIZER), layers=1)  # noqa: E731
    hf, lt = run_both(
        tmp_path,
        student,
        TRAIN,
        EVAL,
        args=args,
        trainer_kwargs=kwargs,
        **both(distillation.distillation_trainer_class),
    )
    assert_parity(hf, lt)
    after = params_of(teacher_model)
    assert all(torch.equal(before[n], after[n]) for n in before) and not teacher_model.training
    optimized = {id(p) for g in lt[0].optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in teacher_model.parameters()}


def test_distillation_loss_includes_the_kl_term(tmp_path):
    cls = distillation.distillation_trainer_class(looptrain.Trainer)
    trainer, _ = run_trainer(
        cls,
        looptrain.TrainingArguments,
        bert,
        tmp_path,
        TRAIN,
        args=BASE,
        do_train=False,
        trainer_kwargs={**TOKENIZED, "teacher_model": teacher(), "temperature": 2.0, "alpha": 0.3},
    )
    model, batch = trainer.model.eval(), a_batch()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        ce = model(**batch).loss
        student_logits = model(**batch).logits / 2.0
        teacher_logits = trainer.teacher_model(**{k: v for k, v in batch.items() if k != "labels"}).logits / 2.0
    p_teacher = teacher_logits.softmax(-1)
    kl = (p_teacher * (p_teacher.log() - student_logits.log_softmax(-1))).sum(-1).mean() * 2.0**2
    assert kl > 1e-3
    assert torch.allclose(loss, 0.3 * ce + 0.7 * kl, atol=1e-6)
    trainer.teacher_model = copy.deepcopy(model)  # a teacher identical to the student: no KL left
    with torch.no_grad():
        assert torch.allclose(trainer.compute_loss(model, batch), 0.3 * ce, atol=1e-6)


# ----------------------------------------------------------------------------------- TRL-style
LM_TRAIN, LM_EVAL = toy.toy_counting(16, seed=1), toy.toy_counting(8, seed=2)
LM_KWARGS = dict(data_collator=toy.pad_for_causal_lm)


class RecordsItems:
    """Test-only: remember `num_items_in_batch` and the label-token count of every training micro-batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.items = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.items.append((num_items_in_batch, int((inputs["labels"][:, 1:] != -100).sum())))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_trl_style_parity_and_num_items(tmp_path):
    args = {
        **BASE,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "eval_strategy": "epoch",
        "per_device_eval_batch_size": 4,
        "logging_steps": 2,
    }
    factory = lambda base: type("Recording", (RecordsItems, trl_style.TokenLevelLossMixin, base), {})  # noqa: E731
    hf, lt = run_both(tmp_path, toy.tiny_gpt2, LM_TRAIN, LM_EVAL, args=args, trainer_kwargs=LM_KWARGS, **both(factory))
    assert_parity(hf, lt)
    log = strip_timing(lt[0].state.log_history)
    assert all("mean_token_accuracy" in e for e in log if "loss" in e)
    assert all("eval_mean_token_accuracy" in e for e in log if "eval_loss" in e)
    # Each window's micro-batches get the window's shifted label-token count.
    items = lt[0].items
    assert len(items) == 8 and items == hf[0].items  # 2 epochs x 2 windows x 2 micro-batches
    for first, second in zip(items[::2], items[1::2]):
        assert float(first[0]) == float(second[0]) == first[1] + second[1]


def test_trl_style_loss_divides_by_num_items(tmp_path):
    cls = trl_style.token_level_trainer_class(looptrain.Trainer)
    trainer, _ = run_trainer(
        cls,
        looptrain.TrainingArguments,
        toy.tiny_gpt2,
        tmp_path,
        LM_TRAIN,
        args=BASE,
        trainer_kwargs=LM_KWARGS,
        do_train=False,
    )
    model, batch = trainer.model.eval(), toy.pad_for_causal_lm([LM_TRAIN[i] for i in range(4)])
    with torch.no_grad():
        token_sum, tokens, _ = trl_style.token_loss_sum_and_counts(
            model(input_ids=batch["input_ids"]).logits, batch["labels"]
        )
        assert torch.allclose(
            trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(100.0)), token_sum / 100
        )
        assert torch.allclose(trainer.compute_loss(model, batch), token_sum / tokens)  # no count: the batch mean
        assert torch.allclose(trainer.compute_loss(model, batch), model(**batch).loss, atol=1e-6)


def test_trl_style_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Dropout off, plain SGD, no clipping: GA=2 x 4 and GA=1 x 8 log the same losses and end with the same
    weights, up to float rounding (the same bound as tests/test_ga_loss_scaling.py)."""
    cls = trl_style.token_level_trainer_class(looptrain.Trainer)
    no_dropout = lambda: toy.tiny_gpt2(dropout=0.0)  # noqa: E731
    runs = []
    for batch_size, ga in ((8, 1), (4, 2)):
        args = {
            **BASE,
            "per_device_train_batch_size": batch_size,
            "gradient_accumulation_steps": ga,
            "max_grad_norm": 0.0,
        }
        kwargs = {**LM_KWARGS, "optimizer_cls_and_kwargs": (torch.optim.SGD, {"lr": 0.5})}
        runs.append(
            run_trainer(
                cls,
                looptrain.TrainingArguments,
                no_dropout,
                tmp_path / f"ga{ga}",
                LM_TRAIN,
                args=args,
                trainer_kwargs=kwargs,
            )[0]
        )
    losses = [[e["loss"] for e in r.state.log_history if "loss" in e] for r in runs]
    assert len(losses[0]) == len(losses[1]) == 4
    assert max(abs(a - b) for a, b in zip(*losses)) < 1e-6
    one, two = params_of(runs[0].model), params_of(runs[1].model)
    assert max((one[n] - two[n]).abs().max().item() for n in one) < 1e-6
    assert max((one[n] - params_of(no_dropout())[n]).abs().max().item() for n in one) > 1e-3  # it did train


# ----------------------------------------------------------------------------------- the scripts
@pytest.mark.parametrize(
    "recipe",
    [weighted_loss, custom_optimizer, custom_sampler, csv_logger, distillation, trl_style],
    ids=lambda m: m.__name__,
)
def test_recipe_main_runs(tmp_path, capsys, recipe):
    """`python examples/<recipe>.py --max_steps 2`; the tests above run each recipe's body on both libraries."""
    trainer = recipe.main(["--output_dir", str(tmp_path), "--max_steps", "2"])
    assert trainer.state.global_step == 2 and isinstance(trainer, looptrain.Trainer)
    assert capsys.readouterr().out.strip()
