"""Pruning checkpoints in the published layouts (tests/real_layouts.py): on disk and in memory agree, to the bit.

For each layout, the source checkpoint is pruned on disk (``prune_checkpoint``) and, loaded by transformers, in
memory (``prune_model``), with a plan keeping different counts per layer and with a uniform one. The pruned
checkpoint must hold exactly the source's tensors (names, dtypes, MXFP4 blocks and scales, FP8 weights and their
``weight_scale_inv``) with the removed experts' entries gone, the rest renumbered or sliced, in the source's shard
files with a matching index; reloaded, it must give the very logits of the model pruned in memory.

On CPU transformers loads MXFP4 and FP8 checkpoints by dequantizing them to bf16 (it needs a GPU, or Triton and
the kernels package, to keep them quantized): the loaded weights are checked against the reference dequantization
of the fixture's own blocks and scales, so the comparison runs on the real quantized files.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

from moe_specialist.architectures import COUNT_FIELDS, find_moe
from moe_specialist.plan import PrunePlan
from moe_specialist.prune import load_pruned_model, prune_checkpoint, prune_model, save_pruned_model
from tests.real_layouts import (
    LAYER,
    LAYOUTS,
    TOP_LEVEL_KEYS,
    build_checkpoint,
    build_model_config,
    dequantize_fp8,
    dequantize_mxfp4,
    read_checkpoint,
)

# Experts kept per MoE layer: different counts per layer, then the same in every layer. DeepSeek-V3 routes within
# 8 groups of 4 experts, so every group keeps the same number (3 and 2 per group).
COUNTS = {
    "gpt-oss-20b": ([24, 12], [20, 20]),
    "qwen3-30b-a3b": ([12, 9], [12, 12]),
    "olmoe-1b-7b-0924": ([10, 13], [12, 12]),
    "deepseek-v3": ([24, 16], [24, 24]),
    "mixtral-8x7b": ([6, 3], [5, 5]),
}
PER_EXPERT_KEY = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<rest>.+)$")


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def source(request, tmp_path_factory):
    """(layout, checkpoint directory, the model transformers loads from it)."""
    layout = LAYOUTS[request.param]
    directory = build_checkpoint(layout, tmp_path_factory.mktemp(layout.name) / "source")
    return layout, directory, AutoModelForCausalLM.from_pretrained(directory).eval()


def make_plan(model, counts: list[int], seed: int = 0) -> PrunePlan:
    """Random experts (seeded, not a prefix: renumbering is tested), the same number in each routing group."""
    moe = find_moe(model)
    generator = torch.Generator().manual_seed(seed)
    kept = {}
    for layer, keep in zip(moe.layers, counts, strict=True):
        size = layer.num_experts // moe.n_group
        kept[layer.layer_index] = sorted(
            group * size + int(i)
            for group in range(moe.n_group)
            for i in torch.randperm(size, generator=generator)[: keep // moe.n_group]
        )
    return PrunePlan(kept)


def expected_tensors(layout, source: dict[str, torch.Tensor], kept: dict[int, list[int]]) -> dict[str, torch.Tensor]:
    """What the pruned checkpoint must hold, from the layout's own description of its per-expert tensors."""
    rows = re.compile(LAYER + layout.per_expert_rows)
    out = {}
    for key, tensor in source.items():
        layer = int(key.split(".")[2]) if key.startswith("model.layers.") else None
        ids = kept.get(layer)
        expert = PER_EXPERT_KEY.match(key)
        if ids is None:
            out[key] = tensor
        elif expert and "shared" not in key:
            if int(expert["expert"]) in ids:
                out[f"{expert['prefix']}.{ids.index(int(expert['expert']))}.{expert['rest']}"] = tensor
        elif rows.match(key):
            out[key] = tensor[ids]
        else:
            out[key] = tensor
    return out


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key].view(torch.uint8), tensor.view(torch.uint8)), key  # bit-identical (FP8 too)


def expected_config_changes(layout, plan: PrunePlan) -> dict:
    """The fields of the pruned config.json that differ from the source's, and their new values."""
    after = {layer: len(ids) for layer, ids in plan.kept_experts.items()}
    changes = {name: max(after.values()) for name in COUNT_FIELDS if name in layout.config}
    if len(set(after.values())) > 1:
        changes["moe_experts_per_layer"] = {str(layer): count for layer, count in after.items()}
        changes["auto_map"] = {"AutoModelForCausalLM": f"modeling_moe_specialist.{layout.config['architectures'][0]}"}
    elif "auto_map" in layout.config:
        changes["auto_map"] = None  # DeepSeek-V3's own modeling code is not in the (fixture or pruned) checkpoint
    return changes


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


