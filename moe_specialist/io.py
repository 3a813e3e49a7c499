"""Atomic writes: an artefact is either absent or complete, never half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from moe_specialist.errors import OutputExistsError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask changes it process-wide for a moment


def _temporary_sibling(path: Path) -> Path:
    """A temporary file next to ``path`` with the permissions a plain ``open`` would give (mkstemp makes 0600)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_UMASK)
    return Path(name)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(data: Any, path: str | Path) -> None:
    atomic_write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", path)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def prepare_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse to replace an existing output unless asked; the caller writes into :func:`staging_dir` first."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"Output {path} already exists: choose another path or pass --overwrite to replace it."
        )
    return path


@contextmanager
def staging_dir(path: str | Path, overwrite: bool = False):
    """Yield a temporary directory next to ``path`` and rename it into place only if the block succeeds."""
    path = prepare_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        if path.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, backup / path.name)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(backup / path.name, path)  # put the previous output back
                raise
            finally:
                shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
