"""Loading models and tokenizers by name: a Hub id, a local directory, or ``demo`` (the embedded generalist)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, Mxfp4Config

from moe_specialist.errors import ConfigurationError, MissingInputError
from moe_specialist.mxfp4 import is_mxfp4
from moe_specialist.prune import SNAPSHOT_IGNORE, SNAPSHOT_PATTERNS, load_pruned_model

DEMO = "demo"
DEMO_MODEL_DIR = Path(__file__).parent / "demo" / "model"


def resolve_model_path(name_or_path: str) -> str:
    """``demo`` means the checkpoint shipped with this package; anything else is passed to transformers.

    A name that can only be a path (absolute, relative with ``./`` or ``../``, ``~``, or more than one ``/``) must
    exist: otherwise transformers would report a missing directory as a failed Hub download.
    """
    if name_or_path == DEMO:
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise MissingInputError(
                f"The demo generalist is missing from {DEMO_MODEL_DIR}: reinstall the package, or train it with "
                "`python -m moe_specialist.demo.train_generalist` and export it with `python -m "
                "moe_specialist.demo.export`."
            )
        return str(DEMO_MODEL_DIR)
    looks_like_path = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    if looks_like_path and not Path(name_or_path).expanduser().exists():
        raise MissingInputError(f"No model at {name_or_path}: the directory does not exist. Check the path.")
    if Path(name_or_path).exists() and not (Path(name_or_path) / "config.json").is_file():
        raise MissingInputError(f"{name_or_path} is not a model directory: it has no config.json.")
    return name_or_path


def local_model_dirs(name_or_path: str) -> tuple[str, ...]:
    """The model's directory when it is local (demo included): outputs may not replace, contain or enter it."""
    path = resolve_model_path(name_or_path)
    return (path,) if Path(path).is_dir() else ()


def load_config(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's config; a name that is neither a local model nor a reachable Hub id is an expected error."""
    path = resolve_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as error:
        offline = " (HF_HUB_OFFLINE is set: only cached models load)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise MissingInputError(
            f"Cannot load model {name_or_path!r}: it is not a local model directory, and the Hub did not give it"
            f"{offline}. Check the path or the Hub id, the revision, your login (`hf auth login`) for gated models, "
            f"and the network. ({str(error).splitlines()[0]})"
        ) from None


def download_checkpoint(repo_id: str, revision: str | None = None) -> str:
    """The local snapshot of a Hub checkpoint with only what pruning reads and copies: top-level safetensors, config,
    tokenizer and generation files (never the other formats some repositories add in sub-folders)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(
        repo_id, revision=revision, allow_patterns=list(SNAPSHOT_PATTERNS), ignore_patterns=list(SNAPSHOT_IGNORE)
    )


DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(name_or_path: str, dtype: str | torch.dtype | None):
    """``auto`` keeps the checkpoint's dtype, except for the CPU demo, which is scored in float32."""
    if dtype is None or dtype == "auto":
        return torch.float32 if name_or_path == DEMO else "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigurationError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    return getattr(torch, dtype)


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype | None = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    **model_kwargs,
):
    """The model (any per-layer expert counts) in eval mode; ``model_kwargs`` (e.g. ``attn_implementation``) go to
    ``from_pretrained``. MXFP4 checkpoints (GPT-OSS) are dequantized: pruning slices the expert tensors (and the
    serving export pads them), which must be plain tensors.
    """
    if is_mxfp4(load_config(name_or_path, revision, trust_remote_code)):
        model_kwargs.setdefault("quantization_config", Mxfp4Config(dequantize=True))
    return load_pruned_model(
        resolve_model_path(name_or_path),
        dtype=resolve_dtype(name_or_path, dtype),
        revision=revision,
        trust_remote_code=trust_remote_code,
        **model_kwargs,
    ).eval()


def load_model_and_tokenizer(
    name_or_path: str,
    dtype: str | torch.dtype | None = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    **model_kwargs,
):
    """:func:`load_model` and its tokenizer with a pad token, ready for left-padded generation; ``device`` moves the
    model there (e.g. ``PartialState().device``)."""
    model = load_model(name_or_path, dtype, revision, trust_remote_code, **model_kwargs)
    if device is not None:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(name_or_path), revision=revision, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_from_arguments(model_args, trust_remote_code: bool, source: str | None = None, device=None, device_map=None):
    """The model and tokenizer a recipe's model arguments describe (dtype, revision, attention implementation);
    ``source`` (a resolved path) replaces ``model_name_or_path``. ``device_map`` loads the weights straight where they
    go, never whole in host memory: onto one device, or ``"auto"``, spread over every GPU (then CPU memory) for a
    model larger than one GPU; ``device`` moves the model there after a host load."""
    extra = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    if device_map is not None:
        extra["device_map"] = device_map if device_map == "auto" else {"": str(device_map)}
    return load_model_and_tokenizer(
        source or model_args.model_name_or_path,
        model_args.dtype,
        model_args.model_revision,
        trust_remote_code,
        device=device,
        **extra,
    )
