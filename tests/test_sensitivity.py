"""The sensitivity allocation: temporary one-layer pruning, measured layer costs, the optimal split of the budget."""

from __future__ import annotations

import math

import pytest
import torch

from moe_specialist.architectures import find_moe
from moe_specialist.calibrate import calibrate, calibration_batches, encode_calibration_data
from moe_specialist.configs import CalibrationArguments, check_held_out_calibration
from moe_specialist.data.bible import bible_examples
from moe_specialist.errors import ConfigurationError
from moe_specialist.plan import Budget, PrunePlan, allocate_sensitivity, make_plan, ranked_sets, score_experts
from moe_specialist.prune import keeping_only, prune_model
from moe_specialist.sensitivity import calibration_sample, grid_counts, layer_costs, target_loss
from tests.helpers import allowed, skewed_counts, stats_with
from tests.tiny_models import tiny_model

INPUT = torch.tensor([[5, 17, 42, 8, 63, 11, 2, 30]])


def logits(model):
    with torch.no_grad():
        return model(INPUT).logits


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_keeping_only_equals_pruning_and_restores_the_model_exactly(arch):
    model = tiny_model(arch)
    moe = find_moe(model)
    layer = moe.layers[1]
    ids = [0, 2, 3, 5] if arch != "deepseek_v3" else [0, 1, 4, 5]  # deepseek: the same count in both groups
    before = logits(model)
    parameters = {name: p for name, p in model.named_parameters()}
    with keeping_only(layer, ids):
        inside = logits(model)
        assert layer.num_experts == len(ids)
    pruned = tiny_model(arch)
    prune_model(pruned, PrunePlan({layer.layer_index: ids}))
    assert torch.equal(inside, logits(pruned))
    assert not torch.equal(inside, before)
    assert torch.equal(logits(model), before)  # restored bit for bit, the very same parameter objects
    assert all(p is parameters[name] for name, p in model.named_parameters())
    assert layer.num_experts == 8 and find_moe(model).experts_per_layer == moe.experts_per_layer


def brute_force(budget: Budget) -> float:
    return min(sum(float(budget.layer_costs[i, c]) for i, c in enumerate(counts)) for counts in allowed(budget))


def test_allocation_minimises_the_summed_layer_costs():
    generator = torch.Generator().manual_seed(0)
    num_experts, min_keep = [8, 8, 8], 2
    # decreasing costs with random convexity: a fragile first layer and two robust ones
    steps = torch.rand(3, 8, generator=generator, dtype=torch.float64) * torch.tensor([[5.0], [0.3], [0.1]])
    costs = torch.zeros(3, 9, dtype=torch.float64)
    costs[:, :8] = steps.flip(1).cumsum(1).flip(1)
    costs[:, :min_keep] = math.inf
    for keep_total in (6, 9, 12, 18, 24):
        budget = Budget(num_experts, keep_total, min_keep, layer_costs=costs)
        counts = allocate_sensitivity(torch.zeros(3, 8), budget)
        assert sum(counts) == keep_total and all(min_keep <= c <= 8 for c in counts)
        chosen = sum(float(costs[i, c]) for i, c in enumerate(counts))
        assert chosen == pytest.approx(brute_force(budget))
    assert allocate_sensitivity(torch.zeros(3, 8), Budget(num_experts, 12, min_keep, layer_costs=costs))[0] == 8
    unpriced = torch.full_like(costs, math.inf)
    unpriced[:, 8] = 0.0  # only "keep everything" has a cost
    with pytest.raises(ConfigurationError, match="price no per-layer counts that add up to 12 experts"):
        allocate_sensitivity(torch.zeros(3, 8), Budget(num_experts, 12, min_keep, layer_costs=unpriced))


def test_sensitivity_without_measured_costs_is_a_clear_error():
    moe = find_moe(tiny_model("qwen3_moe"))
    with pytest.raises(ValueError, match="sensitivity allocation needs measured layer costs"):
        make_plan(moe, stats_with(skewed_counts()), 0.5, allocation="sensitivity")


def test_grid_counts():
    assert grid_counts(range(4, 33)) == [4, 8, 12, 16, 20, 24, 28]
    assert grid_counts(range(2, 9)) == [2, 3, 4, 5, 6, 7]
    assert grid_counts(range(6, 9)) == [6, 7]
    assert grid_counts(range(2, 9, 2)) == [2, 4, 6]  # group-limited (n_group 2): whole units only


