"""Exact budgets: every allocation keeps exactly the experts a ratio asks for, in counts the routing can take."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from moe_specialist.architectures import find_moe
from moe_specialist.errors import ConfigurationError
from moe_specialist.plan import ALLOCATIONS, Budget, PrunePlan, make_plan, select_experts
from moe_specialist.prune import prune_model
from moe_specialist.stats import RoutingStats
from tests.helpers import allowed, stats_with
from tests.tiny_models import tiny_model

# (num_experts, min_keep, n_group, min_per_group): uneven layers, with and without group-limited routing
STRUCTURES = [
    ([32, 4], 2, 1, 1),
    ([8, 16, 4], 2, 1, 1),
    ([6, 3, 9, 2], 2, 1, 1),  # a layer with as many experts as top-k
    ([8, 16, 4], 4, 2, 2),
    ([12, 6, 18], 6, 3, 2),
]


def random_costs(num_experts: list[int], budget_min: list[int], seed: int) -> torch.Tensor:
    """Decreasing costs with random steps, infinite below each layer's fewest count, 0 with every expert."""
    generator = torch.Generator().manual_seed(seed)
    costs = torch.full((len(num_experts), max(num_experts) + 1), math.inf, dtype=torch.float64)
    for position, n in enumerate(num_experts):
        steps = torch.rand(n, generator=generator, dtype=torch.float64) * (position + 1)
        costs[position, : n + 1] = torch.cat([steps.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
        costs[position, : budget_min[position]] = math.inf
    return costs


def budget_for(structure: tuple, keep_total: int, seed: int = 0) -> Budget:
    num_experts, min_keep, n_group, min_per_group = structure
    budget = Budget(num_experts, keep_total, min_keep, n_group, min_per_group)
    budget.layer_costs = random_costs(num_experts, [budget.counts(p).start for p in range(len(num_experts))], seed)
    return budget


def kept_share(scores: torch.Tensor, budget: Budget, counts) -> float:
    """What ``global`` maximises: the summed share of each layer's (positive) scores that its kept experts hold."""
    total = 0.0
    for row, n, count in zip(scores, budget.num_experts, counts, strict=True):
        groups = row[:n].reshape(budget.n_group, -1)
        total += float(groups.topk(count // budget.n_group, dim=1).values.sum() / row[:n].sum())
    return total


@pytest.mark.parametrize("structure", STRUCTURES, ids=str)
def test_every_allocation_meets_every_reachable_budget_exactly(structure):
    num_experts = structure[0]
    scores = torch.rand(len(num_experts), max(num_experts), generator=torch.Generator().manual_seed(1)).double()
    for position, n in enumerate(num_experts):
        scores[position, n:] = -math.inf
    full = Budget(num_experts, sum(num_experts), *structure[1:])
    reachable = {sum(c) for c in itertools.product(*(full.counts(p) for p in range(len(num_experts))))}
    assert list(full.totals()) == sorted(reachable)
    for keep_total in set(range(sum(num_experts) + 1)) - reachable:
        with pytest.raises(ConfigurationError, match=f"Keeping {keep_total} of the {sum(num_experts)} routed"):
            Budget(num_experts, keep_total, *structure[1:])
    for keep_total in sorted(reachable):
        budget = budget_for(structure, keep_total, seed=keep_total)
        choices = allowed(budget)
        for name, allocate in ALLOCATIONS.items():
            counts = tuple(allocate(scores, budget))
            assert counts in choices, (name, keep_total, counts)
        # global keeps the most normalised score of any allowed choice; sensitivity the least summed cost
        best_share = max(kept_share(scores, budget, c) for c in choices)
        assert kept_share(scores, budget, ALLOCATIONS["global"](scores, budget)) == pytest.approx(best_share)
        costs = budget.layer_costs
        least_cost = min(sum(float(costs[i, c]) for i, c in enumerate(counts)) for counts in choices)
        chosen = ALLOCATIONS["sensitivity"](scores, budget)
        assert sum(float(costs[i, c]) for i, c in enumerate(chosen)) == pytest.approx(least_cost)


def test_uniform_keeps_the_same_share_of_uneven_layers():
    scores = torch.zeros(2, 32, dtype=torch.float64)
    assert ALLOCATIONS["uniform"](scores, Budget([32, 4], 18, 2)) == [16, 2]  # today's rounding kept 20
    assert ALLOCATIONS["uniform"](scores, Budget([32, 4], 27, 2)) == [24, 3]
    assert ALLOCATIONS["uniform"](scores, Budget([32, 4], 4, 2)) == [2, 2]  # both at top-k
    even = torch.zeros(4, 8, dtype=torch.float64)
    assert ALLOCATIONS["uniform"](even, Budget([8] * 4, 16, 2)) == [4, 4, 4, 4]
    assert ALLOCATIONS["uniform"](even, Budget([8] * 4, 18, 2)) == [5, 5, 4, 4]  # the remainder to the first layers
    assert ALLOCATIONS["uniform"](even, Budget([8] * 4, 20, 4, n_group=2, min_per_group=2)) == [6, 6, 4, 4]


@pytest.fixture
def deepseek():
    return find_moe(tiny_model("deepseek_v3"))  # 3 MoE layers (1..3) x 8 experts, n_group=2, topk_group=2, top-2


def plan_on(moe, stats, ratio: float, allocation: str) -> PrunePlan:
    def costs(scores: torch.Tensor, budget: Budget) -> torch.Tensor:
        return random_costs(budget.num_experts, [budget.counts(p).start for p in range(len(budget.num_experts))], 0)

    return make_plan(moe, stats, ratio, criterion="frequency", allocation=allocation, measure_layer_costs=costs)


@pytest.mark.parametrize("allocation", sorted(ALLOCATIONS))
def test_group_limited_ratios_are_met_exactly_or_refused(deepseek, allocation):
    stats = stats_with(torch.tensor([[9.0, 8, 7, 6, 5, 4, 3, 2], [1, 2, 3, 4, 5, 6, 7, 8], [5] * 8]), layers=[1, 2, 3])
    # 0.375 of 24 is 15 kept; every layer keeps 4, 6 or 8 (same count in both groups, 2 each at least)
    with pytest.raises(
        ConfigurationError,
        match=r"Keeping 15 of the 24 routed experts \(pruning ratio 0\.375 in whole experts\) is not possible: "
        r"group-limited routing \(n_group=2\) .* a multiple of 2\. The nearest pruning ratios that can be met "
        r"exactly: 0\.333333 below \(keeps 16\) and 0\.416667 above \(keeps 14\)\.",
    ):
        plan_on(deepseek, stats, 0.375, allocation)
    for ratio, kept in ((1 / 3, 16), (0.333333, 16), (0.25, 18), (0.5, 12), (0, 24)):
        plan = plan_on(deepseek, stats, ratio, allocation)
        counts = [len(ids) for ids in plan.kept_experts.values()]
        assert sum(counts) == kept and all(c in (4, 6, 8) for c in counts)
        assert plan.metadata["actual_ratio"] == round(1 - kept / 24, 6)
        for ids in plan.kept_experts.values():
            assert sum(i < 4 for i in ids) == sum(i >= 4 for i in ids)
    with pytest.raises(ConfigurationError, match=r"and 2 in each of 2 routing groups, 12 in all\. .*0\.5 below"):
        plan_on(deepseek, stats, 0.6, allocation)


@pytest.mark.parametrize("allocation", sorted(ALLOCATIONS))
def test_plans_on_unevenly_pruned_models_keep_the_budget(allocation):
    model = tiny_model("qwen3_moe")
    prune_model(model, PrunePlan({0: list(range(8)), 1: [0, 1], 2: list(range(6)), 3: list(range(4))}))
    moe = find_moe(model)
    stats = RoutingStats.empty(["en-fr"], [0, 1, 2, 3], [8, 2, 6, 4])
    stats.count[0, 1] = torch.rand(4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for ratio in (0.25, 0.5, 0.6, 0.55):
        plan = plan_on(moe, stats, ratio, allocation)
        counts = [len(ids) for ids in plan.kept_experts.values()]
        assert sum(counts) == round(20 * (1 - ratio)) and counts[1] == 2 and min(counts) >= 2, (ratio, counts)


def test_select_experts_never_rounds_a_count():
    budget = Budget([8], 4, 4, n_group=2, min_per_group=2)
    scores = torch.tensor([9.0, 8, 7, 6, 5, 4, 3, 2], dtype=torch.float64)
    assert select_experts(scores, 6, budget) == [0, 1, 2, 4, 5, 6]
    with pytest.raises(ValueError, match="cannot keep 5: group-limited routing keeps the same count in every group"):
        select_experts(scores, 5, budget)
