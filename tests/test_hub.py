"""The Hub: `push_to_hub` and every `hub_*` argument, against a local fake of the Hub's API (tests/fake_hub.py).

Parity: `transformers.Trainer` and `looptrain.Trainer` train the same tiny model in this test run against the
fake, and what each sent is compared: repositories created (name, visibility, token), then every commit (branch,
message, token, the files and their bytes). looptrain's files differ from Trainer's in two ways, by design, and
only those: its arguments are `training_args.json` where Trainer pickles `training_args.bin` (the two hold the
same values), and its checkpoints hold one more file, `looptrain_state.json`.

Uploads run in the background while training goes on; a callback waits for each after its save, so that what is
uploaded does not depend on timing (a slow Hub is tested on its own, with `hub_always_push`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket

import pytest
import torch
import transformers
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError

import looptrain
from fake_hub import USER, FakeHub
from helpers import make_args, random_token_dataset, strip_timing, tiny_bert, wordpiece_tokenizer

TRAIN, EVAL = random_token_dataset(16, 1), random_token_dataset(8, 2)
LIBS = {
    "hf": (transformers.Trainer, transformers.TrainingArguments),
    "lt": (looptrain.Trainer, looptrain.TrainingArguments),
}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake Hub on 127.0.0.1, and huggingface_hub pointed at it (online, with a token in HF_TOKEN)."""
    import transformers.utils.hub as transformers_hub

    fake = FakeHub().start()
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # tests/conftest.py sets HF_HUB_OFFLINE=1
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setenv("HF_TOKEN", "hf_env_token")
    monkeypatch.setattr(transformers_hub, "_hf_api", None)  # transformers keeps one HfApi, bound to an endpoint
    yield fake
    fake.stop()


class WaitForUploads(transformers.TrainerCallback):
    """After each save, wait for the uploads it started (Trainer's `on_save` comes after `_push_from_checkpoint`)."""

    trainer = None

    def on_save(self, args, state, control, **kwargs):
        if self.trainer.push_in_progress is not None:
            self.trainer.push_in_progress.wait_until_done()


def make_trainer(lib, tmp_path, callbacks=(), model=None, **overrides):
    trainer_cls, args_cls = LIBS[lib]
    args = dict(per_device_train_batch_size=8, max_steps=2, save_steps=1, logging_steps=1, seed=3, push_to_hub=True)
    args.update(overrides)
    targs = make_args(args_cls, tmp_path / lib / "model", **args)
    return trainer_cls(
        model=model if model is not None else tiny_bert(),
        args=targs,
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        processing_class=wordpiece_tokenizer(),
        callbacks=list(callbacks),
    )


def train_and_push(lib, hub, tmp_path, **overrides):
    """Train with uploads waited for, then `push_to_hub()`; return what the fake Hub received."""
    wait = WaitForUploads()
    trainer = make_trainer(lib, tmp_path, callbacks=[wait], **overrides)
    wait.trainer = trainer
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
        trainer.push_to_hub()
    return hub.take()


def summary(events):
    """Events as comparable tuples: creations, then commits with their sorted file names."""
    out = []
    for kind, e in events:
        if kind == "create_repo":
            out.append(("create_repo", e["repo_id"], e["private"], e["token"], e["existed"]))
        else:
            out.append(("commit", e.repo_id, e.revision, e.message, e.token, sorted(e.files), e.deleted))
    return out


def as_trainer_names(names):
    """looptrain's file names as Trainer would have them: `training_args.json` -> `.bin`, no `looptrain_state.json`."""
    return sorted(
        n.replace("training_args.json", "training_args.bin") for n in names if not n.endswith("looptrain_state.json")
    )


