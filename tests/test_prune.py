"""Physical pruning on tiny random models of every supported family: identity, exactness, reload, on-disk parity."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moe_specialist.architectures import find_moe
from moe_specialist.cli import main as cli_main
from moe_specialist.errors import ConfigurationError
from moe_specialist.io import INDEX_FILE, read_weight_map
from moe_specialist.plan import PrunePlan
from moe_specialist.prune import load_pruned_model, prune_checkpoint, prune_model, save_pruned_model
from moe_specialist.safetensors_stream import read_header
from tests.helpers import routed_counts, umask
from tests.tiny_models import TINY_CONFIGS, tiny_model

ARCHS = sorted(TINY_CONFIGS)
INPUT = torch.tensor([[5, 17, 42, 8, 63]])
SHORT = INPUT[:, :3]  # 3 tokens x top-2 leave at least 2 of 8 experts unrouted in every layer


def logits(model, ids=INPUT):
    with torch.no_grad():
        return model(ids).logits


def non_uniform_plan(model) -> PrunePlan:
    moe = find_moe(model)
    kept = {}
    for position, layer in enumerate(moe.layers):
        n = max(moe.top_k * moe.n_group, layer.num_experts - 2 * (position % 2 + 1) * moe.n_group // moe.n_group)
        if moe.n_group > 1:  # the same count in every group
            size = layer.num_experts // moe.n_group
            per = max(2, n // moe.n_group)
            kept[layer.layer_index] = [g * size + i for g in range(moe.n_group) for i in range(per)]
        else:
            kept[layer.layer_index] = list(range(layer.num_experts))[-n:]
    return PrunePlan(kept)


def uniform_plan(model, keep: int = 6) -> PrunePlan:
    moe = find_moe(model)
    if moe.n_group > 1:
        size = moe.layers[0].num_experts // moe.n_group
        per = keep // moe.n_group
        return PrunePlan(
            {
                layer: [g * size + size - per + i for g in range(moe.n_group) for i in range(per)]
                for layer in moe.layer_indices
            }
        )
    return PrunePlan({layer: list(range(8 - keep, 8)) for layer in moe.layer_indices})


@pytest.mark.parametrize("arch", ARCHS)
def test_keeping_every_expert_is_bit_identical(arch):
    model = tiny_model(arch)
    before = logits(model)
    moe = find_moe(model)
    report = prune_model(model, PrunePlan({layer: list(range(8)) for layer in moe.layer_indices}), moe)
    assert torch.equal(logits(model), before)
    assert report.actual_ratio == 0.0


@pytest.mark.parametrize("arch", ARCHS)
def test_removing_unrouted_experts_is_exact_and_removing_a_routed_one_is_not(arch):
    model = tiny_model(arch)
    moe = find_moe(model)
    if moe.routing.exact is not True:
        pytest.skip(f"{arch}: routing {moe.routing.kind} is not exact by construction ({moe.routing.reason})")
    before = logits(model, SHORT)
    counts = routed_counts(model, SHORT)
    unused = {layer: [e for e in range(8) if counts[layer][e] == 0] for layer in counts}
    assert all(len(ids) >= 2 for ids in unused.values())
    plan = PrunePlan({layer: [e for e in range(8) if e not in unused[layer]] for layer in counts})
    pruned = tiny_model(arch)
    prune_model(pruned, plan)
    assert (logits(pruned, SHORT) - before).abs().max().item() <= 1e-5
    # removing a routed expert changes the output
    layer = moe.layer_indices[0]
    used = [e for e in range(8) if counts[layer][e] > 0]
    damaged = tiny_model(arch)
    prune_model(damaged, PrunePlan({layer: [e for e in range(8) if e != used[0]]}))
    assert (logits(damaged, SHORT) - before).abs().max().item() > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_shapes_config_and_generation(arch):
    model = tiny_model(arch)
    plan = uniform_plan(model)
    report = prune_model(model, plan)
    moe = find_moe(model)
    assert set(moe.experts_per_layer.values()) == {6}
    for layer in moe.layers:
        for t in layer.tensors:
            assert t.tensor.shape[t.dim] == 6, t.path
    for field in moe.count_fields:
        assert getattr(model.config, field) == 6
    assert report.parameters_after["routed_experts"] == report.parameters_before["routed_experts"] * 6 // 8
    out = model.generate(INPUT, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, INPUT.shape[1] + 3)


@pytest.mark.parametrize("arch", ARCHS)
def test_uniform_checkpoint_reloads_with_plain_from_pretrained(arch, tmp_path):
    model = tiny_model(arch)
    prune_model(model, uniform_plan(model))
    expected = logits(model)
    save_pruned_model(model, tmp_path / "pruned")
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (logits(reloaded.eval()) - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_non_uniform_checkpoint_reloads_with_its_counts(arch, tmp_path):
    model = tiny_model(arch)
    plan = non_uniform_plan(model)
    prune_model(model, plan)
    expected = logits(model)
    counts = find_moe(model).experts_per_layer
    assert len(set(counts.values())) > 1
    save_pruned_model(model, tmp_path / "pruned")
    reloaded = load_pruned_model(tmp_path / "pruned")
    assert find_moe(reloaded).experts_per_layer == counts
    assert (logits(reloaded) - expected).abs().max().item() <= 1e-6
    with pytest.raises(RuntimeError, match="size mismatch|ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")


def prune_both_ways(model, plan: PrunePlan, tmp_path) -> tuple[dict, dict]:
    """Prune the checkpoint in ``tmp_path/original`` on disk and ``model`` in memory; the tensors each path saved."""
    prune_checkpoint(tmp_path / "original", plan, tmp_path / "disk")
    prune_model(model, plan)
    save_pruned_model(model, tmp_path / "memory")
    return checkpoint_tensors(tmp_path / "disk"), checkpoint_tensors(tmp_path / "memory")


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint, one file or sharded."""
    return {key: t for shard in sorted(path.glob("*.safetensors")) for key, t in load_file(shard).items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["uniform", "non_uniform"])
