"""Resuming a recovery SFT gives the run an uninterrupted SFT would have given, step by step.

Checkpoints hold the original per-expert key format while transformers keeps fused expert tensors in memory; the
Trainer's own resume loads them unconverted with ``strict=False``, which silently kept the freshly pruned experts
(a run resumed at step 2 diverged at step 3). Each test compares per-step losses and final tensors with a run that
was never interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe_specialist.errors import MissingInputError
from moe_specialist.prune import load_pruned_model
from moe_specialist.training import parse_recipe, run
from moe_specialist.training.setup import resolve_checkpoint
from tests.conftest import build_tiny_translator

TINY = Path(__file__).parent / "fixtures" / "recipes" / "tiny_prune_sft.yaml"
STEPS = ("--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--callbacks", "expert_pruning")


def arguments(model_dir: Path, output_dir: Path, *flags: str) -> list[str]:
    return ["--config", str(TINY), "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir), *flags]


def step_losses(output_dir: Path) -> dict[int, float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def assert_same_run(resumed: Path, reference: Path) -> None:
    expected = step_losses(reference)
    assert step_losses(resumed) == pytest.approx(expected, rel=1e-6, abs=0)
    ours, theirs = (load_pruned_model(d / "model").state_dict() for d in (resumed, reference))
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-7, msg=name)


def interrupt_after(output_dir: Path, step: int) -> None:
    """What a run killed right after saving ``checkpoint-<step>`` leaves behind."""
    for path in output_dir.iterdir():
        is_later = path.name.startswith("checkpoint-") and int(path.name.split("-")[1]) > step
        if is_later or path.name in ("model", "results.json", "trainer_state.json"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.fixture(scope="module")
def gpt_oss_translator(tmp_path_factory, demo_tokenizer) -> Path:
    return build_tiny_translator(tmp_path_factory.mktemp("gpt_oss") / "model", demo_tokenizer, "gpt_oss")


@pytest.mark.parametrize(
    "model, flags",
    [
        ("tiny_translator", ()),  # Qwen3-MoE: per-expert keys on disk, fused tensors in memory
        ("gpt_oss_translator", ()),  # GPT-OSS: fused on disk and in memory
        ("tiny_translator", ("--use_peft", "true", "--lora_target_modules", "all-linear", "--lora_dropout", "0")),
    ],
    ids=["qwen3_moe-full", "gpt_oss-full", "qwen3_moe-lora-all-linear"],
)
def test_a_resumed_run_equals_an_uninterrupted_one(model, flags, request, tmp_path):
    model_dir = request.getfixturevalue(model)
    reference = tmp_path / "uninterrupted"
    run(*parse_recipe(arguments(model_dir, reference, *STEPS, *flags)))
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    interrupt_after(resumed, 2)
    results = run(*parse_recipe(arguments(model_dir, resumed, *STEPS, *flags, "--resume_from_checkpoint", "true")))
    assert results["training"]["resumed_from"] == str(resumed / "checkpoint-2")
    assert_same_run(resumed, reference)


def test_a_partial_checkpoint_is_skipped(tmp_path):
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4" / "model.safetensors").write_text("half written")
    args = parse_recipe(arguments(Path("unused"), tmp_path, "--resume_from_checkpoint", "true"))[-1]
    assert resolve_checkpoint(args) == str(tmp_path / "checkpoint-2")
    args.resume_from_checkpoint = str(tmp_path / "checkpoint-4")
    with pytest.raises(MissingInputError, match="checkpoint-4 is not a complete checkpoint directory"):
        resolve_checkpoint(args)
    shutil.rmtree(tmp_path / "checkpoint-2")
    args.resume_from_checkpoint = "true"
    with pytest.raises(MissingInputError, match="holds no complete checkpoint-\\* directory"):
        resolve_checkpoint(args)


@pytest.mark.slow
def test_kill_9_during_training_then_resume(tiny_translator, tmp_path):
    flags = ("--max_steps", "24", "--save_strategy", "steps", "--save_steps", "2", "--callbacks", "expert_pruning")
    reference = tmp_path / "uninterrupted"
    run(*parse_recipe(arguments(tiny_translator, reference, *flags)))

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "moe_specialist.train", *arguments(tiny_translator, killed, *flags)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint-2" / "trainer_state.json").is_file():
        assert process.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model").exists() and not (killed / "results.json").exists()  # absent, not half-written

    results = run(*parse_recipe(arguments(tiny_translator, killed, *flags, "--resume_from_checkpoint", "true")))
    assert results["training"]["global_step"] == 24
    assert_same_run(killed, reference)
