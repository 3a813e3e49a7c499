"""Safetensors files written one tensor at a time: the header first, then each tensor's bytes in header order.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once (a 3-5 GB shard of a 30B
checkpoint). :func:`write_safetensors` needs only each tensor's dtype and shape up front, and then writes the tensors
one by one: a :class:`SourceTensor` (a tensor of another safetensors file, whole or only some indices along one
dimension) is copied file to file by the kernel (``os.copy_file_range``) without passing through this process, and a
:class:`ComputedTensor` (made by a function when its turn comes, e.g. dequantized from source tensors read with
:meth:`SourceTensor.read`) holds only itself and its inputs.

The file has the layout ``save_file`` gives: tensors sorted by descending dtype (safetensors' own dtype order, which
puts the widest types first so that each tensor's data is aligned to its element size) then by name, compact JSON,
the header padded with spaces to 8 bytes. With at most one metadata entry the bytes are ``save_file``'s; with more,
``save_file`` writes them in a random order (a Rust ``HashMap``) and this module in the order given.
:func:`read_header` reads and checks the header of a file, for the source side.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import torch

# Every safetensors dtype in the order of its Rust ``Dtype`` enum (safetensors 0.8, ``src/tensor.rs``), which
# ``save_file`` sorts by: (bits per element, torch dtype or None where torch has none).
DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "BOOL": (8, torch.bool),
    "F4": (4, None),
    "F6_E2M3": (6, None),
    "F6_E3M2": (6, None),
    "U8": (8, torch.uint8),
    "I8": (8, torch.int8),
    "F8_E5M2": (8, torch.float8_e5m2),
    "F8_E4M3": (8, torch.float8_e4m3fn),
    "F8_E8M0": (8, torch.float8_e8m0fnu),
    "F8_E4M3FNUZ": (8, torch.float8_e4m3fnuz),
    "F8_E5M2FNUZ": (8, torch.float8_e5m2fnuz),
    "I16": (16, torch.int16),
    "U16": (16, torch.uint16),
    "F16": (16, torch.float16),
    "BF16": (16, torch.bfloat16),
    "I32": (32, torch.int32),
    "U32": (32, torch.uint32),
    "F32": (32, torch.float32),
    "C64": (64, torch.complex64),
    "F64": (64, torch.float64),
    "I64": (64, torch.int64),
    "U64": (64, torch.uint64),
}
_ORDER = {name: rank for rank, name in enumerate(DTYPES)}
_NAMES = {dtype: name for name, (_, dtype) in DTYPES.items() if dtype is not None}
MAX_HEADER_SIZE = 100_000_000  # what safetensors itself accepts
_CHUNK = 64 << 20  # bytes per read when the kernel cannot copy file to file


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    if dtype not in _NAMES:
        raise ValueError(f"safetensors has no dtype for {dtype}.")
    return _NAMES[dtype]


def byte_size(dtype: str, shape: Sequence[int]) -> int:
    """The bytes of a tensor of safetensors dtype ``dtype`` and ``shape``; sub-byte dtypes must fill whole bytes."""
    bits = DTYPES[dtype][0] * math.prod(shape)
    if bits % 8:
        raise ValueError(f"A {dtype} tensor of shape {list(shape)} does not fill whole bytes.")
    return bits // 8


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a safetensors file lies: ``start`` and ``end`` are offsets in the file, header included."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str] | None]:
    """The tensors (in file order) and the metadata of the safetensors file ``path``.

    The header is checked as safetensors checks it (a JSON object, known dtypes, each tensor's bytes matching its
    shape, the tensors covering the data exactly up to the end of the file): a ``ValueError`` says what is wrong.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{size} bytes, shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_SIZE or 8 + length > size:
            raise ValueError(f"header length {length} does not fit the file's {size} bytes")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"the header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise ValueError("__metadata__ is not a map of strings")
    tensors = {name: _tensor_info(name, entry, 8 + length) for name, entry in header.items()}
    tensors = dict(sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)))
    position = 8 + length
    for name, info in tensors.items():
        if info.start != position:
            raise ValueError(f"the data of {name} starts at byte {info.start}, not {position}")
        position = info.end
    if position != size:
        raise ValueError(f"the tensors end at byte {position}, the file at {size}")
    return tensors, metadata