def test_on_disk_pruning_equals_in_memory(arch, kind, tmp_path):
    model = tiny_model(arch)
    model.save_pretrained(tmp_path / "original")
    plan = uniform_plan(model) if kind == "uniform" else non_uniform_plan(model)
    disk, memory = prune_both_ways(model, plan, tmp_path)
    assert disk.keys() == memory.keys()
    for key in disk:
        assert torch.equal(disk[key], memory[key]), key
    disk_config = json.loads((tmp_path / "disk" / "config.json").read_text())
    memory_config = json.loads((tmp_path / "memory" / "config.json").read_text())
    for key in set(disk_config) | set(memory_config):
        if key not in ("transformers_version", "dtype", "torch_dtype", "architectures"):
            assert disk_config.get(key) == memory_config.get(key), key
    assert PrunePlan.load(tmp_path / "disk" / "prune_plan.json").kept_experts == plan.kept_experts


@pytest.mark.parametrize("arch", ["deepseek_v3", "gpt_oss"])
def test_sharded_on_disk_pruning_equals_in_memory_and_rewrites_the_index(arch, tmp_path):
    model = tiny_model(arch)
    model.save_pretrained(tmp_path / "original", max_shard_size="100KB")
    shards = set(read_weight_map(tmp_path / "original").values())
    assert len(shards) > 2
    disk, memory = prune_both_ways(model, non_uniform_plan(model), tmp_path)
    assert disk.keys() == memory.keys()
    for key in disk:
        assert torch.equal(disk[key], memory[key]), key
    # every source shard is rewritten under its own name; the index maps each tensor to the shard that holds it
    index = json.loads((tmp_path / "disk" / INDEX_FILE).read_text())
    weight_map = index["weight_map"]
    assert {p.name for p in (tmp_path / "disk").glob("*.safetensors")} == set(weight_map.values()) == shards
    for shard in shards:
        assert set(load_file(tmp_path / "disk" / shard)) == {key for key, s in weight_map.items() if s == shard}
    assert set(weight_map) == set(memory)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in memory.values())
    assert find_moe(load_pruned_model(tmp_path / "disk")).experts_per_layer == find_moe(model).experts_per_layer


def test_lowering_top_k_updates_config_and_routers():
    model = tiny_model("qwen3_moe")
    plan = PrunePlan({layer: [0, 1, 2] for layer in range(4)}, top_k=1)
    report = prune_model(model, plan)
    assert report.top_k_after == 1 and model.config.num_experts_per_tok == 1
    assert all(layer.router.top_k == 1 for layer in find_moe(model).layers)
    assert logits(model).shape == (1, 5, 97)