def assert_same_uploads(hf_events, lt_events, tmp_path):
    """Same creations and commits; same bytes in every file, but for the two designed differences."""
    hf, lt = summary(hf_events), summary(lt_events)
    assert [e[:5] for e in hf] == [e[:5] for e in lt]  # kinds, repositories, branches, messages, tokens
    hf_commits = [e for kind, e in hf_events if kind == "commit"]
    lt_commits = [e for kind, e in lt_events if kind == "commit"]
    for a, b in zip(hf_commits, lt_commits):
        assert a.deleted == b.deleted == []
        assert as_trainer_names(b.files) == sorted(a.files), a.message
        # looptrain_state.json: exactly in the checkpoint folders Trainer uploads trainer_state.json from
        checkpoint_folders = sorted(n.rsplit("/", 1)[0] for n in a.files if n.endswith("/trainer_state.json"))
        assert sorted(n.rsplit("/", 1)[0] for n in b.files if n.endswith("looptrain_state.json")) == checkpoint_folders
        for name, content in a.files.items():
            if name.endswith("training_args.bin"):
                hf_args = torch.load(io.BytesIO(content), weights_only=False).to_json_string()
                hf_args = hf_args.replace(str(tmp_path / "hf"), str(tmp_path / "lt"))
                lt_args = b.files[name.replace(".bin", ".json")].decode()
                assert json.loads(lt_args) == json.loads(hf_args), name
            elif name.endswith("trainer_state.json"):
                hf_state, lt_state = json.loads(content), json.loads(b.files[name])
                hf_state["log_history"] = strip_timing(hf_state["log_history"])
                lt_state["log_history"] = strip_timing(lt_state["log_history"])
                assert lt_state == hf_state, name
            else:  # weights (bit-exact training), optimizer, scheduler, RNG states, tokenizer, config, model card
                assert b.files[name] == content, f"{a.message}: {name}"


# (hub_strategy, arguments, repository the fake holds before the run, expected commit messages)
STEP = "Training in progress, step"
CASES = [
    pytest.param(
        "end", dict(eval_strategy="steps", eval_steps=1), None, ["End of training"], id="end_with_eval_results"
    ),
    pytest.param(
        "every_save",
        dict(hub_model_id="my-org/tiny-bert", hub_private_repo=True, hub_token="hf_arg_token"),
        None,
        [f"{STEP} 1", f"{STEP} 2", "End of training"],
        id="every_save_model_id_private_token",
    ),
    pytest.param(
        "checkpoint",
        dict(hub_revision="dev"),
        f"{USER}/model",
        [f"{STEP} 1", f"{STEP} 1, checkpoint", f"{STEP} 2", f"{STEP} 2, checkpoint", "End of training"],
        id="checkpoint_on_a_branch",
    ),
    pytest.param(
        "all_checkpoints",
        dict(save_strategy="epoch", max_steps=-1, num_train_epochs=2),
        None,
        [
            "Training in progress, epoch 1",
            "Training in progress, epoch 1, checkpoint",
            "Training in progress, epoch 2",
            "Training in progress, epoch 2, checkpoint",
            "End of training",
        ],
        id="all_checkpoints_per_epoch",
    ),
]


@pytest.mark.parametrize("strategy, overrides, existing, messages", CASES)
def test_uploads_match_trainer(hub, tmp_path, strategy, overrides, existing, messages):
    runs = {}
    for lib in LIBS:
        if existing:  # the branch must exist before a push to it, as on the Hub
            hub.create_repo(existing)
            hub.create_branch(existing, overrides["hub_revision"])
        runs[lib] = train_and_push(lib, hub, tmp_path, hub_strategy=strategy, **overrides)
    hf = summary(runs["hf"])
    # What Trainer sent (the specification), then looptrain against it.
    repo_id = overrides.get("hub_model_id", f"{USER}/model")
    token = overrides.get("hub_token", "hf_env_token")
    assert hf[0] == ("create_repo", repo_id, overrides.get("hub_private_repo", False), token, existing is not None)
    assert [e[3] for e in hf[1:]] == messages
    assert {(e[1], e[2], e[4]) for e in hf[1:]} == {(repo_id, overrides.get("hub_revision", "main"), token)}
    if strategy in ("checkpoint", "all_checkpoints"):
        folders = [{n.split("/")[0] for n in e[5]} for e in hf[1:] if e[3].endswith("checkpoint")]
        expected = [{"last-checkpoint"}] * 2 if strategy == "checkpoint" else [{"checkpoint-2"}, {"checkpoint-4"}]
        assert folders == expected
    assert "README.md" in hf[-1][5]
    assert_same_uploads(runs["hf"], runs["lt"], tmp_path)


