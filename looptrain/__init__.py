"""looptrain: `transformers.Trainer`'s semantics in a training loop you can read.

    from looptrain import Trainer, TrainingArguments

Start reading at `looptrain/trainer.py`, `Trainer.train`.
"""

from transformers.trainer_callback import (
    DefaultFlowCallback,
    EarlyStoppingCallback,
    PrinterCallback,
    ProgressCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)
from transformers.trainer_utils import EvalPrediction, PredictionOutput, TrainOutput

from .checkpoint import CheckpointError
from .seq2seq import Seq2SeqTrainer
from .trainer import Trainer
from .training_args import Seq2SeqTrainingArguments, TrainingArguments

__version__ = "0.1.0"

__all__ = [
    "Trainer",
    "TrainingArguments",
    "Seq2SeqTrainer",
    "Seq2SeqTrainingArguments",
    "CheckpointError",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "DefaultFlowCallback",
    "EarlyStoppingCallback",
    "PrinterCallback",
    "ProgressCallback",
    "EvalPrediction",
    "PredictionOutput",
    "TrainOutput",
]
