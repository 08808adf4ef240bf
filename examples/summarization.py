"""Example: a tiny summarization fine-tune with `Seq2SeqTrainer`, offline, in under a minute on a CPU.

The task is made up so that it needs no download: each text mixes filler words ("the", "quickly", ...) with
a few content words, and its summary is the content words in order ("the big dog ran under a red car" ->
"dog ran car"). A two-layer T5 built from a config learns it; the tokenizer is built in memory.

What `Seq2SeqTrainer` adds to `Trainer` is all in evaluation: with `predict_with_generate=True` each
evaluation runs `model.generate` on the eval set, so `compute_metrics` receives generated token ids (padded
to one length with the pad id) and can decode them and score the text, here with ROUGE-1 F1 and exact match.
`generation_max_length` and `generation_num_beams` set how it generates; `predict(...)` takes the same
keywords for one call.

    python examples/summarization.py [--library transformers] [--max_steps N] [--num_beams 2]
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import torch
import transformers
from datasets import Dataset

FILLER = "the a an of on under over very quickly slowly big small red blue old new".split()
CONTENT = "dog cat bird fish man woman child ran sat ate saw found kept car house tree park river book ball".split()
SPECIAL = ["<pad>", "</s>", "<unk>"]  # T5's ids: padding 0 (also the decoder's start), end of sequence 1


def toy_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the task's words that ends every sequence with `</s>`, as T5's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIAL + FILLER + CONTENT)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )


def toy_summaries(n: int, seed: int, tokenizer=None) -> Dataset:
    """Columns `text` and `summary` (the content words of the text, in order); with a tokenizer also
    `input_ids`, `attention_mask` and `labels` (the summary's ids), as run_summarization.py prepares them."""
    rng = random.Random(seed)
    texts, summaries = [], []
    for _ in range(n):
        content = [rng.choice(CONTENT) for _ in range(rng.randint(1, 4))]
        words = list(content)
        for _ in range(rng.randint(2, 8)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(FILLER))
        order = iter(content)  # the content words keep their order among the fillers
        texts.append(" ".join(next(order) if w in CONTENT else w for w in words))
        summaries.append(" ".join(content))
    columns = {"text": texts, "summary": summaries}
    if tokenizer is not None:
        columns.update(tokenizer(texts, text_target=summaries))
    return Dataset.from_dict(columns)


def tiny_t5(vocab_size: int, seed: int = 0, dropout: float = 0.1) -> transformers.T5ForConditionalGeneration:
    """Two encoder and two decoder layers, d_model 32: T5's layout at a size a CPU trains in seconds."""
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        dropout_rate=dropout,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config)


def rouge1_and_exact_match(tokenizer):
    """A `compute_metrics` that decodes the generated ids and scores them against the reference summaries:
    unigram F1 (ROUGE-1's F-measure on whitespace tokens) and the share of exact matches, in percent."""

    def compute_metrics(eval_pred):
        predictions, labels = eval_pred
        # Labels hold -100 where the collator padded them, and generated ids may too where batches of
        # different widths were concatenated: both become the pad id, which decoding skips.
        predictions = np.where(predictions != -100, predictions, tokenizer.pad_token_id)
        labels = np.where(labels != -100, labels, tokenizer.pad_token_id)
        generated = tokenizer.batch_decode(predictions, skip_special_tokens=True)
        references = tokenizer.batch_decode(labels, skip_special_tokens=True)
        f1s = []
        for prediction, reference in zip(generated, references):
            overlap = sum((Counter(prediction.split()) & Counter(reference.split())).values())
            f1s.append(0.0 if overlap == 0 else 2 * overlap / (len(prediction.split()) + len(reference.split())))
        exact = [p.split() == r.split() for p, r in zip(generated, references)]
        return {"rouge1": round(100 * float(np.mean(f1s)), 4), "exact_match": round(100 * float(np.mean(exact)), 4)}

    return compute_metrics


def trainer_classes(library: str = "looptrain"):
    """`(Seq2SeqTrainer, Seq2SeqTrainingArguments)` of one library: "looptrain" or "transformers"."""
    if library == "looptrain":
        import looptrain

        return looptrain.Seq2SeqTrainer, looptrain.Seq2SeqTrainingArguments
    if library == "transformers":
        return transformers.Seq2SeqTrainer, transformers.Seq2SeqTrainingArguments
    raise ValueError(f"library must be 'looptrain' or 'transformers', not {library!r}")


def main(argv=None):
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", choices=["looptrain", "transformers"], default="looptrain")
    parser.add_argument("--output_dir", default=None, help="default: a new temporary folder")
    parser.add_argument(
        "--max_steps", type=int, default=-1, help="stop after this many optimizer steps (a quick check)"
    )
    parser.add_argument("--num_beams", type=int, default=1, help="beam search width when generating")
    options = parser.parse_args(argv)
    output_dir = options.output_dir or tempfile.mkdtemp(prefix="looptrain-summarization-")

    Seq2SeqTrainer, Seq2SeqTrainingArguments = trainer_classes(options.library)
    tokenizer = toy_tokenizer()
    train, evals, test = (toy_summaries(n, seed, tokenizer) for n, seed in ((480, 1), (48, 2), (48, 3)))
    model = tiny_t5(len(tokenizer), dropout=0.0)  # without dropout it learns this task in fewer steps
    args = Seq2SeqTrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        seed=42,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        learning_rate=5e-3,
        num_train_epochs=10,
        max_steps=options.max_steps,
        logging_steps=30,
        eval_strategy="epoch",
        predict_with_generate=True,
        generation_max_length=8,
        generation_num_beams=options.num_beams,
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=train.remove_columns(["text", "summary"]),
        eval_dataset=evals.remove_columns(["text", "summary"]),
        processing_class=tokenizer,
        # Pads the labels with -100 (ignored by the loss) and builds decoder_input_ids from them (shifted right).
        data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, model=model),
        compute_metrics=rouge1_and_exact_match(tokenizer),
    )
    trainer.train()
    prediction = trainer.predict(test.remove_columns(["text", "summary"]), metric_key_prefix="test")
    generated = tokenizer.batch_decode(prediction.predictions, skip_special_tokens=True)
    for text, summary, output in list(zip(test["text"], test["summary"], generated))[:3]:
        print(f"{text!r}\n  reference {summary!r}\n  generated {output!r}")
    print(
        f"{type(trainer).__name__}: test rouge1 {prediction.metrics['test_rouge1']:.1f}, "
        f"exact match {prediction.metrics['test_exact_match']:.1f}%, loss {prediction.metrics['test_loss']:.4f}"
    )
    return trainer, prediction


if __name__ == "__main__":
    main()