def test_layer_costs_are_measured_losses_and_drive_the_plan(tiny_translator, demo_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_translator)
    moe = find_moe(model)
    examples = {"en-fr": bible_examples("en", "fr", "train", limit=6)}
    stats = calibrate(model, demo_tokenizer, examples, batch_size=3, progress=False)
    sequences = encode_calibration_data(demo_tokenizer, examples)
    batches = list(calibration_batches(sequences, 3, demo_tokenizer.pad_token_id))
    scores = score_experts(stats, "frequency")
    budget = Budget([8] * 4, 32, 2)
    costs = layer_costs(model, moe, batches, ranked_sets(scores, budget), budget, progress=False)
    assert costs.shape == (4, 9)
    assert torch.all(torch.isinf(costs[:, :2])) and torch.all(costs[:, 8] == 0)
    # each measured cost is the loss with that layer alone cut to its best experts, minus the full model's loss
    base = target_loss(model, batches)
    best_three = sorted(scores[2].topk(3).indices.tolist())
    with keeping_only(moe.layers[2], best_three):
        assert float(costs[2, 3]) == pytest.approx(target_loss(model, batches) - base, abs=1e-9)
    plan = make_plan(
        moe, stats, 0.5, criterion="frequency", allocation="sensitivity", measure_layer_costs=lambda *_: costs
    )
    counts = [len(ids) for ids in plan.kept_experts.values()]
    assert sum(counts) == 16
    assert plan.metadata["layer_costs"][2][3] == pytest.approx(float(costs[2, 3]), abs=1e-5)
    budget = Budget([8] * 4, 16, 2, layer_costs=costs)
    assert counts == allocate_sensitivity(scores, budget)


def test_the_held_out_sample_is_the_sequences_the_first_sample_leaves_out(demo_tokenizer):
    calibration = CalibrationArguments(
        calibration_directions=["en-fr", "de-en"], calibration_examples=6, calibration_max_length=48
    )

    def sequences(batches) -> set[tuple[int, ...]]:
        rows = (zip(ids, attention, strict=True) for ids, attention, _, _ in batches)
        return {tuple(row[mask.bool()].tolist()) for batch in rows for row, mask in batch}

    first, held_out = (calibration_sample(demo_tokenizer, calibration, 5, held_out=h) for h in (False, True))
    assert len(sequences(first)) == len(sequences(held_out)) == 5 and not sequences(first) & sequences(held_out)
    # the bound checked before any model loads (2 directions x 6), then the count of the sequences themselves
    check_held_out_calibration(calibration, 11, ["refit"])
    check_held_out_calibration(calibration, 12, ["none", "sensitivity"])  # nothing is held out: nothing to check
    with pytest.raises(ConfigurationError, match=r"there are at most 12 \(calibration_examples=6 for each of 2 dir"):
        check_held_out_calibration(calibration, 12, ["sensitivity", "refit"])
    with pytest.raises(ConfigurationError, match=r"examples=12 sample leaves out, but there are 12: raise"):
        calibration_sample(demo_tokenizer, calibration, 12, held_out=True)


def test_sensitivity_examples_must_be_positive():
    from moe_specialist.configs import PruningArguments

    with pytest.raises(ValueError, match="sensitivity_examples must be positive, got 0"):
        PruningArguments(pruning_allocation="sensitivity", sensitivity_examples=0)


def test_group_limited_sensitivity_measures_and_keeps_whole_units():
    """DeepSeek-V3 with n_group 2: only counts every group can share are measured, and the split meets the budget."""
    from moe_specialist.plan import check_groups, select_experts

    model = tiny_model("deepseek_v3").eval()
    moe = find_moe(model)
    generator = torch.Generator().manual_seed(0)
    sequences = [(0, torch.randint(3, 97, (12,), generator=generator).tolist(), [0] * 6 + [1] * 6) for _ in range(4)]
    batches = list(calibration_batches(sequences, 2, 0))
    num_experts = [layer.num_experts for layer in moe.layers]
    # as make_plan sets it up: DeepSeek-V3 scores each group by its top-2 experts, so a group keeps at least 2
    budget = Budget(num_experts, sum(num_experts) * 2 // 3, 2 * moe.n_group, moe.n_group, min_per_group=2)
    scores = torch.rand(len(num_experts), max(num_experts), generator=generator, dtype=torch.float64)
    costs = layer_costs(model, moe, batches, ranked_sets(scores, budget), budget, progress=False)
    counts = allocate_sensitivity(
        scores, Budget(num_experts, budget.keep_total, moe.top_k, moe.n_group, layer_costs=costs)
    )
    assert sum(counts) == budget.keep_total and all(c % moe.n_group == 0 for c in counts)
    for position, count in enumerate(counts):
        ids = select_experts(scores[position, : num_experts[position]], count, budget)
        check_groups(ids, num_experts[position], moe.n_group, moe.layers[position].layer_index)
