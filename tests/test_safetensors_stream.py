"""The streaming safetensors writer: what safetensors reads back, save_file's exact bytes, slices read from a file."""

from __future__ import annotations

import errno
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe_specialist.safetensors_stream import (
    ComputedTensor,
    SourceTensor,
    TensorInfo,
    read_header,
    write_safetensors,
)


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model.embed.weight": torch.randn(7, 5, generator=generator).to(torch.bfloat16),
        "blocks": torch.randint(0, 256, (3, 4, 2, 16), dtype=torch.uint8, generator=generator),
        "fp8": torch.randn(6, 3, generator=generator).to(torch.float8_e4m3fn),
        "positions": torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
        "scale": torch.tensor(0.125),
        "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "bias": torch.randn(5, generator=generator),
    }


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def streamed(tensors: dict[str, torch.Tensor]) -> dict[str, ComputedTensor]:
    return {name: ComputedTensor.of(tensor) for name, tensor in tensors.items()}


def test_safetensors_reads_back_every_tensor_and_the_metadata(tmp_path):
    tensors = sample_tensors()
    size = write_safetensors(tmp_path / "out.safetensors", streamed(tensors), {"format": "pt", "origin": "test"})
    assert size == sum(t.numel() * t.element_size() for t in tensors.values())
    with safe_open(tmp_path / "out.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "origin": "test"}
        assert set(f.keys()) == set(tensors)
        for name, tensor in tensors.items():
            read = f.get_tensor(name)
            assert read.dtype == tensor.dtype and read.shape == tensor.shape, name
            assert torch.equal(as_bytes(read), as_bytes(tensor)), name


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_the_file_is_save_files_byte_for_byte(tmp_path, metadata):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "reference.safetensors", metadata=metadata)
    write_safetensors(tmp_path / "streamed.safetensors", streamed(tensors), metadata)
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def split(path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def test_with_several_metadata_entries_only_their_order_may_differ_from_save_file(tmp_path):
    """save_file writes metadata in a random order (a Rust HashMap): the same header up to that order."""
    tensors, metadata = sample_tensors(), {"format": "pt", "b": "2", "a": "1"}
    save_file(tensors, tmp_path / "reference.safetensors", metadata=metadata)
    write_safetensors(tmp_path / "streamed.safetensors", streamed(tensors), metadata)
    assert split(tmp_path / "streamed.safetensors") == split(tmp_path / "reference.safetensors")
    assert list(split(tmp_path / "streamed.safetensors")[0]["__metadata__"]) == ["format", "b", "a"]


@pytest.fixture
def source(tmp_path):
    tensors = {
        "experts": torch.arange(4 * 3 * 2, dtype=torch.float32).reshape(4, 3, 2),
        "router": torch.arange(10, dtype=torch.bfloat16).reshape(2, 5),
        "blocks": torch.arange(4 * 6, dtype=torch.uint8).reshape(4, 6),
    }
    save_file(tensors, tmp_path / "source.safetensors")
    return tmp_path / "source.safetensors", tensors


def test_read_header_gives_each_tensors_place_in_the_file(source):
    path, tensors = source
    infos, metadata = read_header(path)
    assert metadata is None
    assert list(infos) == ["experts", "router", "blocks"]  # file order: F32, BF16, U8
    data = path.read_bytes()
    for name, info in infos.items():
        assert info.dtype == {"experts": "F32", "router": "BF16", "blocks": "U8"}[name]
        assert info.shape == tuple(tensors[name].shape)
        assert data[info.start : info.end] == as_bytes(tensors[name]).numpy().tobytes()


def test_slices_read_only_the_kept_indices(source, tmp_path):
    path, tensors = source
    infos, _ = read_header(path)
    with open(path, "rb") as f:
        plan = {
            "leading": (SourceTensor(f, infos["experts"], (0, 1, 3), 0), "experts", [0, 1, 3], 0),
            "unordered": (SourceTensor(f, infos["experts"], (3, 0, 2), 0), "experts", [3, 0, 2], 0),
            "inner": (SourceTensor(f, infos["router"], (4, 1), 1), "router", [4, 1], 1),
            "middle": (SourceTensor(f, infos["experts"], (2, 0), 1), "experts", [2, 0], 1),
            "whole": (SourceTensor(f, infos["blocks"]), "blocks", None, 0),
            "none": (SourceTensor(f, infos["blocks"], (), 0), "blocks", [], 0),
        }
        write_safetensors(tmp_path / "out.safetensors", {name: entry for name, (entry, *_) in plan.items()})
        # a row of "experts" is 3 x 2 float32 = 24 bytes; kept rows 0 and 1 are one run, row 3 another
        start = infos["experts"].start
        assert plan["leading"][0].ranges() == [(start, 48), (start + 72, 24)]
    with safe_open(tmp_path / "out.safetensors", framework="pt") as f:
        for name, (_, key, kept, dim) in plan.items():
            index = torch.tensor(kept or [], dtype=torch.long)
            expected = tensors[key] if kept is None else tensors[key].index_select(dim, index)
            assert torch.equal(f.get_tensor(name), expected), name


def test_a_source_tensor_reads_its_kept_indices_into_memory(source):
    """What a ComputedTensor transforming a source entry (e.g. dequantizing it) starts from."""
    path, tensors = source
    infos, _ = read_header(path)
    with open(path, "rb") as f:
        assert torch.equal(SourceTensor(f, infos["experts"], (3, 0), 0).read(), tensors["experts"][[3, 0]])
        assert torch.equal(SourceTensor(f, infos["router"], (4, 1), 1).read(), tensors["router"][:, [4, 1]])
        assert torch.equal(SourceTensor(f, infos["blocks"]).read(), tensors["blocks"])
        assert SourceTensor(f, infos["blocks"], (), 0).read().shape == (0, 6)


def test_without_copy_file_range_the_bytes_pass_through_memory(source, tmp_path, monkeypatch):
    def unsupported(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    path, tensors = source
    infos, _ = read_header(path)
    monkeypatch.setattr(os, "copy_file_range", unsupported)
    with open(path, "rb") as f:
        write_safetensors(tmp_path / "out.safetensors", {"kept": SourceTensor(f, infos["experts"], (1, 2), 0)})
    with safe_open(tmp_path / "out.safetensors", framework="pt") as f:
        assert torch.equal(f.get_tensor("kept"), tensors["experts"][1:3])


def test_a_source_shorter_than_its_header_says_is_an_error(source, tmp_path):
    path, _ = source
    infos, _ = read_header(path)
    beyond = TensorInfo("F32", (4, 3, 2), path.stat().st_size - 24, path.stat().st_size + 72)
    with open(path, "rb") as f, pytest.raises(ValueError, match="the file ends before byte"):
        write_safetensors(tmp_path / "out.safetensors", {"x": SourceTensor(f, beyond)})


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data[:-10], "the tensors end at byte"),
        (lambda data: data[: len(data) // 2], "does not fit"),
        (lambda data: data[:5], "shorter than a safetensors header"),
        (lambda data: struct.pack("<Q", 10**9) + data[8:], "does not fit"),
        (lambda data: data[:8] + b"[" + data[9:], "not JSON"),
        (lambda data: data + b"\0", "the tensors end at byte"),
    ],
)
def test_read_header_refuses_damaged_files(source, damage, message):
    path, _ = source
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message):
        read_header(path)


def test_a_computed_tensor_must_match_its_declared_dtype_and_shape(tmp_path):
    wrong = ComputedTensor("BF16", (2, 3), lambda: torch.zeros(3, 2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"is BF16 \[3, 2\], declared as BF16 \[2, 3\]"):
        write_safetensors(tmp_path / "out.safetensors", {"x": wrong})
