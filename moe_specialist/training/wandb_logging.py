"""Weights & Biases run identity and summary (rank 0 only).

transformers' ``WandbCallback`` would otherwise create the run itself with only ``WANDB_PROJECT``, ``run_name`` and
the ``TrainingArguments`` as config: no entity, group, job type or tags, and no pruning ratio in the config. So the
pipeline calls :func:`init_wandb_training` before the Trainer exists; the callback then reuses that run. Scalars
still go through ``trainer.log`` (the callback's ``train/global_step`` axis); the run summary gets the pruning
report and the final scores (:func:`update_wandb_summary`).

Without credentials (no ``WANDB_API_KEY``, no ``~/.netrc`` entry) and without ``WANDB_MODE``, the run is written
offline under ``<output_dir>/wandb/`` (``wandb sync`` uploads it later) instead of failing or prompting.
"""

from __future__ import annotations

import logging
import netrc
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from accelerate import PartialState

logger = logging.getLogger(__name__)


def wandb_requested(training_args) -> bool:
    return "wandb" in (training_args.report_to or [])


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


SECRET_FLAG = re.compile(r"^--?[\w.-]*(token|api_key|password|secret)[\w.-]*$", re.IGNORECASE)


def redact_secrets(argv: list[str]) -> list[str]:
    """``argv`` with the values of secret flags (``--hub_token X``, ``--hub_token=X``) replaced by ``***``."""
    redacted, hide_next = [], False
    for arg in argv:
        flag, equals, _ = arg.partition("=")
        if hide_next:
            redacted.append("***")
        elif equals and SECRET_FLAG.match(flag):
            arg = f"{flag}=***"
            redacted.append(arg)
        else:
            redacted.append(arg)
        hide_next = not hide_next and not equals and bool(SECRET_FLAG.match(arg))
    return redacted


@contextmanager
def _secrets_hidden_from_argv():
    """W&B records ``sys.argv`` in the run's metadata: a ``--hub_token`` there would be uploaded verbatim."""
    saved = sys.argv
    sys.argv = redact_secrets(saved)
    try:
        yield
    finally:
        sys.argv = saved


def start_wandb_run(training_args, *, name: str, job_type: str, group: str | None, config: dict, directory):
    """A W&B run on rank 0 (None elsewhere, or when ``report_to`` lacks wandb), offline without credentials."""
    if not wandb_requested(training_args) or not PartialState().is_main_process:
        return None
    import wandb

    directory = Path(directory)
    if not os.environ.get("WANDB_MODE") and not _has_credentials():
        logger.warning("No W&B credentials: logging offline under %s/wandb (upload with `wandb sync`).", directory)
        os.environ["WANDB_MODE"] = "offline"
    directory.mkdir(parents=True, exist_ok=True)
    with _secrets_hidden_from_argv():
        run = wandb.init(
            entity=training_args.wandb_entity,
            project=training_args.wandb_project,
            group=group,
            job_type=job_type,
            name=name,
            tags=training_args.wandb_tags,
            config=config,
            dir=str(directory),
            reinit="finish_previous",
        )
    logger.info("W&B run %s (%s) in %s", run.name, run.id, run.dir)
    return run


def init_wandb_training(training_args, config: dict):
    """The run of a training job: the recipe's entity, project, group, job type and tags, the whole recipe as config.

    Its name is ``run_name``, else the name of ``output_dir`` (unique per ratio when the output directories are).
    """
    return start_wandb_run(
        training_args,
        name=training_args.run_name or Path(training_args.output_dir).name,
        job_type=training_args.wandb_job_type,
        group=training_args.wandb_run_group,
        config=config,
        directory=training_args.output_dir,
    )


def update_wandb_summary(summary: dict) -> None:
    """Add ``summary`` to the active run's summary (rank 0; a no-op without a run)."""
    if not PartialState().is_main_process:
        return
    import wandb

    if wandb.run is not None:
        wandb.run.summary.update(summary)


def finish_wandb(exit_code: int | None = None) -> None:
    """Close the active run (rank 0); ``exit_code=1`` marks it failed."""
    if not PartialState().is_main_process:
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def shut_down_wandb() -> None:
    """Stop W&B's service process before the program exits (rank 0): its records are written once it has shut down,
    whereas an exit right after ``finish`` sometimes left an offline run file with only its header."""
    if not PartialState().is_main_process:
        return
    import wandb

    wandb.teardown()


SUMMARY_METRICS = ("chrf++", "bleu", "off_target_rate", "chrf++_signature", "bleu_signature")


def score_summary(prefix: str, directions: dict[str, dict], average: dict) -> dict:
    """``{prefix}/{direction or avg}/{metric}`` for a W&B summary: the same columns for every run and sweep point."""
    return {
        f"{prefix}/{name}/{metric}": value
        for name, values in [*directions.items(), ("avg", average)]
        for metric, value in values.items()
        if metric in SUMMARY_METRICS
    }
