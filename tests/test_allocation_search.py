"""The search allocation: the sensitivity plan refined on the pruned model's next-token KL to the unpruned one."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import pytest
import torch

from moe_specialist import allocation_search
from moe_specialist.allocation_search import TargetKL, search_allocation
from moe_specialist.architectures import find_moe
from moe_specialist.calibrate import calibration_batches
from moe_specialist.configs import PruningArguments
from moe_specialist.errors import ConfigurationError
from moe_specialist.plan import Budget, PrunePlan, SearchSettings, check_groups, make_plan
from moe_specialist.prune import prune_model
from moe_specialist.sensitivity import ModelMeter
from tests.helpers import stats_with
from tests.tiny_models import tiny_model

RECIPE = Path(__file__).parent / "fixtures" / "recipes" / "tiny_prune_sft.yaml"
ARCHITECTURES = ["qwen3_moe", "gpt_oss", "deepseek_v3"]  # plain, expert biases, group-limited routing


def random_batches(count: int, seed: int) -> list:
    """``count`` sequences of 6 source then 6 target tokens, in batches of 2."""
    generator = torch.Generator().manual_seed(seed)
    sequences = [
        (0, torch.randint(3, 97, (12,), generator=generator).tolist(), [0] * 6 + [1] * 6) for _ in range(count)
    ]
    return list(calibration_batches(sequences, 2, 0))


def meter_for(model) -> ModelMeter:
    """A meter whose layer costs and search objective are measured on random sequences (other ones each)."""
    moe = find_moe(model)
    meter = ModelMeter(model, moe, tokenizer=None, calibration=None, examples=4)
    meter.batches = random_batches(4, seed=1)
    meter.held_out = TargetKL(model, moe, random_batches(6, seed=2))
    return meter


def plan_with(model, meter: ModelMeter, allocation: str, ratio: float = 0.5, **limits) -> PrunePlan:
    moe = find_moe(model)
    scores = torch.rand(len(moe.layers), 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return make_plan(
        moe,
        stats_with(scores, layers=moe.layer_indices),
        ratio,
        criterion="frequency",
        allocation=allocation,
        measure_layer_costs=meter,
        search_allocation=meter.search_allocation,
        search=SearchSettings(**{"seconds": 30.0, "evaluations": 40, **limits}),
    )


def kept_of(plan: PrunePlan) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(ids) for _, ids in sorted(plan.kept_experts.items()))


def full_kl(model, pruned_model, batches) -> float:
    """Mean KL(model || pruned_model) over the whole vocabulary at the target positions, computed directly."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for input_ids, attention, _, roles in batches:
            targets = (roles == 1)[:, 1:]
            p = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1][targets].log_softmax(-1)
            q = pruned_model(input_ids=input_ids, attention_mask=attention).logits[:, :-1][targets].log_softmax(-1)
            total += float((p.exp() * (p - q)).sum())
            tokens += int(targets.sum())
    return total / tokens


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_search_improves_on_its_start_within_the_budget(arch):
    model = tiny_model(arch)
    meter = meter_for(model)
    start = plan_with(model, meter, "sensitivity")
    plan = plan_with(model, meter, "search")
    trace = plan.metadata["allocation_search"]
    objective = meter.held_out
    # the start is the sensitivity plan, and the trace's values are the objective of the start and of the result
    assert trace["start_counts"] == [len(ids) for ids in start.kept_experts.values()]
    assert trace["initial_kl"] == pytest.approx(objective(kept_of(start)), abs=1e-6)
    assert trace["final_kl"] == pytest.approx(objective(kept_of(plan)), abs=1e-6)
    assert trace["final_kl"] < trace["initial_kl"]  # 39 candidates find something better on a random model
    assert [step["kl"] for step in trace["accepted"]] == sorted((s["kl"] for s in trace["accepted"]), reverse=True)
    assert trace["accepted"][-1]["kl"] == trace["final_kl"]
    assert trace["evaluations"] == 40 and trace["stopped"] == "evaluations"
    assert trace["examples"] == 6 and trace["target_tokens"] == 6 * 6  # the 6 target tokens of each sequence
    # exactly the budget, every layer at least its fewest, the same count in every routing group
    moe = find_moe(model)
    counts = [len(ids) for ids in plan.kept_experts.values()]
    assert sum(counts) == 4 * len(moe.layers) and plan.metadata["actual_ratio"] == 0.5
    fewest = 2 * moe.n_group if arch == "deepseek_v3" else moe.top_k  # DeepSeek-V3: 2 per group (topk_group 2)
    assert min(counts) >= fewest
    for layer, ids in plan.kept_experts.items():
        check_groups(ids, 8, moe.n_group, layer)
    # in-memory pruning is the real thing: the physically pruned model has the KL the search reports
    pruned_model = copy.deepcopy(model)
    prune_model(pruned_model, plan)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(allocation_search, "REFERENCE_TOP", 97)  # the whole vocabulary: the objective is the full KL
        exact = TargetKL(model, moe, objective.batches)
        assert exact(kept_of(plan)) == pytest.approx(full_kl(model, pruned_model, objective.batches), rel=1e-4)
    # the top-64 bucketed KL never exceeds the full one (merging outcomes cannot raise a KL)
    assert trace["final_kl"] <= exact(kept_of(plan)) + 1e-6


