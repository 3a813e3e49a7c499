"""MXFP4 dequantization: transformers' values and layout bit for bit, on every core, and checkpoint names."""

from __future__ import annotations

import os

import pytest
import torch

from moe_specialist import mxfp4
from moe_specialist.compat import transformers_mxfp4_dequantize
from moe_specialist.errors import ConfigurationError
from moe_specialist.mxfp4 import dequantize_mxfp4, dequantize_state_dict
from tests.tiny_models import tiny_model

SAME_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def random_mxfp4(experts: int, rows: int, groups: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes, and every one of the 256 scale bytes (the extremes overflow and underflow)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), dtype=torch.uint8, generator=generator)
    scales = torch.arange(experts * rows * groups).remainder(256).to(torch.uint8).view(experts, rows, groups)
    return blocks, scales[..., torch.randperm(groups, generator=generator)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_equals_transformers_bit_for_bit(dtype):
    blocks, scales = random_mxfp4(experts=3, rows=40, groups=5)  # 600 scales: each byte twice or more
    ours = dequantize_mxfp4(blocks, scales, dtype, chunk_rows=16)  # 40 rows: chunks of 16, 16 and 8
    reference = transformers_mxfp4_dequantize(blocks, scales, dtype)
    assert ours.shape == reference.shape == (3, 5 * 32, 40) and ours.dtype == dtype
    assert torch.equal(ours.view(SAME_BITS[dtype]), reference.view(SAME_BITS[dtype]))
    assert ours.isinf().any()  # scale 255 (2 ** 128) reached: the extremes are transformers' too


def test_values_and_layout():
    """Byte 0x21 of group 1 of row 2 holds codes 1 (0.5, low nibble) and 2 (1.0); scale 129 multiplies by 4."""
    blocks = torch.zeros(2, 3, 2, 16, dtype=torch.uint8)
    scales = torch.full((2, 3, 2), 127, dtype=torch.uint8)
    blocks[1, 2, 1, 5], scales[1, 2, 1] = 0x21, 129
    blocks[0, 0, 0, 0] = 0xF7  # codes 7 (6.0) and 15 (-6.0), scale 2 ** 0
    out = dequantize_mxfp4(blocks, scales)
    assert out.shape == (2, 64, 3)  # [experts, groups * 32, rows]: transposed against the checkpoint
    expected = torch.zeros(2, 64, 3, dtype=torch.bfloat16)
    expected[1, 32 + 2 * 5, 2], expected[1, 32 + 2 * 5 + 1, 2] = 2.0, 4.0
    expected[0, 0, 0], expected[0, 1, 0] = 6.0, -6.0
    assert torch.equal(out, expected)


def test_every_core_whatever_the_thread_count(monkeypatch):
    """One worker per allowed core even at one torch thread (as under ``accelerate launch``), which is restored."""
    workers = []
    pool = mxfp4.ThreadPoolExecutor
    monkeypatch.setattr(
        mxfp4, "ThreadPoolExecutor", lambda max_workers: workers.append(max_workers) or pool(max_workers)
    )
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dequantize_mxfp4(*random_mxfp4(experts=2, rows=8, groups=2))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved)
    assert workers == [len(os.sched_getaffinity(0))]


def test_a_checkpoints_pairs_become_the_weights_gpt_oss_loads():
    """A GPT-OSS layer as a checkpoint stores it (H 64, I 96: gate_up blocks [E, 2I, H/32, 16], down [E, H, I/32, 16])
    becomes tensors of exactly the shapes transformers' GPT-OSS module takes."""
    model = tiny_model("gpt_oss", intermediate_size=96)
    prefix = "model.layers.0.mlp.experts."
    gate_up, down = random_mxfp4(8, 192, 2), random_mxfp4(8, 64, 3, seed=1)
    bias = model.state_dict()[prefix + "gate_up_proj_bias"]
    tensors = {
        prefix + "gate_up_proj_blocks": gate_up[0],
        prefix + "gate_up_proj_scales": gate_up[1],
        prefix + "gate_up_proj_bias": bias,
        prefix + "down_proj_scales": down[1],
        prefix + "down_proj_blocks": down[0],
    }
    out = dequantize_state_dict(tensors, torch.float32)
    assert list(out) == [prefix + "gate_up_proj", prefix + "gate_up_proj_bias", prefix + "down_proj"]
    assert out[prefix + "gate_up_proj_bias"] is bias
    assert model.load_state_dict(out, strict=False).unexpected_keys == []  # shapes checked by torch
    experts = model.model.layers[0].mlp.experts
    assert torch.equal(experts.gate_up_proj, dequantize_mxfp4(*gate_up, torch.float32))
    assert torch.equal(experts.down_proj, dequantize_mxfp4(*down, torch.float32))
    del tensors[prefix + "down_proj_scales"]
    with pytest.raises(ConfigurationError, match=r"down_proj_blocks has no model.layers.0.mlp.experts.down_proj_sc"):
        dequantize_state_dict(tensors)


def test_other_layouts_are_refused():
    blocks, scales = random_mxfp4(1, 2, 3)
    with pytest.raises(ConfigurationError, match=r"blocks \(1, 2, 3, 16\) and scales \(1, 2\) are not GPT-OSS"):
        dequantize_mxfp4(blocks, scales[..., 0])
    with pytest.raises(ConfigurationError, match="are bytes .uint8., got torch.int32 and torch.uint8"):
        dequantize_mxfp4(blocks.int(), scales)