def test_plan_errors_are_clear():
    model = tiny_model("qwen3_moe")
    moe = find_moe(model)
    with pytest.raises(ValueError, match="decoder layer 9, which is not an MoE layer"):
        PrunePlan({9: [0, 1]}).validate(moe)
    with pytest.raises(ValueError, match=r"experts 0\.\.7; the plan names \[8\]"):
        PrunePlan({0: [0, 8]}).validate(moe)
    with pytest.raises(ValueError, match="fewer than top-k=2"):
        PrunePlan({0: [3]}).validate(moe)
    with pytest.raises(ValueError, match="lists an expert twice"):
        PrunePlan.from_dict({"kept_experts": {"0": [1, 1, 2]}})
    with pytest.raises(ValueError, match="not a prune plan"):
        PrunePlan.from_dict({"experts": {}})
    deepseek = find_moe(tiny_model("deepseek_v3"))
    with pytest.raises(ValueError, match="every group must keep the same number"):
        PrunePlan({1: [0, 1, 2, 4, 5]}).validate(deepseek)


def test_output_directory_is_never_overwritten_silently(tmp_path):
    model = tiny_model("mixtral")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_pruned_model(model, tmp_path / "out")
    model.save_pretrained(tmp_path / "original")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prune_checkpoint(tmp_path / "original", uniform_plan(model), tmp_path / "out")
    prune_checkpoint(tmp_path / "original", uniform_plan(model), tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "original")
    weights = tmp_path / "original" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        prune_checkpoint(tmp_path / "original", uniform_plan(model), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_lowered_top_k_reaches_layers_the_plan_does_not_list(tmp_path):
    model = tiny_model("qwen3_moe")
    prune_model(model, PrunePlan({0: [0, 1, 2, 3]}, top_k=1))
    assert [layer.router.top_k for layer in find_moe(model).layers] == [1, 1, 1, 1]
    expected = logits(model)
    save_pruned_model(model, tmp_path / "pruned")
    assert (logits(load_pruned_model(tmp_path / "pruned")) - expected).abs().max().item() <= 1e-6


def test_a_plan_for_other_expert_counts_is_refused():
    plan = PrunePlan({0: [0, 1]}, metadata={"num_experts": {"0": 6, "1": 6, "2": 6, "3": 6}})
    with pytest.raises(ValueError, match="made for a model with other expert counts"):
        plan.validate(find_moe(tiny_model("qwen3_moe")))


def test_bfloat16_checkpoints_stay_bfloat16_and_both_paths_agree(tmp_path):
    model = tiny_model("gpt_oss").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "original")
    plan = uniform_plan(model)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "original", dtype="auto")
    disk, memory = prune_both_ways(reloaded, plan, tmp_path)
    assert disk.keys() == memory.keys()
    assert all(disk[k].dtype == torch.bfloat16 and torch.equal(disk[k], memory[k]) for k in disk)


