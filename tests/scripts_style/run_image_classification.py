"""Image classification from image folders (`DIR/<label>/<file>.png`), in the manner of transformers' example
scripts, with the transforms written in torch (no torchvision): resize to the model's size, a random
horizontal flip for training (drawn from torch's global random state while the Trainer fetches batches),
scale to [0, 1] and normalise with the image processor's mean and std. The transforms run on the fly
(`set_transform`), so the "image" column must reach them: run with --remove_unused_columns false, and a
`collate_fn` stacks the tensors.

    python run_image_classification.py --model_name_or_path DIR --train_dir train --validation_dir dev \
        --output_dir out --do_train --do_eval --remove_unused_columns false [--trainer_impl looptrain]
"""

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
import transformers
from datasets import load_dataset
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, HfArgumentParser, set_seed
from transformers.trainer_utils import get_last_checkpoint

# --- the only lines that differ between the runs tests/test_scripts_style.py compares ---------------------
_impl = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
_impl.add_argument("--trainer_impl", choices=["transformers", "looptrain", "mixed"], default="transformers")
TRAINER_IMPL, ARGV = _impl.parse_known_args()
if TRAINER_IMPL.trainer_impl == "transformers":
    from transformers import Trainer, TrainingArguments
elif TRAINER_IMPL.trainer_impl == "looptrain":
    from looptrain import Trainer, TrainingArguments
else:  # looptrain's Trainer driven by transformers' own TrainingArguments
    from transformers import TrainingArguments

    from looptrain import Trainer
# ----------------------------------------------------------------------------------------------------------

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A local folder with a config, weights and an image processor."})
    cache_dir: str | None = None


@dataclass
class DataArguments:
    train_dir: str | None = field(default=None, metadata={"help": "One sub-folder of images per label."})
    validation_dir: str | None = None


def collate_fn(examples):
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["label"] for example in examples]),
    }


def main():
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if len(ARGV) == 1 and ARGV[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(ARGV[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=ARGV)

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler(sys.stdout)]
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)

    set_seed(training_args.seed)

    folders = {"train": data_args.train_dir, "validation": data_args.validation_dir}
    data_files = {split: os.path.join(folder, "**") for split, folder in folders.items() if folder}
    raw = load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir)

    label_names = raw["train"].features["label"].names
    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    model = AutoModelForImageClassification.from_pretrained(model_args.model_name_or_path, config=config)
    image_processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)

    height, width = image_processor.size["height"], image_processor.size["width"]
    mean = torch.tensor(image_processor.image_mean).view(-1, 1, 1)
    std = torch.tensor(image_processor.image_std).view(-1, 1, 1)

    def to_tensor(image, augment: bool):
        image = image.convert("RGB").resize((width, height))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if augment and torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        return (pixels - mean) / std

    def train_transform(batch):
        batch["pixel_values"] = [to_tensor(image, augment=True) for image in batch["image"]]
        return batch

    def eval_transform(batch):
        batch["pixel_values"] = [to_tensor(image, augment=False) for image in batch["image"]]
        return batch

    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = raw["train"]
        train_dataset.set_transform(train_transform)
    if training_args.do_eval:
        eval_dataset = raw["validation"]
        eval_dataset.set_transform(eval_transform)

    def accuracy(eval_pred):
        return {"accuracy": float((np.argmax(eval_pred.predictions, axis=1) == eval_pred.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=image_processor,
        data_collator=collate_fn,
        compute_metrics=accuracy,
    )

    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    card = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "image-classification",
        "tags": ["image-classification"],
    }
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)


if __name__ == "__main__":
    main()
