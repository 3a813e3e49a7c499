"""Routing statistics: exact per-expert sums, merging == one pass, files, and mismatches."""

from __future__ import annotations

import pytest
import torch

from moe_specialist.architectures import find_moe
from moe_specialist.stats import IGNORE, ROLES, RoutingCollector, RoutingStats, StatisticsMismatchError
from tests.tiny_models import TINY_CONFIGS, tiny_model

BATCHES = [torch.randint(3, 90, (3, 6), generator=torch.Generator().manual_seed(s)) for s in range(4)]


def collect(model, batches, groups=("a", "b")):
    moe = find_moe(model)
    with torch.no_grad(), RoutingCollector(moe, list(groups)) as collector:
        for i, ids in enumerate(batches):
            group = torch.full_like(ids, i % len(groups))
            role = torch.zeros_like(ids)
            role[:, 3:] = 1
            role[0, -1] = IGNORE  # a padding position
            collector.label(group, role)
            model(ids)
    return collector.stats


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_merge_of_shards_equals_one_pass(arch):
    model = tiny_model(arch)
    whole = collect(model, BATCHES)
    first, second = collect(model, BATCHES[:2]), collect(model, BATCHES[2:], groups=("a", "b"))
    # the second shard's batch 0 is labelled "a" as batch 2 is in the whole pass
    merged = first.merge(second)
    for name in ("count", "gate_mass", "reap_sum", "tokens"):
        assert torch.allclose(getattr(merged, name), getattr(whole, name), rtol=1e-12, atol=1e-12), name
    # padding is never counted; every counted token selects top-k experts in every layer
    moe = find_moe(model)
    counted = 4 * 3 * 6 - 4
    assert whole.tokens.sum().item() == counted
    assert torch.all(whole.count.sum(dim=(0, 1, 3)) == counted * moe.top_k)


def test_statistics_match_a_manual_computation():
    """gate_mass and reap_sum equal sums recomputed from the router and the fused weights (Qwen3-MoE)."""
    model = tiny_model("qwen3_moe")
    ids = BATCHES[0][:1]
    moe = find_moe(model)
    captured = {}
    layer = moe.layers[1]
    hook = layer.block.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0].reshape(-1, 64)))
    with torch.no_grad(), RoutingCollector(moe, ["g"]) as collector:
        collector.label(torch.zeros_like(ids), torch.ones_like(ids))
        model(ids)
    hook.remove()
    x = captured["x"]
    with torch.no_grad():
        _, weights, index = layer.router(x)
        experts = layer.experts
        gate_mass = torch.zeros(8, dtype=torch.float64)
        reap = torch.zeros(8, dtype=torch.float64)
        for t in range(x.shape[0]):
            for slot in range(2):
                e = index[t, slot].item()
                gate, up = torch.nn.functional.linear(x[t], experts.gate_up_proj[e]).chunk(2)
                out = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])
                gate_mass[e] += weights[t, slot].item()
                reap[e] += weights[t, slot].item() * out.norm().item()
    stats = collector.stats
    assert torch.allclose(stats.gate_mass[0, ROLES.index("target"), 1], gate_mass, atol=1e-6)
    assert torch.allclose(stats.reap_sum[0, ROLES.index("target"), 1], reap, atol=1e-5)
    assert stats.count[0, ROLES.index("source")].sum() == 0


def test_save_load_round_trip_and_select(tmp_path):
    model = tiny_model("gpt_oss")
    stats = collect(model, BATCHES)
    stats.metadata["model"] = "tiny-gpt-oss"
    stats.save(tmp_path / "stats.safetensors")
    loaded = RoutingStats.load(tmp_path / "stats.safetensors")
    assert loaded.groups == ["a", "b"] and loaded.layers == [0, 1, 2, 3] and loaded.num_experts == [8] * 4
    assert torch.equal(loaded.reap_sum, stats.reap_sum)
    assert loaded.metadata["model"] == "tiny-gpt-oss"
    assert (tmp_path / "stats.json").is_file()
    only_a_target = loaded.select(["a"], ["target"])
    assert torch.equal(only_a_target["count"], stats.count[0, 1])
    with pytest.raises(StatisticsMismatchError, match=r"No statistics for group\(s\) \['fr-en'\]"):
        loaded.select(["fr-en"])


def test_statistics_of_another_model_are_refused(tmp_path):
    stats = collect(tiny_model("qwen3_moe"), BATCHES)
    other = find_moe(tiny_model("deepseek_v3"))
    with pytest.raises(StatisticsMismatchError, match="calibrate this model"):
        stats.validate_for(other)
    bigger = collect(tiny_model("qwen3_moe", hidden_size=32, head_dim=8), BATCHES)
    with pytest.raises(StatisticsMismatchError, match="different models"):
        stats.merge(bigger)


def test_corrupt_statistics_file(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(StatisticsMismatchError, match="corrupt"):
        RoutingStats.load(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="moe-specialist calibrate"):
        RoutingStats.load(tmp_path / "missing.safetensors")


def test_unlabelled_forward_is_an_error():
    model = tiny_model("mixtral")
    with torch.no_grad(), RoutingCollector(find_moe(model), ["a"]), pytest.raises(RuntimeError, match="not labelled"):
        model(BATCHES[0])
    assert model.config._experts_implementation == "grouped_mm"  # restored after the context


def test_statistics_of_a_retrained_checkpoint_are_refused():
    """Same architecture, other weights: the router fingerprint tells them apart."""
    stats = collect(tiny_model("qwen3_moe", seed=0), BATCHES)
    with pytest.raises(StatisticsMismatchError, match="other router weights"):
        stats.validate_for(find_moe(tiny_model("qwen3_moe", seed=1)))
    stats.validate_for(find_moe(tiny_model("qwen3_moe", seed=0)))


def test_statistics_files_must_be_safetensors(tmp_path):
    stats = collect(tiny_model("qwen3_moe"), BATCHES[:1])
    with pytest.raises(ValueError, match="end in .safetensors"):
        stats.save(tmp_path / "stats.json")