def test_same_seed_same_plan_and_reference_computed_once():
    model = tiny_model("qwen3_moe")
    meter = meter_for(model)
    first = plan_with(model, meter, "search", ratio=0.625, seed=7, evaluations=15)
    again = plan_with(model, meter, "search", ratio=0.625, seed=7, evaluations=15)
    other = plan_with(model, meter, "search", ratio=0.625, seed=8, evaluations=15)
    assert first.kept_experts == again.kept_experts
    assert first.metadata["allocation_search"]["accepted"] == again.metadata["allocation_search"]["accepted"]
    assert other.metadata["allocation_search"]["accepted"] != first.metadata["allocation_search"]["accepted"]
    assert first.metadata["allocation_search"]["reference_seconds"] == 0  # held_out was measured before, once


def test_moves_keep_group_counts_and_the_minimum_when_every_layer_is_at_it():
    """87.5% of a top-2 model of 8 experts: every layer keeps 2, so only swaps within a routing group remain."""
    budget = Budget([8, 8], 4, 2, n_group=2, min_per_group=1)
    calls = []

    def objective(kept, top_k, onset_weight):
        calls.append(kept)
        return float(sum(sum(ids) for ids in kept))  # lower ids are better

    start, settings = [[3, 7], [2, 6]], SearchSettings(30.0)
    kept, trace = search_allocation(objective, start, torch.zeros(2, 8), budget, settings, [1, 2])
    assert all(ids[0] < 4 <= ids[1] for candidate in calls for ids in candidate)  # one kept per group, always
    assert kept == [[0, 4], [0, 4]] and trace["final_kl"] == 8.0 and trace["initial_kl"] == 18.0
    assert trace["stopped"] == "exhausted" and trace["evaluations"] == len(set(calls)) == len(calls)  # none twice
    assert {step["move"] for step in trace["accepted"]} == {"swap"} and trace["accepted"][0]["layer"] in (1, 2)


def test_time_budget_is_honoured(monkeypatch):
    """No candidate is scored once the budget is spent: with a clock that each candidate moves on by one second,
    a 5.5 s budget scores the start and five candidates (the time is read before each candidate)."""
    budget = Budget([8, 8, 8], 12, 2)
    clock = [0.0]
    monkeypatch.setattr(allocation_search, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))

    def slow(kept, top_k, onset_weight):
        clock[0] += 1.0
        return float(hash(kept) % 1000)

    _, trace = search_allocation(slow, [[0, 1, 2, 3]] * 3, torch.zeros(3, 8), budget, SearchSettings(5.5), [0, 1, 2])
    assert trace["stopped"] == "seconds" and trace["seconds"] == 6.0 and trace["evaluations"] == 6


