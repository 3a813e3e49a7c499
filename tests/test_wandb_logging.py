"""W&B runs never carry secrets: the command line W&B records in a run's metadata is redacted. The tests read
offline run files record by record, across the 32 KiB blocks that split their raw bytes."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from moe_specialist.training.wandb_logging import redact_secrets, start_wandb_run
from tests.helpers import LOG_BLOCK, wandb_record, wandb_records


def test_secret_flags_are_redacted_in_both_spellings():
    argv = ["--hub_token", "hf_a", "--wandb_api_key=k", "--model", "demo", "--token", "--learning_rate", "1e-3"]
    assert redact_secrets(argv) == [
        "--hub_token", "***", "--wandb_api_key=***", "--model", "demo", "--token", "***", "1e-3",
    ]  # fmt: skip


def test_the_hub_token_does_not_reach_the_wandb_run(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(sys, "argv", ["train.py", "--hub_token", "hf_SECRETVALUE", "--hub_token=hf_OTHERSECRET"])
    args = SimpleNamespace(report_to=["wandb"], wandb_entity=None, wandb_project="p", wandb_tags=None)
    run = start_wandb_run(args, name="n", job_type="j", group=None, config={}, directory=tmp_path)
    assert run is not None and sys.argv[2] == "hf_SECRETVALUE"  # the process's own argv is left as it was
    wandb.finish()
    wandb.teardown()  # the service has written everything once it has shut down
    (record,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    data = wandb_record(record, b"--hub_token", b"***")
    assert b"--hub_token" in data and b"***" in data
    assert b"SECRETVALUE" not in data and b"OTHERSECRET" not in data


def test_a_record_that_crosses_blocks_is_read_whole(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    value = "verse" * (LOG_BLOCK // 2)  # 80 KiB: the summary record crosses at least two block boundaries
    wandb.init(project="p", dir=str(tmp_path))
    wandb.run.summary.update({"pruning/long_value": value})
    wandb.finish()
    wandb.teardown()
    (record,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    assert value.encode() not in record.read_bytes()  # the raw bytes hold fragment headers inside it
    assert value.encode() in wandb_records(record)


@pytest.fixture(autouse=True)
def _no_leftover_run():
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()