INPUT = torch.randint(3, 150, (2, 11), generator=torch.Generator().manual_seed(0))


def test_the_fixture_has_the_hub_layout(source):
    layout, directory, model = source
    assert json.loads((directory / "config.json").read_text()) == {**layout.config, **layout.tiny}
    tensors = read_checkpoint(directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == layout.shard_names()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert {k for k in tensors if not k.startswith("model.layers.")} == set(TOP_LEVEL_KEYS)
    patterns = [re.compile(LAYER + p + "$") for p in layout.moe_keys + layout.attention_keys]
    for layer in find_moe(model).layer_indices:
        keys = [k for k in tensors if k.startswith(f"model.layers.{layer}.")]
        assert all(any(p.match(k) for p in patterns) for k in keys), keys
        assert all(any(p.match(k) for k in keys) for p in patterns)
    if layout.mtp:  # DeepSeek-V3's multi-token-prediction layer: a decoder layer and six tensors of its own
        mtp = f"model.layers.{layout.tiny['num_hidden_layers']}."
        own = {k.removeprefix(mtp) for k in tensors if k.startswith(mtp) and not any(p.match(k) for p in patterns)}
        assert own == {
            "embed_tokens.weight",
            "enorm.weight",
            "hnorm.weight",
            "eh_proj.weight",
            "shared_head.norm.weight",
            "shared_head.head.weight",
        }


def test_transformers_dequantizes_the_quantized_fixtures_as_the_reference_does(source):
    """What the logit comparisons below rest on: the CPU load reads the MXFP4 and FP8 files as specified."""
    layout, directory, model = source
    tensors = read_checkpoint(directory)
    quantization = layout.config.get("quantization_config", {}).get("quant_method")
    layer = find_moe(model).layers[0]
    prefix = f"model.layers.{layer.layer_index}.mlp"
    if quantization == "mxfp4":
        blocks, scales = (
            tensors[f"{prefix}.experts.gate_up_proj_blocks"],
            tensors[f"{prefix}.experts.gate_up_proj_scales"],
        )
        assert blocks.dtype == scales.dtype == torch.uint8 and blocks.shape[-1] == 16
        reference = dequantize_mxfp4(blocks, scales).transpose(1, 2).to(torch.bfloat16)
        assert torch.equal(layer.experts.gate_up_proj, reference)
        down = dequantize_mxfp4(
            tensors[f"{prefix}.experts.down_proj_blocks"], tensors[f"{prefix}.experts.down_proj_scales"]
        )
        assert torch.equal(layer.experts.down_proj, down.transpose(1, 2).to(torch.bfloat16))
    elif quantization == "fp8":
        expert = 5
        gate, up = (
            dequantize_fp8(
                tensors[f"{prefix}.experts.{expert}.{p}.weight"],
                tensors[f"{prefix}.experts.{expert}.{p}.weight_scale_inv"],
            )
            for p in ("gate_proj", "up_proj")
        )
        assert tensors[f"{prefix}.experts.{expert}.gate_proj.weight"].dtype == torch.float8_e4m3fn
        assert tensors[f"{prefix}.experts.{expert}.gate_proj.weight_scale_inv"].dtype == torch.float32
        assert torch.equal(layer.experts.gate_up_proj[expert], torch.cat([gate, up]).to(torch.bfloat16))
        attention = "model.layers.0.self_attn.kv_b_proj.weight"
        reference = dequantize_fp8(tensors[attention], tensors[f"{attention}_scale_inv"]).to(torch.bfloat16)
        assert torch.equal(model.get_submodule(attention.rsplit(".", 1)[0]).weight, reference)
    else:
        pytest.skip(f"{layout.name} is not quantized")


@pytest.mark.parametrize("uniform", [False, True], ids=["per-layer", "uniform"])
def test_pruning_on_disk_and_in_memory_agree(source, uniform, tmp_path):
    layout, directory, model = source
    plan = make_plan(model, COUNTS[layout.name][uniform])
    pruned_dir = tmp_path / "pruned"
    prune_checkpoint(directory, plan, pruned_dir)

    assert_same_tensors(
        read_checkpoint(pruned_dir), expected_tensors(layout, read_checkpoint(directory), plan.kept_experts)
    )
    index = json.loads((pruned_dir / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == layout.shard_names()
    pruned = read_checkpoint(pruned_dir)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in pruned.values())
    config, source_config = (json.loads((d / "config.json").read_text()) for d in (pruned_dir, directory))
    changed = {k: config.get(k) for k in config.keys() | source_config.keys() if config.get(k) != source_config.get(k)}
    assert changed == expected_config_changes(layout, plan)  # quantization_config and everything else as published

    in_memory = copy.deepcopy(model)
    prune_model(in_memory, plan)
    reloaded = load_pruned_model(pruned_dir).eval()
    expected = logits(in_memory, INPUT)
    assert torch.equal(logits(reloaded, INPUT), expected)
    assert not torch.equal(logits(model, INPUT), expected)  # the plan removed experts the input routes to
    if uniform:
        assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(pruned_dir).eval(), INPUT), expected)


