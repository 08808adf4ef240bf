"""The Hugging Face Hub: `push_to_hub`, `create_model_card`, and uploads during training (`hub_strategy`).

transformers.Trainer's behaviour, through `huggingface_hub`: the repository is created when the Trainer is
(`init_hf_repo`, with `push_to_hub=True`); every checkpoint save copies the model files into `output_dir` and
uploads it in the background (`_push_from_checkpoint`; with `hub_strategy` "checkpoint" or "all_checkpoints"
the checkpoint folder too), skipping a save while the previous upload runs unless `hub_always_push`;
`train()` waits for the last upload at its end (`_finish_current_push`); `push_to_hub()` saves the model,
writes the model card and uploads `output_dir`.

looptrain differs in three ways. When the Hub cannot be reached (offline mode, no connection) or refuses the
credentials, `Trainer(push_to_hub=True)` fails at once with one line that names the fix, where Trainer lets the
HTTP library's error through. A background upload that failed is logged when it is next looked at (Trainer
drops its error). Uploads of `output_dir` leave out the `.tmp-*` folders a checkpoint is written into before
it is renamed (checkpoint.py). The files uploaded are otherwise Trainer's, but for checkpoint.py's own:
`training_args.json` instead of `training_args.bin`, and `looptrain_state.json` in each checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, SaveStrategy
from transformers.utils import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    PushInProgress,
    logging,
)

from .checkpoint import TMP_PREFIX, write_training_args

logger = logging.get_logger(__name__)

# What an upload of `output_dir` leaves out: Trainer's patterns (private files, the checkpoints, uploaded on their
# own), and looptrain's staging folders (`.tmp-checkpoint-N` while a checkpoint is written, see checkpoint.py).
OUTPUT_DIR_IGNORE_PATTERNS = ["_*", f"{PREFIX_CHECKPOINT_DIR}-*", f"{TMP_PREFIX}*"]


def _hf_api():
    from transformers.utils import hf_api

    return hf_api()


@contextlib.contextmanager
def _explain_hub_errors(action: str, fix: str):
    """Turn "the Hub cannot be reached" and "the Hub refused the token" into one line that says what to do.

    `action` names what needed the Hub ("push_to_hub=True"), `fix` how to do without it ("set push_to_hub=False").
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        from httpx2 import TransportError  # huggingface_hub 2.x
    except ImportError:  # pragma: no cover - huggingface_hub 1.x
        from httpx import TransportError

    try:
        yield
    except OfflineModeIsEnabled:
        raise ConnectionError(
            f"{action} needs the Hugging Face Hub, and offline mode is on (HF_HUB_OFFLINE=1): {fix}, "
            "or unset HF_HUB_OFFLINE."
        ) from None
    except TransportError as e:  # no network, unknown host, connection refused, timeout
        raise ConnectionError(
            f"{action} needs the Hugging Face Hub, which cannot be reached at {constants.ENDPOINT} "
            f"({type(e).__name__}: {e}): {fix}, or check the network (and HF_ENDPOINT)."
        ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status not in (401, 403) or isinstance(e, RepositoryNotFoundError):  # that one says what to check
            raise
        raise PermissionError(
            f"{action}: the Hugging Face Hub at {constants.ENDPOINT} refused the credentials (HTTP {status}): {fix}, "
            "or log in with a token that can write (`hf auth login`, HF_TOKEN, or hub_token=)."
        ) from None


class HubMixin:
    """Trainer's Hub methods; mixed into `looptrain.Trainer`."""

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create (or reuse) the repository `hub_model_id` (default: the output folder's name); main process only."""
        if not self.is_world_process_zero():
            return
        repo_name = (
            self.args.hub_model_id if self.args.hub_model_id is not None else Path(self.args.output_dir).absolute().name
        )
        token = token if token is not None else self.args.hub_token
        private = private if private is not None else self.args.hub_private_repo
        if self.args.push_to_hub:
            action, fix = "push_to_hub=True", "set push_to_hub=False"
        else:
            action, fix = "push_to_hub()", "keep the model local (save_model())"
        with _explain_hub_errors(f"{action} (creating the repository {repo_name})", fix):
            repo_url = _hf_api().create_repo(repo_name, token=token, private=private, exist_ok=True)
        self.hub_model_id = repo_url.repo_id
        self.push_in_progress = None

    def create_model_card(
        self,
        language=None,
        license=None,
        tags=None,
        model_name=None,
        finetuned_from=None,
        tasks=None,
        dataset_tags=None,
        dataset=None,
        dataset_args=None,
    ) -> None:
        """Write `output_dir/README.md`: a model card from what the Trainer knows (transformers' `TrainingSummary`)."""
        from huggingface_hub import ModelCard
        from transformers.modelcard import TrainingSummary

        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        is_peft_library = False
        if os.path.exists(path):
            existing = ModelCard.load(path).data
            is_peft_library = existing.get("library_name") == "peft"
            if tags is not None and existing.tags is not None:  # Trainer: the card's own tags are kept
                tags = [tags] if isinstance(tags, str) else tags
                for tag in existing.tags:
                    if tag not in tags:
                        tags.append(tag)
        summary = TrainingSummary.from_trainer(
            self,
            language=language,
            license=license,
            tags=tags,
            model_name=model_name,
            finetuned_from=finetuned_from,
            tasks=tasks,
            dataset_tags=dataset_tags,
            dataset=dataset,
            dataset_args=dataset_args,
        )
        with open(path, "w", encoding="utf-8") as f:
            f.write(summary.to_model_card())
        if is_peft_library:
            self.accelerator.unwrap_model(self.model).create_or_update_model_card(self.args.output_dir)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Save the model, write the model card, upload `output_dir` (not its checkpoints) to `hub_model_id`."""
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        model_name = kwargs.pop("model_name", None)
        if model_name is None and self.args.should_save:
            model_name = (
                Path(self.args.output_dir).name
                if self.args.hub_model_id is None
                else self.args.hub_model_id.split("/")[-1]
            )
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:  # push_to_hub() called with push_to_hub=False in the arguments
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        if getattr(self.model, "model_tags", None) is not None:  # Trainer: the model's own tags join the card's
            tags = kwargs.get("tags") or []
            tags = [tags] if isinstance(tags, str) else list(tags)
            kwargs["tags"] = tags + [tag for tag in self.model.model_tags if tag not in tags]
        self.create_model_card(model_name=model_name, **kwargs)
        self._finish_current_push()
        with _explain_hub_errors(
            f"push_to_hub() (uploading to {self.hub_model_id})", "keep the model local (save_model())"
        ):
            return _hf_api().upload_folder(
                repo_id=self.hub_model_id,
                folder_path=self.args.output_dir,
                commit_message=commit_message,
                token=token,
                run_as_future=not blocking,
                ignore_patterns=OUTPUT_DIR_IGNORE_PATTERNS,
                revision=self.args.hub_revision if revision is None else revision,
            )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """After a checkpoint save: upload in the background, unless the previous upload still runs."""
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        output_dir = self.args.output_dir
        # Trainer: the model files are copied from the checkpoint rather than saved again.
        modeling_files = [CONFIG_NAME, GENERATION_CONFIG_NAME, WEIGHTS_NAME, SAFE_WEIGHTS_NAME]
        for index_file in (WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_INDEX_NAME):
            index_path = os.path.join(checkpoint_folder, index_file)
            if os.path.isfile(index_path):
                modeling_files.append(index_file)
                with open(index_path, encoding="utf-8") as f:
                    modeling_files.extend(set(json.load(f)["weight_map"].values()))
        modeling_files += [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, ADAPTER_SAFE_WEIGHTS_NAME]
        for name in modeling_files:
            if os.path.isfile(os.path.join(checkpoint_folder, name)):
                shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(output_dir, name))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        write_training_args(self.args, output_dir)  # looptrain: the one writer of training_args.json (checkpoint.py)
        if self.args.save_strategy == SaveStrategy.STEPS:
            commit_message = f"Training in progress, step {self.state.global_step}"
        else:
            commit_message = f"Training in progress, epoch {int(self.state.epoch)}"
        jobs = [
            _hf_api().upload_folder(
                repo_id=self.hub_model_id,
                folder_path=output_dir,
                commit_message=commit_message,
                token=self.args.hub_token,
                run_as_future=True,
                ignore_patterns=OUTPUT_DIR_IGNORE_PATTERNS,
                revision=self.args.hub_revision,
            )
        ]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            path_in_repo = (
                "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT else Path(checkpoint_folder).name
            )
            jobs.append(
                _hf_api().upload_folder(
                    repo_id=self.hub_model_id,
                    folder_path=checkpoint_folder,
                    path_in_repo=path_in_repo,
                    commit_message=commit_message + ", checkpoint",
                    token=self.args.hub_token,
                    run_as_future=True,
                    revision=self.args.hub_revision,
                )
            )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self._log_failed_pushes()
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    def _finish_current_push(self) -> None:
        """Wait for a background upload to finish (at the end of training, before another push)."""
        if self.push_in_progress is not None and not self.push_in_progress.is_done():
            logger.info("Waiting for the current checkpoint push to be finished, this might take a couple of minutes.")
            self.push_in_progress.wait_until_done()
        self._log_failed_pushes()

    def _log_failed_pushes(self) -> None:
        """looptrain: say which finished background uploads failed (Trainer drops their errors), once each."""
        push = self.push_in_progress
        if push is None:
            return
        for job in [job for job in push.jobs if job.done() and not job.cancelled() and job.exception() is not None]:
            error = job.exception()
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            logger.warning(f"An upload to the Hub ({self.hub_model_id}) failed: {type(error).__name__}: {first_line}")
            push.jobs.remove(job)
