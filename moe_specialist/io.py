"""Safe writes: an artefact is either absent or complete, never half-written, and never lands where it must not.

- :func:`atomic_path` and :func:`staging_dir` write next to the output and rename into place on success. Their
  temporary names carry the owner (``.{name}.{pid}@{host}.XXXX.tmp``), so the next write of the same output removes
  what a killed run left (kill -9 skips every ``finally``; at 30B a staging directory is tens of GB).
- :func:`prepare_output_dir` refuses an output that would replace or modify an input, the working directory, the
  home directory or the filesystem root.
- :func:`safe_child` joins a name read from an untrusted file (checkpoints come from the internet) to its directory;
  :func:`read_weight_map` reads a checkpoint's shard index and checks its structure.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from moe_specialist.errors import ConfigurationError, OutputExistsError, UnsafePathError

logger = logging.getLogger(__name__)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask changes it process-wide for a moment
_FILE_MODE = 0o666 & ~_UMASK  # what a plain ``open`` gives; mkstemp and safetensors' own temporary file give 0600
_DIR_MODE = 0o777 & ~_UMASK
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


# ---- untrusted names ------------------------------------------------------------------------------------------------
def _name_problem(name: object) -> str | None:
    """Why ``name`` is not one plain file name, or None."""
    if not isinstance(name, str):
        return f"is of type {type(name).__name__}, not a file name"
    if not name:
        return "is empty"
    if "\0" in name:
        return "contains a NUL byte"
    if "/" in name or "\\" in name:
        return "contains a path separator (an absolute path or a sub-directory)"
    if name in (".", ".."):
        return "names a directory, not a file in it"
    return None


def _allowed_roots(directory: Path) -> list[Path]:
    """Where the files of ``directory`` may resolve to: itself, and for a Hugging Face cache snapshot (whose files are
    links into ``../../blobs``, the hub's own layout) that repository's blobs."""
    root = directory.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def safe_child(directory: str | Path, name: str, what: str) -> Path:
    """``directory / name`` for a ``name`` read from an untrusted file (a checkpoint index, a plan, a statistics file).

    ``what`` says where the name comes from, for the message (e.g. ``"shard name in model.safetensors.index.json"``).
    Raises :class:`UnsafePathError` unless ``name`` is one plain file name (not empty, no NUL, no ``/`` or ``\\``,
    not ``.`` or ``..``) whose path, symlinks resolved, stays inside ``directory``: otherwise an absolute name would
    rewrite another model's file and ``../x`` would write beside the output.
    """
    problem = _name_problem(name)
    if problem is None:
        child = Path(directory) / name
        target = child.resolve()
        if not any(target != root and target.is_relative_to(root) for root in _allowed_roots(Path(directory))):
            problem = f"links to {target}, which is not a file inside {directory}"
    if problem is not None:
        raise UnsafePathError(
            f"Unsafe {what} {name!r}: it {problem}. Names read from a checkpoint or another downloaded file must "
            f"be plain file names inside {directory}; the file is corrupt or malicious: get it again from a source "
            "you trust (or, for a link you made yourself, put the file itself in the directory)."
        )
    return child


INDEX_FILE = "model.safetensors.index.json"


def read_weight_map(checkpoint: str | Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a sharded safetensors checkpoint; {} without an index.

    Its structure is checked (a ConfigurationError names the file); the shard names are not: join them with
    :func:`safe_child`.
    """
    index = Path(checkpoint) / INDEX_FILE
    if not index.is_file():
        return {}
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        data = None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not (
        isinstance(weight_map, dict)
        and weight_map
        and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
    ):
        raise ConfigurationError(
            f'{index} is not a safetensors index: it needs a JSON object whose "weight_map" maps each tensor name '
            "to its shard's file name. The checkpoint is corrupt or incomplete: download it again."
        )
    return weight_map


# ---- permissions and owned temporary names --------------------------------------------------------------------------
def _follow_umask(path: Path) -> None:
    """Give ``path`` (or every regular file under it) the mode a plain ``open`` would: writers such as safetensors'
    ``save_file`` write a 0600 temporary file of their own and rename it over the one they were given."""
    if not path.is_dir():
        os.chmod(path, _FILE_MODE)
        return
    for folder, _, files in os.walk(path):
        for name in files:
            file = os.path.join(folder, name)
            if not os.path.islink(file):
                os.chmod(file, _FILE_MODE)


def _owned_sibling(path: Path, suffix: str, directory: bool) -> Path:
    """A new temporary file or directory next to ``path`` whose name says which process on which host owns it."""
    options = dict(prefix=f".{path.name}.{os.getpid()}@{_HOST}.", suffix=suffix, dir=path.parent)
    if directory:
        made = tempfile.mkdtemp(**options)
        os.chmod(made, _DIR_MODE)
    else:
        fd, made = tempfile.mkstemp(**options)
        os.close(fd)
    return Path(made)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or a pid this system cannot check: keep it
        pass
    return True


def _remove_stale_siblings(path: Path) -> None:
    """Remove the temporary files and directories of ``path`` left by dead processes of this host.

    A live owner's are never touched (a concurrent run); nor are another host's (its pids mean nothing here). A
    backup (``.old``) is removed only once ``path`` exists again: without it, the backup is the previous output of a
    run killed between its two renames, kept for the user to move back.
    """
    owned = re.compile(rf"\.{re.escape(path.name)}\.(\d+)@{re.escape(_HOST)}\.[a-z0-9_]+\.(tmp|old)")
    for sibling in path.parent.iterdir():
        match = owned.fullmatch(sibling.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        if match.group(2) == "old" and not path.exists():
            logger.warning(
                "A run killed while replacing %s left its previous version in %s.", path, sibling / path.name
            )
            continue
        logger.info("Removing %s, left by a killed run (pid %s).", sibling, match.group(1))
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)  # another run may be removing it too
        else:
            sibling.unlink(missing_ok=True)


# ---- atomic files ---------------------------------------------------------------------------------------------------
@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path``, with the umask's mode, if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(path)
    tmp = _owned_sibling(path, ".tmp", directory=False)
    try:
        yield tmp
        _follow_umask(tmp)
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


# ---- output directories ---------------------------------------------------------------------------------------------
def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_not_an_input(path: str | Path, protected: Iterable[str | Path]) -> None:
    """Refuse an output that is, contains or lies inside a ``protected`` input (e.g. the source checkpoint)."""
    target = Path(path).resolve()
    for item in protected:
        source = Path(item).resolve()
        if not source.exists():  # a Hub id or a missing path: nothing on disk to damage
            continue
        if _contains(target, source) or _contains(source, target):
            relation = "is" if target == source else ("contains" if _contains(target, source) else "is inside")
            raise ConfigurationError(
                f"The output {path} {relation} the input {item}: writing it would modify or delete the input. "
                "Choose an output that is neither the input, nor inside it, nor a directory containing it."
            )


def _refuse_vital_directories(path: Path, target: Path) -> None:
    for what, directory in {"the working directory": Path.cwd(), "the home directory": Path.home()}.items():
        if _contains(target, directory.resolve()):
            raise ConfigurationError(
                f"Refusing to overwrite {path}: it is or contains {what} ({directory}), which --overwrite never "
                "replaces. Choose a dedicated output path."
            )


def prepare_output_dir(path: str | Path, overwrite: bool = False, protected: Iterable[str | Path] = ()) -> Path:
    """Check ``path`` before anything is written; the caller then writes into :func:`staging_dir`.

    The output may never be, contain, or lie inside a ``protected`` path (the inputs, e.g. the source checkpoint:
    ``--overwrite`` would delete it, writing inside it would modify it). An existing output is replaced only with
    ``overwrite``, and never when it is or contains the working directory (the root always does) or the home
    directory.
    """
    path = Path(path)
    check_not_an_input(path, protected)
    if path.exists():
        if not overwrite:
            raise OutputExistsError(
                f"Output {path} already exists: choose another path or pass --overwrite to replace it."
            )
        _refuse_vital_directories(path, path.resolve())
    return path


@contextmanager
def staging_dir(path: str | Path, overwrite: bool = False, protected: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary directory next to ``path`` and rename it into place only if the block succeeds.

    ``overwrite`` and ``protected`` are checked first (:func:`prepare_output_dir`). Files written inside get the
    umask's mode. What killed runs left for the same output is removed first (see :func:`_remove_stale_siblings`).
    """
    path = prepare_output_dir(path, overwrite, protected)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(path)
    tmp = _owned_sibling(path, ".tmp", directory=True)
    try:
        yield tmp
        _follow_umask(tmp)
        if path.exists():
            backup = _owned_sibling(path, ".old", directory=True)
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
