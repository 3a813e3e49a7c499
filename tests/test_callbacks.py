"""The callback registry, PruningCallback's refusals, and single-process runs of the pipeline on a tiny MoE.

Every run below is a real ``moe_specialist.training.run`` (SFTTrainer, report_to none) of
tests/fixtures/recipes/tiny_prune_sft.yaml: 8 Bible verse pairs, 2 steps, 5 dev verses scored with 8 new tokens.
The prune-only run is the reference: the other runs replay its plan, so their saved tensors can be compared with it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moe_specialist.architectures import find_moe
from moe_specialist.calibrate import statistics_for
from moe_specialist.models import load_model_and_tokenizer
from moe_specialist.plan import PrunePlan, plan_for
from moe_specialist.prune import load_pruned_model, prune_model
from moe_specialist.training import PruningCallback, get_callbacks, parse_recipe, run
from moe_specialist.training.callbacks import check_callback_names, expert_fingerprint
from moe_specialist.training.setup import validate_arguments
from tests.tiny_models import tiny_model

TINY = Path(__file__).parent / "fixtures" / "recipes" / "tiny_prune_sft.yaml"
SIGNATURES = {
    "chrf++_signature": "nrefs:3|case:mixed|eff:yes|nc:6|nw:2|space:no|version:2.",
    "bleu_signature": "nrefs:3|",
}


def recipe(model_dir, output_dir, *flags):
    return parse_recipe(
        ["--config", str(TINY), "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir), *flags]
    )


def saved_tensors(output_dir) -> dict[str, torch.Tensor]:
    return load_pruned_model(Path(output_dir) / "model").state_dict()


def rank_record(output_dir, rank=0) -> dict:
    return json.loads((Path(output_dir) / "ranks" / f"rank-{rank}.json").read_text())


def rescored(output_dir) -> dict[str, float]:
    """chrF++ per direction of the saved translations against all their references, by sacreBLEU directly."""
    from sacrebleu.metrics import CHRF

    scores = {}
    for direction, rows in json.loads((Path(output_dir) / "translations.json").read_text()).items():
        references = [[row["references"][k] for row in rows] for k in range(len(rows[0]["references"]))]
        hypotheses = [row["hypothesis"] for row in rows]
        scores[direction] = round(CHRF(word_order=2).corpus_score(hypotheses, references).score, 2)
    return scores


def changed(a: dict, b: dict) -> set[str]:
    assert a.keys() == b.keys()
    return {name for name in a if not torch.equal(a[name], b[name])}


@pytest.fixture(scope="module")
def prune_only(tiny_translator, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("runs") / "prune_only"
    return output_dir, run(*recipe(tiny_translator, output_dir, "--max_steps", "0"))


@pytest.fixture(scope="module")
def full_sft(tiny_translator, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("runs") / "full"
    flags = ("--save_strategy", "steps", "--save_steps", "1", "--eval_strategy", "steps", "--eval_steps", "1")
    return output_dir, run(*recipe(tiny_translator, output_dir, *flags))


# ---- registry and refusals ------------------------------------------------------------------------------------------
def test_unknown_callback_names_fail_listing_the_known_ones():
    with pytest.raises(
        ValueError, match=r"Unknown callback\(s\) 'push_to_hub'.*known callbacks: expert_pruning, translation_eval"
    ):
        get_callbacks(["expert_pruning", "push_to_hub"], context=None)
    with pytest.raises(ValueError, match="listed more than once"):
        check_callback_names(["expert_pruning", "expert_pruning"])


def _callback(tmp_path):
    return PruningCallback(PrunePlan({layer: [0, 1, 2, 3] for layer in range(4)}), tmp_path)


def test_pruning_refuses_a_zero3_partitioned_model(tmp_path):
    model = tiny_model("qwen3_moe")
    next(model.parameters()).ds_id = 0  # what deepspeed.zero.Init leaves on every parameter
    with pytest.raises(RuntimeError, match="already partitioned by DeepSpeed ZeRO-3"):
        _callback(tmp_path).prune(model)


def test_pruning_refuses_a_peft_model_and_an_existing_optimizer(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("qwen3_moe")
    with pytest.raises(RuntimeError, match="An optimizer already exists"):
        _callback(tmp_path).prune(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(RuntimeError, match="experts must be pruned before the LoRA adapters are added"):
        _callback(tmp_path).prune(peft_model)
    assert find_moe(model).experts_per_layer == {0: 8, 1: 8, 2: 8, 3: 8}  # untouched


# ---- runs -----------------------------------------------------------------------------------------------------------
def test_prune_only_run(prune_only, tiny_translator):
    output_dir, results = prune_only
    assert json.loads((output_dir / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["mode"] == "prune_only" and results["training"]["global_step"] == 0
    pruning = results["pruning"]
    assert pruning["experts_before"] == {str(i): 8 for i in range(4)}
    assert pruning["experts_after"] == {str(i): 4 for i in range(4)}
    assert (
        pruning["target_ratio"] == pruning["actual_ratio"] == 0.5
        and pruning["uniform"]
        and pruning["criterion"] == "frequency"
    )
    assert pruning["parameters_after"]["total"] < pruning["parameters_before"]["total"]
    assert pruning["parameters_before"]["routed_experts"] == 2 * pruning["parameters_after"]["routed_experts"]
    # scored once: the scores after pruning are the start and the end, with their sacreBLEU signatures
    assert [h["label"] for h in results["history"]] == ["end"]
    assert results["scores"]["start"] == results["scores"]["end"]
    scores = results["scores"]["end"]["directions"]["en-fr"]
    assert scores["num_segments"] == 5 and scores["chrf++"] == rescored(output_dir)["en-fr"]
    for key, prefix in SIGNATURES.items():
        assert scores[key].startswith(prefix)
    assert results["decoding"] == {
        "strategy": "greedy",
        "max_new_tokens": 8,
        "no_repeat_ngram_size": 0,
        "batch_size": 4,
    }
    assert {"load_model", "calibrate", "prune", "mt_eval", "save", "total"} <= set(results["timings"])
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["log_history"][0]["eval_mt/en-fr/chrf++"] == scores["chrf++"]
    assert len(json.loads((output_dir / "translations.json").read_text())["en-fr"]) == 5
    # the saved model is exactly the original pruned with the saved plan, reloadable, with the plan and a card
    plan = PrunePlan.load(output_dir / "prune_plan.json")
    assert PrunePlan.load(output_dir / "model" / "prune_plan.json").to_dict() == plan.to_dict()
    original, _ = load_model_and_tokenizer(str(tiny_translator))
    prune_model(original, plan)
    assert not changed(saved_tensors(output_dir), original.state_dict())
    assert rank_record(output_dir)["pruned"]["sha256"] == expert_fingerprint(find_moe(original))["sha256"]
    card = (output_dir / "model" / "README.md").read_text()
    assert "expert-pruned" in card and "## Recovery fine-tuning (SFT)" in card and "none (prune only" in card


def test_full_sft_run(full_sft, prune_only):
    output_dir, results = full_sft
    reference_dir, reference = prune_only
    assert results["mode"] == "full" and results["training"]["global_step"] == 2
    assert results["training"]["aux_loss"] == "on (coefficient 0.001)"
    # calibrated again (deterministically): the same plan as the prune-only run, so the step-0 score is its score
    assert PrunePlan.load(output_dir / "prune_plan.json").kept_experts == (
        PrunePlan.load(reference_dir / "prune_plan.json").kept_experts
    )
    assert results["scores"]["start"]["directions"] == reference["scores"]["end"]["directions"]
    # scored at the start, after every evaluate() (eval_steps: 1) and at the end (the last evaluation, not redone)
    assert [(h["label"], h["step"]) for h in results["history"]] == [
        ("start", 0),
        ("eval", 1),
        ("eval", 2),
        ("end", 2),
    ]
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    logged = [e for e in history if "eval_mt/en-fr/chrf++" in e]
    assert [e["step"] for e in logged] == [0, 1, 2]
    assert [e["step"] for e in history if "eval_loss" in e] == [1, 2]  # the teacher-forced loss on the same dev data
    assert logged[-1]["eval_mt/en-fr/chrf++"] == results["scores"]["end"]["directions"]["en-fr"]["chrf++"]
    assert {"model.layers.*.mlp.experts.gate_up_proj", "model.layers.*.mlp.gate.weight", "lm_head.weight"} <= set(
        results["training"]["trainable"]["tensors"]
    )
    # pruned once, in on_init_end, before the optimizer was made: it holds the pruned tensors (Adam moments of their
    # shapes after a step) and no unpruned one; the pruned experts were trained and saved as trained
    record = rank_record(output_dir)
    assert record["pruned"]["when"] == "on_init_end"
    assert record["pruned"]["sha256"] == rank_record(reference_dir)["pruned"]["sha256"]
    assert record["trained"]["sha256"] != record["pruned"]["sha256"]
    model = load_pruned_model(output_dir / "model")
    optimizer = torch.load(output_dir / "checkpoint-2" / "optimizer.pt", weights_only=True)
    moments = sorted(tuple(state["exp_avg"].shape) for state in optimizer["state"].values())
    assert moments == sorted(tuple(p.shape) for p in model.parameters())
    assert moments.count((4, 48, 64)) == 4  # gate_up_proj of 4 experts in each of the 4 layers
    assert find_moe(model).experts_per_layer == {0: 4, 1: 4, 2: 4, 3: 4}
    assert expert_fingerprint(find_moe(model))["sha256"] == record["trained"]["sha256"]
    assert (output_dir / "checkpoint-2").is_dir()
    card = (output_dir / "model" / "README.md").read_text()
    assert "full fine-tune" in card and "| en-fr |" in card


def test_an_existing_output_dir_is_refused_and_a_checkpoint_resumes(full_sft, tiny_translator, tmp_path):
    source, first = full_sft
    with pytest.raises(FileExistsError, match="exists and is not empty.*--overwrite_output_dir true"):
        run(*recipe(tiny_translator, source))
    output_dir = tmp_path / "resumed"
    shutil.copytree(source, output_dir)
    flags = ("--resume_from_checkpoint", "true", "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1")
    results = run(*recipe(tiny_translator, output_dir, *flags))
    assert results["training"]["resumed_from"] == str(output_dir / "checkpoint-2")
    assert results["training"]["global_step"] == 3
    assert "calibrate" not in results["timings"]  # the checkpoint's plan was replayed
    assert results["pruning"]["experts_after"] == first["pruning"]["experts_after"]
    assert (
        PrunePlan.load(output_dir / "prune_plan.json").kept_experts
        == PrunePlan.load(source / "prune_plan.json").kept_experts
    )


def test_lora_prunes_before_wrapping_and_merges(prune_only, tiny_translator, tmp_path):
    reference_dir, _ = prune_only
    flags = ("--use_peft", "true", "--lora_target_modules", "q_proj", "v_proj")
    results = run(
        *recipe(tiny_translator, tmp_path / "lora", "--prune_plan", str(reference_dir / "prune_plan.json"), *flags)
    )
    assert results["mode"] == "lora"
    assert results["training"]["trainable"]["tensors"] == [
        f"base_model.model.model.layers.*.self_attn.{proj}.lora_{ab}.default.weight"
        for proj in ("q_proj", "v_proj")
        for ab in "AB"
    ]
    assert rank_record(tmp_path / "lora")["pruned"]["when"] == "before PEFT wrapping"
    tensors = saved_tensors(tmp_path / "lora")
    assert not any("lora" in name for name in tensors)  # merged
    assert changed(tensors, saved_tensors(reference_dir)) == {
        f"model.layers.{i}.self_attn.{proj}.weight" for i in range(4) for proj in ("q_proj", "v_proj")
    }
    assert "LoRA (r=16, alpha=32), merged" in (tmp_path / "lora" / "model" / "README.md").read_text()


def test_router_only_trains_the_routers_alone(prune_only, tiny_translator, tmp_path):
    reference_dir, _ = prune_only
    flags = ("--prune_plan", str(reference_dir / "prune_plan.json"), "--train_router_only", "true")
    results = run(*recipe(tiny_translator, tmp_path / "router", *flags))
    assert results["mode"] == "router_only"
    assert results["training"]["trainable"] == {
        "parameters": 4 * 4 * 64,
        "tensors": ["model.layers.*.mlp.gate.weight"],
    }
    assert changed(saved_tensors(tmp_path / "router"), saved_tensors(reference_dir)) == {
        f"model.layers.{i}.mlp.gate.weight" for i in range(4)
    }


def test_freeze_router_trains_everything_but_the_routers(prune_only, tiny_translator, tmp_path):
    reference_dir, _ = prune_only
    flags = ("--prune_plan", str(reference_dir / "prune_plan.json"), "--freeze_router", "true")
    results = run(*recipe(tiny_translator, tmp_path / "frozen", *flags))
    assert results["mode"] == "full" and results["freeze_router"] is True
    assert "model.layers.*.mlp.gate.weight" not in results["training"]["trainable"]["tensors"]
    different = changed(saved_tensors(tmp_path / "frozen"), saved_tensors(reference_dir))
    assert not any(name.endswith("mlp.gate.weight") for name in different)
    assert {f"model.layers.{i}.mlp.experts.down_proj" for i in range(4)} <= different


def test_per_layer_counts_switch_the_aux_loss_off(tiny_translator, tmp_path):
    flags = ("--pruning_allocation", "global", "--pruning_ratio", "0.4", "--max_steps", "1")
    results = run(*recipe(tiny_translator, tmp_path / "global", *flags))
    assert not results["pruning"]["uniform"], "the global allocation was expected to keep different counts"
    assert results["training"]["aux_loss"] == "off (per-layer expert counts differ)"
    config = json.loads((tmp_path / "global" / "model" / "config.json").read_text())
    assert config["moe_experts_per_layer"] == results["pruning"]["experts_after"]
    assert config["output_router_logits"] is False
    model = load_pruned_model(tmp_path / "global" / "model")
    assert {str(k): v for k, v in find_moe(model).experts_per_layer.items()} == results["pruning"]["experts_after"]


def test_statistics_from_the_caller_are_used(tiny_translator, tmp_path):
    """What a sweep does: calibrate once, then run every point with the same statistics."""
    args = recipe(tiny_translator, tmp_path / "with_stats", "--max_steps", "0", "--pruning_criterion", "gate_mass")
    model, tokenizer = load_model_and_tokenizer(str(tiny_translator))
    stats = statistics_for(model, tokenizer, args[2], "tiny", statistics_file=None, progress=False)
    results = run(*args, stats=stats)
    assert "calibrate" not in results["timings"]
    expected = plan_for(find_moe(model), stats, args[3])
    assert PrunePlan.load(tmp_path / "with_stats" / "prune_plan.json").kept_experts == expected.kept_experts
    assert results["pruning"]["criterion"] == "gate_mass"


def test_the_sensitivity_allocation_measures_layers_in_the_callback(tiny_translator, tmp_path):
    flags = ("--pruning_allocation", "sensitivity", "--sensitivity_examples", "4", "--max_steps", "0")
    results = run(*recipe(tiny_translator, tmp_path / "sensitivity", *flags))
    plan = json.loads((tmp_path / "sensitivity" / "prune_plan.json").read_text())
    costs = plan["layer_costs"]
    assert len(costs) == 4 and all(row[8] == 0 and row[1] is None and row[2] is not None for row in costs)
    counts = [len(ids) for ids in plan["kept_experts"].values()]
    assert sum(counts) == 16 and results["pruning"]["experts_after"] == {str(i): c for i, c in enumerate(counts)}
    chosen = sum(costs[i][c] for i, c in enumerate(counts))
    assert chosen <= sum(row[4] for row in costs) + 1e-9  # no worse than the uniform split the costs also price


def test_without_the_pruning_callback_nothing_is_pruned(tiny_translator, tmp_path):
    results = run(
        *recipe(tiny_translator, tmp_path / "unpruned", "--max_steps", "0", "--callbacks", "translation_eval")
    )
    assert results["pruning"] is None
    assert find_moe(load_pruned_model(tmp_path / "unpruned" / "model")).experts_per_layer == {i: 8 for i in range(4)}
    assert results["scores"]["end"]["average"]["chrf++"] == rescored(tmp_path / "unpruned")["en-fr"]


def test_lora_needs_explicit_targets_and_respects_freeze_router(prune_only, tiny_translator, tmp_path):
    reference_dir, _ = prune_only
    with pytest.raises(ValueError, match="use_peft needs lora_target_modules"):
        run(*recipe(tiny_translator, tmp_path / "a", "--use_peft", "true"))
    flags = (
        "--use_peft",
        "true",
        "--lora_target_modules",
        "all-linear",
        "--lora_dropout",
        "0",
        "--freeze_router",
        "true",
    )
    with pytest.raises(
        ValueError, match=r"freeze_router is set but router parameters are trainable \(.*mlp\.gate\.lora_"
    ):
        run(*recipe(tiny_translator, tmp_path / "b", "--prune_plan", str(reference_dir / "prune_plan.json"), *flags))


def test_lora_under_zero3_is_refused():
    from types import SimpleNamespace

    from trl import ModelConfig

    model_args = ModelConfig(model_name_or_path="x", use_peft=True, lora_target_modules=["q_proj"])
    training_args = SimpleNamespace(train_router_only=False, deepspeed_plugin=SimpleNamespace(zero_stage=3))
    with pytest.raises(ValueError, match="LoRA under DeepSpeed ZeRO-3 is not supported.*zero2.yaml"):
        validate_arguments(model_args, training_args)
