"""Kept sets chosen as sets (``pruning_selection: greedy``): greedy elimination on the MoE block's reconstruction
error, against the criterion's ranked sets, on tiny models of three architectures (Qwen3-MoE; GPT-OSS, whose router
has a bias; DeepSeek-V3, with group-limited routing and a score-correction bias)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from moe_specialist.architectures import find_moe
from moe_specialist.calibrate import calibration_batches
from moe_specialist.cli import main
from moe_specialist.plan import GREEDY_NEEDS_THE_MODEL, Budget, PrunePlan, check_groups, make_plan, ranked_sets
from moe_specialist.prune import keeping_only, prune_model
from moe_specialist.selection import block_inputs, block_outputs, greedy_sets, reconstruction_error
from moe_specialist.sensitivity import layer_costs, target_loss
from moe_specialist.sweep import run_sweep_cli
from moe_specialist.training import parse_recipe, run
from tests.helpers import stats_with
from tests.tiny_models import TINY_CONFIGS, tiny_model

SCALE = 300  # router rows of the duplicates: tokens routed to them are routed to them decisively
ARCHITECTURES = ["qwen3_moe", "gpt_oss", "deepseek_v3"]


def random_batches(seed: int = 0, padded: bool = False) -> list:
    """Calibration batches of random tokens; ``padded``: of several lengths (padding must not count). The tiny
    DeepSeek-V3's attention refuses a padded mask in this transformers version, hence unpadded by default."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [16, 12, 16, 9, 16, 14] if padded else [16] * 6
    sequences = [
        (0, torch.randint(3, 97, (n,), generator=generator).tolist(), [0] * 4 + [1] * (n - 4)) for n in lengths
    ]
    return list(calibration_batches(sequences, 3, 0))


def budget_for(moe, keep_total: int) -> Budget:
    """The budget ``make_plan`` makes for this model (top-2; two routing groups for DeepSeek-V3)."""
    per_group = 2 if moe.n_group > 1 else 1
    return Budget([8] * len(moe.layers), keep_total, max(2, per_group * moe.n_group), moe.n_group, per_group)


def test_block_inputs_are_the_real_tokens_the_block_sees():
    model = tiny_model("qwen3_moe")
    moe = find_moe(model)
    batches = random_batches(padded=True)
    inputs = block_inputs(model, moe, batches, [1])[1]
    assert inputs.shape == (sum(int(b[1].sum()) for b in batches), 64)  # padding left out
    outputs = []
    hook = moe.layers[1].block.register_forward_hook(lambda module, args, output: outputs.append(output))
    with torch.no_grad():
        model(input_ids=batches[0][0], attention_mask=batches[0][1])
    hook.remove()
    real = batches[0][1].bool()
    replayed = torch.cat(list(block_outputs(moe.layers[1], inputs[: int(real.sum())])))
    torch.testing.assert_close(replayed, outputs[0][real].float())  # the block is per token: flattened = in place


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_error_is_the_pruned_models_block_with_a_lowered_top_k_too(arch):
    model = tiny_model(arch)
    moe = find_moe(model)
    layer = moe.layers[1]
    ids = [0, 1, 4, 5]  # two per routing group for DeepSeek-V3
    inputs = block_inputs(model, moe, random_batches(), [1])[1]
    reference = torch.cat(list(block_outputs(layer, inputs)))
    for top_k in (None, 1):
        pruned = tiny_model(arch)
        prune_model(pruned, PrunePlan({layer.layer_index: ids}, top_k))
        output = torch.cat(list(block_outputs(find_moe(pruned).layers[1], inputs)))
        expected = float((output - reference).pow(2).mean())
        assert reconstruction_error(layer, inputs, reference, ids, top_k) == pytest.approx(expected, rel=1e-5)
    assert reconstruction_error(layer, inputs, reference, list(range(8)), 1) > 0  # every expert, but top-1
    torch.testing.assert_close(torch.cat(list(block_outputs(layer, inputs))), reference, rtol=0, atol=0)  # restored


