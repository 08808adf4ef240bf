"""Checkpoints: what Trainer writes into `checkpoint-<step>/`, and how a run resumes from one.

Layout (Trainer 5.24's file names): `model.safetensors` + `config.json` (`save_pretrained`), tokenizer files,
`optimizer.pt`, `scheduler.pt`, `scaler.pt` (fp16), `rng_state.pth` (`rng_state_<rank>.pth` on several
processes), `trainer_state.json`. Two files differ from Trainer's:
  * the training arguments are `training_args.json`, not a pickled `training_args.bin`. looptrain never
    opens a `training_args.bin` (Trainer writes one into its checkpoints: it is ignored on resume);
  * `looptrain_state.json` holds what Trainer loses on resume (below). transformers.Trainer ignores it.

Loading never runs code from a file: every `torch.load` is `weights_only=True` (tensors, numbers, strings,
containers, and the three numpy types an RNG state needs), weights are safetensors, the rest is JSON.
A file that fails to load that way (a pickle payload, truncation, corruption) is a `CheckpointError`
naming the file, raised before training touches the model, the optimizer or the RNG.

What looptrain does that Trainer 5.24 does not:
  * crash safety: a checkpoint is written into `.tmp-checkpoint-<step>/`, flushed to disk, and renamed to
    `checkpoint-<step>/` only when complete; rotation renames a checkpoint away before deleting it. So a
    `checkpoint-<step>/` folder is always complete, and `resume_from_checkpoint=True` takes the newest;
  * exact resume where Trainer's is not. `looptrain_state.json` records the loss summed since the last log,
    the last step's grad norm and learning rate, and whether the save happened after an optimizer step or at
    the end of an epoch. A checkpoint written after the step that ends an epoch precedes that epoch's end:
    its evaluation (one draw from the global RNG, semantics doc section 0, item 8) and epoch logs. Trainer
    skips that epoch end on resume; looptrain replays it first (`Trainer.train`), from the checkpoint's RNG;
  * preemption: SIGTERM during `train()` saves a checkpoint at the next optimizer-step boundary and returns.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
import signal
import threading
from dataclasses import dataclass

import numpy as np
import torch
from transformers.trainer_callback import ExportableState, TrainerControl, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, sort_checkpoints
from transformers.utils import logging

logger = logging.get_logger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_ARGS_NAME = "training_args.json"
LOOP_STATE_NAME = "looptrain_state.json"
OPTIMIZER_NAME, SCHEDULER_NAME, SCALER_NAME = "optimizer.pt", "scheduler.pt", "scaler.pt"
SAFE_WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
TMP_PREFIX = ".tmp-"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which file and why."""


def last_checkpoint(folder: str) -> str | None:
    """The newest complete `checkpoint-<N>` (highest N). Temporary folders never match the name; a folder
    without `trainer_state.json` (a save that transformers.Trainer did not finish) is passed over."""
    if not os.path.isdir(folder):
        return None
    steps = [
        (int(m.group(1)), name)
        for name in os.listdir(folder)
        if (m := _CHECKPOINT_RE.match(name)) and os.path.isfile(os.path.join(folder, name, TRAINER_STATE_NAME))
    ]
    return os.path.join(folder, max(steps)[1]) if steps else None


def _numpy_safe_globals() -> list:
    """The numpy types in `np.random.get_state()`, which `rng_state.pth` holds (as transformers allow-lists)."""
    np_core = np._core if hasattr(np, "_core") else np.core
    return [np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def safe_torch_load(path: str):
    """`torch.load(weights_only=True)`: tensors, numbers, strings and containers only, never code."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist.")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # a pickle payload is an UnpicklingError; truncation a RuntimeError or EOFError
        raise CheckpointError(
            f"Refusing to load {path}: it does not load as a plain tensor file with weights_only=True "
            f"({type(err).__name__}: {_first_line(err)}). The file is truncated or corrupted, or holds pickled "
            "objects, which could run code."
        ) from None


def read_json(path: str) -> dict:
    """A JSON object from a checkpoint file, or a `CheckpointError` that says what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} does not exist.") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not valid JSON ({type(err).__name__}: {_first_line(err)}): the file is truncated, "
            "corrupted, or not what its name says (a pickle, for instance; it was not unpickled)."
        ) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object.")
    return value


