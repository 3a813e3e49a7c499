"""``compensation: refit`` wherever pruning happens: the sweep (``+refit`` methods), ``moe_specialist.train`` and
``moe-specialist prune``; each gives the same weights as :func:`calibration_refit` by hand."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_specialist.cli import main
from moe_specialist.compensation import COMPENSATION_FILE, calibration_refit, named_compensation
from moe_specialist.configs import CalibrationArguments, PruningArguments
from moe_specialist.errors import ConfigurationError
from moe_specialist.plan import PrunePlan
from moe_specialist.prune import load_pruned_model, prune_model
from moe_specialist.sweep import SweepArguments, run_sweep_cli, sweep_points
from moe_specialist.training import parse_recipe, run
from tests.helpers import TINY_RECIPE, refit_by_hand

FIT = ("--sensitivity_examples", "4")  # the recipe calibrates on 8 sequences: 4 to fit, 4 held out


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    theirs = b.state_dict()
    return all(torch.equal(tensor, theirs[name]) for name, tensor in a.state_dict().items())


def test_methods_name_a_compensation():
    args = SweepArguments(ratios="0,0.5", criteria="frequency,frequency+refit,random@global+none", random_seeds=1)
    points = sweep_points(args, "frequency", 0, "uniform", "none")
    assert [p.id for p in points] == [
        "r0.000-frequency-uniform",
        "r0.500-frequency-uniform",
        "r0.500-frequency-uniform-refit",
        "r0.500-random-global-s0",
    ]
    assert points[2].method == ("frequency", "uniform", "refit") and points[1].method[2] == "none"
    # a recipe's compensation is what a bare method takes; +none opts out of it
    refit_by_default = sweep_points(args, "frequency", 0, "uniform", "refit")
    assert [p.criterion for p in refit_by_default][1:] == ["frequency@uniform+refit", "random@global"]
    with pytest.raises(ConfigurationError, match=r"Unknown compensation 'merge' in --criteria; choose among"):
        SweepArguments(ratios="0,0.5", criteria="reap@uniform+merge")
    with pytest.raises(ConfigurationError, match=r"Unknown compensation 'merge'; choose one of \['none', 'refit'\]"):
        PruningArguments(compensation="merge")


def test_the_recipe_sets_the_refit_and_none_is_no_compensation(tiny_translator):
    calibration = CalibrationArguments(
        calibration_directions=["en-fr"], calibration_examples=8, calibration_max_length=64
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_translator)
    pruning = PruningArguments(compensation="refit", sensitivity_examples=4, refit_steps=7)
    assert named_compensation("none", tokenizer, calibration, pruning) is None
    model = AutoModelForCausalLM.from_pretrained(tiny_translator, dtype=torch.float32)
    plan = PrunePlan({i: [0, 1, 2, 3] for i in range(4)})
    report, trace = named_compensation("refit", tokenizer, calibration, pruning)(model, plan, None)
    assert report.experts_after == {i: 4 for i in range(4)} and trace["settings"]["steps"] == 7
    assert all(0 <= layer["steps_kept"] <= 7 for layer in trace["layers"])
    with pytest.raises(ConfigurationError, match="refit_steps"):
        PruningArguments(refit_steps=0)


def test_train_refits_after_pruning_exactly_as_refit_by_hand(tiny_translator, tmp_path):
    output_dir = tmp_path / "run"
    flags = ["--output_dir", str(output_dir), "--max_steps", "0", "--compensation", "refit", *FIT]
    results = run(*parse_recipe(["--config", str(TINY_RECIPE), "--model_name_or_path", str(tiny_translator), *flags]))
    trace = results["pruning"]["compensation"]
    assert [layer["layer"] for layer in trace["layers"]] == [0, 1, 2, 3]
    assert trace["tokens"]["fit"] > 0 and trace["settings"]["held_out"] == "batches"
    model, by_hand_trace = refit_by_hand(tiny_translator, PrunePlan.load(output_dir / "prune_plan.json"))
    assert [layer["held_out_error_after"] for layer in trace["layers"]] == [
        layer["held_out_error_after"] for layer in by_hand_trace["layers"]
    ]
    saved = load_pruned_model(output_dir / "model")
    assert same_weights(saved, model)
    plain = AutoModelForCausalLM.from_pretrained(tiny_translator, dtype=torch.float32)
    prune_model(plain, PrunePlan.load(output_dir / "prune_plan.json"))
    accepted = [layer["layer"] for layer in trace["layers"] if layer["accepted"]]
    assert accepted and not same_weights(saved, plain)  # the re-fit changed the kept experts of some layer


def test_train_refuses_a_compensation_it_cannot_apply(tiny_translator, tmp_path):
    base = ["--config", str(TINY_RECIPE), "--model_name_or_path", str(tiny_translator), "--compensation", "refit"]
    with pytest.raises(ConfigurationError, match=r"disk never holds it: use prune_mode memory, or prune and"):
        run(*parse_recipe([*base, "--output_dir", str(tmp_path / "disk"), "--prune_mode", "disk", *FIT]))
    with pytest.raises(ConfigurationError, match=r"`callbacks` has no expert_pruning: add it, or set compensation"):
        run(*parse_recipe([*base, "--output_dir", str(tmp_path / "none"), "--callbacks", "translation_eval"]))
    # 8 calibration sequences, all of them in the default sample of 64: none is left to hold out
    short = r"sensitivity_examples=64 sample leaves out, but there are at most 8 \(calibration_examples=8 for each"
    with pytest.raises(ConfigurationError, match=short):
        run(*parse_recipe([*base, "--output_dir", str(tmp_path / "short")]))
    with pytest.raises(ConfigurationError, match=short):  # the search allocation holds out the same sequences
        flags = ["--compensation", "none", "--pruning_allocation", "search", "--output_dir", str(tmp_path / "short")]
        run(*parse_recipe([*base, *flags]))
    assert not any((tmp_path / name).exists() for name in ("disk", "none", "short"))  # refused before anything ran


def test_sweep_refuses_held_out_methods_with_nothing_to_hold_out(tiny_translator, tmp_path):
    out = tmp_path / "sweep"
    base = ["--config", str(TINY_RECIPE), "--model_name_or_path", str(tiny_translator), "--output_dir", str(out)]
    for criteria in ("frequency,frequency@search", "frequency+refit"):
        with pytest.raises(ConfigurationError, match=r"sample leaves out, but there are at most 8 \(calibration_"):
            run_sweep_cli([*base, "--ratios", "0,0.5", "--criteria", criteria])
    assert not out.exists()


@pytest.mark.slow
def test_sweep_refit_points_and_their_sft(tiny_translator, tmp_path):
    out = tmp_path / "sweep"
    argv = [
        "--config", str(TINY_RECIPE), "--model_name_or_path", str(tiny_translator), "--output_dir", str(out),
        "--ratios", "0,0.5", "--criteria", "frequency+none,frequency", "--compensation", "refit", *FIT,
        "--sft_at", "0.5", "--sft_criteria", "frequency", "--max_eval_examples", "3", "--max_new_tokens", "4",
    ]  # fmt: skip
    run_sweep_cli(argv)
    points = sorted(p.name for p in (out / "points").iterdir())
    assert points == [
        "r0.000-frequency-uniform",
        "r0.500-frequency-uniform",
        "r0.500-frequency-uniform-refit",
        "r0.500-frequency-uniform-refit-sft",
    ]
    refit = json.loads((out / "points" / "r0.500-frequency-uniform-refit" / "result.json").read_text())
    plain = json.loads((out / "points" / "r0.500-frequency-uniform" / "result.json").read_text())
    assert (refit["compensation"], plain["compensation"]) == ("refit", "none") and "compensation_trace" not in plain
    plan = PrunePlan.load(out / "points" / "r0.500-frequency-uniform-refit" / "prune_plan.json")
    _, by_hand_trace = refit_by_hand(tiny_translator, plan)
    errors = [layer["held_out_error_after"] for layer in by_hand_trace["layers"]]
    assert [layer["held_out_error_after"] for layer in refit["compensation_trace"]["layers"]] == errors
    # the SFT point replays the plan and re-fits the same way before training
    sft = json.loads((out / "points" / "r0.500-frequency-uniform-refit-sft" / "result.json").read_text())
    assert [layer["held_out_error_after"] for layer in sft["compensation_trace"]["layers"]] == errors
    table = (out / "results.md").read_text()
    assert table.startswith("| pruned | frequency@uniform | frequency@uniform+refit |")


def test_prune_command_refits_in_memory_and_plan_refuses(tiny_translator, tmp_path):
    stats = tmp_path / "stats.safetensors"
    calibrate = ["--calibration_directions", "en-fr", "--calibration_examples", "8", "--calibration_max_length", "64"]
    main(["calibrate", "--model", str(tiny_translator), *calibrate, "--output", str(stats), "--debug"])
    plan_flags = ["--statistics_file", str(stats), "--pruning_ratio", "0.5"]
    main(["plan", "--model", str(tiny_translator), *plan_flags, "--output", str(tmp_path / "plan.json"), "--debug"])
    with pytest.raises(ConfigurationError, match=r"so a plan does not hold it: plan without it, then pass it to"):
        main(["plan", "--model", str(tiny_translator), *plan_flags, "--compensation", "refit", "--output",
              str(tmp_path / "refused.json"), "--debug"])  # fmt: skip
    prune = ["prune", "--model", str(tiny_translator), "--prune_plan", str(tmp_path / "plan.json"), *calibrate]
    with pytest.raises(ConfigurationError, match=r"which --mode disk never loads: use --mode memory \(or auto\)"):
        main([*prune, "--compensation", "refit", "--mode", "disk", "--output", str(tmp_path / "disk"), "--debug"])
    with pytest.raises(ConfigurationError, match=r"sensitivity_examples=8 sample leaves out, but there are at most 8"):
        main([*prune, "--compensation", "refit", "--sensitivity_examples", "8", "--output", str(tmp_path / "short"),
              "--debug"])  # fmt: skip
    assert not (tmp_path / "short").exists()
    main([*prune, "--compensation", "refit", *FIT, "--output", str(tmp_path / "refit"), "--debug"])  # auto: memory
    trace = json.loads((tmp_path / "refit" / COMPENSATION_FILE).read_text())
    calibration = CalibrationArguments(
        calibration_directions=["en-fr"], calibration_examples=8, calibration_max_length=64
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_translator, dtype=torch.float32)
    refit = calibration_refit(AutoTokenizer.from_pretrained(tiny_translator), calibration, 4)
    _, expected = refit(model, PrunePlan.load(tmp_path / "plan.json"), None)
    assert [layer["held_out_error_after"] for layer in trace["layers"]] == [
        layer["held_out_error_after"] for layer in expected["layers"]
    ]
    assert same_weights(load_pruned_model(tmp_path / "refit"), model)
