"""sentence-transformers and SetFit on a tiny BERT (run by tests/test_ecosystem.py through `python -m looptrain
compare`): SentenceTransformerTrainer with MultipleNegativesRankingLoss, gradient accumulation, an evaluator without
an eval dataset, checkpoints and the best model at the end; CosineSimilarityLoss with an eval dataset; SetFit with an
eval set (its classifier head's predictions are written to the output folder, so they are compared too).
Usage: st_cases.py OUTPUT_ROOT [CASE ...]."""

import json
import os
import sys
import warnings

import tiny
from datasets import Dataset
from transformers import set_seed

root = sys.argv[1]
cases = sys.argv[2:] or ["mnrl", "cosine", "setfit"]


def out(name):
    return os.path.join(root, name)


BERT = tiny.bert_folder(out("bert"))


def embedder():
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    body = Transformer(BERT)
    return SentenceTransformer(modules=[body, Pooling(body.get_embedding_dimension())], device="cpu")


def mnrl():
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    a, b = tiny.sentences(24, 1), tiny.sentences(16, 2)
    set_seed(0)
    model = embedder()
    trainer = SentenceTransformerTrainer(
        model=model,
        train_dataset=Dataset.from_dict({"anchor": a, "positive": [s + " yes" for s in a]}),
        loss=MultipleNegativesRankingLoss(model),
        evaluator=EmbeddingSimilarityEvaluator(b[:8], b[8:], [i / 8 for i in range(8)], name="sts"),
        args=SentenceTransformerTrainingArguments(
            output_dir=out("mnrl"),
            per_device_train_batch_size=6,
            gradient_accumulation_steps=2,
            num_train_epochs=2,
            logging_steps=1,
            eval_strategy="steps",
            eval_steps=2,
            save_steps=2,
            save_total_limit=1,
            load_best_model_at_end=True,
            metric_for_best_model="sts_spearman_cosine",
            learning_rate=1e-3,
            **tiny.COMMON,
        ),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    # looptrain's transformers#47688 warning is for batches with a label count; these have `label`-less pairs, and
    # both trainers divide their loss by the accumulation steps
    assert not [w for w in caught if "num_items_in_batch" in str(w.message)], [str(w.message) for w in caught]


def cosine():
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss

    def pairs(n, seed):
        s1, s2 = tiny.sentences(n, seed), tiny.sentences(n, seed + 1)
        return Dataset.from_dict({"sentence1": s1, "sentence2": s2, "score": [(i % 5) / 4 for i in range(n)]})

    set_seed(0)
    model = embedder()
    trainer = SentenceTransformerTrainer(
        model=model,
        train_dataset=pairs(16, 3),
        eval_dataset=pairs(8, 5),
        loss=CosineSimilarityLoss(model),
        args=SentenceTransformerTrainingArguments(
            output_dir=out("cosine"),
            per_device_train_batch_size=4,
            max_steps=4,
            logging_steps=1,
            eval_strategy="steps",
            eval_steps=2,
            save_strategy="no",
            learning_rate=1e-3,
            **tiny.COMMON,
        ),
    )
    trainer.train()


def accuracy(predictions, references):  # SetFit's default, "accuracy", is loaded from the Hub
    return {"accuracy": sum(int(p == r) for p, r in zip(predictions, references)) / len(references)}


def setfit():
    from setfit import SetFitModel, Trainer, TrainingArguments
    from sklearn.linear_model import LogisticRegression

    set_seed(0)
    model = SetFitModel(model_body=embedder(), model_head=LogisticRegression())
    texts = tiny.sentences(12, 7)
    labels = [int("cat" in t or "dog" in t) for t in texts]
    trainer = Trainer(
        model=model,
        train_dataset=Dataset.from_dict({"text": texts, "label": labels}),
        eval_dataset=Dataset.from_dict({"text": texts[:6], "label": labels[:6]}),
        metric=accuracy,
        args=TrainingArguments(
            output_dir=out("setfit"),
            batch_size=4,
            num_epochs=1,
            max_steps=4,
            logging_steps=1,
            eval_strategy="steps",
            eval_steps=2,
            save_strategy="no",
            report_to="none",
            seed=0,
        ),
    )
    trainer.train()
    metrics = trainer.evaluate()
    probabilities = model.predict_proba(tiny.sentences(6, 8)).tolist()
    with open(os.path.join(out("setfit"), "setfit_predictions.json"), "w") as f:
        json.dump({"metrics": metrics, "probabilities": probabilities}, f)


for case in cases:
    globals()[case]()
    print("done:", case, flush=True)
