"""Hyperparameter search: `Trainer.hyperparameter_search` on transformers' own backends.

The backends (optuna, Ray Tune, W&B sweeps; `transformers/hyperparameter_search.py`) drive the trainer
through its public surface: for each trial they call `train(trial=...)`, which calls `_hp_search_setup`
(the trial's values into the arguments) before anything else; every evaluation reports to the trial
(`_report_to_hp_search`, which may prune it); checkpoints go to `output_dir/run-<trial>/` (`_get_output_dir`).
"""

from __future__ import annotations

import os
import tempfile

from transformers.hyperparameter_search import ALL_HYPERPARAMETER_SEARCH_BACKENDS, default_hp_search_backend
from transformers.trainer_utils import HPSearchBackend, default_compute_objective
from transformers.utils import logging

logger = logging.get_logger(__name__)


class HyperparameterSearchMixin:
    """`hyperparameter_search` and the three hooks it relies on, as in `transformers.Trainer`."""

    def hyperparameter_search(
        self,
        hp_space=None,
        compute_objective=None,
        n_trials: int = 20,
        direction="minimize",
        backend=None,
        hp_name=None,
        **kwargs,
    ):
        """Run `n_trials` trainings with hyperparameters from `hp_space`; return the best run (`BestRun`).

        Needs `model_init` (each trial builds a new model). `backend`: "optuna", "ray" or "wandb" (default: the
        first installed). `compute_objective` turns the evaluation metrics into the number to optimise (default:
        the loss if it is the only metric, else the sum of the metrics).
        """
        backend = HPSearchBackend(backend if backend is not None else default_hp_search_backend())
        backend_obj = ALL_HYPERPARAMETER_SEARCH_BACKENDS[backend]()
        backend_obj.ensure_available()  # a clear "pip install optuna" when the package is missing
        self.hp_search_backend = backend
        if self.model_init is None:
            raise RuntimeError(
                "hyperparameter_search builds a new model for every trial: pass Trainer(model_init=...)."
            )
        self.hp_space = backend_obj.default_hp_space if hp_space is None else hp_space
        self.hp_name = hp_name
        self.compute_objective = default_compute_objective if compute_objective is None else compute_objective
        best_run = backend_obj.run(self, n_trials, direction, **kwargs)
        self.hp_search_backend = None
        return best_run

    def _hp_search_setup(self, trial) -> None:
        """At the start of `train(trial=...)`: write the trial's hyperparameters into the arguments."""
        self._trial = trial
        if self.hp_search_backend is None or trial is None:
            return
        if self.hp_search_backend == HPSearchBackend.OPTUNA:
            params = self.hp_space(trial)
        elif self.hp_search_backend == HPSearchBackend.RAY:  # the trial is the values; its "wandb" entry is not one
            params = trial
            params.pop("wandb", None)  # Trainer: removed from the trial itself (so not in `state.trial_params`)
        else:  # W&B: the trial is the values
            params = trial
        for key, value in params.items():
            if not hasattr(self.args, key):
                logger.warning(
                    f"The hyperparameter search sets {key}, which is not a TrainingArguments field; it is ignored."
                )
                continue
            old = getattr(self.args, key, None)
            setattr(self.args, key, type(old)(value) if old is not None else value)  # Trainer: cast to the field's type
        if self.hp_search_backend == HPSearchBackend.OPTUNA:
            logger.info(f"Trial: {trial.params}")
        elif self.hp_search_backend == HPSearchBackend.WANDB:
            logger.info(f"W&B Sweep parameters: {trial}")
        if self.is_deepspeed_enabled:
            if self.args.deepspeed is None:
                raise ValueError("A hyperparameter search under DeepSpeed needs TrainingArguments(deepspeed=...).")
            from accelerate.state import AcceleratorState
            from accelerate.utils import DeepSpeedPlugin
            from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

            self.accelerator.free_memory()
            self.args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(self.args.deepspeed)
            self.args.hf_deepspeed_config.trainer_config_process(self.args)
            self.args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=self.args.hf_deepspeed_config)
            AcceleratorState()._reset_state()
        # Trainer: the trial may change the batch size, and the accelerator is rebuilt for its arguments.
        self._train_batch_size = self.args.train_batch_size
        self.create_accelerator_and_postprocess()

    def _report_to_hp_search(self, trial, step: int, metrics: dict[str, float]) -> None:
        """After each evaluation in a trial: report the objective (optuna may prune the trial here)."""
        if self.hp_search_backend is None or trial is None:
            return
        metrics = metrics.copy()
        self.objective = self.compute_objective(metrics)
        if self.hp_search_backend == HPSearchBackend.OPTUNA:
            import optuna

            if hasattr(trial, "study") and not trial.study._is_multi_objective():
                trial.report(self.objective, step)
                if trial.should_prune():
                    self.callback_handler.on_train_end(self.args, self.state, self.control)
                    raise optuna.TrialPruned()
        elif self.hp_search_backend == HPSearchBackend.RAY:
            import ray.tune

            with tempfile.TemporaryDirectory() as checkpoint_dir:
                checkpoint = None
                if self.control.should_save:
                    self._tune_save_checkpoint(checkpoint_dir=checkpoint_dir)
                    checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir)
                metrics["objective"] = self.objective
                ray.tune.report(metrics, checkpoint=checkpoint)

    def _tune_save_checkpoint(self, checkpoint_dir: str) -> None:
        """Ray Tune: a checkpoint of the trial in Ray's folder, written as every other checkpoint is
        (`_write_checkpoint`: a staging folder, the model, optimizer, scheduler, RNG and loop state)."""
        self._write_checkpoint(checkpoint_dir)

    def _get_output_dir(self, trial) -> str:
        """`output_dir`, or its `run-<id>` subfolder for a hyperparameter-search trial."""
        if self.hp_search_backend is None or trial is None:
            return self.args.output_dir
        if self.hp_search_backend == HPSearchBackend.OPTUNA:
            run_id = trial.number
        elif self.hp_search_backend == HPSearchBackend.RAY:
            import ray.tune

            run_id = ray.tune.get_context().get_trial_id()
        else:  # wandb
            import wandb

            run_id = wandb.run.id
        run_name = self.hp_name(trial) if self.hp_name is not None else f"run-{run_id}"
        return os.path.join(self.args.output_dir, run_name)
