"""Two CPU processes under ``accelerate launch``: DDP on gloo, DeepSpeed ZeRO-2 and ZeRO-3, W&B offline.

Each test launches ``python -m moe_specialist.train`` on tests/fixtures/recipes/tiny_prune_sft.yaml (a tiny random
Qwen3-MoE, 8 Bible verse pairs, 2 steps, 5 dev verses scored) with one of accelerate_configs/cpu/*.yaml, then checks:

- each rank pruned once, in ``on_init_end`` before any optimizer, to the same shapes and the same tensors
  (``output_dir/ranks/rank-<i>.json``), and both ranks hold the same trained tensors at the end, which differ from
  the pruned ones (so the pruned experts were in the optimizer) and are what was saved;
- under ZeRO-3 the trained tensors were partitioned (the model really was sharded) and the final save gathered them;
- the saved model reloads with ``load_pruned_model`` with 4 of 8 experts per layer;
- the step-0 translation scores equal a single-process run's (the sharded generation is gathered in order);
- ``eval_mt/...`` metrics are in trainer_state.json and results.json and in the offline W&B run (history, summary,
  the recipe as config, the samples table).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_specialist.architectures import find_moe
from moe_specialist.plan import PrunePlan
from moe_specialist.prune import load_pruned_model, prune_model
from moe_specialist.training import parse_recipe, run
from moe_specialist.training.callbacks import expert_fingerprint
from tests.helpers import refit_by_hand, wandb_record

ROOT = Path(__file__).parents[1]
TINY = ROOT / "tests" / "fixtures" / "recipes" / "tiny_prune_sft.yaml"
DISTRIBUTED_TYPES = {"ddp": "MULTI_CPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_process_scores(tiny_translator, tmp_path_factory):
    """Scores of the pruned model (before any step) in one process: what every launch must find at step 0."""
    output_dir = tmp_path_factory.mktemp("reference") / "prune_only"
    args = parse_recipe(
        ["--config", str(TINY), "--model_name_or_path", str(tiny_translator), "--output_dir", str(output_dir)]
        + ["--max_steps", "0"]
    )
    return run(*args)["scores"]["end"]


def launch(config: str, model_dir: Path, output_dir: Path, *flags: str) -> tuple[subprocess.CompletedProcess, float]:
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "accelerate_configs" / "cpu" / f"{config}.yaml"),
        "--main_process_port", str(free_port()),
        "-m", "moe_specialist.train",
        "--config", str(TINY),
        "--model_name_or_path", str(model_dir),
        "--output_dir", str(output_dir),
        "--report_to", "wandb",
        "--wandb_run_group", f"test-{config}",
        "--wandb_tags", "test", config,
        *flags,
    ]  # fmt: skip
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.time()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return done, time.time() - start


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp", "zero2", "zero3"])
def test_two_process_prune_sft(config, tiny_translator, single_process_scores, tmp_path):
    output_dir = tmp_path / config
    done, seconds = launch(config, tiny_translator, output_dir)
    assert done.returncode == 0, f"{config} failed after {seconds:.0f}s:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    print(f"{config}: {seconds:.1f}s")

    # pruning: once per rank, before the optimizer, identical on both ranks; both ranks trained the same model
    records = [json.loads((output_dir / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in records] == [0, 1] and all(r["world_size"] == 2 for r in records)
    for record in records:
        assert record["pruned"]["when"] == "on_init_end"
        assert record["pruned"]["experts_per_layer"] == {str(i): 4 for i in range(4)}
        assert record["pruned"]["shapes"]["model.layers.0.mlp.experts.gate_up_proj"] == [4, 48, 64]
        assert record["trained"]["global_step"] == 2
        assert record["trained"]["sha256"] != record["pruned"]["sha256"]
        assert record["trained"]["zero3_partitioned"] is (config == "zero3")
    assert records[0]["pruned"]["shapes"] == records[1]["pruned"]["shapes"] == records[0]["trained"]["shapes"]
    assert records[0]["pruned"]["sha256"] == records[1]["pruned"]["sha256"]
    assert records[0]["trained"]["sha256"] == records[1]["trained"]["sha256"]
    assert done.stdout.count("of routed experts removed (target_ratio") == 1  # logged by rank 0 only
    assert ("ZeRO-3 leaf modules: ['Qwen3MoeSparseMoeBlock']" in done.stdout) is (config == "zero3")

    # the saved model: pruned architecture, reloadable, the trained tensors
    model = load_pruned_model(output_dir / "model")
    moe = find_moe(model)
    assert moe.experts_per_layer == {0: 4, 1: 4, 2: 4, 3: 4}
    assert expert_fingerprint(moe)["sha256"] == records[0]["trained"]["sha256"]
    assert (
        json.loads((output_dir / "model" / "prune_plan.json").read_text())["kept_experts"]
        == json.loads((output_dir / "prune_plan.json").read_text())["kept_experts"]
    )

    # results.json and trainer_state.json
    results = json.loads((output_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["distributed_type"] == DISTRIBUTED_TYPES[config]
    assert results["zero_stage"] == {"ddp": None, "zero2": 2, "zero3": 3}[config]
    assert results["training"]["global_step"] == 2
    assert results["scores"]["start"]["directions"] == single_process_scores["directions"]
    assert results["scores"]["end"]["directions"]["en-fr"]["chrf++_signature"].startswith("nrefs:3|")
    state = json.loads((output_dir / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "eval_mt/en-fr/chrf++" in e]
    assert [e["step"] for e in logged] == [0, 2]
    assert logged[-1]["eval_mt/en-fr/chrf++"] == results["scores"]["end"]["directions"]["en-fr"]["chrf++"]

    # the offline W&B run (rank 0 only): history, summary and config are in its .wandb file
    runs = sorted((output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    (wandb_file,) = runs[0].glob("run-*.wandb")
    keys = (b"eval/mt/en-fr/chrf++", b"pruning/experts_kept_per_layer", b"pruning/params_active_after",
            b"final/en-fr/chrf++", b"pruning_ratio", b"test-" + config.encode(), b"prune_sft")  # fmt: skip
    data = wandb_record(wandb_file, *keys)
    assert len(data) > 1000
    for key in keys:
        assert key in data, key
    assert results["wandb"]["id"] in wandb_file.name
    tables = [json.loads(p.read_text()) for p in (runs[0] / "files" / "media" / "table").glob("mt_samples_*.json")]
    assert len(tables) == 2  # at the start and at the end
    for table in tables:
        assert table["columns"] == ["step", "direction", "source", "reference", "hypothesis", "chrf"]
        assert len(table["data"]) == 2  # mt_eval_num_samples_table rows per direction
    assert sorted(table["data"][0][0] for table in tables) == [0, 2]  # the steps


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp", "zero3"])
def test_two_process_distillation(config, tiny_translator, tmp_path):
    """KD+CE from the unpruned model under 2 processes: the live teacher (a DeepSpeed inference engine under ZeRO-3)
    runs on each rank's batch; both ranks end with the same trained tensors; the KD term is logged."""
    output_dir = tmp_path / config
    done, seconds = launch(config, tiny_translator, output_dir, "--recovery", "kd+ce", "--report_to", "none")
    assert done.returncode == 0, f"{config} failed after {seconds:.0f}s:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    records = [json.loads((output_dir / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert records[0]["trained"]["sha256"] == records[1]["trained"]["sha256"] != records[0]["pruned"]["sha256"]
    assert records[0]["trained"]["zero3_partitioned"] is (config == "zero3")
    state = json.loads((output_dir / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "kd" in e]
    assert [e["step"] for e in logged] == [1, 2] and all(e["kd"] > 0 and e["ce"] > 0 for e in logged)
    results = json.loads((output_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["training"]["global_step"] == 2


@pytest.mark.slow
def test_two_process_zero3_refit_before_sharding(tiny_translator, tmp_path):
    """compensation refit under ZeRO-3 (memory mode): every rank prunes and re-fits the whole model in place before
    DeepSpeed shards it, to exactly the weights and trace one process gives; training then runs sharded."""
    output_dir = tmp_path / "zero3-refit"
    flags = ("--compensation", "refit", "--sensitivity_examples", "4", "--report_to", "none")
    done, seconds = launch("zero3", tiny_translator, output_dir, *flags)
    assert done.returncode == 0, f"failed after {seconds:.0f}s:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    records = [json.loads((output_dir / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    model, trace = refit_by_hand(tiny_translator, PrunePlan.load(output_dir / "prune_plan.json"))
    refitted = expert_fingerprint(find_moe(model))["sha256"]
    assert records[0]["pruned"]["sha256"] == records[1]["pruned"]["sha256"] == refitted
    assert records[0]["trained"]["zero3_partitioned"] and records[0]["trained"]["sha256"] != refitted
    results = json.loads((output_dir / "results.json").read_text())
    assert results["pruning"]["compensation"]["layers"] == trace["layers"]


@pytest.mark.slow
def test_two_process_zero3_prune_on_disk(tiny_translator, single_process_scores, tmp_path):
    """prune_mode disk under ZeRO-3: calibration with the unpruned model on each rank, the checkpoint pruned on disk
    once by rank 0, every rank loading only the pruned model, partitioned as it loads (zero.Init); the precomputed
    teacher logits come from the source model, also loaded partitioned. Step-0 scores are generated without
    gathering the model and equal the single-process, in-memory ones."""
    output_dir = tmp_path / "zero3-disk"
    flags = ("--prune_mode", "disk", "--recovery", "kd", "--teacher_logits", str(tmp_path / "teacher"))
    done, seconds = launch("zero3", tiny_translator, output_dir, *flags, "--report_to", "none")
    assert done.returncode == 0, f"failed after {seconds:.0f}s:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    assert done.stdout.count("on disk into") == 1  # rank 0 alone prunes
    records = [json.loads((output_dir / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    plan = json.loads((output_dir / "prune_plan.json").read_text())
    reference = load_pruned_model(tiny_translator)
    prune_model(reference, PrunePlan.from_dict(plan))
    for record in records:
        assert record["pruned"]["zero3_partitioned"] is True  # loaded partitioned: no rank held it whole
        assert record["pruned"]["sha256"] == expert_fingerprint(find_moe(reference))["sha256"]
        assert record["trained"]["sha256"] != record["pruned"]["sha256"]
    assert records[0]["trained"]["sha256"] == records[1]["trained"]["sha256"]
    results = json.loads((output_dir / "results.json").read_text())
    assert results["training"]["prune_mode"] == "disk" and results["training"]["global_step"] == 2
    assert results["scores"]["start"]["directions"] == single_process_scores["directions"]
    teacher = json.loads((tmp_path / "teacher" / "teacher_logits.json").read_text())
    assert teacher["teacher"] == str(tiny_translator) and len(teacher["parts"]) == 2
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert all(e["kd"] > 0 for e in state["log_history"] if "kd" in e)
    assert find_moe(load_pruned_model(output_dir / "model")).experts_per_layer == {i: 4 for i in range(4)}


@pytest.mark.slow
def test_two_process_zero2_lora_prune_on_disk(tiny_translator, tmp_path):
    """prune_mode disk with LoRA under ZeRO-2 (the prune_lora recipe): each rank loads the pruned checkpoint straight
    onto its device, the live KD teacher is the source model, the adapters are merged into the saved model."""
    output_dir = tmp_path / "zero2-lora-disk"
    flags = ("--prune_mode", "disk", "--use_peft", "true", "--lora_target_modules", "q_proj", "v_proj",
             "--recovery", "kd", "--report_to", "none")  # fmt: skip
    done, seconds = launch("zero2", tiny_translator, output_dir, *flags)
    assert done.returncode == 0, f"failed after {seconds:.0f}s:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    records = [json.loads((output_dir / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    reference = load_pruned_model(tiny_translator)
    prune_model(reference, PrunePlan.from_dict(json.loads((output_dir / "prune_plan.json").read_text())))
    assert {r["pruned"]["sha256"] for r in records} == {expert_fingerprint(find_moe(reference))["sha256"]}
    results = json.loads((output_dir / "results.json").read_text())
    assert results["mode"] == "lora" and results["training"]["prune_mode"] == "disk"
    saved = load_pruned_model(output_dir / "model")
    assert find_moe(saved).experts_per_layer == {i: 4 for i in range(4)}
    assert not any("lora" in name for name in saved.state_dict())
