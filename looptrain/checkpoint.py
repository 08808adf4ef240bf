"""Checkpoints: what Trainer writes into `checkpoint-<step>/`, and how a run resumes from one.

Layout (Trainer 5.24's file names): the model (`model.safetensors` + `config.json` from `save_pretrained`, or
PEFT adapter files, or FSDP/DeepSpeed shards), tokenizer files, `optimizer.pt`, `scheduler.pt`, `scaler.pt`
(fp16), `rng_state.pth` (`rng_state_<rank>.pth` on several processes), `trainer_state.json`. Two files differ:
  * the training arguments are `training_args.json`, not a pickled `training_args.bin`. looptrain never opens
    a `training_args.bin` (Trainer writes one into its checkpoints: it is ignored on resume);
  * `looptrain_state.json` holds what Trainer loses on resume (`LoopState`). transformers.Trainer ignores it.

Sharded runs write Trainer's sharded files: FSDP through accelerate's savers (`pytorch_model_fsdp_0/` and
`optimizer_0/` from every process, or gathered `pytorch_model_fsdp.bin` and `optimizer.bin`), DeepSpeed through
its engine (`global_step<N>/`, `latest`); so their checkpoints hold the whole optimizer state, and resume in
either library.

Loading never runs code from a file: every `torch.load` is `weights_only=True`, weights are safetensors (or
`weights_only` .bin), the rest is JSON. The pickled parts of sharded formats, which their own loaders read, are
checked first for what they reference (`check_sharded_files`). Every file a resume uses is read and checked before training touches
the model, the optimizer or the RNG; a file that fails is a `CheckpointError` naming it.

What looptrain does that Trainer 5.24 does not:
  * crash safety: a checkpoint is written into `.tmp-checkpoint-<step>/`, flushed to disk, and renamed to
    `checkpoint-<step>/` only when complete; rotation renames a checkpoint away before deleting it. So a
    `checkpoint-<step>/` folder is always complete, and `resume_from_checkpoint=True` takes the newest;
  * exact resume (`plan_resume`, `LoopState`): the resumed run continues as the uninterrupted run did, with
    the loss summed since the last log, and the end of an epoch that a checkpoint preceded.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.trainer_callback import ExportableState, TrainerControl, TrainerState
from transformers.trainer_pt_utils import reissue_pt_warnings, remove_dummy_checkpoint
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    _is_peft_model,
    compare_trainer_and_checkpoint_args,
    sort_checkpoints,
)
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    logging,
)

from . import fastpath

logger = logging.get_logger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_ARGS_NAME = "training_args.json"
LOOP_STATE_NAME = "looptrain_state.json"
OPTIMIZER_NAME, SCHEDULER_NAME, SCALER_NAME = "optimizer.pt", "scheduler.pt", "scaler.pt"
FSDP_MODEL_NAME = "pytorch_model_fsdp"  # accelerate's names for FSDP's model and optimizer files
FSDP_OPTIMIZER_NAME = "optimizer.bin"
TMP_PREFIX = ".tmp-"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which file and why."""


# ================================================================================== the loop's running state
@dataclass
class LoopState:
    """The loop's running counters between two logs: what `trainer_state.json` lacks for an exact resume.

    `tr_loss` is the float32 sum of the step losses since the last log, on the device (Trainer's `_tr_loss`);
    `total_loss_scalar` the sum of the logged losses (`train_loss` in the summary); `globalstep_last_logged`
    the step of the last log. `grad_norm` and `learning_rate` are the last optimizer step's (the epoch-end log
    repeats them); `at_epoch_end` is True while the epoch-end log/evaluate/save runs. The loop owns it
    (`Trainer._loop`); `_save_checkpoint` writes it to `looptrain_state.json` and a resume reads it back.
    """

    tr_loss: torch.Tensor
    total_loss_scalar: float = 0.0
    globalstep_last_logged: int = 0
    grad_norm: object = None
    learning_rate: float | None = None
    at_epoch_end: bool = False
    # The NaN/inf filter's deferred check (`fastpath.add_step_loss`): the step losses added to `tr_loss` since the
    # sum was last checked, each with its running-mean divisor, and the sum as it was then.
    unchecked: list = field(default_factory=list)
    checked_tr_loss: torch.Tensor | None = None
    defer_nan_filter: bool = False

    @classmethod
    def start(cls, global_step: int, device, resume: Resume | None = None, process_index: int = 0) -> LoopState:
        """Trainer's fresh counters at the start of `train()`; with a checkpoint, continued from its
        `looptrain_state.json` (looptrain: the loss summed since the last log, the last norm and learning rate)."""
        loop = cls(tr_loss=torch.tensor(0.0, device=device), globalstep_last_logged=global_step)
        if resume is not None:
            loop.restore(resume.loop_state, process_index)
        return loop

    def to_json(self, accelerator) -> dict:
        """The JSON object of `looptrain_state.json`. Collective: every process must call it (each process sums
        its own losses until the next log averages them)."""
        per_process = accelerator.gather(self.tr_loss.detach().reshape(1).float()).tolist()
        grad_norm = self.grad_norm.item() if torch.is_tensor(self.grad_norm) else self.grad_norm
        return {
            "format": 1,
            # "epoch_end": saved by the epoch-end log/evaluate/save; "step_end": after an optimizer step
            "saved_at": "epoch_end" if self.at_epoch_end else "step_end",
            "tr_loss": per_process,
            "globalstep_last_logged": self.globalstep_last_logged,
            "grad_norm": grad_norm,
            "learning_rate": self.learning_rate,
        }

    def restore(self, saved: dict | None, process_index: int) -> None:
        """Continue from `looptrain_state.json` (nothing to restore from a transformers.Trainer checkpoint: then
        Trainer's behaviour, the loss since the last log is lost)."""
        if saved is None:
            return
        tr_loss = saved["tr_loss"]
        if isinstance(tr_loss, list):
            tr_loss = tr_loss[process_index] if len(tr_loss) > process_index else 0.0
        self.tr_loss = torch.tensor(float(tr_loss), dtype=torch.float32, device=self.tr_loss.device)
        self.globalstep_last_logged = int(saved["globalstep_last_logged"])
        self.grad_norm, self.learning_rate = saved.get("grad_norm"), saved.get("learning_rate")


