"""looptrain: `transformers.Trainer`'s semantics in a training loop you can read.

    from looptrain import Trainer, TrainingArguments

or, for a library that subclasses transformers.Trainer (TRL, sentence-transformers, SetFit), before importing it:

    import looptrain; looptrain.use_in_transformers()     # or: python -m looptrain run script.py

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
from .ecosystem import use_in_transformers
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
    "use_in_transformers",
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