@pytest.mark.parametrize("always_push", [False, True])
def test_a_slow_upload_skips_the_next_unless_hub_always_push(hub, tmp_path, always_push):
    """While the first upload is held by the Hub, the second save uploads only with `hub_always_push`."""

    class ReleaseAtTrainEnd(transformers.TrainerCallback):
        pushes = 0

        def on_push_begin(self, args, state, control, **kwargs):
            self.pushes += 1

        def on_train_end(self, args, state, control, **kwargs):
            hub.release_uploads()  # Trainer waits for the uploads right after on_train_end

    seen = {}
    for lib in LIBS:
        counter = ReleaseAtTrainEnd()
        trainer = make_trainer(lib, tmp_path, callbacks=[counter], hub_always_push=always_push)
        hub.hold_uploads()
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
        requests = [r for r in hub.requests if r[1] != "/api/repos/create"]
        hub.requests.clear()
        seen[lib] = (counter.pushes, [e[3] for e in summary(hub.take())[1:]], requests)
    assert seen["hf"][0] == (2 if always_push else 1)
    assert seen["hf"][1] == [f"{STEP} 1"]  # (with hub_always_push the second upload finds nothing new to commit)
    assert seen["lt"] == seen["hf"]


def test_push_to_hub_called_directly(hub, tmp_path):
    """`push_to_hub()` without push_to_hub=True: it creates the repository; its arguments reach the Hub and the card;
    `blocking=False` returns a future."""
    runs = {}
    for lib in LIBS:
        model = tiny_bert()
        model.add_model_tags(["tiny"])  # Trainer: the model's own tags join the card's
        trainer = make_trainer(lib, tmp_path, model=model, push_to_hub=False, hub_model_id="direct")
        assert trainer.hub_model_id is None and not hub.events
        info = trainer.push_to_hub(
            "First version",
            token="hf_call_token",
            private=True,
            model_name="my-model",
            language="en",
            license="mit",
            tags=["demo"],
            finetuned_from="some/base",
            tasks="text-classification",
            dataset="my-data",
        )
        assert info.commit_message == "First version" and trainer.hub_model_id == f"{USER}/direct"
        with open(tmp_path / lib / "model" / "README.md", "w") as f:
            f.write("---\ntags:\n- kept\n---\n")  # an edited card: its tags are kept
        future = trainer.push_to_hub("Second version", blocking=False, tags="again")
        assert future.result().commit_message == "Second version"
        runs[lib] = hub.take()
    hf = summary(runs["hf"])
    assert hf[0] == ("create_repo", f"{USER}/direct", True, "hf_call_token", False)
    assert [e[3:5] for e in hf[1:]] == [("First version", "hf_call_token"), ("Second version", "hf_env_token")]
    card = [e for k, e in runs["hf"] if k == "commit"][1].files["README.md"].decode()
    assert "- again" in card and "- kept" in card and "- tiny" in card
    assert_same_uploads(runs["hf"], runs["lt"], tmp_path)


def test_save_model_uploads_with_push_to_hub(hub, tmp_path):
    runs = {}
    for lib in LIBS:
        trainer = make_trainer(lib, tmp_path, hub_revision="v1")
        hub.create_branch(f"{USER}/model", "v1")
        trainer.save_model()  # a user's save_model() pushes: "Model save", to hub_revision
        trainer.save_model(str(tmp_path / lib / "elsewhere"))  # Trainer: any output folder, still uploads output_dir
        runs[lib] = hub.take()
    hf = summary(runs["hf"])
    assert [e[2:4] for e in hf[1:]] == [("v1", "Model save")]  # the second found nothing new to commit
    assert_same_uploads(runs["hf"], runs["lt"], tmp_path)


def test_a_checkpoint_being_written_is_not_uploaded(hub, tmp_path):
    """looptrain writes a checkpoint into `.tmp-checkpoint-N` before renaming it (checkpoint.py); an upload of
    output_dir that runs meanwhile (they run in the background) leaves it out, as Trainer leaves `checkpoint-*` out."""
    trainer = make_trainer("lt", tmp_path)
    staging = tmp_path / "lt" / "model" / ".tmp-checkpoint-3"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"half written")
    trainer.push_to_hub()
    (commit,) = hub.commits()
    assert commit.files and not [name for name in commit.files if ".tmp-" in name]