def test_a_model_pruned_in_memory_saves_and_reloads(source, tmp_path):
    """The in-memory path's own output (``save_pruned_model``) reloads with the same logits, also from MXFP4 and FP8
    checkpoints (dequantized on load, saved unquantized: see ``compat.saved_without_quantized_loading``)."""
    layout, directory, model = source
    pruned = copy.deepcopy(model)
    prune_model(pruned, make_plan(model, COUNTS[layout.name][0]))
    save_pruned_model(pruned, tmp_path / "saved")
    assert torch.equal(logits(load_pruned_model(tmp_path / "saved").eval(), INPUT), logits(pruned, INPUT))


def test_a_model_kept_in_fp8_prunes_each_experts_scales_with_its_weights():
    """On a GPU transformers keeps DeepSeek-V3's experts in FP8 (``FP8Experts``: e4m3 weights and float32
    ``*_scale_inv`` blocks, expert dim first). Its forward needs a GPU; the pruned tensors are compared here."""
    layout = LAYOUTS["deepseek-v3"]
    model = AutoModelForCausalLM.from_config(build_model_config(layout))
    model = replace_with_fp8_linear(model, quantization_config=FineGrainedFP8Config(), pre_quantized=True)
    model.to_empty(device="cpu")  # the FP8 modules are created empty, on the meta device
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator).to(tensor.dtype))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    plan = make_plan(model, COUNTS[layout.name][0])
    prune_model(model, plan)
    for layer in find_moe(model).layers:
        kept = plan.kept_experts[layer.layer_index]
        experts = {f"{layer.experts_path}.{name}" for name in ("gate_up_proj", "down_proj")}
        scales = {f"{name}_scale_inv" for name in experts}
        assert experts | scales <= {t.path for t in layer.tensors} and layer.experts.num_experts == len(kept)
        for t in layer.tensors:
            assert (
                t.tensor.dtype
                == before[t.path].dtype
                == (torch.float8_e4m3fn if t.path in experts else t.tensor.dtype)
            )
            assert torch.equal(t.tensor.view(torch.uint8), before[t.path][kept].view(torch.uint8)), t.path


def test_gpt_oss_pruned_on_disk_and_dequantized_once_loads_as_plain_bf16(tmp_path):
    """``prune_checkpoint(..., dequantize=True)`` (what ``prune_mode: disk`` does for MXFP4): the kept experts are
    written in bf16 without the quantization config, so loading skips dequantizing, with the very logits of the MXFP4
    checkpoint pruned on disk and dequantized by transformers at load time."""
    layout = LAYOUTS["gpt-oss-20b"]
    directory = build_checkpoint(layout, tmp_path / "source")
    plan = make_plan(AutoModelForCausalLM.from_pretrained(directory), COUNTS[layout.name][0])
    prune_checkpoint(directory, plan, tmp_path / "mxfp4")
    prune_checkpoint(directory, plan, tmp_path / "bf16", dequantize=True)

    tensors = read_checkpoint(tmp_path / "bf16")
    assert not any(key.endswith(("_blocks", "_scales")) for key in tensors)
    assert tensors["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    assert tensors["model.layers.0.mlp.experts.gate_up_proj"].shape == (24, 64, 128)  # [E kept, H, 2I]
    assert tensors["model.layers.1.mlp.experts.down_proj"].shape == (12, 64, 64)
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_local_experts"] == 24 and config["moe_experts_per_layer"] == {"0": 24, "1": 12}
    expected = logits(load_pruned_model(tmp_path / "mxfp4").eval(), INPUT)
    assert torch.equal(logits(load_pruned_model(tmp_path / "bf16").eval(), INPUT), expected)