def _tensor_info(name: str, entry: object, data_start: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        valid = (
            dtype in DTYPES
            and isinstance(shape, list)
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and all(isinstance(o, int) for o in (begin, end))
            and end - begin == byte_size(dtype, shape)
        )
    except (TypeError, KeyError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"invalid header entry for {name}: {entry}")
    return TensorInfo(dtype, tuple(shape), data_start + begin, data_start + end)


class StreamedTensor(Protocol):
    """A tensor to write: dtype and shape known up front, bytes written when its turn comes."""

    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    def write_to(self, out: int) -> None:
        """Write the tensor's bytes at the current position of file descriptor ``out``."""


@dataclass(frozen=True)
class SourceTensor:
    """Tensor ``info`` of the open safetensors file ``source``, or only indices ``kept`` (in that order) along ``dim``.

    Only the bytes of the kept indices are read; with the indexed dimension first, they are one run of bytes per
    stretch of consecutive kept indices.
    """

    source: BinaryIO
    info: TensorInfo
    kept: tuple[int, ...] | None = None
    dim: int = 0

    @property
    def dtype(self) -> str:
        return self.info.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        if self.kept is None:
            return self.info.shape
        return tuple(len(self.kept) if d == self.dim else size for d, size in enumerate(self.info.shape))

    def ranges(self) -> list[tuple[int, int]]:
        """The (file offset, length) runs that make the tensor's bytes, in order, adjacent runs merged."""
        if self.kept is None:
            return [(self.info.start, self.info.end - self.info.start)]
        shape = self.info.shape
        if not 0 <= self.dim < len(shape) or any(not 0 <= i < shape[self.dim] for i in self.kept):
            raise ValueError(f"Indices {list(self.kept)} of dimension {self.dim} are outside shape {list(shape)}.")
        row = byte_size(self.dtype, shape[self.dim + 1 :])
        runs: list[tuple[int, int]] = []
        for outer in range(math.prod(shape[: self.dim])):
            base = self.info.start + outer * shape[self.dim] * row
            for index in self.kept:
                offset = base + index * row
                if runs and runs[-1][0] + runs[-1][1] == offset:
                    runs[-1] = (runs[-1][0], runs[-1][1] + row)
                else:
                    runs.append((offset, row))
        return [run for run in runs if run[1]]

    def write_to(self, out: int) -> None:
        for offset, length in self.ranges():
            copy_range(self.source.fileno(), out, offset, length)

    def read(self) -> torch.Tensor:
        """The tensor (kept indices only) in memory: the input of a :class:`ComputedTensor` that transforms it."""
        dtype = DTYPES[self.dtype][1]
        if dtype is None:
            raise ValueError(f"torch has no dtype for the safetensors dtype {self.dtype}.")
        data = bytearray(byte_size(self.dtype, self.shape))
        position = 0
        for offset, length in self.ranges():
            end = position + length
            while position < end:
                read = os.preadv(self.source.fileno(), [memoryview(data)[position:end]], offset)
                if read == 0:
                    raise ValueError(f"the file ends before byte {offset + end - position}")
                position, offset = position + read, offset + read
        if not data:
            return torch.empty(self.shape, dtype=dtype)
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(self.shape)


@dataclass(frozen=True)
class ComputedTensor:
    """A tensor made by ``compute`` when its turn comes (e.g. dequantized from source tensors); it must have the
    declared ``dtype`` (a safetensors name) and ``shape``."""

    dtype: str
    shape: tuple[int, ...]
    compute: Callable[[], torch.Tensor]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> ComputedTensor:
        """A tensor already in memory."""
        return cls(dtype_name(tensor.dtype), tuple(tensor.shape), lambda: tensor)

    def write_to(self, out: int) -> None:
        tensor = self.compute()
        if dtype_name(tensor.dtype) != self.dtype or tuple(tensor.shape) != self.shape:
            raise ValueError(
                f"A computed tensor is {dtype_name(tensor.dtype)} {list(tensor.shape)}, declared as {self.dtype} "
                f"{list(self.shape)}."
            )
        _write_all(out, memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


def copy_range(source: int, out: int, offset: int, length: int) -> None:
    """Append ``length`` bytes of file descriptor ``source`` from ``offset`` at the position of ``out``.

    The kernel copies file to file (``copy_file_range``); where it cannot (another filesystem on older kernels,
    no such system call), the bytes pass through a 64 MB buffer.
    """
    end = offset + length
    while offset < end:
        try:
            copied = os.copy_file_range(source, out, end - offset, offset)
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            _copy_through_memory(source, out, offset, end - offset)
            return
        if copied == 0:
            raise ValueError(f"the file ends before byte {end}")
        offset += copied


def _copy_through_memory(source: int, out: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        data = os.pread(source, min(_CHUNK, end - offset), offset)
        if not data:
            raise ValueError(f"the file ends before byte {end}")
        offset += len(data)
        _write_all(out, memoryview(data))


def _write_all(out: int, data: memoryview) -> None:
    while data:
        data = data[os.write(out, data) :]


def header_bytes(
    tensors: Mapping[str, StreamedTensor], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[tuple[str, StreamedTensor]]]:
    """The encoded header (length prefix included) of a file of ``tensors`` and the (name, tensor) pairs in the order
    their bytes follow it."""
    order = sorted(tensors.items(), key=lambda item: (-_ORDER[item[1].dtype], item[0]))
    header: dict[str, object] = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for name, tensor in order:
        size = byte_size(tensor.dtype, tensor.shape)
        header[name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded, order


def write_safetensors(
    path: str | Path, tensors: Mapping[str, StreamedTensor], metadata: Mapping[str, str] | None = None
) -> int:
    """Write ``tensors`` to the safetensors file ``path`` one at a time; the number of data bytes written.

    Write into a staging directory or an :func:`~moe_specialist.io.atomic_path`: a failure leaves a partial file.
    """
    header, order = header_bytes(tensors, metadata)
    data = 0
    with open(path, "wb", buffering=0) as f:
        out = f.fileno()
        _write_all(out, memoryview(header))
        for name, tensor in order:
            tensor.write_to(out)
            data += byte_size(tensor.dtype, tensor.shape)
            if f.tell() != len(header) + data:
                raise ValueError(f"Writing {name} left {path} at byte {f.tell()}, not {len(header) + data}.")
    return data