def test_create_model_card_called_directly(tmp_path):
    """No Hub needed: the card written into output_dir is Trainer's, byte for byte (existing tags kept)."""
    cards = {}
    for lib in LIBS:
        trainer = make_trainer(lib, tmp_path, push_to_hub=False, max_steps=1)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
        trainer.create_model_card(model_name="card", language="fr", tags=["first"], dataset_tags="d", dataset="d")
        trainer.create_model_card(model_name="card", tags="second", finetuned_from="base/model")
        cards[lib] = (tmp_path / lib / "model" / "README.md").read_text()
    assert "- first" in cards["hf"] and "- second" in cards["hf"] and "base/model" in cards["hf"]
    assert cards["lt"] == cards["hf"]


# ----------------------------------------------------------------------------------------- the Hub out of reach
def one_line_error(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message and exc_info.value.__cause__ is None
    return message


def test_offline_mode_fails_at_once_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError):  # Trainer: huggingface_hub's OfflineModeIsEnabled
        make_trainer("hf", tmp_path)
    with pytest.raises(ConnectionError) as error:
        make_trainer("lt", tmp_path)
    message = one_line_error(error)
    assert message.startswith("push_to_hub=True (creating the repository model) needs the Hugging Face Hub")
    assert "HF_HUB_OFFLINE" in message and "set push_to_hub=False" in message
    assert not (tmp_path / "lt" / "model").exists()  # nothing written before it fails


def test_unreachable_hub_fails_at_once_with_one_line(monkeypatch, tmp_path):
    import transformers.utils.hub as transformers_hub

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers_hub, "_hf_api", None)
    with pytest.raises(Exception, match="Connection refused"):  # Trainer: the HTTP library's ConnectError
        make_trainer("hf", tmp_path)
    with pytest.raises(ConnectionError) as error:
        make_trainer("lt", tmp_path)
    message = one_line_error(error)
    assert f"cannot be reached at {url}" in message and "set push_to_hub=False" in message


def test_refused_credentials_fail_with_one_line(hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HfHubHTTPError, match="401"):
        make_trainer("hf", tmp_path)
    with pytest.raises(PermissionError) as error:
        make_trainer("lt", tmp_path)
    message = one_line_error(error)
    assert "refused the credentials (HTTP 401)" in message and "hub_token=" in message


def test_a_failed_background_upload_is_logged(hub, tmp_path, caplog):
    """Trainer drops a background upload's error; looptrain logs it (here: a branch that does not exist)."""
    trainer = make_trainer("lt", tmp_path, hub_revision="no-such-branch")
    with caplog.at_level(logging.WARNING, logger="looptrain.hub"), contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    failures = [r.getMessage() for r in caplog.records if "upload to the Hub" in r.getMessage()]
    assert failures and all("RevisionNotFoundError" in m for m in failures)
    assert not hub.commits()


def test_a_path_valued_argument_is_uploaded_like_a_checkpoint_writes_it(hub, tmp_path):
    """training_args.json has one writer (checkpoint.write_training_args): the copy uploaded with the model is the
    checkpoint's, byte for byte, also with a pathlib.Path argument (HfArgumentParser makes `--generation_config DIR`
    one), which `to_json_string()` cannot encode."""
    import pathlib

    generation_dir = tmp_path / "generation"
    transformers.GenerationConfig(max_length=7).save_pretrained(generation_dir)
    args = make_args(
        looptrain.Seq2SeqTrainingArguments,
        tmp_path / "lt" / "model",
        per_device_train_batch_size=8,
        max_steps=1,
        save_steps=1,
        push_to_hub=True,
        generation_config=pathlib.Path(generation_dir),
    )
    wait = WaitForUploads()
    trainer = looptrain.Trainer(tiny_bert(), args, train_dataset=TRAIN, callbacks=[wait])
    wait.trainer = trainer
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    uploaded = [e for kind, e in hub.take() if kind == "commit"][0].files["training_args.json"]
    checkpoint = (tmp_path / "lt" / "model" / "checkpoint-1" / "training_args.json").read_bytes()
    assert uploaded == checkpoint
    assert json.loads(uploaded)["generation_config"] == str(generation_dir)
