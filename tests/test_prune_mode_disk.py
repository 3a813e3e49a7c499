"""``prune_mode: disk`` (moe_specialist.training.on_disk): the same run as pruning in memory, from a checkpoint pruned
on disk once, without the whole unpruned model ever loaded for training.

Every run is a real ``moe_specialist.training.run`` of tests/fixtures/recipes/tiny_prune_sft.yaml on the tiny
Qwen3-MoE translator of tests/conftest.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from moe_specialist.errors import ConfigurationError
from moe_specialist.plan import PrunePlan
from moe_specialist.prune import load_pruned_model
from moe_specialist.training import parse_recipe
from moe_specialist.training.on_disk import measuring_model
from tests.test_pipeline_options import TINY, read_json, run_tiny

SFT_FLAGS = ("--max_steps", "2")


@pytest.fixture(scope="module")
def memory_run(tiny_translator, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("memory") / "run"
    return output_dir, run_tiny(tiny_translator, output_dir, *SFT_FLAGS)


def test_disk_mode_trains_and_scores_exactly_as_pruning_in_memory(tiny_translator, memory_run, tmp_path):
    memory_dir, memory = memory_run
    disk_dir = tmp_path / "run"
    disk = run_tiny(tiny_translator, disk_dir, *SFT_FLAGS, "--prune_mode", "disk")

    plan = read_json(disk_dir / "prune_plan.json")
    assert plan == read_json(memory_dir / "prune_plan.json")
    counts = {layer: len(ids) for layer, ids in plan["kept_experts"].items()}
    # the pruned source holds the plan, and the run's report is read from it
    assert PrunePlan.load(disk_dir / "pruned_source" / "prune_plan.json").kept_experts == {
        int(k): v for k, v in plan["kept_experts"].items()
    }
    assert disk["pruning"] | {"plan_file": None} == memory["pruning"] | {"plan_file": None}
    assert disk["pruning"]["experts_after"] == counts
    # the same weights trained the same way: the same scores, the same saved model
    assert disk["scores"] == memory["scores"]
    assert disk["training"]["metrics"]["train_loss"] == memory["training"]["metrics"]["train_loss"]
    saved_disk = load_pruned_model(disk_dir / "model").state_dict()
    saved_memory = load_pruned_model(memory_dir / "model").state_dict()
    assert saved_disk.keys() == saved_memory.keys()
    for name, tensor in saved_memory.items():
        assert torch.equal(saved_disk[name], tensor), name
    assert read_json(disk_dir / "ranks" / "rank-0.json")["pruned"]["experts_per_layer"] == {
        str(k): v for k, v in counts.items()
    }


def test_a_resumed_disk_run_reuses_its_pruned_source(tiny_translator, tmp_path):
    output_dir = tmp_path / "run"
    flags = (*SFT_FLAGS, "--prune_mode", "disk", "--save_strategy", "steps", "--save_steps", "1")
    run_tiny(tiny_translator, output_dir, *flags)
    weights = sorted((output_dir / "pruned_source").glob("*.safetensors"))
    stamps = [path.stat().st_mtime_ns for path in weights]
    resumed = run_tiny(tiny_translator, output_dir, *flags, "--resume_from_checkpoint", "true", "--max_steps", "3")
    assert resumed["training"]["global_step"] == 3
    assert [path.stat().st_mtime_ns for path in weights] == stamps


def test_a_given_uneven_plan_prunes_on_disk_without_loading_the_unpruned_model(tiny_translator, tmp_path, monkeypatch):
    plan_file = tmp_path / "plan.json"
    kept = {0: [0, 3, 5], 1: [1, 2, 4, 6, 7], 2: [2, 6], 3: [0, 1, 2, 3, 4, 5]}
    PrunePlan(kept, metadata={"target_ratio": 0.5}).save(plan_file)
    flags = ("--prune_plan", str(plan_file), "--max_steps", "0")
    memory = run_tiny(tiny_translator, tmp_path / "memory", *flags)

    def refuse(*args, **kwargs):
        raise AssertionError("the unpruned model was loaded although the plan was given")

    monkeypatch.setattr("moe_specialist.training.pipeline.measuring_model", refuse)
    disk = run_tiny(tiny_translator, tmp_path / "disk", *flags, "--prune_mode", "disk")
    assert disk["pruning"]["experts_after"] == {str(k): len(v) for k, v in kept.items()}
    assert disk["scores"] == memory["scores"]
    saved_disk = load_pruned_model(tmp_path / "disk" / "model").state_dict()
    for name, tensor in load_pruned_model(tmp_path / "memory" / "model").state_dict().items():
        assert torch.equal(saved_disk[name], tensor), name


def test_the_measuring_model_is_loaded_straight_onto_the_run_device(tiny_translator, tmp_path, monkeypatch):
    import moe_specialist.models

    seen = {}
    original = moe_specialist.models.load_pruned_model

    def spy(path, **kwargs):
        seen.update(kwargs)
        return original(path, **kwargs)

    monkeypatch.setattr(moe_specialist.models, "load_pruned_model", spy)
    model_args, *_, training_args = parse_recipe(
        ["--config", str(TINY), "--model_name_or_path", str(tiny_translator), "--output_dir", str(tmp_path)]
    )
    model, tokenizer = measuring_model(model_args, training_args)
    assert seen["device_map"] == {"": str(training_args.device)}  # from_pretrained places it: no host copy first
    assert {p.device for p in model.parameters()} == {training_args.device}
    assert tokenizer.pad_token is not None


def test_disk_mode_needs_expert_pruning(tiny_translator, tmp_path):
    with pytest.raises(ConfigurationError, match="prune_mode disk prunes the checkpoint .* no expert_pruning"):
        parse_recipe(
            ["--config", str(TINY), "--model_name_or_path", str(tiny_translator), "--output_dir", str(tmp_path),
             "--prune_mode", "disk", "--callbacks", "translation_eval"]
        )  # fmt: skip
    with pytest.raises(ConfigurationError, match="prune_mode must be one of memory, disk, got 'disc'"):
        parse_recipe(["--config", str(TINY), "--output_dir", str(tmp_path), "--prune_mode", "disc"])


def test_results_say_where_the_pruned_source_is(tiny_translator, tmp_path):
    output_dir = tmp_path / "run"
    run_tiny(tiny_translator, output_dir, *SFT_FLAGS, "--prune_mode", "disk", "--max_steps", "0")
    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["training"]["prune_mode"] == "disk"


def test_the_memory_estimate_is_logged_and_a_run_that_cannot_fit_is_refused_before_loading(
    tiny_translator, tmp_path, monkeypatch, caplog
):
    import logging

    caplog.set_level(logging.INFO, logger="moe_specialist")
    monkeypatch.setattr("moe_specialist.memory.available_memory", lambda: (10 * 2**20, None))  # 10 MiB of host

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the memory check")

    monkeypatch.setattr("moe_specialist.training.pipeline.load_model", refuse)
    with pytest.raises(ConfigurationError) as error:
        run_tiny(tiny_translator, tmp_path / "run", *SFT_FLAGS)
    message = str(error.value)
    assert message.startswith("Not enough host memory for the load phase (the unpruned model in host memory)")
    assert "`prune_mode: disk`" in message and "`--check_memory false` to skip this check" in message
    assert "Memory per rank (estimate):" in caplog.text and "prune_mode memory" in caplog.text
    assert not (tmp_path / "run").exists()  # refused before the output directory was made
    results = run_tiny(tiny_translator, tmp_path / "run", *SFT_FLAGS, "--check_memory", "false", "--max_steps", "0",
                       "--prune_mode", "disk")  # fmt: skip
    assert results["training"]["prune_mode"] == "disk"
