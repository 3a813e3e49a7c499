"""GPT-OSS's MXFP4 expert weights dequantized on the CPU with every core, chunk by chunk.

transformers dequantizes MXFP4 checkpoints while loading them (``Mxfp4Config(dequantize=True)``, or any load
without a Triton GPU kernel), on torch's intra-op threads: one under ``accelerate launch``, which sets
``OMP_NUM_THREADS=1``, so about 45 s per GPT-OSS-20B layer and 18 minutes per rank. :func:`dequantize_mxfp4` gives
the same values in the same layout, bit for bit, from one table lookup per nibble instead of a lookup, a scaling and
a transposing copy, on one worker thread per core whatever ``OMP_NUM_THREADS`` says (torch's thread count is
restored after), so that one process can write a dequantized checkpoint once and every rank loads plain bfloat16.

The format (OCP MX, as GPT-OSS stores it): each row of an expert's weight is cut into groups of 32 values; a group is
16 bytes of FP4 (e2m1) codes, two per byte with the low nibble first, and one shared E8M0 scale byte, the power of
two ``2 ** (scale - 127)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from moe_specialist.errors import ConfigurationError

# The 16 FP4 e2m1 codes: sign bit, 2 exponent bits, 1 mantissa bit.
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_BIAS = 127
BYTES_PER_GROUP = 16
BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"


def is_mxfp4(config) -> bool:
    """Whether a model config says its experts are stored in MXFP4 (GPT-OSS as published)."""
    quantization = getattr(config, "quantization_config", None) or {}
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
    return str(method).lower().endswith("mxfp4")


@contextmanager
def one_thread_per_core() -> Iterator[ThreadPoolExecutor]:
    """A pool of one worker per core this process may run on, each running torch ops single-threaded.

    Independent chunks on independent threads keep every core busy without the fork-join barriers of torch's
    intra-op parallelism, which stall whenever another process holds one of the cores; torch's thread count is
    restored after.
    """
    saved = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=cores) as pool:
            yield pool
    finally:
        torch.set_num_threads(saved)


def nibble_tables(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The value of the low and of the high nibble for every ``(scale << 8) | byte``: two tables of 65536.

    Each entry is ``torch.ldexp(code, scale - 127)`` in float32 rounded to ``dtype``, the arithmetic of transformers'
    conversion, so one lookup gives its exact result, special cases (scale 255) included.
    """
    codes = torch.arange(256)
    fp4 = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32)
    exponents = (torch.arange(256, dtype=torch.int32) - E8M0_BIAS).view(256, 1)
    return tuple(
        torch.ldexp(nibble.expand(256, 256).contiguous(), exponents).to(dtype).view(-1)
        for nibble in (fp4[codes & 0x0F], fp4[codes >> 4])
    )


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, *, chunk_rows: int = 1024
) -> torch.Tensor:
    """Expert weights from MXFP4: ``blocks`` ``[experts, rows, groups, 16]`` uint8 and ``scales``
    ``[experts, rows, groups]`` uint8 give ``[experts, groups * 32, rows]`` in ``dtype``.

    The output is transformers' layout for GPT-OSS (transposed against the checkpoint): ``gate_up_proj_blocks``
    ``[E, 2 * I, H / 32, 16]`` becomes ``gate_up_proj`` ``[E, H, 2 * I]`` and ``down_proj_blocks`` ``[E, H, I / 32,
    16]`` becomes ``down_proj`` ``[E, I, H]``. The values are looked up already scaled (:func:`nibble_tables`) and
    written straight into that transposed layout, each worker ``chunk_rows`` rows of one expert at a time, so the
    working memory beside the output is about 12 MB per core for GPT-OSS-20B's 90 groups per row.
    """
    if blocks.dim() != 4 or blocks.shape[-1] != BYTES_PER_GROUP or blocks.shape[:-1] != scales.shape:
        raise ConfigurationError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} are not GPT-OSS's expert layout: "
            "blocks [experts, rows, groups, 16] and scales [experts, rows, groups]; pass a checkpoint's "
            "*_proj_blocks and *_proj_scales tensors of one layer as they are stored."
        )
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ConfigurationError(
            f"MXFP4 blocks and scales are bytes (uint8), got {blocks.dtype} and {scales.dtype}: pass the tensors as "
            "the checkpoint stores them."
        )
    experts, rows, groups, _ = blocks.shape
    low, high = nibble_tables(dtype)
    out = torch.empty(experts, groups * 2 * BYTES_PER_GROUP, rows, dtype=dtype)
    # Output row 32 * g + 2 * k (+ 1) of an expert is the low (high) nibble of byte k of group g, for every row.
    pairs = out.view(experts, groups * BYTES_PER_GROUP, 2, rows)

    def chunk(expert: int, start: int) -> None:
        stop = min(start + chunk_rows, rows)
        index = torch.empty(groups, BYTES_PER_GROUP, stop - start, dtype=torch.int32)
        index.copy_(blocks[expert, start:stop].permute(1, 2, 0))
        index.add_(scales[expert, start:stop].T.int().unsqueeze(1) << 8)
        for nibble, table in enumerate((low, high)):
            pairs[expert, :, nibble, start:stop] = table.index_select(0, index.view(-1)).view(-1, stop - start)

    with one_thread_per_core() as pool:
        list(pool.map(lambda task: chunk(*task), [(e, r) for e in range(experts) for r in range(0, rows, chunk_rows)]))
    return out


def dequantize_state_dict(
    tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors with each ``X_blocks`` / ``X_scales`` pair replaced by the dequantized ``X``.

    The names are GPT-OSS's: ``...mlp.experts.gate_up_proj_blocks`` and ``..._scales`` become
    ``...mlp.experts.gate_up_proj``; every other tensor passes through unchanged.
    """
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(SCALES_SUFFIX) and name.removesuffix(SCALES_SUFFIX) + BLOCKS_SUFFIX in tensors:
            continue
        if name.endswith(BLOCKS_SUFFIX):
            stem = name.removesuffix(BLOCKS_SUFFIX)
            if stem + SCALES_SUFFIX not in tensors:
                raise ConfigurationError(
                    f"{name} has no {stem + SCALES_SUFFIX} beside it: pass all the tensors of the layer together."
                )
            out[stem] = dequantize_mxfp4(tensor, tensors[stem + SCALES_SUFFIX], dtype)
        else:
            out[name] = tensor
    return out