def _first_line(err: BaseException) -> str:
    text = str(err)
    return text.splitlines()[0] if text else ""


@dataclass
class _EpochEndReplay:
    """The end of `epoch` is still to run when a resume starts; `stopped`: training had ended at that step."""

    epoch: int
    stopped: bool


class CheckpointMixin:
    """Saving and loading of Trainer checkpoints; mixed into `looptrain.Trainer`."""

    # ------------------------------------------------------------------ save
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model (safetensors + config), the tokenizer and `training_args.json`, loadable with
        `from_pretrained`."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.accelerator.wait_for_everyone()
        state_dict = self.accelerator.get_state_dict(self.model_wrapped)
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model_wrapped, keep_torch_compile=False)
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(output_dir, state_dict=state_dict)
        else:
            import safetensors.torch

            safetensors.torch.save_file(
                {k: v.contiguous() for k, v in state_dict.items()}, os.path.join(output_dir, SAFE_WEIGHTS_NAME),
                metadata={"format": "pt"},
            )
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(output_dir)
        with open(os.path.join(output_dir, TRAINING_ARGS_NAME), "w") as f:
            f.write(self.args.to_json_string())

    def _save_checkpoint(self, model, trial) -> None:
        """Write `checkpoint-<global_step>/` atomically, then rotate old checkpoints."""
        args = self.args
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final_dir = os.path.join(args.output_dir, name)
        tmp_dir = os.path.join(args.output_dir, TMP_PREFIX + name)
        self.store_flos()
        if args.should_save:
            _remove_debris(args.output_dir)  # what a crash in an earlier save or rotation left behind
        self.save_model(tmp_dir, _internal_call=True)
        # Trainer: the best checkpoint is known once its folder exists (it may be the one written now).
        if args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and self.state.best_global_step:
            best_dir = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if os.path.exists(best_dir) or self.state.best_global_step == self.state.global_step:
                self.state.best_model_checkpoint = best_dir
        if not args.save_only_model:
            self._save_optimizer_and_scheduler(tmp_dir)
            self._save_rng_state(tmp_dir)
        loop_state = self._loop_state()  # collective under DDP: every process calls it
        if args.should_save:
            # The callbacks' state as it is now (Trainer appends to a list for repeated callback types, and
            # restores the oldest entries; here each save holds the current state of each callback).
            fresh = TrainerState(stateful_callbacks=self._stateful_callbacks()).stateful_callbacks
            self.state.stateful_callbacks = {**(self.state.stateful_callbacks or {}), **fresh}
            self.state.save_to_json(os.path.join(tmp_dir, TRAINER_STATE_NAME))
            with open(os.path.join(tmp_dir, LOOP_STATE_NAME), "w") as f:
                json.dump(loop_state, f, indent=2)
        self.accelerator.wait_for_everyone()
        if args.should_save:
            _fsync_tree(tmp_dir)  # the files' bytes are on disk before the name says "complete"
            if os.path.exists(final_dir):  # the same step saved again: set the old one aside, then replace it
                _remove_checkpoint(final_dir)
            os.replace(tmp_dir, final_dir)
            _fsync_dir(args.output_dir)
            self._rotate_checkpoints()
        self.accelerator.wait_for_everyone()

    def _loop_state(self) -> dict:
        """`looptrain_state.json`: what the loop holds between logs, which `trainer_state.json` lacks."""
        tr_loss = getattr(self, "_tr_loss", None)
        if tr_loss is None:
            per_process = [0.0] * max(self.args.world_size, 1)
        else:  # each process sums its own losses until the next log averages them
            per_process = self.accelerator.gather(tr_loss.detach().reshape(1).float()).tolist()
        grad_norm, learning_rate = getattr(self, "_last_step_logs", (None, None))
        return {
            "format": 1,
            # "epoch_end": saved by the epoch-end log/evaluate/save; "step_end": after an optimizer step
            "saved_at": getattr(self, "_saving_at", "step_end"),
            "tr_loss": per_process,
            "globalstep_last_logged": getattr(self, "_globalstep_last_logged", self.state.global_step),
            "grad_norm": grad_norm.item() if torch.is_tensor(grad_norm) else grad_norm,
            "learning_rate": learning_rate,
        }

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.args.should_save:
            torch.save(self.optimizer.state_dict(), os.path.join(output_dir, OPTIMIZER_NAME))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                torch.save(scaler.state_dict(), os.path.join(output_dir, SCALER_NAME))

    def _save_rng_state(self, output_dir: str) -> None:
        """Every RNG the run draws from; one file per process, since each has its own CUDA/dropout stream."""
        states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.random.get_rng_state()
        os.makedirs(output_dir, exist_ok=True)
        torch.save(states, os.path.join(output_dir, self._rng_file_name()))

    def _rng_file_name(self) -> str:
        return "rng_state.pth" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}.pth"

    def _rotate_checkpoints(self) -> None:
        """Trainer's rotation (`rotate_checkpoints`): keep the newest and the best, delete the oldest others
        until `save_total_limit` remain. Each deletion is a rename first, so a crash never leaves a
        half-deleted `checkpoint-<N>/`."""
        limit = self.args.save_total_limit
        if limit is None or limit <= 0:
            return
        checkpoints = sort_checkpoints(self.args.output_dir, PREFIX_CHECKPOINT_DIR, use_mtime=True)
        if len(checkpoints) <= limit:
            return
        protected = {checkpoints[-1]}
        if self.state.best_model_checkpoint is not None:
            protected.add(os.path.normpath(self.state.best_model_checkpoint))
        remaining = len(checkpoints)
        for checkpoint in checkpoints:
            if remaining <= max(limit, len(protected)):
                break
            if os.path.normpath(checkpoint) not in protected:
                _remove_checkpoint(checkpoint)
                remaining -= 1

    def _determine_best_metric(self, metrics: dict[str, float], trial=None) -> bool:
        """Trainer: compare `eval_<metric_for_best_model>` with the best so far; record step and value."""
        args = self.args
        if args.metric_for_best_model is None:
            return False
        key = args.metric_for_best_model
        key = key if key.startswith("eval_") else f"eval_{key}"
        if key not in metrics:
            raise KeyError(
                f"metric_for_best_model={args.metric_for_best_model!r} looks for {key!r}, which the evaluation did "
                f"not return; it returned {list(metrics)}. Return it from compute_metrics or change the argument."
            )
        better = np.greater if args.greater_is_better else np.less
        if self.state.best_metric is None:
            self.state.best_metric = float("-inf") if args.greater_is_better else float("inf")
        if better(metrics[key], self.state.best_metric):
            self.state.best_metric = metrics[key]
            if args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST):
                self.state.best_global_step = self.state.global_step
            return True
        return False

    def _delete_non_best_checkpoints(self):
        """Trainer: with save_total_limit=1 and a best checkpoint, only the best one survives training.
        Not after a preemption: the newest checkpoint is the one the job resumes from."""
        if getattr(self, "_preempted", False):
            return
        if self.args.should_save and self.state.best_model_checkpoint is not None and self.args.save_total_limit == 1:
            for checkpoint in sort_checkpoints(self.args.output_dir, best_model_checkpoint=self.state.best_model_checkpoint):
                if not os.path.samefile(checkpoint, self.state.best_model_checkpoint):
                    _remove_checkpoint(checkpoint)

    # ------------------------------------------------------------------ load
    def _resolve_checkpoint(self, resume_from_checkpoint) -> str | None:
        """The checkpoint folder to resume from, with every file it holds read and checked (`_read_checkpoint`)."""
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        if resume_from_checkpoint is True:
            path = last_checkpoint(self.args.output_dir)
            if path is None:
                raise CheckpointError(
                    f"resume_from_checkpoint=True, but {self.args.output_dir} holds no complete checkpoint-<step> folder."
                )
        else:
            path = os.fspath(resume_from_checkpoint)
            if not os.path.exists(path):
                raise CheckpointError(f"resume_from_checkpoint={path!r} does not exist.")
            if not os.path.isdir(path):
                raise CheckpointError(f"resume_from_checkpoint={path!r} is a file, not a checkpoint folder.")
            if not os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
                raise CheckpointError(f"{path} has no {TRAINER_STATE_NAME}: it is not a (complete) Trainer checkpoint.")
        self._read_checkpoint(path)
        return path

    def _read_checkpoint(self, checkpoint: str) -> None:
        """Read every file of the checkpoint that resuming uses, the safe way, before anything is changed.

        A file that fails is an error now, not after the model or the RNG was half restored. What is read
        is kept in `self._checkpoint_files` until it is applied. `training_args.bin` (Trainer's pickle) is
        never opened; the weights are read (and checked against the model) in `_load_from_checkpoint`.
        """
        files = {"path": checkpoint}
        files["trainer_state"] = read_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        for name in (LOOP_STATE_NAME, CONFIG_NAME, TRAINING_ARGS_NAME):
            if os.path.exists(os.path.join(checkpoint, name)):
                files[name] = read_json(os.path.join(checkpoint, name))
        for key, name in (("optimizer", OPTIMIZER_NAME), ("scheduler", SCHEDULER_NAME), ("scaler", SCALER_NAME),
                          ("rng", self._rng_file_name())):
            if os.path.exists(os.path.join(checkpoint, name)):
                files[key] = safe_torch_load(os.path.join(checkpoint, name))
        rng = files.get("rng")
        if rng is not None and not (isinstance(rng, dict) and {"python", "numpy", "cpu"} <= rng.keys()):
            raise CheckpointError(f"{checkpoint}/{self._rng_file_name()} is not an RNG state (keys python, numpy, cpu).")
        for key in ("optimizer", "scheduler", "scaler"):
            if key in files and not isinstance(files[key], dict):
                raise CheckpointError(f"{checkpoint}: the {key} file holds a {type(files[key]).__name__}, not a state dict.")
        loop = files.get(LOOP_STATE_NAME)
        if loop is not None and not {"saved_at", "tr_loss", "globalstep_last_logged"} <= loop.keys():
            raise CheckpointError(f"{checkpoint}/{LOOP_STATE_NAME} lacks the keys saved_at, tr_loss, globalstep_last_logged.")
        self._checkpoint_files = files

    def _checkpoint_file(self, checkpoint: str, key: str):
        """A file read by `_read_checkpoint` (read now if this is another checkpoint)."""
        files = getattr(self, "_checkpoint_files", None)
        if files is None or files.get("path") != checkpoint:
            self._read_checkpoint(checkpoint)
            files = self._checkpoint_files
        return files.get(key)

    def _load_from_checkpoint(self, checkpoint: str, model=None) -> None:
        """Load the weights. Strictly: a checkpoint of another model is an error, not a partial load."""
        model = self.model if model is None else model
        weights = os.path.join(checkpoint, SAFE_WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise CheckpointError(f"{checkpoint} has no {SAFE_WEIGHTS_NAME}.")
        config = getattr(model, "config", None)
        saved_config = read_json(os.path.join(checkpoint, CONFIG_NAME)) if os.path.isfile(os.path.join(checkpoint, CONFIG_NAME)) else None
        if config is not None and saved_config is not None and saved_config.get("model_type") not in (None, config.model_type):
            raise CheckpointError(
                f"{checkpoint} is a checkpoint of a {saved_config.get('model_type')!r} model, and this model is a "
                f"{config.model_type!r} ({type(model).__name__})."
            )
        import safetensors.torch

        try:
            state_dict = safetensors.torch.load_file(weights, device="cpu")
        except Exception as err:  # safetensors never unpickles: a pickle here is just an unreadable header
            raise CheckpointError(
                f"{weights} cannot be read as safetensors ({type(err).__name__}: {_first_line(err)}); the file is "
                "truncated or corrupted."
            ) from None
        expected = model.state_dict()
        missing = [k for k in expected if k not in state_dict and not _is_tied(model, k)]
        unexpected = [k for k in state_dict if k not in expected]
        mismatched = [
            f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
            for k in state_dict
            if k in expected and state_dict[k].shape != expected[k].shape
        ]
        if missing or unexpected or mismatched:
            raise CheckpointError(
                f"{checkpoint} is a checkpoint of a different model ({type(model).__name__} here): "
                f"{len(missing)} missing tensors {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
                f"{len(mismatched)} of another shape {mismatched[:3]}."
            )
        model.load_state_dict(state_dict, strict=False)

    def _load_trainer_state(self, checkpoint: str, num_update_steps_per_epoch: int, max_steps: int | None = None) -> tuple[int, int]:
        """Restore `TrainerState`, callback state and the loop state; return (epochs done, micro-batches to skip).

        Trainer's rule: `global_step // steps per epoch` epochs are done, and `(global_step % steps per epoch)
        * GA` micro-batches of the next. looptrain adds, from `looptrain_state.json`: a checkpoint saved at an
        epoch's end continues with the next epoch; one saved after the step that ended an epoch first replays
        that epoch's end (`self._epoch_end_to_replay`); and a run that reached `max_steps` trains no further
        (Trainer would run one more step when `max_steps` fell inside an epoch).
        """
        try:
            self.state = TrainerState(**self._checkpoint_file(checkpoint, "trainer_state"))
            global_step = int(self.state.global_step)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{checkpoint}/{TRAINER_STATE_NAME} is not a Trainer state ({_first_line(err)}).") from None
        if self.state.best_model_checkpoint is not None and not os.path.isdir(self.state.best_model_checkpoint):
            logger.warning(f"The best checkpoint {self.state.best_model_checkpoint} no longer exists; it is forgotten.")
            self.state.best_model_checkpoint = None
        if self.state.train_batch_size not in (None, self._train_batch_size):
            logger.warning(
                f"The checkpoint was trained with batch size {self.state.train_batch_size}, this run uses "
                f"{self._train_batch_size}: the batches skipped on resume are not the ones already seen."
            )
        saved_control = (self.state.stateful_callbacks or {}).get(type(self.control).__name__, {})
        saved_control = saved_control.get("args", {}) if isinstance(saved_control, dict) else {}
        saved_max_steps = self.state.max_steps
        self._load_callback_state()
        newest = last_checkpoint(self.args.output_dir)
        if self.args.should_save and newest is not None and os.path.abspath(newest) == os.path.abspath(checkpoint):
            # a crash between a save's rename and its rotation left one checkpoint too many: rotate now
            self._rotate_checkpoints()

        nupe, GA = num_update_steps_per_epoch, self.args.gradient_accumulation_steps
        epochs_trained = global_step // nupe
        steps_to_skip = 0 if self.args.ignore_data_skip else (global_step % nupe) * GA
        self._epoch_end_to_replay = None
        loop = self._checkpoint_file(checkpoint, LOOP_STATE_NAME)
        saved_at = loop["saved_at"] if loop is not None else self._when_trainer_saved()
        finished = max_steps is not None and global_step >= max_steps
        if saved_at == "epoch_end":
            epochs_trained, steps_to_skip = (global_step - 1) // nupe + 1, 0  # that epoch is over
        elif global_step > 0:
            # Saved after an optimizer step. Did that step end its epoch (last window, max_steps, a callback)?
            stopped = finished or bool(saved_control.get("should_training_stop") and global_step < saved_max_steps)
            if global_step % nupe == 0 or stopped or saved_control.get("should_epoch_stop"):
                self._epoch_end_to_replay = _EpochEndReplay(epoch=(global_step - 1) // nupe, stopped=stopped)
                epochs_trained, steps_to_skip = (global_step - 1) // nupe + 1, 0
        if finished and self._epoch_end_to_replay is None:
            epochs_trained = max(epochs_trained, global_step // nupe + 1)  # nothing is left to train
        return epochs_trained, steps_to_skip

    def _when_trainer_saved(self) -> str:
        """A checkpoint written by transformers.Trainer has no `looptrain_state.json`. Its save strategy (the
        same as this run's, which resuming assumes anyway) says when it saved: at an epoch's end for "epoch",
        and for "best" with epoch evaluation; otherwise after an optimizer step."""
        strategy = self.args.save_strategy
        if strategy == SaveStrategy.EPOCH or (strategy == SaveStrategy.BEST and self.args.eval_strategy == "epoch"):
            return "epoch_end"
        return "step_end"

    def _restore_loop_state(self, checkpoint: str) -> tuple:
        """Give the loop back the loss it summed since the last log (so the next log averages the same
        steps as in the uninterrupted run) and return the last step's (grad_norm, learning_rate)."""
        loop = self._checkpoint_file(checkpoint, LOOP_STATE_NAME)
        if loop is None:  # a Trainer checkpoint: Trainer's behaviour (the unlogged loss is lost)
            return None, None
        tr_loss = loop["tr_loss"]
        if isinstance(tr_loss, list):
            tr_loss = tr_loss[self.args.process_index] if len(tr_loss) > self.args.process_index else 0.0
        self._tr_loss = torch.tensor(float(tr_loss), dtype=torch.float32, device=self.args.device)
        self._globalstep_last_logged = int(loop["globalstep_last_logged"])
        return loop.get("grad_norm"), loop.get("learning_rate")

    def _start_epoch_end_replay(self, checkpoint: str) -> None:
        """Before a replayed epoch end: the RNG as at the save, and the control flags as after it (the step's
        log, evaluation and save were done; whether training had stopped is recomputed for this run)."""
        self._load_rng_state(checkpoint)
        self.control.should_log = self.control.should_evaluate = self.control.should_save = False
        self.control.should_epoch_stop = False
        self.control.should_training_stop = self._epoch_end_to_replay.stopped

    def _load_callback_state(self) -> None:
        """Give stateful callbacks (EarlyStoppingCallback, ...) their saved state back, as Trainer does with
        `restore_callback_states_from_checkpoint=True` (always on here: a resumed run must continue the
        early-stopping patience it had). Callbacks of one type are matched in order; each is rebuilt from
        its saved constructor args and attributes, in place. `TrainerControl` is not restored: its saved
        flags describe the save itself, and the loop sets them as the uninterrupted run had them."""
        saved = self.state.stateful_callbacks or {}
        not_found = []
        callbacks = self.callback_handler.callbacks
        for name, data in saved.items():
            if name == TrainerControl.__name__:
                continue
            entries = data if isinstance(data, list) else [data]
            positions = [i for i, cb in enumerate(callbacks) if type(cb).__name__ == name and isinstance(cb, ExportableState)]
            if not positions:
                not_found.append(name)
                continue
            for i, entry in zip(positions, entries):
                try:
                    new = type(callbacks[i])(**entry.get("args", {}))
                    for key, value in entry.get("attributes", {}).items():
                        setattr(new, key, value)
                except (TypeError, AttributeError) as err:
                    raise CheckpointError(f"The saved state of callback {name} does not fit it ({err}).") from None
                callbacks[i] = new
        if not_found:
            logger.warning(f"The checkpoint holds state of callbacks this Trainer does not have: {', '.join(not_found)}.")

    def _load_optimizer_and_scheduler(self, checkpoint: str) -> None:
        optimizer_state = self._checkpoint_file(checkpoint, "optimizer")
        scheduler_state = self._checkpoint_file(checkpoint, "scheduler")
        if optimizer_state is None or scheduler_state is None:
            logger.warning(f"{checkpoint} has no optimizer/scheduler state (save_only_model?): they start fresh.")
            return
        try:
            self.optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"{checkpoint}/{OPTIMIZER_NAME} does not fit this model's optimizer ({err}).") from None
        try:
            self.lr_scheduler.load_state_dict(scheduler_state)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{checkpoint}/{SCHEDULER_NAME} does not fit this scheduler ({err}).") from None
        scaler = getattr(self.accelerator, "scaler", None)
        scaler_state = self._checkpoint_file(checkpoint, "scaler")
        if scaler is not None and scaler_state is not None:
            scaler.load_state_dict(scaler_state)
        # the big tensors are applied; do not keep a second copy
        self._checkpoint_files.pop("optimizer", None)
        self._checkpoint_files.pop("scheduler", None)

    def _load_rng_state(self, checkpoint: str) -> None:
        states = self._checkpoint_file(checkpoint, "rng")
        if states is None:
            logger.warning(
                f"{checkpoint} has no {self._rng_file_name()}: the resumed run will not reproduce the uninterrupted one exactly."
            )
            return
        try:
            random.setstate(_as_python_rng_state(states["python"]))
            np.random.set_state(states["numpy"])
            torch.random.set_rng_state(states["cpu"])
            if torch.cuda.is_available() and "cuda" in states:
                torch.cuda.random.set_rng_state(states["cuda"])
        except (TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{checkpoint}/{self._rng_file_name()} is not a valid RNG state ({err}).") from None

    def _skip_first_batches(self, dataloader, num_batches: int):
        """Skip at the sampler level, as Trainer does (`accelerate.skip_first_batches`): nothing is collated."""
        return self.accelerator.skip_first_batches(dataloader, num_batches)

    def _load_best_model(self) -> None:
        logger.info(f"Loading best model from {self.state.best_model_checkpoint} (score: {self.state.best_metric}).")
        self._load_from_checkpoint(self.state.best_model_checkpoint, self.accelerator.unwrap_model(self.model_wrapped))

    # ------------------------------------------------------------------ preemption
    @property
    def preempted(self) -> bool:
        """Whether the last `train()` stopped early on SIGTERM; its newest checkpoint is where to resume."""
        return getattr(self, "_preempted", False)

    def _preemption_requested(self) -> bool:
        """Whether SIGTERM arrived (on any process: they must all stop at the same step)."""
        flag = getattr(self, "_sigterm_received", False)
        if self.args.world_size > 1:
            flag = bool(self.accelerator.gather(torch.tensor([int(flag)], device=self.args.device)).max().item())
        return flag


def preemptible(train):
    """Decorate `Trainer.train`: while it runs, SIGTERM (how clusters preempt jobs) does not kill the process;
    it asks the loop to save a checkpoint at the next optimizer-step boundary and return. The previous
    handler is back when `train` returns or raises. Outside the main thread signals cannot be caught, and
    `train` runs unchanged."""

    @functools.wraps(train)
    def wrapper(self, *args, **kwargs):
        self._sigterm_received = self._preempted = False
        self._saving_at = "step_end"  # the loop sets "epoch_end" around its epoch-end save (looptrain_state.json)
        if threading.current_thread() is not threading.main_thread():
            return train(self, *args, **kwargs)

        def on_sigterm(signum, frame):
            self._sigterm_received = True
            logger.warning("SIGTERM: saving a checkpoint at the next optimizer step, then stopping.")

        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            return train(self, *args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


def _as_python_rng_state(state):
    """`random.setstate` wants (version, tuple of 625 ints, gauss); a loaded state may hold lists."""
    if isinstance(state, (list, tuple)) and len(state) == 3 and isinstance(state[1], (list, tuple)):
        return (state[0], tuple(state[1]), state[2])
    return state


def _is_tied(model, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = tied.keys() if isinstance(tied, dict) else tied
    return any(re.fullmatch(k, key) or k == key for k in keys)


def _remove_checkpoint(path: str) -> None:
    """Rename aside, then delete: the `checkpoint-<N>` name disappears in one step."""
    parent, name = os.path.split(os.path.normpath(path))
    doomed = os.path.join(parent, f"{TMP_PREFIX}delete-{name}")
    if os.path.exists(doomed):
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_debris(output_dir: str) -> None:
    """Delete `.tmp-*` folders: saves or deletions a crash interrupted (never a complete checkpoint)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(TMP_PREFIX) and os.path.isdir(os.path.join(output_dir, name)):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def _fsync_tree(path: str) -> None:
    """Flush every file of a checkpoint, then its folders, before the rename makes it visible."""
    for root, _, files in os.walk(path):
        for name in files:
            _fsync_path(os.path.join(root, name))
        _fsync_path(root)


def _fsync_dir(path: str) -> None:
    """Flush a folder's entries (the rename) to disk."""
    _fsync_path(path)


def _fsync_path(path: str) -> None:
    """fsync one file or folder; a no-op where the platform does not allow it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
