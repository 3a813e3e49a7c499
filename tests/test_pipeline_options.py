"""Run options of ``moe_specialist.train``: overwriting an output_dir, W&B sweep redirection, no step-0 score.

Every run is a real ``moe_specialist.training.run`` (SFTTrainer, report_to none) of
tests/fixtures/recipes/tiny_prune_sft.yaml on the tiny Qwen3-MoE translator of tests/conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from moe_specialist.architectures import find_moe
from moe_specialist.prune import load_pruned_model
from moe_specialist.training import parse_recipe, run

TINY = Path(__file__).parent / "fixtures" / "recipes" / "tiny_prune_sft.yaml"


def run_tiny(model_dir: Path, output_dir: Path, *flags: str) -> dict:
    return run(
        *parse_recipe(
            ["--config", str(TINY), "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir), *flags]
        )
    )


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_overwrite_output_dir_replaces_the_results_and_removes_the_old_checkpoints(tiny_translator, tmp_path):
    output_dir = tmp_path / "run"
    run_tiny(tiny_translator, output_dir, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1")
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (output_dir / "translations.json").is_file()
    (output_dir / "notes.txt").write_text("mine")  # not a run artefact: an overwrite leaves it alone

    # prune only, 75% pruned, without translation_eval: nothing of the first run may be read back
    flags = ("--overwrite_output_dir", "true", "--max_steps", "0", "--pruning_ratio", "0.75")
    results = run_tiny(tiny_translator, output_dir, *flags, "--callbacks", "expert_pruning")
    assert read_json(output_dir / "results.json") == json.loads(json.dumps(results))
    assert results["mode"] == "prune_only" and results["training"]["global_step"] == 0
    assert results["scores"] == {"start": None, "end": None} and results["history"] == []
    assert results["pruning"]["experts_after"] == {str(i): 2 for i in range(4)}
    assert read_json(output_dir / "prune_plan.json")["target_ratio"] == 0.75
    assert read_json(output_dir / "trainer_state.json")["global_step"] == 0
    assert find_moe(load_pruned_model(output_dir / "model")).experts_per_layer == {i: 2 for i in range(4)}
    assert not list(output_dir.glob("checkpoint-*")) and not (output_dir / "translations.json").exists()
    assert (output_dir / "notes.txt").read_text() == "mine"


def test_a_wandb_sweep_agent_writes_each_point_into_its_own_directory(tiny_translator, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep123")
    sweep_dir = tmp_path / "sweep"
    points = {"gate_mass-uniform-r0.75-s3": ("gate_mass", "0.75"), "frequency-uniform-r0.5-s3": ("frequency", "0.5")}
    for name, (criterion, ratio) in points.items():
        flags = ("--max_steps", "0", "--pruning_criterion", criterion, "--pruning_ratio", ratio, "--seed", "3")
        results = run_tiny(tiny_translator, sweep_dir, *flags)  # every agent passes the recipe's one output_dir
        assert results["output_dir"] == str(sweep_dir / name) and results["run_name"] == name
        assert read_json(sweep_dir / name / "results.json")["pruning"]["criterion"] == criterion
        assert read_json(sweep_dir / name / "prune_plan.json")["target_ratio"] == float(ratio)
    assert sorted(p.name for p in sweep_dir.iterdir()) == sorted(points)


def test_without_mt_eval_on_start_there_is_no_start_score(tiny_translator, tmp_path):
    output_dir = tmp_path / "no_start"
    results = run_tiny(tiny_translator, output_dir, "--max_steps", "1", "--mt_eval_on_start", "false")
    assert [(h["label"], h["step"]) for h in results["history"]] == [("end", 1)]
    assert results["scores"]["start"] is None
    assert results["scores"]["end"]["directions"]["en-fr"]["num_segments"] == 5
    logged = read_json(output_dir / "trainer_state.json")["log_history"]
    assert [e["step"] for e in logged if "eval_mt/en-fr/chrf++" in e] == [1]