def test_errors_are_one_paragraph(tmp_path):
    with pytest.raises(ConfigurationError, match=r"^allocation_search_seconds must be a positive number of seconds"):
        PruningArguments(pruning_allocation="search", allocation_search_seconds=0)
    with pytest.raises(ConfigurationError, match="allocation_search_evaluations must be positive, got 0"):
        PruningArguments(pruning_allocation="search", allocation_search_evaluations=0)
    with pytest.raises(ConfigurationError, match="allocation_search_seed must be an integer"):
        PruningArguments(allocation_search_seed=1.5)
    moe = find_moe(tiny_model("qwen3_moe"))
    scores = torch.rand(4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(ConfigurationError, match=r"pruning_allocation search .* needs the model") as error:
        make_plan(moe, stats_with(scores), 0.5, allocation="search")
    assert "\n" not in str(error.value) and "`moe-specialist plan`" in str(error.value)


def test_plan_command_refuses_the_search(tmp_path, capsys):
    from moe_specialist.cli import main

    model_dir = tmp_path / "model"
    tiny_model("qwen3_moe").save_pretrained(model_dir)
    stats = stats_with(torch.rand(4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    stats.save(tmp_path / "stats.safetensors")
    argv = ["plan", "--model", str(model_dir), "--statistics_file", str(tmp_path / "stats.safetensors")]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--pruning_allocation", "search", "--output", str(tmp_path / "plan.json")])
    assert exit_.value.code == 2
    assert "moe-specialist plan: error: pruning_allocation search" in capsys.readouterr().err


def test_sweep_plans_with_the_search_and_reuses_the_reference(tiny_translator, tmp_path, monkeypatch):
    from moe_specialist.sweep import run_sweep_cli

    built, original = [], TargetKL.__init__
    monkeypatch.setattr(TargetKL, "__init__", lambda self, *a: built.append(1) or original(self, *a))
    out = tmp_path / "search"
    run_sweep_cli([
        "--config", str(RECIPE), "--model_name_or_path", str(tiny_translator), "--output_dir", str(out),
        "--ratios", "0,0.5,0.75", "--criteria", "gate_mass@search", "--sensitivity_examples", "4",
        "--allocation_search_evaluations", "6", "--max_eval_examples", "2", "--max_new_tokens", "4",
        "--report_to", "none",
    ])  # fmt: skip
    assert len(built) == 1  # the unpruned model's distributions, once for both ratios
    for ratio, kept in (("0.500", 16), ("0.750", 8)):
        plan = PrunePlan.load(out / "points" / f"r{ratio}-gate_mass-search" / "prune_plan.json")
        assert plan.metadata["allocation"] == "search"
        assert sum(len(ids) for ids in plan.kept_experts.values()) == kept
        trace = plan.metadata["allocation_search"]
        assert trace["evaluations"] == 6 and trace["final_kl"] <= trace["initial_kl"] and trace["examples"] == 4


def test_a_run_plans_with_the_search_through_its_meter():
    """``moe_specialist.train`` passes its ModelMeter's measurements to plan_for, the search among them."""
    from moe_specialist.plan import plan_for

    model = tiny_model("gpt_oss")
    meter, moe = meter_for(model), find_moe(model)
    scores = torch.rand(4, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    args = PruningArguments(pruning_allocation="search", allocation_search_evaluations=5, allocation_search_seed=2)
    plan = plan_for(moe, stats_with(scores), args, meter, search_allocation=meter.search_allocation)
    trace = plan.metadata["allocation_search"]
    assert plan.metadata["allocation"] == "search" and trace["evaluations"] == 5 and trace["seed"] == 2
    assert trace["seconds_budget"] == 60.0 and trace["evaluations_budget"] == 5


def per_token_kl(model, pruned_model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(model || pruned_model) per target token over the whole vocabulary, and whether each token is among the
    first four targets of its sequence (counted directly from the role ids)."""
    kls, onsets = [], []
    model.eval(), pruned_model.eval()
    with torch.no_grad():
        for input_ids, attention, _, roles in batches:
            targets = (roles == 1)[:, 1:]
            p, q = (
                m(input_ids=input_ids, attention_mask=attention).logits[:, :-1][targets].log_softmax(-1)
                for m in (model, pruned_model)
            )
            kls.append((p.exp() * (p - q)).sum(-1))
            for row in targets:
                onsets.append(torch.tensor([i < 4 for i in range(int(row.sum()))]))
    return torch.cat(kls), torch.cat(onsets)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_onset_weight_adds_the_kl_of_the_first_target_tokens(arch):
    """The objective with ``onset_weight`` w is the mean KL over every target token plus w times the mean KL over
    the first 4 target tokens of each sequence (shorter targets: all of them), and the search minimises that."""
    model = tiny_model(arch)
    moe = find_moe(model)
    generator = torch.Generator().manual_seed(5)
    sequences = [  # targets of 2, 6 and 9 tokens after sources of 9, 5 and 2 (one length: no padding)
        (0, torch.randint(3, 97, (s + t,), generator=generator).tolist(), [0] * s + [1] * t)
        for s, t in [(9, 2), (5, 6), (2, 9)]
    ]
    batches = list(calibration_batches(sequences, 2, 0))
    meter = meter_for(model)
    start = plan_with(model, meter, "sensitivity")
    pruned_model = copy.deepcopy(model)
    prune_model(pruned_model, start)
    kl, onset = per_token_kl(model, pruned_model, batches)
    assert int(onset.sum()) == 2 + 4 + 4
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(allocation_search, "REFERENCE_TOP", 97)  # the whole vocabulary: the objective is exact
        objective = TargetKL(model, moe, batches)
        assert objective.onset_tokens == 10 and objective.tokens == 17
        assert objective(kept_of(start), None, 0.0) == pytest.approx(float(kl.mean()), rel=1e-4)
        weighted = float(kl.mean() + 3.0 * kl[onset].mean())
        assert objective(kept_of(start), None, 3.0) == pytest.approx(weighted, rel=1e-4)
    plan = plan_with(model, meter, "search", onset_weight=3.0, evaluations=20)
    trace = plan.metadata["allocation_search"]
    assert trace["onset_weight"] == 3.0
    assert trace["initial_kl"] == pytest.approx(meter.held_out(kept_of(start), None, 3.0), abs=1e-6)
    assert trace["final_kl"] == pytest.approx(meter.held_out(kept_of(plan), None, 3.0), abs=1e-6)
    assert trace["final_kl"] <= trace["initial_kl"]


def test_onset_weight_must_be_finite_and_not_negative():
    message = r"^allocation_search_onset_weight must be a finite number >= 0, got -1"
    with pytest.raises(ConfigurationError, match=message):
        PruningArguments(allocation_search_onset_weight=-1.0)


def test_the_same_search_runs_once_per_meter(monkeypatch):
    """A sweep's methods that differ only in their compensation (gate_mass@search, gate_mass@search+refit) share
    one search; another seed is another search."""
    from moe_specialist import sensitivity

    runs = []
    monkeypatch.setattr(sensitivity, "search_allocation", lambda *a, **k: runs.append(a) or search_allocation(*a))
    model = tiny_model("qwen3_moe")
    meter = meter_for(model)
    first = plan_with(model, meter, "search", evaluations=6)
    again = plan_with(model, meter, "search", evaluations=6)
    assert len(runs) == 1 and first.kept_experts == again.kept_experts
    assert first.metadata["allocation_search"] == again.metadata["allocation_search"]
    plan_with(model, meter, "search", evaluations=6, seed=3)
    assert len(runs) == 2