# ========================================================================================== the resume plan
@dataclass
class ResumePlan:
    """Where a resumed run starts: `epochs_trained` epochs are done; `steps_to_skip` micro-batches of the next one
    were consumed (when it is the epoch's every batch, only the epoch's end is left to run); `training_stopped`:
    training had been told to stop at the checkpoint's step (that end is then the last thing to run)."""

    epochs_trained: int
    steps_to_skip: int
    training_stopped: bool = False


@dataclass(frozen=True)
class EpochStart:
    """Where `_run_epoch` starts an epoch: what to skip and when to restore the checkpoint's RNG. The default is a
    fresh epoch: its first window, nothing skipped, nothing restored."""

    checkpoint: str | None = None  # the checkpoint whose RNG state is restored
    first_window: int = 0  # the epoch's optimizer steps (windows) already done
    micro_batches_to_skip: int = 0  # consumed by the checkpoint's run; skipped at the sampler, never collated
    restore_rng_first: bool = False  # before the epoch's iterator draws from the RNG
    restore_rng_after_window: int | None = None  # once this window is fetched (overwrites the skipping iterator's draw)
    only_epoch_end: bool = False  # the checkpoint precedes this epoch's end: only the end is left to run
    training_stopped: bool = False  # ... and training had been told to stop at the checkpoint's step

    def replay_epoch_end(self, control: TrainerControl, loop: LoopState) -> tuple:
        """For an epoch whose end alone is left: the control flags as the uninterrupted run had them after its save
        (the step's log, evaluation and save were done; whether training was stopping is the checkpoint's), and the
        last step's (grad_norm, learning_rate), which the end's log repeats. (None, None) otherwise."""
        if not self.only_epoch_end:
            return None, None
        control.should_log = control.should_evaluate = control.should_save = False
        control.should_training_stop = self.training_stopped
        return loop.grad_norm, loop.learning_rate


@dataclass
class Resume:
    """The checkpoint a `train()` resumes from, as one value: made once by `_resolve_checkpoint` (the folder, every
    file read and checked), planned once by `_init_training_state` (`plan`), then asked by the loop: the loop state
    (`LoopState.start`), where each epoch starts (`epoch_start`), the optimizer, scheduler, scaler and RNG files."""

    path: str
    files: dict  # `read_checkpoint`'s: trainer_state, looptrain_state.json, optimizer, scheduler, scaler, rng
    plan: ResumePlan | None = None
    optimizer_steps_per_epoch: int = 1
    micro_batches_per_step: int = 1  # gradient_accumulation_steps

    @property
    def loop_state(self) -> dict | None:
        """The parsed `looptrain_state.json` (None in a transformers.Trainer checkpoint)."""
        return self.files.get(LOOP_STATE_NAME)

    def epoch_start(self, steps_to_skip: int, steps_in_epoch: int) -> EpochStart:
        """Where the first epoch of the resumed run starts, from `steps_to_skip` of its `steps_in_epoch` micro-batches."""
        if steps_to_skip >= steps_in_epoch:
            # looptrain: the checkpoint precedes this epoch's end (see `plan_resume`): nothing is left to train in it.
            # Its end runs from the checkpoint's RNG, with the last step's norm and learning rate.
            return EpochStart(
                self.path,
                first_window=self.optimizer_steps_per_epoch,
                restore_rng_first=True,
                only_epoch_end=True,
                training_stopped=self.plan is not None and self.plan.training_stopped,
            )
        if steps_to_skip > 0:
            # Trainer: the consumed batches are skipped at the sampler; the RNG is restored once the first window
            # is fetched (creating the skipping iterator drew from it).
            window = steps_to_skip // self.micro_batches_per_step
            return EpochStart(
                self.path, first_window=window, micro_batches_to_skip=steps_to_skip, restore_rng_after_window=window
            )
        return EpochStart(self.path, restore_rng_first=True)


def plan_resume(
    state: TrainerState,
    loop_state: dict | None,
    *,
    num_update_steps_per_epoch: int,
    max_steps: int,
    gradient_accumulation_steps: int,
    ignore_data_skip: bool,
    trainer_saved_at_epoch_end: bool,
) -> ResumePlan:
    """Where to resume, from a checkpoint's `TrainerState` and `looptrain_state.json` alone (no Trainer).

    Trainer's rule: `global_step // optimizer steps per epoch` epochs are done, and `(global_step % optimizer steps
    per epoch) * gradient_accumulation_steps` micro-batches of the next. looptrain refines it:
      * a checkpoint saved by the epoch-end log/evaluate/save continues with the next epoch;
      * one saved after the optimizer step that ended an epoch (its last window, max_steps, a callback's stop)
        precedes that epoch's end (its evaluation, one draw from the global RNG, its logs): the plan returns
        that epoch with every micro-batch consumed, so `_run_epoch` runs only its end. Trainer skips it;
      * a run that reached `max_steps` trains no further (Trainer would run one more step when `max_steps`
        fell inside an epoch).
    A transformers.Trainer checkpoint has no `looptrain_state.json`: when it saved is inferred from the save
    strategy (`trainer_saved_at_epoch_end`).
    """
    # windows (optimizer steps) per epoch, and micro-batches per window
    per_epoch, per_window = num_update_steps_per_epoch, gradient_accumulation_steps
    global_step = int(state.global_step)
    epochs_trained = global_step // per_epoch
    steps_to_skip = 0 if ignore_data_skip else (global_step % per_epoch) * per_window
    saved_control = (state.stateful_callbacks or {}).get(TrainerControl.__name__, {})
    saved_control = saved_control.get("args", {}) if isinstance(saved_control, dict) else {}
    finished = global_step >= max_steps
    saved_at_epoch_end = loop_state["saved_at"] == "epoch_end" if loop_state is not None else trainer_saved_at_epoch_end
    if saved_at_epoch_end:
        epochs_trained, steps_to_skip = (global_step - 1) // per_epoch + 1, 0  # that epoch is over
    elif global_step > 0:
        # Saved after an optimizer step. Did that step end its epoch (last window, max_steps, a callback)?
        stopped = finished or bool(saved_control.get("should_training_stop") and global_step < (state.max_steps or 0))
        if global_step % per_epoch == 0 or stopped or saved_control.get("should_epoch_stop"):
            # every micro-batch of that epoch counts as consumed: only its end is left to run
            return ResumePlan(
                (global_step - 1) // per_epoch, steps_to_skip=per_epoch * per_window, training_stopped=stopped
            )
    if finished:
        epochs_trained = max(epochs_trained, global_step // per_epoch + 1)  # nothing is left to train
    return ResumePlan(epochs_trained, steps_to_skip)


def trainer_saves_at_epoch_end(args) -> bool:
    """Whether transformers.Trainer, with these arguments, writes its checkpoints at an epoch's end ("epoch", and
    "best" with epoch evaluation) rather than after an optimizer step."""
    strategy = args.save_strategy
    return strategy == "epoch" or (strategy == "best" and args.eval_strategy == "epoch")


def describe_resume(
    checkpoint: str, global_step: int, epochs_trained: int, steps_to_skip: int, only_epoch_end: bool
) -> str:
    """The line a resumed run logs: from where, at which step and epoch, what it skips."""
    where = f"Resuming from {checkpoint} at step {global_step}, epoch {epochs_trained}"
    if only_epoch_end:
        return f"{where}: that epoch's end (its evaluation, logs and save) runs first, then training continues."
    if steps_to_skip:
        return f"{where}: skipping the {steps_to_skip} batches of that epoch already trained on."
    return f"{where}: starting that epoch from its first batch."


def trainer_state_from_json(data: dict, checkpoint: str) -> TrainerState:
    """A `TrainerState` from the checkpoint's parsed `trainer_state.json`, or a `CheckpointError` saying why not."""
    try:
        state = TrainerState(**data)
        int(state.global_step)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{checkpoint}/{TRAINER_STATE_NAME} is not a Trainer state ({_first_line(err)})."
        ) from None
    return state


