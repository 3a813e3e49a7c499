"""Names read from downloaded files (checkpoint indexes, shard lists) never reach outside their directory."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_specialist.errors import ConfigurationError, UnsafePathError
from moe_specialist.io import INDEX_FILE, read_weight_map, safe_child
from moe_specialist.plan import PrunePlan
from moe_specialist.prune import prune_checkpoint
from tests.tiny_models import tiny_model

PLAN = PrunePlan({layer: [0, 1, 2, 3] for layer in range(4)})


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("/etc/passwd", "contains a path separator"),
        ("../x.safetensors", "contains a path separator"),
        ("sub/x.safetensors", "contains a path separator"),
        ("..\\x.safetensors", "contains a path separator"),
        ("C:\\x.safetensors", "contains a path separator"),
        ("", "is empty"),
        ("x\0.safetensors", "contains a NUL byte"),
        ("..", "names a directory"),
        (".", "names a directory"),
        (7, "is of type int"),
    ],
)
def test_safe_child_refuses_names_that_are_not_plain_file_names(tmp_path, name, problem):
    with pytest.raises(UnsafePathError, match=re.escape(f"Unsafe shard name {name!r}: it {problem}")) as raised:
        safe_child(tmp_path, name, "shard name")
    assert str(tmp_path) in str(raised.value) and "get it again from a source you trust" in str(raised.value)


def test_safe_child_accepts_plain_names_and_links_that_stay_inside(tmp_path):
    (tmp_path / "real.safetensors").write_bytes(b"x")
    (tmp_path / "link.safetensors").symlink_to("real.safetensors")
    assert safe_child(tmp_path, "model..00001.safetensors", "shard") == tmp_path / "model..00001.safetensors"
    assert safe_child(str(tmp_path), "link.safetensors", "shard") == tmp_path / "link.safetensors"


def test_safe_child_refuses_links_that_escape(tmp_path):
    (tmp_path / "secret").write_text("not yours")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tokenizer.json").symlink_to(tmp_path / "secret")
    (tmp_path / "model" / "self").symlink_to(".")
    with pytest.raises(UnsafePathError, match=f"it links to {tmp_path / 'secret'}, which is not a file inside"):
        safe_child(tmp_path / "model", "tokenizer.json", "file")
    with pytest.raises(UnsafePathError, match="which is not a file inside"):
        safe_child(tmp_path / "model", "self", "file")


def hub_cache(source: Path, root: Path) -> Path:
    """The Hugging Face cache layout of ``source``: a snapshot of relative links into the repository's blobs."""
    snapshot = root / "models--org--tiny" / "snapshots" / "0123abcd"
    blobs = root / "models--org--tiny" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for number, file in enumerate(sorted(source.iterdir())):
        shutil.copy(file, blobs / f"blob{number}")
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", f"blob{number}"))
    return snapshot


@pytest.fixture
def sharded(tmp_path) -> Path:
    """A tiny checkpoint in several shards, with an index."""
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "model", max_shard_size="200KB")
    assert len(list((tmp_path / "model").glob("*.safetensors"))) > 1
    return tmp_path / "model"


def first_shard(model_dir: Path) -> str:
    return sorted(read_weight_map(model_dir).values())[0]


def renamed_shard(model_dir: Path, new_name: str) -> None:
    """Point the index's first shard at ``new_name``."""
    old = first_shard(model_dir)
    weight_map = {key: new_name if shard == old else shard for key, shard in read_weight_map(model_dir).items()}
    (model_dir / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))


def test_an_absolute_shard_name_cannot_rewrite_another_checkpoint(sharded, tmp_path):
    victim = tmp_path / "victim" / "model.safetensors"
    victim.parent.mkdir()
    shutil.copy(sharded / first_shard(sharded), victim)
    before = victim.read_bytes()
    renamed_shard(sharded, str(victim))
    with pytest.raises(UnsafePathError, match=rf"Unsafe shard name in .*{INDEX_FILE} '{victim}': it contains a path"):
        prune_checkpoint(sharded, PLAN, tmp_path / "out")
    assert victim.read_bytes() == before
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_parent_shard_name_cannot_write_beside_the_output(sharded, tmp_path):
    shutil.copy(sharded / first_shard(sharded), tmp_path / "x.safetensors")  # readable, so only the write is at stake
    renamed_shard(sharded, "../x.safetensors")
    (tmp_path / "outputs").mkdir()
    with pytest.raises(UnsafePathError, match="'../x.safetensors': it contains a path separator"):
        prune_checkpoint(sharded, PLAN, tmp_path / "outputs" / "out")
    assert os.listdir(tmp_path / "outputs") == []


def test_a_shard_linked_from_outside_is_refused(sharded, tmp_path):
    shard = first_shard(sharded)
    (sharded / shard).rename(tmp_path / shard)
    (sharded / shard).symlink_to(tmp_path / shard)
    with pytest.raises(UnsafePathError, match=f"'{shard}': it links to {tmp_path / shard}"):
        prune_checkpoint(sharded, PLAN, tmp_path / "out")


@pytest.mark.parametrize(
    "index",
    [
        "not json {",
        "[]",
        "{}",
        '{"weight_map": []}',
        '{"weight_map": {}}',
        '{"weight_map": {"model.embed_tokens.weight": 3}}',
    ],
)
def test_a_malformed_index_is_a_clear_error(sharded, tmp_path, index):
    (sharded / INDEX_FILE).write_text(index)
    with pytest.raises(
        ConfigurationError, match=r'is not a safetensors index: it needs a JSON object whose "weight_map"'
    ):
        prune_checkpoint(sharded, PLAN, tmp_path / "out")


def test_hub_cache_snapshots_link_into_their_blobs_and_prune(sharded, tmp_path):
    """snapshot_download gives a directory of links into ../../blobs: the on-disk prune of a Hub id reads those."""
    snapshot = hub_cache(sharded, tmp_path / "cache")
    prune_checkpoint(snapshot, PLAN, tmp_path / "from_cache")
    prune_checkpoint(sharded, PLAN, tmp_path / "plain")
    shards = sorted(p.name for p in (tmp_path / "plain").glob("*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "from_cache").glob("*.safetensors"))
    for name in shards:
        assert not (tmp_path / "from_cache" / name).is_symlink()
        cached, plain = load_file(tmp_path / "from_cache" / name), load_file(tmp_path / "plain" / name)
        assert cached.keys() == plain.keys() and all(torch.equal(cached[k], plain[k]) for k in cached)
    (snapshot / "tokenizer.json").symlink_to(tmp_path / "cache" / "models--org--tiny" / "elsewhere")
    (tmp_path / "cache" / "models--org--tiny" / "elsewhere").write_text("{}")
    with pytest.raises(UnsafePathError, match="'tokenizer.json': it links to"):
        prune_checkpoint(snapshot, PLAN, tmp_path / "out")
