"""Checkpoints: what Trainer writes into `checkpoint-<step>/`, and how a run resumes from one.

Layout (Trainer 5.24's file names): `model.safetensors` + `config.json` (`save_pretrained`), tokenizer files,
`optimizer.pt`, `scheduler.pt`, `scaler.pt` (fp16), `rng_state.pth` (`rng_state_<rank>.pth` on several
processes), `trainer_state.json`. The training arguments are stored as `training_args.json`, not
pickled: nothing in a looptrain checkpoint needs unpickling, and every `torch.load` is `weights_only=True`.

Two things Trainer does not do:
  * a checkpoint is written into `.tmp-checkpoint-<step>/` and renamed into place once complete, so a
    crash never leaves a half-written `checkpoint-<step>/`, and resume only ever sees complete ones;
  * loading failures (missing folder, truncated or foreign file, different model) are one clear error.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints, sort_checkpoints
from transformers.utils import logging

logger = logging.get_logger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_ARGS_NAME = "training_args.json"
OPTIMIZER_NAME, SCHEDULER_NAME, SCALER_NAME = "optimizer.pt", "scheduler.pt", "scaler.pt"
SAFE_WEIGHTS_NAME = "model.safetensors"
TMP_PREFIX = ".tmp-"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which file and why."""


def last_checkpoint(folder: str) -> str | None:
    """The complete `checkpoint-<N>` with the highest N (temporary folders are never complete)."""
    if not os.path.isdir(folder):
        return None
    steps = [
        (int(m.group(1)), name)
        for name in os.listdir(folder)
        if (m := _CHECKPOINT_RE.match(name)) and os.path.isdir(os.path.join(folder, name))
    ]
    return os.path.join(folder, max(steps)[1]) if steps else None