# =============================================================================================== the mixin
class CheckpointMixin:
    """Saving and loading, with `transformers.Trainer`'s method names; mixed into `looptrain.Trainer`."""

    # ------------------------------------------------------------------ the final model
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model (and tokenizer and arguments), loadable with `from_pretrained`; only the main process writes."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.is_fsdp_enabled:
            if "FULL_STATE_DICT" in str(self.accelerator.state.fsdp_plugin.state_dict_type):
                self._save(output_dir, state_dict=self.accelerator.get_state_dict(self.model))
            # a SHARDED_STATE_DICT model is saved by `_save_optimizer_and_scheduler` (save_fsdp_model)
        elif self.is_deepspeed_enabled:
            try:
                zero3 = self.deepspeed.config.get("zero_optimization", {}).get("stage") == 3
                if zero3 and _is_peft_model(self.model) and _accepts_exclude_frozen(self.model_wrapped):
                    # Trainer: PEFT under ZeRO-3 gathers only the trainable (adapter) weights
                    state_dict = self.deepspeed._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
                else:
                    state_dict = self.accelerator.get_state_dict(self.deepspeed)  # ZeRO-3: gathered from every rank
                self._save(output_dir, state_dict=state_dict)
            except ValueError:
                # Trainer: ZeRO-3 without stage3_gather_16bit_weights_on_model_save cannot gather the weights: the
                # folder gets the config, tokenizer and arguments, and DeepSpeed's own sharded checkpoint.
                logger.warning(
                    "ZeRO-3 without stage3_gather_16bit_weights_on_model_save: saving DeepSpeed's sharded checkpoint "
                    "instead of the weights; DeepSpeed's zero_to_fp32.py rebuilds them."
                )
                self._save(output_dir, state_dict={})
                remove_dummy_checkpoint(self.args.should_save, output_dir, [WEIGHTS_NAME, SAFE_WEIGHTS_NAME])
                self.model_wrapped.save_checkpoint(output_dir)
        else:
            self._save(output_dir)
        if self.args.push_to_hub and not _internal_call:  # Trainer: a user's save_model() also uploads
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the weights (`save_pretrained`, or safetensors for a plain nn.Module), the tokenizer and
        `training_args.json` into `output_dir`."""
        from transformers import PreTrainedModel

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        logger.info(f"Saving model checkpoint to {output_dir}")
        supported = (PreTrainedModel,) + _peft_model_classes()
        unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if isinstance(self.model, supported):
            self.model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        elif isinstance(unwrapped, supported):
            state_dict = self.model.state_dict() if state_dict is None else state_dict
            unwrapped.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        else:
            import safetensors.torch

            state_dict = self.model.state_dict() if state_dict is None else state_dict
            logger.info("The model is not a PreTrainedModel: only its weights are saved (model.safetensors).")
            safetensors.torch.save_file(
                {k: v.contiguous() for k, v in state_dict.items()},
                os.path.join(output_dir, SAFE_WEIGHTS_NAME),
                metadata={"format": "pt"},
            )
        tokenizer = (
            self.processing_class
            if self.processing_class is not None
            else getattr(self.data_collator, "tokenizer", None)
        )
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(output_dir)
        write_training_args(self.args, output_dir)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial) -> None:
        """Write `checkpoint-<global_step>/` (`_write_checkpoint`), upload it (`push_to_hub`), rotate."""
        args = self.args
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        self._update_best_model_checkpoint(run_dir)  # the state written below names the best checkpoint
        output_dir = self._write_checkpoint(run_dir)
        if args.push_to_hub:
            self._push_from_checkpoint(output_dir)
        if args.should_save:
            rotate_checkpoints(run_dir, args.save_total_limit, self.state.best_model_checkpoint)

    def _write_checkpoint(self, run_dir: str) -> str:
        """Write every file of `run_dir/checkpoint-<global_step>/`, each by its one writer: into a temporary folder,
        renamed when complete. Every checkpoint is written here (a save during training, a hyperparameter-search
        trial's). Collective: every process calls it. Returns the checkpoint's folder."""
        args = self.args
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        output_dir, staging_dir = os.path.join(run_dir, name), os.path.join(run_dir, TMP_PREFIX + name)
        if args.should_save:
            remove_debris(run_dir)  # what a crash in an earlier save or rotation left behind
        self.accelerator.wait_for_everyone()  # nobody writes into the staging folder before it is cleared
        try:
            self._write_checkpoint_files(staging_dir, output_dir)
        except BaseException:  # looptrain: a save that fails midway (an exception, not a kill) leaves nothing behind
            shutil.rmtree(staging_dir, ignore_errors=True)
            raise
        return output_dir

    def _write_checkpoint_files(self, staging_dir: str, output_dir: str) -> None:
        """`_write_checkpoint`'s body: every file into `staging_dir`, then the folder renamed to `output_dir`."""
        args = self.args
        self.save_model(staging_dir, _internal_call=True)  # the model, tokenizer, training_args.json
        if not args.save_only_model:
            self._save_optimizer_and_scheduler(staging_dir)
            self._save_scaler(staging_dir)
            self._save_rng_state(staging_dir)
        if self._loop is not None:
            fastpath.settle_loss(self._loop)  # the running loss as Trainer would have it
        loop_state = self._loop.to_json(self.accelerator) if self._loop is not None else None  # collective
        if args.should_save:
            # The callbacks' state as it is now. (Trainer appends to a list for repeated callback types and restores
            # the oldest entries; here each save holds the current state of each callback.)
            fresh = TrainerState(stateful_callbacks=self._stateful_callbacks()).stateful_callbacks
            self.state.stateful_callbacks = {**(self.state.stateful_callbacks or {}), **fresh}
            write_trainer_state(self.state, staging_dir)
            if loop_state is not None:
                write_loop_state(loop_state, staging_dir)
        self.accelerator.wait_for_everyone()  # every process's files (its RNG state) are in the staging folder
        if args.should_save:
            _publish(staging_dir, output_dir)
        self.accelerator.wait_for_everyone()
        if not args.should_save and args.local_process_index == 0 and os.path.isdir(staging_dir):
            # looptrain: a machine with its own disk (save_on_each_node=False): its processes' files (rng_state_<rank>.pth)
            # are published there too, where Trainer writes them, `checkpoint-<N>/` (a shared disk has no staging left).
            _publish(staging_dir, output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """`optimizer.pt` and `scheduler.pt` (under DeepSpeed and FSDP, their own sharded files)."""
        if self.is_deepspeed_enabled:
            # Trainer: DeepSpeed's engine writes model, optimizer (and its scheduler) shards itself.
            # (from every process into the staging folder: each writes its partitions, the main one `latest`)
            if _is_peft_model(self.model) and _accepts_exclude_frozen(self.model_wrapped):
                self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
            else:
                self.model_wrapped.save_checkpoint(output_dir)
        elif self.is_fsdp_enabled:
            # Trainer: accelerate's FSDP savers. SHARDED_STATE_DICT: every process writes its shards of the model
            # and of the optimizer state (torch.distributed.checkpoint, `pytorch_model_fsdp_0/`, `optimizer_0/`);
            # FULL_STATE_DICT: both are gathered and the main process writes `pytorch_model_fsdp.bin` and
            # `optimizer.bin`. Either way the whole optimizer state, not one process's shard.
            from accelerate.utils import save_fsdp_model, save_fsdp_optimizer
            from transformers.distributed.fsdp import get_fsdp_ckpt_kwargs

            plugin = self.accelerator.state.fsdp_plugin
            save_fsdp_model(plugin, self.accelerator, self.model, output_dir, **get_fsdp_ckpt_kwargs())
            save_fsdp_optimizer(plugin, self.accelerator, self.optimizer, self.model, output_dir)
        elif self.args.should_save:
            torch.save(self.optimizer.state_dict(), os.path.join(output_dir, OPTIMIZER_NAME))
        deepspeed_owns_scheduler = (
            self.is_deepspeed_enabled and type(self.lr_scheduler).__name__ == "DeepSpeedSchedulerWrapper"
        )
        if self.args.should_save and not deepspeed_owns_scheduler:
            with _caught_warnings():
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _save_scaler(self, output_dir: str) -> None:
        """`scaler.pt`: fp16's GradScaler state (its current loss scale)."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            with _caught_warnings():
                torch.save(scaler.state_dict(), os.path.join(output_dir, SCALER_NAME))

    def _save_rng_state(self, output_dir: str) -> None:
        """Every RNG the run draws from; one file per process, since each has its own CUDA/dropout stream."""
        states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            distributed = self.args.parallel_mode.value == "distributed"
            states["cuda"] = torch.cuda.random.get_rng_state_all() if distributed else torch.cuda.random.get_rng_state()
        os.makedirs(output_dir, exist_ok=True)  # a process may get here before the main one made the folder
        torch.save(states, os.path.join(output_dir, self._rng_file_name()))

    def _rng_file_name(self) -> str:
        return "rng_state.pth" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}.pth"

    def _delete_non_best_checkpoints(self, run_dir: str) -> None:
        """Trainer: with save_total_limit=1 and a best checkpoint, only the best one survives training."""
        if self.args.should_save and self.state.best_model_checkpoint is not None and self.args.save_total_limit == 1:
            for checkpoint in sort_checkpoints(run_dir, best_model_checkpoint=self.state.best_model_checkpoint):
                if not os.path.samefile(checkpoint, self.state.best_model_checkpoint):
                    _remove_checkpoint(checkpoint)

    # ------------------------------------------------------------------ resume
    def _resolve_checkpoint(self, resume_from_checkpoint) -> Resume | None:
        """The checkpoint to resume from (True: the newest in output_dir; None or False: none), with every file it
        holds read and checked (`read_checkpoint`) before anything is changed; then its weights loaded (before
        accelerate wraps the model; sharded ones later, in `_prepare_for_training`) and, under
        `auto_find_batch_size`, its batch size adopted."""
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
        resume = Resume(path, read_checkpoint(path, self._rng_file_name()))
        newest = last_checkpoint(self.args.output_dir)
        if self.args.should_save and newest is not None and os.path.samefile(newest, path):
            # A crash between a save's rename and its rotation left one checkpoint too many: finish that save.
            best = resume.files["trainer_state"].get("best_model_checkpoint")
            rotate_checkpoints(self.args.output_dir, self.args.save_total_limit, best)
        if not self.is_deepspeed_enabled and not self.is_fsdp_enabled:
            self._load_from_checkpoint(path)  # before accelerate wraps the model
        saved_batch_size = resume.files["trainer_state"].get("train_batch_size")
        if saved_batch_size is not None and self.args.auto_find_batch_size:
            self._train_batch_size = saved_batch_size  # Trainer: the batch size that fitted before
        return resume

    def _checkpoint_file(self, checkpoint: str, key: str):
        """A file of the checkpoint: as `_resolve_checkpoint` read it, or (another checkpoint) read now."""
        if self._resume is not None and self._resume.path == checkpoint:
            return self._resume.files.get(key)
        return read_checkpoint(checkpoint, self._rng_file_name()).get(key)

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ) -> tuple[int, int]:
        """A fresh `TrainerState`, or the checkpoint's; return (epochs done, micro-batches of the next epoch to skip).

        Resuming follows a plan computed from the checkpoint alone (`plan_resume`): Trainer's rule (`global_step //
        optimizer steps per epoch` epochs done, then `(global_step % optimizer steps per epoch) *
        gradient_accumulation_steps` micro-batches), made exact where Trainer's is not. When the checkpoint was
        written after the step that ended an epoch but before that epoch's end ran (its evaluation, logs and save),
        the plan returns that epoch with all its micro-batches consumed: `_run_epoch` then runs only its end.
        """
        self.state = TrainerState(stateful_callbacks=self._stateful_callbacks())
        self.state.is_hyper_param_search = trial is not None
        self.state.train_batch_size = self._train_batch_size
        self.state.compute_steps(self.args, max_steps)  # resolves ratio logging/eval/save steps
        epochs_trained, steps_to_skip = 0, 0
        if resume_from_checkpoint is not None:
            self.state = trainer_state_from_json(
                self._checkpoint_file(resume_from_checkpoint, "trainer_state"), resume_from_checkpoint
            )
            if self.state.best_model_checkpoint is not None and not os.path.isdir(self.state.best_model_checkpoint):
                logger.warning(
                    f"The best checkpoint {self.state.best_model_checkpoint} no longer exists; it is forgotten."
                )
                self.state.best_model_checkpoint = None
            compare_trainer_and_checkpoint_args(self.args, self.state)
            self._load_callback_state()
            plan = plan_resume(
                self.state,
                self._checkpoint_file(resume_from_checkpoint, LOOP_STATE_NAME),
                num_update_steps_per_epoch=num_update_steps_per_epoch,
                max_steps=max_steps,
                gradient_accumulation_steps=self.args.gradient_accumulation_steps,
                ignore_data_skip=self.args.ignore_data_skip,
                trainer_saved_at_epoch_end=trainer_saves_at_epoch_end(self.args),
            )
            epochs_trained, steps_to_skip = plan.epochs_trained, plan.steps_to_skip
            if self._resume is not None and self._resume.path == resume_from_checkpoint:
                self._resume.plan = plan  # the loop asks it where each epoch starts (`Resume.epoch_start`)
                self._resume.optimizer_steps_per_epoch = num_update_steps_per_epoch
                self._resume.micro_batches_per_step = self.args.gradient_accumulation_steps
            # looptrain: said at WARNING, Trainer's default verbosity, so that a resumed run never goes unnoticed.
            only_epoch_end = steps_to_skip >= num_update_steps_per_epoch * self.args.gradient_accumulation_steps
            logger.warning(
                describe_resume(
                    resume_from_checkpoint, self.state.global_step, epochs_trained, steps_to_skip, only_epoch_end
                )
            )
        self.state.init_training_references(self, max_steps, num_train_epochs, trial)
        return epochs_trained, steps_to_skip

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load the checkpoint's weights into `model` (the unwrapped model by default)."""
        model = self.model if model is None else model
        load_result = load_weights(resume_from_checkpoint, model, self.accelerator, self.is_fsdp_enabled)
        if load_result is not None:
            self._issue_warnings_after_load(load_result)

    def _load_best_model(self) -> None:
        """Load the best checkpoint's weights (`load_best_model_at_end`)."""
        best = self.state.best_model_checkpoint
        logger.info(f"Loading best model from {best} (score: {self.state.best_metric}).")
        if self.is_deepspeed_enabled:
            from transformers.integrations.deepspeed import deepspeed_load_checkpoint

            deepspeed_load_checkpoint(self.model_wrapped, best, load_module_strict=not _is_peft_model(self.model))
            return
        load_result = load_weights(best, self.model, self.accelerator, self.is_fsdp_enabled)
        if load_result is not None:
            self._issue_warnings_after_load(load_result)

    def _issue_warnings_after_load(self, load_result) -> None:
        """Trainer: re-tie weights the checkpoint omitted on purpose; warn about other missing/unexpected keys."""
        if len(load_result.missing_keys) != 0:
            ignored = getattr(self.model, "_keys_to_ignore_on_save", None)
            if ignored and set(load_result.missing_keys) == set(ignored):
                self.model.tie_weights()
            else:
                logger.warning(f"There were missing keys in the checkpoint model loaded: {load_result.missing_keys}.")
        if len(load_result.unexpected_keys) != 0:
            logger.warning(f"There were unexpected keys in the checkpoint model loaded: {load_result.unexpected_keys}.")

    def _load_optimizer_and_scheduler(self, checkpoint: str) -> None:
        """Give the optimizer and the schedule the checkpoint's state (DeepSpeed restores its own)."""
        if checkpoint is None:
            return
        if self.is_deepspeed_enabled:
            if type(self.lr_scheduler).__name__ != "DeepSpeedSchedulerWrapper":
                scheduler_state = self._checkpoint_file(checkpoint, "scheduler")
                if scheduler_state is not None:
                    self.lr_scheduler.load_state_dict(scheduler_state)
            return
        if self.is_fsdp_enabled:
            # Trainer: the FSDP optimizer state is loaded only when the checkpoint has one and a schedule
            # (`optimizer_0/` or `optimizer.bin`); accelerate's loader reads and re-shards it on every process.
            from accelerate.utils import load_fsdp_optimizer
            from transformers.distributed.fsdp import get_fsdp_ckpt_kwargs

            optimizer_state = None
            if has_fsdp_optimizer_state(checkpoint) and self._checkpoint_file(checkpoint, "scheduler") is not None:
                load_fsdp_optimizer(
                    self.accelerator.state.fsdp_plugin,
                    self.accelerator,
                    self.optimizer,
                    self.model,
                    checkpoint,
                    **get_fsdp_ckpt_kwargs(),
                )
                optimizer_state = "loaded"
        else:
            optimizer_state = self._checkpoint_file(checkpoint, "optimizer")
        scheduler_state = self._checkpoint_file(checkpoint, "scheduler")
        if optimizer_state is None or scheduler_state is None:
            logger.warning(f"{checkpoint} has no optimizer/scheduler state (save_only_model?): they start fresh.")
            return
        if optimizer_state != "loaded":
            try:
                self.optimizer.load_state_dict(optimizer_state)
            except (ValueError, KeyError, TypeError, RuntimeError) as err:
                raise CheckpointError(
                    f"{checkpoint}/{OPTIMIZER_NAME} does not fit this model's optimizer ({err})."
                ) from None
        try:
            self.lr_scheduler.load_state_dict(scheduler_state)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{checkpoint}/{SCHEDULER_NAME} does not fit this scheduler ({err}).") from None
        if self._resume is not None and self._resume.path == checkpoint:
            self._resume.files.pop("optimizer", None)  # applied: do not keep a second copy of the big tensors
            self._resume.files.pop("scheduler", None)

    def _load_scaler(self, checkpoint: str) -> None:
        """fp16: the GradScaler continues with the checkpoint's loss scale."""
        scaler = getattr(self.accelerator, "scaler", None)
        scaler_state = self._checkpoint_file(checkpoint, "scaler") if checkpoint is not None else None
        if scaler is not None and scaler_state is not None:
            scaler.load_state_dict(scaler_state)

    def _load_rng_state(self, checkpoint: str) -> None:
        """Every RNG as it was at the save (this process's file)."""
        if checkpoint is None:
            return
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
                cuda = states["cuda"]
                if isinstance(cuda, (list, tuple)):
                    torch.cuda.random.set_rng_state_all(cuda)
                else:
                    torch.cuda.random.set_rng_state(cuda)
        except (TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{checkpoint}/{self._rng_file_name()} is not a valid RNG state ({err}).") from None

    def _load_callback_state(self) -> None:
        """`restore_callback_states_from_checkpoint`: stateful callbacks (EarlyStoppingCallback, ...) get their saved
        state back. Callbacks of one type are matched in order; each is rebuilt from its saved constructor args and
        attributes, and moved to the end of the list, as Trainer does. looptrain: `TrainerControl` is not restored
        (Trainer restores it): its saved flags describe the save itself, and the loop sets them as the uninterrupted
        run had them."""
        if not self.args.restore_callback_states_from_checkpoint:
            return
        saved = self.state.stateful_callbacks or {}
        not_found, restored = [], []
        callbacks = self.callback_handler.callbacks
        for name, data in saved.items():
            if name == TrainerControl.__name__:
                continue
            entries = data if isinstance(data, list) else [data]
            positions = [
                i for i, cb in enumerate(callbacks) if type(cb).__name__ == name and isinstance(cb, ExportableState)
            ]
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
                restored.append((callbacks[i], new))
        for old, new in restored:  # Trainer: a restored callback leaves its place and runs last
            callbacks.remove(old)
            callbacks.append(new)
        if not_found:
            logger.warning(
                f"The checkpoint holds state of callbacks this Trainer does not have: {', '.join(not_found)}."
            )


# ================================================================================ reading a checkpoint safely
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


def read_checkpoint(checkpoint: str, rng_file_name: str) -> dict:
    """Read every file of the checkpoint that resuming uses, the safe way, before anything is changed.

    A file that fails is an error now, not after the model or the RNG was half restored. `training_args.bin`
    (Trainer's pickle) is never opened; the weights are read (and checked against the model) by `load_weights`.
    Returns {"path", "trainer_state", looptrain_state.json, "optimizer", "scheduler", "scaler", "rng"} (those present).
    """
    files = {"path": checkpoint}
    files["trainer_state"] = read_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
    for name in (LOOP_STATE_NAME, CONFIG_NAME, TRAINING_ARGS_NAME):
        if os.path.exists(os.path.join(checkpoint, name)):
            files[name] = read_json(os.path.join(checkpoint, name))
    for key, name in (
        ("optimizer", OPTIMIZER_NAME),
        ("scheduler", SCHEDULER_NAME),
        ("scaler", SCALER_NAME),
        ("rng", rng_file_name),
    ):
        if os.path.exists(os.path.join(checkpoint, name)):
            files[key] = safe_torch_load(os.path.join(checkpoint, name))
    rng = files.get("rng")
    if rng is not None and not (isinstance(rng, dict) and {"python", "numpy", "cpu"} <= rng.keys()):
        raise CheckpointError(f"{checkpoint}/{rng_file_name} is not an RNG state (keys python, numpy, cpu).")
    for key in ("optimizer", "scheduler", "scaler"):
        if key in files and not isinstance(files[key], dict):
            raise CheckpointError(
                f"{checkpoint}: the {key} file holds a {type(files[key]).__name__}, not a state dict."
            )
    check_sharded_files(checkpoint)  # FSDP's and DeepSpeed's own files are read by their loaders, later
    loop = files.get(LOOP_STATE_NAME)
    if loop is not None and not {"saved_at", "tr_loss", "globalstep_last_logged"} <= loop.keys():
        raise CheckpointError(
            f"{checkpoint}/{LOOP_STATE_NAME} lacks the keys saved_at, tr_loss, globalstep_last_logged."
        )
    return files


def has_fsdp_optimizer_state(checkpoint: str) -> bool:
    """Trainer's test for an optimizer state it can load under FSDP: a file (`optimizer.pt`, `optimizer.bin`) or
    a torch.distributed.checkpoint folder (`optimizer_0/`)."""
    if any(os.path.isfile(os.path.join(checkpoint, name)) for name in (OPTIMIZER_NAME, FSDP_OPTIMIZER_NAME)):
        return True
    return any("optimizer" in name and os.path.isdir(os.path.join(checkpoint, name)) for name in os.listdir(checkpoint))


# What the pickled parts of sharded checkpoints may reference. torch.distributed.checkpoint's `.metadata` is a plain
# pickle, and DeepSpeed loads its `global_step*/*.pt` with weights_only=False; both loaders would run code that a
# tampered file names, so `check_sharded_files` reads their references first and refuses anything else.
_DCP_METADATA_GLOBALS = {
    "torch": {"Size"},  # and torch's dtypes, allowed by type below
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "bytearray", "slice"},
}
_DEEPSPEED_GLOBALS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
}


def check_sharded_files(checkpoint: str) -> None:
    """Before a sharded resume: refuse torch.distributed.checkpoint metadata (FSDP's `pytorch_model_fsdp_0/`,
    `optimizer_0/`) and DeepSpeed files (`global_step*/*.pt`) that reference anything but the classes these
    formats use. The files are parsed, never executed; the loaders of accelerate and DeepSpeed read them later."""
    import glob
    import pickle

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            allowed = module.startswith("torch.distributed.checkpoint.") or name in _DCP_METADATA_GLOBALS.get(
                module, ()
            )
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                allowed = True
            if not allowed:
                raise pickle.UnpicklingError(f"it references {module}.{name}")
            return super().find_class(module, name)

    for metadata in sorted(glob.glob(os.path.join(checkpoint, "*", ".metadata"))):
        try:
            with open(metadata, "rb") as f:
                RestrictedUnpickler(f).load()
        except Exception as err:
            raise CheckpointError(
                f"Refusing to resume from {metadata}: it is not a torch.distributed.checkpoint metadata file "
                f"({type(err).__name__}: {_first_line(err)}). It is truncated or corrupted, or references code."
            ) from None
    for path in sorted(glob.glob(os.path.join(checkpoint, "global_step*", "*.pt"))):
        try:
            unexpected = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - _DEEPSPEED_GLOBALS
        except Exception as err:
            raise CheckpointError(
                f"{path} cannot be read as a DeepSpeed checkpoint file ({type(err).__name__}: {_first_line(err)})."
            ) from None
        if unexpected:
            raise CheckpointError(
                f"Refusing to resume from {path}: DeepSpeed would unpickle it, and it references "
                f"{', '.join(sorted(unexpected))}, which DeepSpeed's own checkpoints never do."
            )


def load_weights(checkpoint: str, model, accelerator, is_fsdp_enabled: bool):
    """Load a checkpoint's weights into `model`, as Trainer finds them (FSDP shards, safetensors, weights_only
    .bin, a sharded index, PEFT adapters). Returns the load result (missing / unexpected keys), or None.

    looptrain: a checkpoint of another model is a `CheckpointError`, not a partial load with a warning.
    """
    is_fsdp_checkpoint = os.path.isdir(checkpoint) and (
        any(FSDP_MODEL_NAME in name for name in os.listdir(checkpoint) if os.path.isdir(os.path.join(checkpoint, name)))
        or os.path.isfile(os.path.join(checkpoint, f"{FSDP_MODEL_NAME}.bin"))
    )
    if is_fsdp_checkpoint and not is_fsdp_enabled:
        raise CheckpointError(
            f"{checkpoint} holds FSDP-sharded weights: resume it under FSDP (accelerate launch with an FSDP config)."
        )
    if is_fsdp_enabled:
        from accelerate.utils import load_fsdp_model
        from transformers.distributed.fsdp import get_fsdp_ckpt_kwargs

        return load_fsdp_model(accelerator.state.fsdp_plugin, accelerator, model, checkpoint, **get_fsdp_ckpt_kwargs())
    config = getattr(model, "config", None)
    config_path = os.path.join(checkpoint, CONFIG_NAME)
    saved_config = read_json(config_path) if os.path.isfile(config_path) else None
    if (
        config is not None
        and saved_config is not None
        and saved_config.get("model_type") not in (None, getattr(config, "model_type", None))
    ):
        raise CheckpointError(
            f"{checkpoint} is a checkpoint of a {saved_config.get('model_type')!r} model, and this model is a "
            f"{config.model_type!r} ({type(model).__name__})."
        )
    safe, bin_ = os.path.join(checkpoint, SAFE_WEIGHTS_NAME), os.path.join(checkpoint, WEIGHTS_NAME)
    if os.path.isfile(safe) or os.path.isfile(bin_):
        if os.path.isfile(safe):
            import safetensors.torch

            try:
                state_dict = safetensors.torch.load_file(safe, device="cpu")
            except Exception as err:  # safetensors never unpickles: a pickle here is just an unreadable header
                raise CheckpointError(
                    f"{safe} cannot be read as safetensors ({type(err).__name__}: {_first_line(err)}); the file is "
                    "truncated or corrupted."
                ) from None
        else:
            state_dict = safe_torch_load(bin_)
        _check_same_model(checkpoint, model, state_dict)
        return model.load_state_dict(state_dict, strict=False)
    if _is_peft_model(model):
        return _load_adapters(checkpoint, model)
    if os.path.isfile(os.path.join(checkpoint, SAFE_WEIGHTS_INDEX_NAME)) or os.path.isfile(
        os.path.join(checkpoint, WEIGHTS_INDEX_NAME)
    ):
        from transformers.trainer_utils import load_sharded_checkpoint

        result = load_sharded_checkpoint(model, checkpoint, strict=False)
        unexpected = list(result.unexpected_keys)
        missing = [k for k in result.missing_keys if not _is_tied(model, k)]
        if missing or unexpected:
            raise CheckpointError(
                f"{checkpoint} is a checkpoint of a different model ({type(model).__name__} here): {len(missing)} "
                f"missing tensors {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}."
            )
        return result
    raise CheckpointError(
        f"{checkpoint} holds no model weights ({SAFE_WEIGHTS_NAME}, {WEIGHTS_NAME}, a sharded index, adapter files or "
        "FSDP shards)."
    )


def _check_same_model(checkpoint: str, model, state_dict: dict) -> None:
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


def _load_adapters(checkpoint: str, model):
    """Trainer: a PEFT model resumes its adapter(s): the default one at the top, others in subfolders."""
    from torch.nn.modules.module import _IncompatibleKeys

    has_adapter = lambda folder: any(  # noqa: E731
        os.path.isfile(os.path.join(folder, n)) for n in (ADAPTER_WEIGHTS_NAME, ADAPTER_SAFE_WEIGHTS_NAME)
    )
    subdirs = [
        n
        for n in os.listdir(checkpoint)
        if os.path.isdir(os.path.join(checkpoint, n)) and has_adapter(os.path.join(checkpoint, n))
    ]
    if not (has_adapter(checkpoint) or subdirs):
        raise CheckpointError(f"{checkpoint} holds no adapter weights for this PEFT model.")
    active = model.active_adapters[0]
    if len(model.active_adapters) > 1:
        logger.warning("Several active adapters: only the first one is resumed.")
    if subdirs:
        if has_adapter(checkpoint):
            model.load_adapter(checkpoint, "default", is_trainable=(active == "default"))
        for name in subdirs:
            model.load_adapter(os.path.join(checkpoint, name), name, is_trainable=(name == active))
        model.set_adapter(active)
    else:
        model.load_adapter(checkpoint, active, is_trainable=True)
    return _IncompatibleKeys([], [])


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
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist.") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not valid JSON ({type(err).__name__}: {_first_line(err)}): the file is truncated, "
            "corrupted, or not what its name says (a pickle, for instance; it was not unpickled)."
        ) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object.")
    return value


# ====================================================================================== files on the disk
# One writer per file of a checkpoint: the model files (`_save`), `training_args.json`, `trainer_state.json`,
# `looptrain_state.json` (here), `optimizer.pt` / `scheduler.pt` (`_save_optimizer_and_scheduler`), `scaler.pt`
# (`_save_scaler`), `rng_state*.pth` (`_save_rng_state`). hub.py and search.py write through them too.
def write_training_args(args, folder: str) -> None:
    """`training_args.json` (looptrain: JSON, not Trainer's pickled `training_args.bin`): `to_json_string()` with
    paths written as text (HfArgumentParser makes `--generation_config DIR` a pathlib.Path, which json cannot encode)."""
    with open(os.path.join(folder, TRAINING_ARGS_NAME), "w") as f:
        f.write(json.dumps(args.to_dict(), indent=2, default=str))


def write_trainer_state(state: TrainerState, folder: str) -> None:
    """`trainer_state.json`, Trainer's format (`TrainerState.save_to_json`)."""
    state.save_to_json(os.path.join(folder, TRAINER_STATE_NAME))


def write_loop_state(loop_state: dict, folder: str) -> None:
    """`looptrain_state.json`: the loop's running state (`LoopState.to_json`)."""
    with open(os.path.join(folder, LOOP_STATE_NAME), "w") as f:
        json.dump(loop_state, f, indent=2)


def rotate_checkpoints(run_dir: str, save_total_limit: int | None, best_model_checkpoint: str | None) -> None:
    """Trainer's rotation (`trainer_utils.rotate_checkpoints`): keep the newest and the best, delete the oldest
    others until `save_total_limit` remain. looptrain: each deletion is a rename first, so a crash never leaves
    a half-deleted `checkpoint-<N>/`."""
    if save_total_limit is None or save_total_limit <= 0:
        return
    checkpoints = sort_checkpoints(run_dir, PREFIX_CHECKPOINT_DIR, use_mtime=True)
    if len(checkpoints) <= save_total_limit:
        return
    protected = {checkpoints[-1]}
    if best_model_checkpoint is not None:
        protected.add(os.path.normpath(best_model_checkpoint))
    remaining = len(checkpoints)
    for checkpoint in checkpoints:
        if remaining <= max(save_total_limit, len(protected)):
            break
        if os.path.normpath(checkpoint) not in protected:
            _remove_checkpoint(checkpoint)
            remaining -= 1


def _publish(staging_dir: str, final_dir: str) -> None:
    """Make a complete checkpoint visible under its name: its bytes reach the disk before the rename does."""
    _fsync_tree(staging_dir)
    if os.path.exists(final_dir):  # the same step saved again: set the old one aside, then replace it
        _remove_checkpoint(final_dir)
    os.replace(staging_dir, final_dir)
    _fsync_path(os.path.dirname(os.path.abspath(final_dir)))


def _remove_checkpoint(path: str) -> None:
    """Rename aside, then delete: the `checkpoint-<N>` name disappears in one step."""
    parent, name = os.path.split(os.path.normpath(path))
    doomed = os.path.join(parent, f"{TMP_PREFIX}delete-{name}")
    if os.path.exists(doomed):
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


_STAGING = re.compile(rf"^{re.escape(TMP_PREFIX)}(delete-)?{PREFIX_CHECKPOINT_DIR}-\d+$")


def remove_debris(output_dir: str) -> list[str]:
    """Delete the staging folders of saves or deletions that a crash or a kill interrupted (`.tmp-checkpoint-<N>`,
    `.tmp-delete-checkpoint-<N>`): looptrain's own names only, real folders only (never a link, never a complete
    `checkpoint-<N>`). Returns the names removed."""
    removed = []
    if not os.path.isdir(output_dir):
        return removed
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if _STAGING.match(name) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def _fsync_tree(path: str) -> None:
    """Flush every file of a checkpoint, then its folders, before the rename makes it visible."""
    for root, _, files in os.walk(path):
        for name in files:
            _fsync_path(os.path.join(root, name))
        _fsync_path(root)


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


# ============================================================================================== small helpers
@contextlib.contextmanager
def _caught_warnings():
    """Trainer: torch's scheduler-saving warnings are re-issued once, not per save (`reissue_pt_warnings`)."""
    with warnings.catch_warnings(record=True) as caught:
        yield
    reissue_pt_warnings(caught)


def _accepts_exclude_frozen(engine) -> bool:
    """Whether this DeepSpeed version's `save_checkpoint` can leave out frozen parameters (Trainer asks the same)."""
    import inspect

    return "exclude_frozen_parameters" in inspect.signature(engine.save_checkpoint).parameters


def _peft_model_classes() -> tuple:
    try:
        from peft import PeftModel
    except ImportError:
        return ()
    return (PeftModel,)


def _as_python_rng_state(state):
    """`random.setstate` wants (version, tuple of 625 ints, gauss); a loaded state may hold lists."""
    if isinstance(state, (list, tuple)) and len(state) == 3 and isinstance(state[1], (list, tuple)):
        return (state[0], tuple(state[1]), state[2])
    return state


def _is_tied(model, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = tied.keys() if isinstance(tied, dict) else tied
    return any(re.fullmatch(k, key) or k == key for k in keys)


def _first_line(err: BaseException) -> str:
    text = str(err)
    return text.splitlines()[0] if text else ""
