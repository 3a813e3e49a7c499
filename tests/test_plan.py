"""Criteria and allocations on hand-made statistics with known answers."""

from __future__ import annotations

import json

import pytest
import torch

from moe_specialist.architectures import find_moe
from moe_specialist.errors import ConfigurationError
from moe_specialist.plan import PrunePlan, make_plan, score_experts
from moe_specialist.stats import RoutingStats
from tests.helpers import skewed_counts, stats_with
from tests.tiny_models import tiny_model


@pytest.fixture
def qwen():
    return find_moe(tiny_model("qwen3_moe"))


def test_frequency_keeps_the_most_routed_experts(qwen):
    plan = make_plan(qwen, stats_with(skewed_counts()), ratio=0.5, criterion="frequency", allocation="uniform")
    assert plan.kept_experts == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3], 2: [0, 1, 2, 3], 3: [0, 1, 2, 3]}
    assert plan.metadata["target_ratio"] == plan.metadata["actual_ratio"] == 0.5
    assert "pruning_ratio" not in plan.metadata  # the knob's name never labels an outcome


def test_gate_mass_and_reap_rank_differently_from_frequency(qwen):
    counts = torch.full((4, 8), 10.0, dtype=torch.float64)
    gate = torch.arange(8, dtype=torch.float64).repeat(4, 1)  # expert 7 carries the most weight
    reap = gate.flip(1) * counts  # mean g*||f|| largest for expert 0
    stats = stats_with(counts, gate, reap)
    by_gate = make_plan(qwen, stats, 0.75, criterion="gate_mass")
    by_reap = make_plan(qwen, stats, 0.75, criterion="reap")
    assert by_gate.kept_experts[0] == [6, 7]
    assert by_reap.kept_experts[0] == [0, 1]
    assert torch.allclose(score_experts(stats, "reap")[0], gate.flip(1)[0])


def two_direction_stats() -> RoutingStats:
    """Output mass (reap_sum) per group x role on 2 layers of 4 experts; de-en has no target tokens.

    Layer 0: en-fr sources use experts 0-1 (mass 8), its targets experts 2-3 (mass 40), de-en sources experts 1-2.
    Counts and gate mass are uniform: only the output mass may decide.
    """
    stats = RoutingStats.empty(["en-fr", "de-en"], [0, 1], [4, 4])
    stats.count.fill_(5.0)
    stats.gate_mass.fill_(1.0)
    stats.reap_sum[0, 0] = torch.tensor([[6.0, 2, 0, 0], [1, 1, 1, 1]])  # en-fr, source
    stats.reap_sum[0, 1] = torch.tensor([[0.0, 0, 30, 10], [0, 0, 0, 8]])  # en-fr, target
    stats.reap_sum[1, 0] = torch.tensor([[0.0, 4, 4, 0], [2, 0, 0, 2]])  # de-en, source
    return stats


def test_output_mass_sums_the_router_weighted_output_over_the_chosen_slices():
    stats = two_direction_stats()
    expected = torch.tensor([[6.0, 6, 34, 10], [3, 1, 1, 11]], dtype=torch.float64)
    assert torch.equal(score_experts(stats, "output_mass"), expected)
    assert torch.equal(score_experts(stats, "output_mass", groups=["en-fr"], roles=["source"]), stats.reap_sum[0, 0])
    assert torch.equal(
        score_experts(stats, "output_mass", groups=["en-fr"]), torch.tensor([[6.0, 2, 30, 10], [1, 1, 1, 9]])
    )


def test_language_aware_averages_each_direction_and_role_slice_normalised():
    stats = two_direction_stats()
    # slices with mass (the empty de-en target slice is left out), each normalised per layer, then averaged
    expected = torch.tensor([[3.0, 3, 5, 1], [3, 1, 1, 7]], dtype=torch.float64) / 12
    torch.testing.assert_close(score_experts(stats, "language_aware"), expected, rtol=0, atol=1e-15)
    en_fr = score_experts(stats, "language_aware", groups=["en-fr"])
    torch.testing.assert_close(en_fr[0], torch.tensor([0.375, 0.125, 0.375, 0.125], dtype=torch.float64))
    # the target side has 5x the mass of the source side: output_mass keeps two target experts, language_aware
    # the best expert of each side
    assert sorted(score_experts(stats, "output_mass", groups=["en-fr"])[0].topk(2).indices.tolist()) == [2, 3]
    assert sorted(en_fr[0].topk(2).indices.tolist()) == [0, 2]
    with pytest.raises(ConfigurationError, match=r"No routed tokens in groups \['de-en'\] and roles \['target'\]\."):
        score_experts(stats, "language_aware", groups=["de-en"], roles=["target"])


def test_random_is_seeded(qwen):
    stats = stats_with(skewed_counts())
    a = make_plan(qwen, stats, 0.5, criterion="random", seed=1)
    b = make_plan(qwen, stats, 0.5, criterion="random", seed=1)
    c = make_plan(qwen, stats, 0.5, criterion="random", seed=2)
    assert a.kept_experts == b.kept_experts != c.kept_experts


def test_global_allocation_moves_budget_to_spread_layers(qwen):
    plan = make_plan(qwen, stats_with(skewed_counts()), 0.5, criterion="frequency", allocation="global")
    kept = {layer: len(ids) for layer, ids in plan.kept_experts.items()}
    assert sum(kept.values()) == 16
    assert kept[0] == 2  # the concentrated layer gives its slots away, down to top-k
    assert min(kept.values()) >= 2


