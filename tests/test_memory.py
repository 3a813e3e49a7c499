"""The memory estimate against what is real: materialized tiny models before and after pruning, what PEFT and
AdamW allocate, DeepSpeed's own model-state estimators, and the published real models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_specialist.architectures import find_moe
from moe_specialist.errors import ConfigurationError
from moe_specialist.memory import (
    GIB,
    HOST_RUNTIME_BYTES,
    available_memory,
    check_memory_fits,
    estimate_for_run,
    estimate_memory,
)
from moe_specialist.plan import PrunePlan
from moe_specialist.prune import prune_model
from tests.test_real_models import GPT_OSS_20B, QWEN3_30B_A3B
from tests.tiny_models import tiny_model

# Kept experts (of 8) per MoE layer, in layer order: whole routing groups of DeepSeek-V3's tiny n_group=2 too.
UNIFORM = [[0, 1, 4, 5]] * 4
NON_UNIFORM = [[0, 1, 4, 5], [0, 1, 2, 4, 5, 6], [0, 4], list(range(8))]
ARCHITECTURES = ["qwen3_moe", "gpt_oss", "deepseek_v3", "qwen2_moe", "olmoe"]  # expert biases; shared experts


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def pruned_tiny(model_type: str, kept: list[list[int]]):
    """A tiny bf16 model pruned with ``kept``, its config before pruning, and the per-layer counts."""
    model = tiny_model(model_type).to(torch.bfloat16)
    config = copy.deepcopy(model.config)
    layers = find_moe(model).layer_indices
    plan = {layer: ids for layer, ids in zip(layers, kept, strict=False)}
    prune_model(model, PrunePlan(plan))
    return model, config, {layer: len(ids) for layer, ids in plan.items()}


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@pytest.mark.parametrize("kept", [UNIFORM, NON_UNIFORM], ids=["uniform", "non_uniform"])
def test_parameter_bytes_equal_the_materialized_model_before_and_after_pruning(model_type, kept):
    unpruned = parameter_bytes(tiny_model(model_type).to(torch.bfloat16))
    model, config, counts = pruned_tiny(model_type, kept)
    estimate = estimate_memory(config, experts_after=counts)  # one process, DDP: whole weights on the GPU
    assert estimate.before.total * 2 == unpruned
    assert estimate.phase("measure").gpu["unpruned weights"] == unpruned
    assert estimate.phase("train").gpu["weights"] == parameter_bytes(model)
    assert estimate.after.routed_experts == find_moe(model).parameter_counts()["routed_experts"]
    assert estimate.after.largest_tensor == max(p.numel() for p in model.parameters())
    if kept is UNIFORM:  # a ratio keeps round(E x (1 - ratio)) in every layer: the same model
        assert estimate_memory(config, pruning_ratio=0.5).after == estimate.after


def test_expert_biases_and_shared_experts_are_counted_where_they_belong():
    """GPT-OSS's expert biases are routed-expert parameters; DeepSeek-V3's shared experts are never pruned."""
    model, config, counts = pruned_tiny("gpt_oss", UNIFORM)
    biases = sum(p.numel() for name, p in model.named_parameters() if name.endswith("_proj_bias"))
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    assert biases > 0 and estimate_memory(config, experts_after=counts).after.routed_experts == experts
    model, config, counts = pruned_tiny("deepseek_v3", NON_UNIFORM)
    shared = sum(p.numel() for name, p in model.named_parameters() if "shared_experts" in name)
    estimate = estimate_memory(config, experts_after=counts)
    assert shared > 0 and estimate.after.other - estimate.before.other == -sum(
        (8 - n) * config.hidden_size for n in counts.values()
    )  # only router rows leave the non-expert part


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_lora_adapters_are_counted_as_peft_adds_them_and_kept_in_fp32(model_type):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model, config, counts = pruned_tiny(model_type, NON_UNIFORM)
    wrapped = get_peft_model(model, copy.deepcopy(lora))
    adapters = [p for p in wrapped.parameters() if p.requires_grad]
    estimate = estimate_memory(config, experts_after=counts, training="lora", peft_config=lora)
    assert estimate.after.lora == sum(p.numel() for p in adapters) > 0
    assert {p.dtype for p in adapters} == {torch.float32}
    assert estimate.phase("train").gpu["weights"] == parameter_bytes(wrapped)


def test_router_only_trains_the_pruned_routers():
    model, config, counts = pruned_tiny("gpt_oss", NON_UNIFORM)
    routers = sum(p.numel() for layer in find_moe(model).layers for p in layer.router.parameters())
    estimate = estimate_memory(config, experts_after=counts, training="router_only", num_processes=2, zero_stage=2)
    assert estimate.after.router == routers == sum(n * (64 + 1) for n in counts.values())  # rows and bias
    assert estimate.phase("train").gpu["optimizer"] == math.ceil(12 * routers / 2)


def test_ddp_optimizer_state_and_gradients_are_what_adamw_allocates():
    """Without DeepSpeed the AdamW moments take the bf16 parameters' dtype; DDP doubles the gradients (its buckets)."""
    model, config, counts = pruned_tiny("qwen3_moe", UNIFORM)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
    model(torch.tensor([[5, 17, 42, 7]]), labels=torch.tensor([[5, 17, 42, 7]])).loss.backward()
    optimizer.step()
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    alone = estimate_memory(config, experts_after=counts).phase("train").gpu
    assert alone["optimizer"] == moments and alone["gradients"] == gradients
    ddp = estimate_memory(config, experts_after=counts, num_processes=2).phase("train").gpu
    assert ddp["optimizer"] == moments and ddp["gradients"] == 2 * gradients