def duplicated(arch: str, position: int):
    """A tiny model whose experts 0 and 1 of one MoE layer are exact duplicates (weights, router rows and biases),
    with router rows scaled up (``SCALE``)."""
    model = tiny_model(arch)
    layer = find_moe(model).layers[position]
    with torch.no_grad():
        for t in layer.tensors:
            t.tensor.select(t.dim, 1).copy_(t.tensor.select(t.dim, 0))
            if t.module is layer.router and t.name == "weight":
                t.tensor.select(t.dim, 0).mul_(SCALE)
                t.tensor.select(t.dim, 1).mul_(SCALE)
    return model


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_greedy_keeps_one_of_two_duplicates_and_reconstructs_better(arch):
    model = duplicated(arch, position=1)
    moe = find_moe(model)
    # the criterion ranks both duplicates first: keeping 4, the ranked set holds both
    scores = torch.tensor([[8.0, 7.9, 6, 5, 4, 3, 2, 1]] * len(moe.layers), dtype=torch.float64)
    budget = budget_for(moe, 16)
    greedy = greedy_sets(model, moe, random_batches(), scores, budget, progress=False)
    ranked = ranked_sets(scores, budget)
    assert ranked.sets[1][4] == [0, 1, 2, 3]
    kept = greedy.sets[1][4]
    assert len({0, 1} & set(kept)) == 1 and len(kept) == 4
    greedy_error, ranked_error = greedy.errors[1][4]
    assert greedy_error < ranked_error
    # the errors are what the block does: the kept set pruned in place, against the unpruned block
    layer = moe.layers[1]
    inputs = block_inputs(model, moe, random_batches(), [1])[1]
    reference = torch.cat(list(block_outputs(layer, inputs)))
    assert reconstruction_error(layer, inputs, reference, kept) == pytest.approx(greedy_error, rel=1e-6)
    assert reconstruction_error(layer, inputs, reference, [0, 1, 2, 3]) == pytest.approx(ranked_error, rel=1e-6)


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))  # every supported family's block, not only the three
def test_greedy_is_never_worse_than_ranked_and_keeps_whole_groups(arch):
    model = tiny_model(arch, seed=3)
    moe = find_moe(model)
    scores = torch.rand(len(moe.layers), 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    budget = budget_for(moe, 4 * len(moe.layers))
    greedy = greedy_sets(model, moe, random_batches(1), scores, budget, progress=False)
    better = 0
    for position in range(len(moe.layers)):
        assert sorted(greedy.sets[position]) == list(budget.counts(position))
        for count, ids in greedy.sets[position].items():
            greedy_error, ranked_error = greedy.errors[position][count]
            assert greedy_error <= ranked_error and len(ids) == count == len(set(ids))
            better += greedy_error < ranked_error
            if moe.n_group > 1:
                check_groups(ids, 8, moe.n_group, moe.layers[position].layer_index)
    assert better > 0  # elimination found better sets than the ranking somewhere


def test_greedy_bounded_by_candidates_only_removes_the_lowest_scored():
    model = tiny_model("qwen3_moe")
    moe = find_moe(model)
    scores = torch.arange(8, dtype=torch.float64).flip(0).repeat(4, 1)  # expert 0 best, 7 worst
    budget = budget_for(moe, 16)
    one = greedy_sets(model, moe, random_batches(), scores, budget, candidates=1, progress=False)
    assert one.sets == ranked_sets(scores, budget).sets  # one candidate: the ranking's choice at every step
    two = greedy_sets(model, moe, random_batches(), scores, budget, candidates=2, progress=False)
    for position in range(4):  # each step removes one of the two lowest-scored left: never expert 0 at 4 kept
        assert 0 in two.sets[position][4]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_plans_meet_the_budget_exactly_and_record_what_they_bought(arch):
    model = tiny_model(arch)
    moe = find_moe(model)
    counts = torch.rand(len(moe.layers), 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 100
    stats = stats_with(counts, layers=moe.layer_indices)
    calls = []

    def measure(scores, budget, candidates):
        calls.append((candidates, budget.top_k))
        return greedy_sets(model, moe, random_batches(), scores, budget, candidates, progress=False)

    ratios = [0.25, 0.5] if moe.n_group > 1 else [0.25, 0.5, 0.75]
    for ratio in ratios:
        plan = make_plan(moe, stats, ratio, "frequency", "global", selection="greedy", measure_kept_sets=measure)
        total = 8 * len(moe.layers)
        assert sum(len(ids) for ids in plan.kept_experts.values()) == round(total * (1 - ratio))
        assert plan.metadata["selection"] == "greedy" and plan.metadata["selection_candidates"] is None
        errors = plan.metadata["reconstruction_error"]
        assert sorted(errors) == sorted(str(layer) for layer in moe.layer_indices)
        assert all(e["kept"] <= e["ranked"] for e in errors.values())
        plan = PrunePlan.from_dict(plan.to_dict())
        pruned = tiny_model(arch)
        prune_model(pruned, plan)  # validates group-limited counts too
    assert calls == [(None, None)] * len(ratios)
    lowered = make_plan(moe, stats, 0.5, "frequency", "global", top_k=1, selection="greedy", measure_kept_sets=measure)
    assert calls[-1] == (None, 1) and lowered.top_k == 1  # the blocks are measured as they will route
    ranked = make_plan(moe, stats, 0.5, "frequency", "global")
    assert ranked.metadata["selection"] == "ranked" and "reconstruction_error" not in ranked.metadata


def test_sensitivity_costs_are_measured_on_the_greedy_sets():
    model = tiny_model("qwen3_moe")
    moe = find_moe(model)
    batches = random_batches()
    stats = stats_with(torch.rand(4, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    greedy = []

    def measure_kept_sets(scores, budget, candidates):
        greedy.append(greedy_sets(model, moe, batches, scores, budget, candidates, progress=False))
        return greedy[-1]

    def measure_layer_costs(kept, budget):
        assert kept is greedy[-1]
        return layer_costs(model, moe, batches, kept, budget, progress=False)

    plan = make_plan(
        moe, stats, 0.5, "frequency", "sensitivity", measure_layer_costs=measure_layer_costs, selection="greedy",
        measure_kept_sets=measure_kept_sets,
    )  # fmt: skip
    (kept,) = greedy
    assert plan.kept_experts == {
        layer: kept.sets[p][len(plan.kept_experts[layer])] for p, layer in enumerate([0, 1, 2, 3])
    }
    # a measured cost is the loss with that layer alone cut to its greedy set
    base = target_loss(model, batches)
    with keeping_only(moe.layers[2], kept.sets[2][3]):
        cut = target_loss(model, batches)
    assert plan.metadata["layer_costs"][2][3] == pytest.approx(cut - base, abs=1e-5)


# ---- where it runs: only where the model is ----------------------------------------------------------------------
RECIPE = Path(__file__).parent / "fixtures" / "recipes" / "tiny_prune_sft.yaml"


def test_plan_command_refuses_greedy_with_one_paragraph(capsys, tiny_translator, tmp_path):
    stats = tmp_path / "stats.safetensors"
    main(["calibrate", "--model", str(tiny_translator), "--calibration_examples", "4", "--output", str(stats)])
    capsys.readouterr()
    argv = ["plan", "--model", str(tiny_translator), "--statistics_file", str(stats), "--output", str(tmp_path / "p")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--pruning_selection", "greedy"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"moe-specialist plan: error: {GREEDY_NEEDS_THE_MODEL}")
    assert "`moe-specialist sweep`" in err and "`python -m moe_specialist.train`" in err
    assert not (tmp_path / "p").exists()


def test_a_run_plans_with_greedy_sets(tiny_translator, tmp_path):
    output_dir = tmp_path / "run"
    flags = ["--max_steps", "0", "--callbacks", "expert_pruning", "--pruning_selection", "greedy"]
    argv = ["--config", str(RECIPE), "--model_name_or_path", str(tiny_translator), "--output_dir", str(output_dir)]
    results = run(*parse_recipe([*argv, *flags, "--sensitivity_examples", "4", "--selection_candidates", "3"]))
    plan = PrunePlan.load(output_dir / "prune_plan.json")
    assert plan.metadata["selection"] == "greedy" and plan.metadata["selection_candidates"] == 3
    assert set(plan.metadata["reconstruction_error"]) == {"0", "1", "2", "3"}
    assert results["pruning"]["experts_after"] == {str(i): 4 for i in range(4)}
    assert "selection: `greedy`" in (output_dir / "model" / "README.md").read_text()  # the model card says so


def test_a_sweep_plans_with_greedy_sets_once_per_ranking(tiny_translator, tmp_path, caplog):
    out = tmp_path / "sweep"
    argv = [
        "--config", str(RECIPE), "--model_name_or_path", str(tiny_translator), "--output_dir", str(out),
        "--ratios", "0.5,0.75", "--criteria", "frequency@sensitivity", "--pruning_selection", "greedy",
        "--sensitivity_examples", "4", "--max_eval_examples", "2", "--max_new_tokens", "4", "--report_to", "none",
    ]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="moe_specialist"):
        run_sweep_cli(argv)
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("Greedy selection") for m in messages) == 1  # reused across the ratios
    assert sum(m.startswith("Layer sensitivity") for m in messages) == 1  # measured once, on the greedy sets
    for ratio, kept in (("0.500", 16), ("0.750", 8)):
        plan = PrunePlan.load(out / "points" / f"r{ratio}-frequency-sensitivity" / "prune_plan.json")
        assert plan.metadata["selection"] == "greedy" and "layer_costs" in plan.metadata
        assert sum(len(ids) for ids in plan.kept_experts.values()) == kept