def test_coverage_allocation_meets_the_budget_exactly(qwen):
    for ratio in (0.25, 0.5, 0.625, 0.75):
        plan = make_plan(qwen, stats_with(skewed_counts()), ratio, criterion="frequency", allocation="coverage")
        kept = [len(ids) for ids in plan.kept_experts.values()]
        assert sum(kept) == round(32 * (1 - ratio))
        assert min(kept) >= 2
        assert kept[0] <= min(kept[1:])  # the concentrated layer reaches the coverage with fewer experts


def test_ratio_and_top_k_errors(qwen):
    stats = stats_with(skewed_counts())
    with pytest.raises(ValueError, match=r"pruning_ratio must be in \[0, 1\)"):
        make_plan(qwen, stats, 1.0)
    with pytest.raises(
        ConfigurationError,
        match=r"Keeping 5 of the 32 .* at least top-k experts, 8 in all\. .*exactly: 0\.75 below \(keeps 8\); "
        r"or lower top-k explicitly \(--pruning_top_k\)",
    ):
        make_plan(qwen, stats, 0.85)
    plan = make_plan(qwen, stats, 0.85, top_k=1)
    assert plan.top_k == 1 and all(len(ids) >= 1 for ids in plan.kept_experts.values())
    with pytest.raises(ValueError, match="Unknown criterion 'magic'"):
        make_plan(qwen, stats, 0.5, criterion="magic")
    with pytest.raises(ValueError, match="Unknown allocation 'smart'"):
        make_plan(qwen, stats, 0.5, allocation="smart")


def test_group_limited_plans_keep_the_same_count_per_group():
    moe = find_moe(tiny_model("deepseek_v3"))  # n_group=2, MoE layers 1..3
    counts = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3, 2]] * 3, dtype=torch.float64)
    plan = make_plan(moe, stats_with(counts, layers=[1, 2, 3]), 0.5, criterion="frequency")
    for ids in plan.kept_experts.values():
        assert sum(i < 4 for i in ids) == sum(i >= 4 for i in ids) == 2
    assert plan.kept_experts[1] == [0, 1, 4, 5]


def test_plan_round_trip(tmp_path, qwen):
    plan = make_plan(qwen, stats_with(skewed_counts()), 0.5, criterion="gate_mass", allocation="global")
    plan.save(tmp_path / "plan.json")
    loaded = PrunePlan.load(tmp_path / "plan.json")
    assert loaded.kept_experts == plan.kept_experts
    assert loaded.metadata["criterion"] == "gate_mass" and loaded.metadata["allocation"] == "global"


def test_statistics_of_another_structure_are_refused(qwen):
    with pytest.raises(ValueError, match="calibrate this model"):
        make_plan(qwen, stats_with(torch.ones(3, 8, dtype=torch.float64)), 0.5)


def test_plans_record_their_architecture_and_refuse_another(qwen):
    plan = make_plan(qwen, stats_with(skewed_counts()), 0.5)
    assert (plan.metadata["model_type"], plan.metadata["architecture"]) == ("qwen3_moe", "Qwen3MoeForCausalLM")
    mixtral = find_moe(tiny_model("mixtral"))  # the same 4 layers x 8 experts, top-2
    replayed = PrunePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    with pytest.raises(
        ConfigurationError,
        match=r"made for model_type qwen3_moe, architecture Qwen3MoeForCausalLM, not for this model \(model_type "
        r"mixtral, architecture MixtralForCausalLM\).*even with the same expert counts",
    ):
        replayed.validate(mixtral)
    replayed.validate(qwen)
    for key in ("model_type", "architecture"):  # a plan that records one of them is held to it
        one = PrunePlan(plan.kept_experts, metadata={key: plan.metadata[key]})
        with pytest.raises(ConfigurationError, match="not for this model"):
            one.validate(mixtral)
    PrunePlan(plan.kept_experts).validate(mixtral)  # hand-written: no architecture recorded, accepted


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kept_experts": [[0, 1], [2, 3]]}, r'needs a "kept_experts" mapping from decoder-layer index'),
        ({"kept_experts": None}, r'needs a "kept_experts" mapping'),
        ([0, 1], r'needs a "kept_experts" mapping'),
        ({"kept_experts": {"0": [True, 1]}}, r"layer 0 must map to a list of expert ids \(integers, not booleans\)"),
        ({"kept_experts": {"0": [0, 1.0]}}, r"layer 0 must map to a list of expert ids"),
        ({"kept_experts": {"0": "0,1"}}, r"layer 0 must map to a list of expert ids"),
        ({"kept_experts": {"first": [0, 1]}}, r"layer key 'first' is not a decoder-layer index"),
        ({"kept_experts": {True: [0, 1]}}, r"layer key True is not a decoder-layer index"),
        ({"kept_experts": {"0": [0, 1]}, "top_k": True}, r"'top_k' must be a positive integer or null, got True"),
    ],
)
def test_malformed_plans_are_configuration_errors(data, message):
    with pytest.raises(ConfigurationError, match=message):
        PrunePlan.from_dict(data, "plan.json")


def test_plans_written_before_the_ratio_split_read_their_target():
    plan = PrunePlan.from_dict({"kept_experts": {"0": [0, 1]}, "pruning_ratio": 0.75, "actual_ratio": 0.75})
    assert plan.metadata == {"target_ratio": 0.75, "actual_ratio": 0.75}
    assert plan.kept_experts == {0: [0, 1]}
