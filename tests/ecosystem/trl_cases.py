"""TRL's trainers on tiny models, one after another (run by tests/test_ecosystem.py through `python -m looptrain
compare`, so each is compared stock vs looptrain): SFT on plain text with accumulation, evaluation and checkpoints,
then resumed from a mid-run checkpoint; SFT with a PEFT LoRA adapter on prompt/completion; DPO; reward modelling;
GRPO with sampled generations and a seeded reward. Usage: trl_cases.py OUTPUT_ROOT [CASE ...]."""

import os
import random
import sys

import tiny  # this folder's builders (the script's folder is on sys.path, as under `python trl_cases.py`)
from datasets import Dataset
from transformers import set_seed

root = sys.argv[1]
cases = sys.argv[2:] or ["sft", "lora", "dpo", "reward", "grpo"]


def out(name):
    return os.path.join(root, name)


def sft():
    from trl import SFTConfig, SFTTrainer

    train = Dataset.from_dict({"text": tiny.sentences(20, 1)})
    evals = Dataset.from_dict({"text": tiny.sentences(6, 2)})
    config = dict(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        learning_rate=1e-3,
        max_length=24,
        **tiny.COMMON,
    )
    set_seed(0)
    first = SFTTrainer(
        model=tiny.causal_lm(),
        args=SFTConfig(output_dir=out("sft"), **config),
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tiny.tokenizer(),
    )
    first.train()
    set_seed(0)
    resumed = SFTTrainer(
        model=tiny.causal_lm(),
        args=SFTConfig(output_dir=out("sft-resumed"), **config),
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tiny.tokenizer(),
    )
    resumed.train(resume_from_checkpoint=os.path.join(out("sft"), "checkpoint-2"))
    assert resumed.state.global_step == first.state.global_step == 6


def lora():
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    prompts = tiny.sentences(12, 3)
    train = Dataset.from_dict({"prompt": prompts, "completion": [" " + s for s in tiny.sentences(12, 4)]})
    set_seed(0)
    trainer = SFTTrainer(
        model=tiny.causal_lm(),
        processing_class=tiny.tokenizer(),
        train_dataset=train,
        args=SFTConfig(
            output_dir=out("lora"),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            max_steps=3,
            logging_steps=1,
            save_steps=2,
            learning_rate=1e-2,
            max_length=24,
            **tiny.COMMON,
        ),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
    )
    trainer.train()


def _preferences(n, seed):
    return {
        "prompt": tiny.sentences(n, seed, 2, 4),
        "chosen": tiny.sentences(n, seed + 1, 2, 5),
        "rejected": tiny.sentences(n, seed + 2, 2, 5),
    }


def dpo():
    from trl import DPOConfig, DPOTrainer

    set_seed(0)
    trainer = DPOTrainer(
        model=tiny.causal_lm(),
        ref_model=tiny.causal_lm(),
        processing_class=tiny.tokenizer(),
        train_dataset=Dataset.from_dict(_preferences(8, 5)),
        eval_dataset=Dataset.from_dict(_preferences(4, 9)),
        args=DPOConfig(
            output_dir=out("dpo"),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=3,
            logging_steps=1,
            eval_strategy="steps",
            eval_steps=3,
            save_strategy="no",
            learning_rate=1e-3,
            max_length=24,
            **tiny.COMMON,
        ),
    )
    trainer.train()


def reward():
    from trl import RewardConfig, RewardTrainer

    data = _preferences(8, 11)
    set_seed(0)
    trainer = RewardTrainer(
        model=tiny.reward_model(),
        processing_class=tiny.tokenizer(),
        train_dataset=Dataset.from_dict({"chosen": data["chosen"], "rejected": data["rejected"]}),
        args=RewardConfig(
            output_dir=out("reward"),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=3,
            logging_steps=1,
            save_strategy="no",
            learning_rate=1e-3,
            max_length=24,
            **tiny.COMMON,
        ),
    )
    trainer.train()


def grpo():
    from trl import GRPOConfig, GRPOTrainer

    def seeded_reward(completions, **kwargs):
        rng = random.Random(len(completions))  # a deterministic, content-dependent reward
        return [len(c.split()) / 8 + rng.random() / 10 for c in completions]

    set_seed(0)
    trainer = GRPOTrainer(
        model=tiny.causal_lm(),
        processing_class=tiny.tokenizer(),
        reward_funcs=seeded_reward,
        train_dataset=Dataset.from_dict({"prompt": tiny.sentences(8, 13, 2, 4)}),
        args=GRPOConfig(
            output_dir=out("grpo"),
            per_device_train_batch_size=4,
            num_generations=2,
            max_steps=2,
            max_completion_length=6,
            logging_steps=1,
            save_strategy="no",
            learning_rate=1e-3,
            **tiny.COMMON,
        ),
    )
    trainer.train()


for case in cases:
    globals()[case]()
    print("done:", case, flush=True)
