"""The Hugging Face Hub: `push_to_hub`, `create_model_card`, and uploads during training (`hub_strategy`).

transformers.Trainer's behaviour, through `huggingface_hub`: the repository is created when the Trainer is
(`init_hf_repo`, with `push_to_hub=True`); every checkpoint save copies the model files into `output_dir` and
uploads it in the background (`_push_from_checkpoint`; with `hub_strategy` "checkpoint" or "all_checkpoints"
the checkpoint folder too), skipping a save while the previous upload runs unless `hub_always_push`;
`train()` waits for the last upload at its end (`_finish_current_push`); `push_to_hub()` saves the model,
writes the model card and uploads `output_dir`.
"""

from __future__ import annotations

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

logger = logging.get_logger(__name__)


def _hf_api():
    from transformers.utils import hf_api

    return hf_api()


class HubMixin:
    """Trainer's Hub methods; mixed into `looptrain.Trainer`."""

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create (or reuse) the repository `hub_model_id` (default: the output folder's name); main process only."""
        if not self.is_world_process_zero():
            return
        repo_name = self.args.hub_model_id if self.args.hub_model_id is not None else Path(self.args.output_dir).absolute().name
        token = token if token is not None else self.args.hub_token
        private = private if private is not None else self.args.hub_private_repo
        repo_url = _hf_api().create_repo(repo_name, token=token, private=private, exist_ok=True)
        self.hub_model_id = repo_url.repo_id
        self.push_in_progress = None

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None) -> None:
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
            if tags is not None and existing.tags is not None:  # Trainer: keep the card's tags
                tags = [tags] if isinstance(tags, str) else tags
                tags += [tag for tag in existing.tags if tag not in tags]
        summary = TrainingSummary.from_trainer(
            self, language=language, license=license, tags=tags, model_name=model_name, finetuned_from=finetuned_from,
            tasks=tasks, dataset_tags=dataset_tags, dataset=dataset, dataset_args=dataset_args,
        )
        with open(path, "w", encoding="utf-8") as f:
            f.write(summary.to_model_card())
        if is_peft_library:
            self.accelerator.unwrap_model(self.model).create_or_update_model_card(self.args.output_dir)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, token: str | None = None,
                    revision: str | None = None, private: bool | None = None, **kwargs):
        """Save the model, write the model card, upload `output_dir` (not its checkpoints) to `hub_model_id`."""
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        model_name = kwargs.pop("model_name", None)
        if model_name is None and self.args.should_save:
            model_name = Path(self.args.output_dir).name if self.args.hub_model_id is None else self.args.hub_model_id.split("/")[-1]
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
        return _hf_api().upload_folder(
            repo_id=self.hub_model_id,
            folder_path=self.args.output_dir,
            commit_message=commit_message,
            token=token,
            run_as_future=not blocking,
            ignore_patterns=["_*", f"{PREFIX_CHECKPOINT_DIR}-*"],
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
        with open(os.path.join(output_dir, "training_args.json"), "w") as f:
            f.write(self.args.to_json_string())
        if self.args.save_strategy == SaveStrategy.STEPS:
            commit_message = f"Training in progress, step {self.state.global_step}"
        else:
            commit_message = f"Training in progress, epoch {int(self.state.epoch)}"
        jobs = [
            _hf_api().upload_folder(
                repo_id=self.hub_model_id, folder_path=output_dir, commit_message=commit_message, token=self.args.hub_token,
                run_as_future=True, ignore_patterns=["_*", f"{PREFIX_CHECKPOINT_DIR}-*"], revision=self.args.hub_revision,
            )
        ]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            path_in_repo = "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT else Path(checkpoint_folder).name
            jobs.append(
                _hf_api().upload_folder(
                    repo_id=self.hub_model_id, folder_path=checkpoint_folder, path_in_repo=path_in_repo,
                    commit_message=commit_message + ", checkpoint", token=self.args.hub_token, run_as_future=True,
                    revision=self.args.hub_revision,
                )
            )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    def _finish_current_push(self) -> None:
        """Wait for a background upload to finish (at the end of training, before another push)."""
        if getattr(self, "push_in_progress", None) is not None and not self.push_in_progress.is_done():
            logger.info("Waiting for the current checkpoint push to be finished, this might take a couple of minutes.")
            self.push_in_progress.wait_until_done()