@pytest.mark.parametrize("processes", [1, 8])
def test_zero_model_states_match_deepspeeds_own_estimators(processes):
    """DeepSpeed's estimators without offload: ZeRO-2 ``2P + 18P/N``, ZeRO-3 ``4 x largest layer + 18P/N`` (the unit
    ZeRO-3 gathers: a decoder layer, its MoE block being a leaf module)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    config = AutoConfig.for_model(**QWEN3_30B_A3B)
    for stage in (2, 3):
        estimate = estimate_memory(config, pruning_ratio=0.5, num_processes=processes, zero_stage=stage)
        train, total = estimate.phase("train").gpu, estimate.after.total
        states = sum(train.get(k, 0) for k in ("weights", "gradients", "optimizer", "ZeRO-3 gathered layers"))
        if stage == 2:
            expected = estimate_zero2_model_states_mem_needs(total, processes, cpu_offload=False)[1]
        else:
            expected = estimate_zero3_model_states_mem_needs(
                total, estimate.after.largest_unit, processes, cpu_offload=False
            )[1]
        assert abs(states - expected) <= 3  # each part rounds up on its own
        assert train["optimizer"] == math.ceil(12 * total / processes)
        assert train["weights"] == (math.ceil(2 * total / processes) if stage == 3 else 2 * total)


def test_the_published_sizes_of_qwen3_30b_a3b_and_gpt_oss_20b():
    qwen = estimate_memory(AutoConfig.for_model(**QWEN3_30B_A3B), pruning_ratio=0.5, num_processes=8, zero_stage=3)
    assert round(qwen.before.total * 2 / GIB, 1) == 56.9  # bf16
    removed = 48 * 64 * (3 * 768 * 2048 + 2048)  # 64 of 128 experts per layer: gate, up, down and a router row
    assert qwen.before.total - qwen.after.total == removed
    assert round(qwen.phase("train").gpu["optimizer"] * 8 / GIB) == 179  # a ZeRO-3 checkpoint's ~180 GiB at 0.5
    gpt_oss = estimate_memory(AutoConfig.for_model(**GPT_OSS_20B), pruning_ratio=0.5)
    assert round(gpt_oss.before.routed_experts / gpt_oss.before.total, 3) == 0.914  # MXFP4 on the Hub, bf16 here
    assert round(gpt_oss.before.total * 2 / GIB, 2) == 38.96
    per_expert = 2880 * 5760 + 5760 + 2880 * 2880 + 2880 + 2880 + 1  # gate_up, down, their biases; router row, bias
    assert gpt_oss.before.total - gpt_oss.after.total == 24 * 16 * per_expert
    assert gpt_oss.after.experts_per_layer == dict.fromkeys(range(24), 16)


def test_memory_mode_holds_the_unpruned_model_in_host_memory_and_no_mode_gathers_it_to_generate():
    """What users saw: ~56 GiB of host memory per rank (prune_mode memory); generation under ZeRO-3 no longer gathers
    the whole model on every GPU (it needed 87-128 GiB per GPU unpruned), in either mode."""
    config = AutoConfig.for_model(**QWEN3_30B_A3B)
    settings = dict(pruning_ratio=0.0, num_processes=8, zero_stage=3, per_device_train_batch_size=4, max_length=512)
    in_memory = estimate_memory(config, prune_mode="memory", **settings)
    on_disk = estimate_memory(config, prune_mode="disk", **settings)
    assert in_memory.phase("load").host_bytes == HOST_RUNTIME_BYTES + in_memory.before.total * 2
    assert on_disk.peak_host_bytes < 8 * GIB
    assert in_memory.phase("eval").gpu == on_disk.phase("eval").gpu
    assert "whole model gathered" not in on_disk.phase("eval").gpu
    assert on_disk.phase("eval").gpu_bytes < 75 * GIB


def test_a_run_that_does_not_fit_is_refused_naming_the_phase_the_numbers_and_the_knob():
    config = AutoConfig.for_model(**QWEN3_30B_A3B)
    settings = dict(pruning_ratio=0.5, num_processes=8, zero_stage=3, teacher="precomputed")
    today = estimate_memory(config, prune_mode="memory", per_device_train_batch_size=4, **settings)
    with pytest.raises(ConfigurationError) as error:
        check_memory_fits(today, 40 * GIB, 80 * GIB)
    assert str(error.value) == (
        "Not enough host memory for the load phase (the unpruned model in host memory): each rank needs 59.9 GiB "
        "(largest parts in GiB: unpruned weights 56.9; an estimate of moe_specialist.memory) but 40.0 GiB are "
        "available per rank. To fit: "
        "`prune_mode: disk` (the unpruned model goes straight to the GPUs, pruned on disk); fewer processes "
        "on this node; or `--check_memory false` to skip this check."
    )
    unpruned = estimate_memory(config, **{**settings, "pruning_ratio": 0.0})
    with pytest.raises(ConfigurationError, match=r"GPU memory for the measure phase .*unless the plan, statistics"):
        check_memory_fits(unpruned, 512 * GIB, 48 * GIB)
    one_gpu = estimate_memory(config, pruning_ratio=0.5, prune_mode="disk", teacher="precomputed")
    with pytest.raises(ConfigurationError) as error:
        check_memory_fits(one_gpu, 512 * GIB, 80 * GIB)
    message = str(error.value)
    assert "GPU memory for the train phase" in message and "80.0 GiB are available" in message
    assert "`accelerate_configs/zero3.yaml`" in message and "`use_peft: true`" in message
    assert "a higher `pruning_ratio` than 0.5" in message
    assert check_memory_fits(today, 64 * GIB, None) is None  # no GPU: only the host is checked


def test_describe_renders_every_phase_and_the_peak():
    estimate = estimate_memory(
        AutoConfig.for_model(**QWEN3_30B_A3B), pruning_ratio=0.5, num_processes=8, zero_stage=3,
        prune_mode="disk", teacher="precomputed", per_device_train_batch_size=4,
    )  # fmt: skip
    lines = estimate.describe().splitlines()
    assert lines[0] == (
        "Memory per rank (estimate): 30.53B -> 16.03B parameters, 8 processes, ZeRO-3, full, teacher precomputed, "
        "prune_mode disk"
    )
    assert [line.split()[0] for line in lines[2:]] == ["measure", "prune", "load", "train", "eval", "peak"]
    assert lines[-1].split() == [
        "peak",
        f"{estimate.peak_host_bytes / GIB:.1f}",
        f"{estimate.peak_gpu_bytes / GIB:.1f}",
    ]
    assert lines[2].startswith("measure") and "unpruned weights 56.9" in lines[2]


def test_available_memory_shares_the_host_between_local_processes(tmp_path, monkeypatch):
    import moe_specialist.memory as memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    host, gpu = available_memory()
    assert host == 8000000 * 1024 // 4
    assert available_memory(local_processes=2)[0] == 8000000 * 1024 // 2
    assert (gpu is None) == (not torch.cuda.is_available())
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "absent")
    assert available_memory()[0] is None


def test_estimate_for_run_reads_a_recipe(tmp_path):
    from moe_specialist.training import parse_recipe

    *_, calibration, _, training = parse_recipe(
        ["--config", "recipes/olmoe-1b-7b/en-de/prune_sft.yaml", "--output_dir", str(tmp_path / "run")]
    )
    config = tiny_model("olmoe").config
    estimate = estimate_for_run(config, 0.5, training, 8, "disk", zero_stage=2, calibration_args=calibration)
    assert estimate == estimate_memory(
        config, pruning_ratio=0.5, num_processes=8, zero_stage=2, teacher="precomputed",
        per_device_train_batch_size=8, max_length=512, gradient_checkpointing=True, prune_mode="disk",
        measure_batch_size=8, measure_max_length=512, generation_batch_size=16, max_new_tokens=256,
    )  # fmt: skip


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "olmoe", "deepseek_v3"])
def test_activations_match_what_autograd_saves_for_the_backward_pass(model_type):
    """Without checkpointing the estimate is within 20% of the tensors autograd saves (weights left out); with it
    the forward saves less than the estimate, which adds the recomputed layer and the logits' gradients."""
    from tests.tiny_models import tiny_config

    config = tiny_config(model_type, hidden_size=256)  # 97 tokens: the layers dominate, not the logits
    eager = model_type == "gpt_oss"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager" if eager else "sdpa")
    model = model.to(torch.bfloat16).train()
    ids = torch.randint(3, 97, (2, 128), generator=torch.Generator().manual_seed(0))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        saved: dict[int, int] = {}

        def pack(tensor, saved=saved):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(ids, labels=ids)
        measured = sum(n for pointer, n in saved.items() if pointer not in weights)
        estimate = estimate_memory(
            config, pruning_ratio=0.0, per_device_train_batch_size=2, max_length=128,
            gradient_checkpointing=checkpointing, eager_attention=eager,
        ).phase("train").gpu["activations"]  # fmt: skip
        if checkpointing:
            assert measured < estimate
        else:
            assert 0.75 < estimate / measured < 1.25