def test_on_disk_pruning_copies_file_to_file_and_never_reads_a_removed_expert(tmp_path, monkeypatch):
    """GPT-OSS's fused experts and router rows are indexed by expert first: only the kept experts' bytes are read."""
    model = tiny_model("gpt_oss").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "original")
    copied: list[tuple[int, int]] = []
    copy_file_range = os.copy_file_range

    def recording(source, out, count, offset_src=None, *args):
        copied.append((offset_src, copy_file_range(source, out, count, offset_src, *args)))
        return copied[-1][1]

    monkeypatch.setattr(os, "copy_file_range", recording)
    report = prune_checkpoint(tmp_path / "original", uniform_plan(model), tmp_path / "out")  # removes experts 0, 1
    assert sum(count for _, count in copied) == report["total_size"]  # every byte once, straight from the source
    tensors, _ = read_header(tmp_path / "original" / "model.safetensors")
    fused = {key: info for key, info in tensors.items() if re.search(r"mlp\.(experts|router)\.", key)}
    assert len(fused) == 6 * 4 and all(info.shape[0] == 8 for info in fused.values())
    for key, info in fused.items():
        removed = (info.start, info.start + 2 * (info.end - info.start) // 8)
        assert not [(o, n) for o, n in copied if o < removed[1] and removed[0] < o + n], key


def test_prune_checkpoint_copies_only_what_belongs_to_the_model(tmp_path):
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "original")
    (tmp_path / "original" / "pytorch_model.bin").write_bytes(b"stale full-size weights")
    (tmp_path / "original" / "tokenizer_config.json").write_text("{}")
    prune_checkpoint(tmp_path / "original", uniform_plan(model), tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()


def test_routers_with_extra_rows_are_refused():
    """Inkling / Zaya / Longcat-style routers score sentinel or 'zero' experts beyond the real ones."""
    from torch import nn

    from moe_specialist.architectures import UnsupportedArchitectureError

    model = tiny_model("qwen3_moe")
    model.model.layers[0].mlp.gate.weight = nn.Parameter(torch.zeros(9, 64))
    with pytest.raises(UnsupportedArchitectureError, match="has 9 rows for 8 experts"):
        find_moe(model)


@pytest.mark.parametrize(
    ("output", "relation"), [("original", "is"), (".", "contains"), ("original/pruned", "is inside")]
)
def test_pruning_never_overwrites_or_writes_into_the_source(tmp_path, output, relation):
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "original")
    (tmp_path / "sibling.txt").write_text("kept")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    message = re.escape(f"The output {tmp_path / output} {relation} the input {tmp_path / 'original'}: writing")
    with pytest.raises(ConfigurationError, match=message):
        prune_checkpoint(tmp_path / "original", uniform_plan(model), tmp_path / output, overwrite=True)
    with pytest.raises(ConfigurationError, match=message):
        save_pruned_model(model, tmp_path / output, overwrite=True, protected=[tmp_path / "original"])
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_pruned_files_follow_the_umask(tmp_path):
    """safetensors writes each shard as a 0600 temporary file of its own; copies keep their source's mode."""
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "original", max_shard_size="200KB")
    (tmp_path / "original" / "tokenizer.json").write_text("{}")
    (tmp_path / "original" / "tokenizer.json").chmod(0o600)
    prune_checkpoint(tmp_path / "original", uniform_plan(model), tmp_path / "out")
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out").iterdir()}
    assert len([name for name in modes if name.endswith(".safetensors")]) > 1 and "tokenizer.json" in modes
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask()))
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask()


# The killed run is the CLI with each shard's write followed by a pause, so that the kill lands mid-prune however
# fast the disk is (200 MB prune in 0.3 s here: a race without it).
THROTTLED_CLI = """
import time
import moe_specialist.prune as prune
from moe_specialist.cli import main

def write_then_pause(*args, **kwargs):
    size = write_safetensors(*args, **kwargs)
    time.sleep(0.5)
    return size

write_safetensors, prune.write_safetensors = prune.write_safetensors, write_then_pause
main()
"""


@pytest.mark.slow
def test_a_killed_on_disk_prune_leaves_no_output_and_the_rerun_cleans_up(tmp_path):
    model = tiny_model("qwen3_moe", moe_intermediate_size=1024)  # 26 MB in 6 shards
    model.save_pretrained(tmp_path / "original", max_shard_size="5MB")
    plan = uniform_plan(model)
    plan.save(tmp_path / "plan.json")
    shards = sorted(read_weight_map(tmp_path / "original").values())
    first_shard = shards[0]
    assert len(set(shards)) == 6
    arguments = ["prune", "--model", tmp_path / "original", "--prune_plan", tmp_path / "plan.json"]
    arguments = [str(a) for a in (*arguments, "--output", tmp_path / "out", "--mode", "disk")]

    def staged() -> list[Path]:
        return [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]

    with (tmp_path / "killed.log").open("w") as log:
        killed = subprocess.Popen([sys.executable, "-c", THROTTLED_CLI, *arguments], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not any((staging / first_shard).is_file() for staging in staged()):
            assert killed.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
            time.sleep(0.01)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "out").exists()
    [stale] = staged()
    assert stale.name.startswith(f".out.{killed.pid}@") and (stale / first_shard).is_file()

    cli_main(arguments)  # the same command, in this process (a second interpreter start costs seconds)
    assert staged() == []
    prune_checkpoint(tmp_path / "original", plan, tmp_path / "reference")
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(tmp_path / "reference"))
    assert read_weight_map(tmp_path / "out") == read_weight_map(tmp_path / "reference")
    resumed, reference = checkpoint_tensors(tmp_path / "out"), checkpoint_tensors(tmp_path / "reference")
    assert len(resumed) > 100 and resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[key], reference[key]) for key in reference)
