"""The command line end to end on a tiny translator: inspect -> calibrate -> plan -> prune -> evaluate."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from moe_specialist.cli import main
from moe_specialist.data.langid import off_target_rate
from moe_specialist.prune import load_pruned_model
from moe_specialist.stats import RoutingStats


def run(*argv):
    """The command in process, with --debug: expected errors propagate as exceptions (tests/test_errors.py checks
    what users see without it)."""
    main([*(str(a) for a in argv), "--debug"])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_translator):
    out = tmp_path_factory.mktemp("cli")
    run(
        "calibrate",
        "--model",
        tiny_translator,
        "--calibration_directions",
        "en-fr,de-en",
        "--calibration_examples",
        6,
        "--calibration_general_languages",
        "fr",
        "--output",
        out / "stats.safetensors",
    )
    run(
        "plan",
        "--model",
        tiny_translator,
        "--statistics_file",
        out / "stats.safetensors",
        "--pruning_ratio",
        0.5,
        "--pruning_criterion",
        "gate_mass",
        "--pruning_allocation",
        "global",
        "--pruning_groups",
        "en-fr",
        "--output",
        out / "plan.json",
    )
    run("prune", "--model", tiny_translator, "--prune_plan", out / "plan.json", "--output", out / "disk")
    run(
        "prune",
        "--model",
        tiny_translator,
        "--prune_plan",
        out / "plan.json",
        "--output",
        out / "memory",
        "--mode",
        "memory",
    )
    return out


def test_inspect_prints_structure(tiny_translator, capsys):
    run("inspect", tiny_translator, "--json")
    report = json.loads(capsys.readouterr().out)
    assert report["architecture"] == "Qwen3MoeForCausalLM"
    assert report["moe_layers"] == [0, 1, 2, 3] and report["top_k"] == 2
    assert report["experts_per_layer"] == {"0": 8, "1": 8, "2": 8, "3": 8}
    assert report["routing"] == {
        "kind": "softmax_topk_renorm",
        "exact": True,
        "reason": "softmax, top-k, renormalised over the k selected",
    }
    assert report["parameters"]["routed_experts"] == 4 * 8 * 3 * 64 * 24
    run("inspect", tiny_translator)
    assert "exact under pruning: yes" in capsys.readouterr().out


def test_calibrate_writes_groups_and_roles(pipeline):
    stats = RoutingStats.load(pipeline / "stats.safetensors")
    assert stats.groups == ["en-fr", "de-en", "fr"]
    table = stats.token_table()
    assert table["en-fr"]["source"] > 0 and table["en-fr"]["target"] > 0
    assert table["fr"]["source"] == 0 and table["fr"]["target"] > 0  # monolingual text has no prompt
    assert stats.metadata["data"]["examples"] == {"en-fr": 6, "de-en": 6}
    assert json.loads((pipeline / "stats.json").read_text())["groups"] == ["en-fr", "de-en", "fr"]


def test_plan_and_both_prune_paths_agree(pipeline):
    plan = json.loads((pipeline / "plan.json").read_text())
    assert sum(len(v) for v in plan["kept_experts"].values()) == 16
    assert plan["criterion"] == "gate_mass" and plan["groups"] == ["en-fr"]
    disk = load_file(pipeline / "disk" / "model.safetensors")
    memory = load_file(pipeline / "memory" / "model.safetensors")
    assert disk.keys() == memory.keys() and all(torch.equal(disk[k], memory[k]) for k in disk)
    card = (pipeline / "disk" / "README.md").read_text()
    assert "gate_mass" in card and "| routed experts | 32 | 16 |" in card
    model = load_pruned_model(pipeline / "disk")
    counts = {int(k): len(v) for k, v in plan["kept_experts"].items()}
    assert [layer.mlp.experts.gate_up_proj.shape[0] for layer in model.model.layers] == [counts[i] for i in range(4)]
    assert (pipeline / "disk" / "tokenizer.json").is_file()


def test_evaluate_writes_scores_and_records(pipeline, capsys):
    run(
        "evaluate",
        "--model",
        pipeline / "disk",
        "--eval_directions",
        "en-fr",
        "de-en",
        "--eval_split",
        "test",
        "--max_eval_examples",
        3,
        "--max_new_tokens",
        6,
        "--output",
        pipeline / "scores.json",
    )
    scores = json.loads((pipeline / "scores.json").read_text())
    assert set(scores["directions"]) == {"en-fr", "de-en"}
    en_fr = scores["directions"]["en-fr"]
    assert en_fr["num_segments"] == 3 and len(en_fr["records"]) == 3
    assert en_fr["chrf++_signature"].startswith("nrefs:3|") and scores["directions"]["de-en"]["chrf++_signature"]
    assert set(en_fr["records"][0]) == {"id", "source", "references", "hypothesis"}
    hypotheses = [record["hypothesis"] for record in en_fr["records"]]
    assert en_fr["off_target_rate"] == round(off_target_rate(hypotheses, "fr"), 4)
    assert scores["decoding"]["max_new_tokens"] == 6
    assert (scores["eval_dataset_name"], scores["eval_split"], scores["max_eval_examples"]) == ("bible", "test", 3)
    assert scores["dtype"] == "auto"
    assert "avg chrF++" in capsys.readouterr().out


def test_existing_output_is_refused(pipeline):
    with pytest.raises(FileExistsError, match="--overwrite"):
        run(
            "plan",
            "--model",
            pipeline / "disk",
            "--statistics_file",
            pipeline / "stats.safetensors",
            "--output",
            pipeline / "plan.json",
        )


def test_bad_ratio_and_foreign_statistics(pipeline, tiny_translator, tmp_path):
    with pytest.raises(ValueError, match=r"pruning_ratio must be in \[0, 1\)"):
        run(
            "plan",
            "--model",
            tiny_translator,
            "--statistics_file",
            pipeline / "stats.safetensors",
            "--pruning_ratio",
            1.5,
            "--output",
            tmp_path / "p.json",
        )
    # statistics of the unpruned model do not fit the pruned one
    with pytest.raises(ValueError, match="calibrate this model"):
        run(
            "plan",
            "--model",
            pipeline / "disk",
            "--statistics_file",
            pipeline / "stats.safetensors",
            "--output",
            tmp_path / "p.json",
        )


def test_unsupported_architecture_is_named(tmp_path, capsys):
    config = AutoConfig.for_model(
        "dbrx",
        d_model=32,
        n_heads=2,
        n_layers=2,
        vocab_size=50,
        ffn_config={"moe_num_experts": 4, "moe_top_k": 2, "ffn_hidden_size": 16},
        attn_config={"kv_n_heads": 1, "rope_theta": 10000.0},
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "dbrx")
    with pytest.raises(ValueError, match="DbrxForCausalLM is not supported: DBRX stores experts as flattened 2-D"):
        run("inspect", tmp_path / "dbrx")


def test_calibrate_overwrite_recalibrates_and_settings_are_checked_on_reuse(pipeline, tiny_translator):
    from moe_specialist.calibrate import statistics_for
    from moe_specialist.configs import CalibrationArguments
    from moe_specialist.models import load_model_and_tokenizer
    from moe_specialist.stats import StatisticsMismatchError

    target = pipeline / "again.safetensors"
    run("calibrate", "--model", tiny_translator, "--calibration_examples", 4, "--output", target)
    run("calibrate", "--model", tiny_translator, "--calibration_examples", 3, "--output", target, "--overwrite")
    assert RoutingStats.load(target).metadata["data"]["examples"] == {"en-fr": 3}
    model, tokenizer = load_model_and_tokenizer(str(tiny_translator))
    args = CalibrationArguments(calibration_examples=5)
    with pytest.raises(StatisticsMismatchError, match="calibration_examples=3"):
        statistics_for(model, tokenizer, args, "tiny", statistics_file=str(target))
    args.calibration_examples = 3
    assert statistics_for(model, tokenizer, args, "tiny", statistics_file=str(target)).groups == ["en-fr"]
    # files written when list-valued knobs were comma-separated strings still match
    stats = RoutingStats.load(target)
    stats.metadata["calibration"]["calibration_directions"] = "en-fr"
    stats.save(target)
    assert statistics_for(model, tokenizer, args, "tiny", statistics_file=str(target)).groups == ["en-fr"]


def test_calibrate_with_device_map_auto_gives_the_same_statistics(pipeline, tiny_translator, tmp_path):
    """``--device_map auto`` (a model larger than one GPU, spread by one process) measures the same routing."""
    flags = ("--model", tiny_translator, "--calibration_directions", "en-fr,de-en", "--calibration_examples", 6,
             "--calibration_general_languages", "fr")  # fmt: skip
    run("calibrate", *flags, "--device_map", "auto", "--output", tmp_path / "auto.safetensors")
    spread, whole = (load_file(p) for p in (tmp_path / "auto.safetensors", pipeline / "stats.safetensors"))
    assert spread.keys() == whole.keys()
    for name, tensor in whole.items():
        torch.testing.assert_close(spread[name], tensor, rtol=0, atol=1e-9, msg=name)
    with pytest.raises(ValueError, match="--device_map balanced in 1 process.*spreads one process's model"):
        run("calibrate", *flags, "--device_map", "balanced", "--output", tmp_path / "x.safetensors")
