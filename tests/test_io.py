"""Safe writes: outputs never damage inputs, killed runs are cleaned up, files follow the umask."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moe_specialist.errors import ConfigurationError, OutputExistsError
from moe_specialist.io import atomic_write_text, prepare_output_dir, staging_dir
from moe_specialist.stats import RoutingStats
from tests.helpers import umask


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def work(tmp_path) -> Path:
    """``work/model`` (the input, with a sub-directory) next to ``work/sibling``."""
    for name in ("model/config.json", "model/original/weights.bin", "sibling/notes.txt"):
        (tmp_path / "work" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "work" / name).write_text(name)
    return tmp_path / "work"


@pytest.mark.parametrize(
    ("output", "relation", "overwrite"),
    [
        ("model", "is", True),
        ("model", "is", False),
        ("alias", "is", True),  # a link to the input
        (".", "contains", True),
        ("model/pruned", "is inside", False),
        ("model/original", "is inside", True),
    ],
)
def test_the_output_never_is_contains_or_lies_inside_an_input(work, output, relation, overwrite):
    (work / "alias").symlink_to(work / "model")
    before = tree(work)
    with (
        pytest.raises(ConfigurationError) as raised,
        staging_dir(work / output, overwrite, protected=[work / "model"]),
    ):
        pytest.fail("the block must not run")
    assert str(raised.value).startswith(f"The output {work / output} {relation} the input {work / 'model'}: writing")
    assert "Choose an output that is neither the input, nor inside it, nor a directory containing it" in str(
        raised.value
    )
    assert tree(work) == before and sorted(os.listdir(work)) == ["alias", "model", "sibling"]


def test_inputs_that_are_not_on_disk_protect_nothing(tmp_path):
    """A Hub id such as ``org/model`` is not a local path: ``org`` may be an output."""
    assert prepare_output_dir(tmp_path / "org", protected=[tmp_path / "org" / "model"]) == tmp_path / "org"


def test_overwrite_never_replaces_the_working_or_home_directory(tmp_path, monkeypatch):
    (tmp_path / "out" / "run").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "out" / "run")
    with pytest.raises(
        ConfigurationError, match=rf"overwrite {re.escape(str(tmp_path / 'out'))}: it is or contains the working"
    ):
        prepare_output_dir(tmp_path / "out", overwrite=True)
    with pytest.raises(ConfigurationError, match="Refusing to overwrite /: it is or contains the working directory"):
        prepare_output_dir("/", overwrite=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "out" / "run"))
    with pytest.raises(ConfigurationError, match="it is or contains the home directory"):
        prepare_output_dir(tmp_path / "out", overwrite=True)
    with pytest.raises(OutputExistsError, match="pass --overwrite to replace it"):
        prepare_output_dir(tmp_path / "out")
    assert (tmp_path / "out" / "run").is_dir()


def test_a_failed_block_removes_its_staging_directory_and_keeps_the_previous_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "previous.txt").write_text("kept")
    for path, overwrite in ((tmp_path / "out", True), (tmp_path / "new", False)):
        with pytest.raises(RuntimeError, match="writer failed"), staging_dir(path, overwrite) as tmp:
            (tmp / "partial.txt").write_text("half")
            raise RuntimeError("writer failed")
    assert os.listdir(tmp_path) == ["out"] and tree(tmp_path / "out") == {"previous.txt": b"kept"}


KILLED_WRITER = """
import os, sys
from moe_specialist.io import atomic_path, staging_dir
writers = staging_dir(sys.argv[1]), atomic_path(sys.argv[1] + ".json")  # referenced: collected ones clean up
staging, tmp = (writer.__enter__() for writer in writers)
(staging / "shard.safetensors").write_text("partial")
tmp.write_text("partial")
print(os.getpid(), staging.name, flush=True)
os._exit(0)  # like kill -9: no finally runs
"""


def test_the_next_write_removes_what_killed_runs_of_this_host_left(tmp_path, caplog):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True, text=True, check=True
    )
    pid, stale = result.stdout.split()
    host = re.fullmatch(rf"\.out\.{pid}@(.+)\.[a-z0-9_]+\.tmp", stale).group(1)
    stale_file = next(p.name for p in tmp_path.iterdir() if p.name.startswith(f".out.json.{pid}@{host}."))
    backup = stale.removesuffix(".tmp") + ".old"
    kept = [
        stale.replace(f".{pid}@", f".{os.getpid()}@"),  # a live process's
        stale.replace(f"@{host}.", "@another-host."),  # another host's: its pid means nothing here
        stale.replace(".out.", ".out2."),  # another output's
        backup,  # the previous output of a run killed mid-swap, while the output is missing
    ]
    for name in kept:
        (tmp_path / name).mkdir()
    with caplog.at_level(logging.WARNING, "moe_specialist.io"), staging_dir(out) as tmp:
        (tmp / "shard.safetensors").write_text("complete")
    message = f"A run killed while replacing {out} left its previous version in {tmp_path / backup / 'out'}."
    assert message in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "out", stale_file])
    atomic_write_text("complete", tmp_path / "out.json")
    with staging_dir(out, overwrite=True):
        pass
    kept.remove(backup)  # the output exists again: the backup is obsolete
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "out", "out.json"])


def test_statistics_files_follow_the_umask(tmp_path):
    """safetensors' save_file writes a 0600 temporary file of its own and renames it over the path it is given."""
    RoutingStats.empty(["en-fr"], [0, 1], [8, 8]).save(tmp_path / "stats.safetensors")
    for name in ("stats.safetensors", "stats.json"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(0o666 & ~umask()), name
