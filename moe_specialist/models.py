"""Loading models and tokenizers by name: a Hub id, a local directory, or ``demo`` (the embedded generalist)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from moe_specialist.prune import load_pruned_model

DEMO = "demo"
DEMO_MODEL_DIR = Path(__file__).parent / "demo" / "model"


def resolve_model_path(name_or_path: str) -> str:
    """``demo`` means the checkpoint shipped with this package; anything else is passed to transformers."""
    if name_or_path == DEMO:
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"The demo generalist is missing from {DEMO_MODEL_DIR}: reinstall the package, or train it with "
                "`python -m moe_specialist.demo.train_generalist` and export it with `python -m "
                "moe_specialist.demo.export`."
            )
        return str(DEMO_MODEL_DIR)
    return name_or_path


def load_model_and_tokenizer(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    **model_kwargs,
):
    """Model (any per-layer expert counts) and tokenizer with a pad token, ready for left-padded generation.

    ``model_kwargs`` (e.g. ``attn_implementation``) go to ``from_pretrained`` only.
    """
    path = resolve_model_path(name_or_path)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    model = load_pruned_model(path, dtype=dtype, **kwargs, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