def safe_torch_load(path: str):
    """`torch.load(weights_only=True)`: tensors, numbers, strings and containers only, never code.

    numpy's RNG state holds an ndarray, so the few numpy types it needs are allow-listed.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist.")
    safe = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np.core.multiarray._reconstruct] if hasattr(np, "core") else []
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # pickle payloads land here as UnpicklingError, truncation as RuntimeError
        raise CheckpointError(
            f"Refusing to load {path}: it is not a plain tensor file that loads with weights_only=True "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). The file is corrupted, "
            "truncated, or holds pickled objects that could run code."
        ) from err


class CheckpointMixin:
    """Saving and loading of Trainer checkpoints; mixed into `looptrain.Trainer`."""

    # ------------------------------------------------------------------ save
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model (safetensors + config) and the tokenizer, loadable with `from_pretrained`."""
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
        if args.should_save and os.path.exists(tmp_dir):
            shutil.rmtree(tmp_dir)  # debris of an earlier crash
        self.save_model(tmp_dir, _internal_call=True)
        # Trainer: the best checkpoint is known once its folder exists (it may be the one written now).
        if args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and self.state.best_global_step:
            best_dir = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if os.path.exists(best_dir) or self.state.best_global_step == self.state.global_step:
                self.state.best_model_checkpoint = best_dir
        if not args.save_only_model:
            self._save_optimizer_and_scheduler(tmp_dir)
            self._save_rng_state(tmp_dir)
        if args.should_save:
            for cb in self._stateful_callbacks():
                cb_name, cb_state = type(cb).__name__, cb.state()
                if isinstance(self.state.stateful_callbacks.get(cb_name), list):
                    self.state.stateful_callbacks[cb_name].append(cb_state)
                else:
                    self.state.stateful_callbacks[cb_name] = cb_state
            self.state.save_to_json(os.path.join(tmp_dir, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()
        if args.should_save:
            _fsync_dir(tmp_dir)
            if os.path.exists(final_dir):  # a re-run over the same step replaces the old folder
                shutil.rmtree(final_dir)
            os.replace(tmp_dir, final_dir)
            _fsync_dir(args.output_dir)
            rotate_checkpoints(
                output_dir=args.output_dir,
                save_total_limit=args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

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
        name = "rng_state.pth" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}.pth"
        os.makedirs(output_dir, exist_ok=True)
        torch.save(states, os.path.join(output_dir, name))

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
        """Trainer: with save_total_limit=1 and a best checkpoint, only the best one survives training."""
        if self.args.should_save and self.state.best_model_checkpoint is not None and self.args.save_total_limit == 1:
            for checkpoint in sort_checkpoints(self.args.output_dir, best_model_checkpoint=self.state.best_model_checkpoint):
                if not os.path.samefile(checkpoint, self.state.best_model_checkpoint):
                    shutil.rmtree(checkpoint, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def _resolve_checkpoint(self, resume_from_checkpoint) -> str | None:
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        if resume_from_checkpoint is True:
            found = last_checkpoint(self.args.output_dir)
            if found is None:
                raise CheckpointError(f"resume_from_checkpoint=True, but {self.args.output_dir} holds no complete checkpoint-<step> folder.")
            return found
        path = os.fspath(resume_from_checkpoint)
        if not os.path.isdir(path):
            raise CheckpointError(f"resume_from_checkpoint={path!r} is not a folder.")
        if not os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            raise CheckpointError(f"{path} has no {TRAINER_STATE_NAME}: it is not a Trainer checkpoint.")
        return path

    def _load_from_checkpoint(self, checkpoint: str, model=None) -> None:
        """Load the weights (strictly: a checkpoint of another model is an error, not a partial load)."""
        model = self.model if model is None else model
        weights = os.path.join(checkpoint, SAFE_WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise CheckpointError(f"{checkpoint} has no {SAFE_WEIGHTS_NAME}.")
        import safetensors.torch

        try:
            state_dict = safetensors.torch.load_file(weights, device="cpu")
        except Exception as err:
            raise CheckpointError(f"{weights} cannot be read ({err}); the file is truncated or corrupted.") from err
        expected = model.state_dict()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        tied = {k for k in missing if _is_tied(model, k)}
        missing = [k for k in missing if k not in tied]
        mismatched = [k for k in state_dict if k in expected and state_dict[k].shape != expected[k].shape]
        if missing or unexpected or mismatched:
            raise CheckpointError(
                f"{checkpoint} is a checkpoint of a different model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, shape mismatch {mismatched[:5]}."
            )
        model.load_state_dict(state_dict, strict=False)

    def _load_trainer_state(self, checkpoint: str, num_update_steps_per_epoch: int) -> tuple[int, int]:
        """Restore `TrainerState` and callback state; return (epochs done, micro-batches to skip)."""
        try:
            self.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"{checkpoint}/{TRAINER_STATE_NAME} is not a valid trainer state ({err}).") from err
        if self.state.best_model_checkpoint is not None and not os.path.isdir(self.state.best_model_checkpoint):
            self.state.best_model_checkpoint = None
        self._load_callback_state()
        epochs_trained = self.state.global_step // num_update_steps_per_epoch
        steps_to_skip = 0
        if not self.args.ignore_data_skip:
            steps_to_skip = (self.state.global_step % num_update_steps_per_epoch) * self.args.gradient_accumulation_steps
        return epochs_trained, steps_to_skip

    def _load_callback_state(self) -> None:
        """Give stateful callbacks (EarlyStoppingCallback, TrainerControl) their saved state back."""
        saved = self.state.stateful_callbacks or {}
        for cb in self._stateful_callbacks():
            entry = saved.get(type(cb).__name__)
            if entry is None:
                continue
            entry = entry[-1] if isinstance(entry, list) else entry
            for key, value in entry.get("args", {}).items():
                setattr(cb, key, value) if not hasattr(cb, "__dataclass_fields__") else None
            for key, value in entry.get("attributes", {}).items():
                setattr(cb, key, value)

    def _load_optimizer_and_scheduler(self, checkpoint: str) -> None:
        opt_path, sched_path = os.path.join(checkpoint, OPTIMIZER_NAME), os.path.join(checkpoint, SCHEDULER_NAME)
        if not (os.path.isfile(opt_path) and os.path.isfile(sched_path)):
            logger.warning(f"{checkpoint} has no optimizer/scheduler state (save_only_model?): they start fresh.")
            return
        try:
            self.optimizer.load_state_dict(safe_torch_load(opt_path))
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{opt_path} does not match this model's optimizer ({err}).") from err
        self.lr_scheduler.load_state_dict(safe_torch_load(sched_path))
        scaler = getattr(self.accelerator, "scaler", None)
        scaler_path = os.path.join(checkpoint, SCALER_NAME)
        if scaler is not None and os.path.isfile(scaler_path):
            scaler.load_state_dict(safe_torch_load(scaler_path))

    def _load_rng_state(self, checkpoint: str) -> None:
        name = "rng_state.pth" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}.pth"
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            logger.warning(f"{path} is missing: the resumed run will not reproduce the uninterrupted one exactly.")
            return
        states = safe_torch_load(path)
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.random.set_rng_state(states["cpu"])
        if torch.cuda.is_available() and "cuda" in states:
            torch.cuda.random.set_rng_state(states["cuda"])

    def _skip_first_batches(self, dataloader, num_batches: int):
        """Skip at the sampler level, as Trainer does (`accelerate.skip_first_batches`): nothing is collated."""
        return self.accelerator.skip_first_batches(dataloader, num_batches)

    def _load_best_model(self) -> None:
        logger.info(f"Loading best model from {self.state.best_model_checkpoint} (score: {self.state.best_metric}).")
        self._load_from_checkpoint(self.state.best_model_checkpoint, self.accelerator.unwrap_model(self.model_wrapped))


def _is_tied(model, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = tied.keys() if isinstance(tied, dict) else tied
    return any(re.fullmatch(k, key) or k == key for k in keys)


def _fsync_dir(path: str) -> None:
    """Flush a folder's entries (the rename) to disk; a no-op where the platform does not allow it."""
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
