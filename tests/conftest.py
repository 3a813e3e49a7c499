"""Shared fixtures: tiny MoE translators built offline from configs and the demo generalist's tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from tests.tiny_models import tiny_config

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(1)

TOKENIZER_DIR = Path(__file__).parents[1] / "moe_specialist" / "demo" / "tokenizer"


@pytest.fixture(scope="session")
def demo_tokenizer():
    return PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR)


def build_tiny_translator(path: Path, tokenizer, model_type: str = "qwen3_moe", seed: int = 0) -> Path:
    """A tiny random MoE with the demo tokenizer's vocabulary and chat template, saved to ``path``."""
    torch.manual_seed(seed)
    config = tiny_config(
        model_type,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_translator(tmp_path_factory, demo_tokenizer) -> Path:
    return build_tiny_translator(tmp_path_factory.mktemp("tiny") / "model", demo_tokenizer)


@pytest.fixture
def restore_environment():
    """Recipes' `env:` blocks are exported by the parser: keep them out of the other tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
