"""Recovery modes: the divergences, the compact LM head, each ``recovery`` on a tiny translator, precomputed teacher
logits, progressive pruning, and the recipe errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_specialist.architectures import find_moe
from moe_specialist.errors import ConfigurationError, MissingInputError
from moe_specialist.prune import load_pruned_model
from moe_specialist.training import parse_recipe, run
from moe_specialist.training.progressive import relative_ratio, run_progressive, stage_ratios, stage_steps
from moe_specialist.training.recovery import (
    add_compact_lm_head,
    generalized_jsd,
    loss_weights,
    top_k_forward_kl,
)
from moe_specialist.training.teacher import TEACHER_META_FILE
from tests.tiny_models import tiny_model

ROOT = Path(__file__).parents[1]
TINY = ROOT / "tests" / "fixtures" / "recipes" / "tiny_prune_sft.yaml"


def recipe(model_dir: Path, output_dir: Path, *flags: str):
    return parse_recipe(
        ["--config", str(TINY), "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir), *flags]
    )


def first_log(output_dir: Path) -> dict:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return next(e for e in state["log_history"] if "loss" in e)


# ---- divergences ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_matches_trl_gkd(beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    torch.manual_seed(0)
    student, teacher = torch.randn(7, 50) * 3, torch.randn(7, 50) * 3
    ours = generalized_jsd(student, teacher, beta, temperature)
    reference = GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, temperature=temperature, reduction="sum")
    assert ours.shape == (7,)
    torch.testing.assert_close(ours.sum(), reference, rtol=1e-5, atol=1e-6)
    assert (ours >= -1e-6).all()
    assert generalized_jsd(student, student, beta, temperature).abs().max() < 1e-6


def test_top_k_kl_is_the_forward_kl_with_the_whole_vocabulary_and_close_with_the_head():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 40), torch.randn(5, 40) * 4
    ids = torch.arange(40).expand(5, 40)
    torch.testing.assert_close(top_k_forward_kl(student, ids, teacher, 1.5), generalized_jsd(student, teacher, 0, 1.5))
    top = teacher.topk(20, dim=-1)
    sparse = top_k_forward_kl(student, top.indices, top.values, 1.0)
    assert torch.allclose(sparse, generalized_jsd(student, teacher, 0, 1.0), rtol=0.2)


def test_loss_weights():
    assert loss_weights("sft", 0.3) == (1.0, 0.0)
    assert loss_weights("kd", 0.3) == (0.0, 1.0)
    assert loss_weights("router_kd", 0.3) == (0.0, 1.0)
    assert loss_weights("kd+ce", 0.25) == (0.75, 0.25)


# ---- the compact LM head --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "granitemoe", "deepseek_v3"])
def test_compact_lm_head_gives_the_models_own_logits_and_aux_loss(model_type):
    model = tiny_model(model_type).eval()
    torch.manual_seed(1)
    input_ids = torch.randint(3, model.config.vocab_size, (3, 12))
    attention = torch.ones_like(input_ids)
    if model_type != "deepseek_v3":  # its tiny attention fails on any padded batch in transformers 5.23 (not ours)
        attention[1, 9:] = 0
    positions = torch.rand(3, 11) > 0.4
    reference = model(input_ids=input_ids, attention_mask=attention, output_router_logits=True)
    add_compact_lm_head(model)
    compact = model(input_ids=input_ids, attention_mask=attention, positions=positions, output_router_logits=True)
    assert compact.logits.shape == (int(positions.sum()), model.config.vocab_size)
    torch.testing.assert_close(compact.logits, reference.logits[:, :-1][positions], rtol=1e-5, atol=1e-5)
    if getattr(reference, "aux_loss", None) is not None:
        torch.testing.assert_close(compact.aux_loss, reference.aux_loss)
    unchanged = model(input_ids=input_ids, attention_mask=attention)  # without positions: the original forward
    torch.testing.assert_close(unchanged.logits, reference.logits)


# ---- each recovery mode on a tiny translator ------------------------------------------------------------------------
def test_sft_loss_is_trls(tiny_translator, tmp_path):
    """The compact loss is the cross-entropy TRL's SFTTrainer logs for the same first batch (ratio 0: no pruning)."""
    from trl import SFTTrainer

    from moe_specialist.training import pipeline

    results = run(*recipe(tiny_translator, tmp_path / "ours", "--pruning_ratio", "0", "--max_steps", "1"))
    ours = first_log(tmp_path / "ours")
    original = pipeline.RecoveryTrainer
    pipeline.RecoveryTrainer = lambda *a, teacher_snapshot=None, teacher_name=None, **k: SFTTrainer(*a, **k)
    try:
        run(*recipe(tiny_translator, tmp_path / "trl", "--pruning_ratio", "0", "--max_steps", "1"))
    finally:
        pipeline.RecoveryTrainer = original
    trl_log = first_log(tmp_path / "trl")
    assert ours["loss"] == pytest.approx(trl_log["loss"], rel=1e-6)
    assert ours["grad_norm"] == pytest.approx(trl_log["grad_norm"], rel=1e-5)
    coefficient = json.loads((tiny_translator / "config.json").read_text())["router_aux_loss_coef"]
    assert ours["loss"] == pytest.approx(ours["ce"] + coefficient * ours["aux_loss"], rel=1e-6)
    assert results["training"]["global_step"] == 1


def test_kd_from_the_unpruned_model_itself_is_zero_and_positive_after_pruning(tiny_translator, tmp_path):
    run(*recipe(tiny_translator, tmp_path / "r0", "--pruning_ratio", "0", "--max_steps", "1", "--recovery", "kd"))
    assert first_log(tmp_path / "r0")["kd"] == pytest.approx(0.0, abs=1e-9)  # the same weights: the same logits
    run(*recipe(tiny_translator, tmp_path / "r5", "--max_steps", "1", "--recovery", "kd+ce", "--kd_alpha", "0.25"))
    log = first_log(tmp_path / "r5")
    assert log["kd"] > 1e-5  # a random tiny model is near uniform: small, but far from 0
    coefficient = json.loads((tiny_translator / "config.json").read_text())["router_aux_loss_coef"]
    assert log["loss"] == pytest.approx(0.25 * log["kd"] + 0.75 * log["ce"] + coefficient * log["aux_loss"], rel=1e-5)


def test_router_kd_trains_only_the_routers_on_every_token(tiny_translator, tmp_path):
    results = run(*recipe(tiny_translator, tmp_path / "router", "--recovery", "router_kd", "--max_steps", "2"))
    run(*recipe(tiny_translator, tmp_path / "pruned", "--max_steps", "0"))
    assert results["mode"] == "router_only"
    assert all(".mlp.gate." in name for name in results["training"]["trainable"]["tensors"])
    trained = load_pruned_model(tmp_path / "router" / "model").state_dict()
    pruned = load_pruned_model(tmp_path / "pruned" / "model").state_dict()
    changed = sorted(name for name in trained if not torch.equal(trained[name], pruned[name]))
    assert changed and all(".mlp.gate." in name for name in changed)
    kd_tokens = first_log(tmp_path / "router")
    assert kd_tokens["kd"] > 0


def test_precomputed_teacher_logits_equal_the_live_teacher_and_are_reused(tiny_translator, tmp_path, caplog):
    table = tmp_path / "teacher"
    flags = ("--max_steps", "1", "--recovery", "kd")
    run(*recipe(tiny_translator, tmp_path / "live", *flags))
    run(*recipe(tiny_translator, tmp_path / "pre", *flags, "--teacher_logits", str(table), "--teacher_top_k", "4096"))
    meta = json.loads((table / TEACHER_META_FILE).read_text())
    assert meta["top_k"] == 4096 and meta["teacher"] == str(tiny_translator) and meta["parts"]
    assert first_log(tmp_path / "pre")["kd"] == pytest.approx(first_log(tmp_path / "live")["kd"], rel=2e-3)
    part = table / meta["parts"][0]
    written = part.stat().st_mtime_ns
    with caplog.at_level("INFO"):
        run(*recipe(tiny_translator, tmp_path / "again", *flags, "--teacher_logits", str(table),
                    "--teacher_top_k", "4096"))  # fmt: skip
    assert part.stat().st_mtime_ns == written and "Computing the teacher" not in caplog.text
    with pytest.raises(ConfigurationError, match="teacher_top_k 32"):
        run(*recipe(tiny_translator, tmp_path / "k32", *flags, "--teacher_logits", str(table)))


def test_progressive_pruning_reaches_the_ratio_in_stages_within_the_step_budget(tiny_translator, tmp_path):
    args = recipe(tiny_translator, tmp_path / "prog", "--progressive_ratios", "0.25", "--max_steps", "3",
                  "--recovery", "kd+ce")  # fmt: skip
    results = run_progressive(*args)
    assert [s["ratio"] for s in results["stages"]] == [0.25, 0.5]
    assert [s["steps"] for s in results["stages"]] == [1, 2]
    assert [s["pruning"]["experts_after"] for s in results["stages"]] == [{str(i): 6 for i in range(4)},
                                                                           {str(i): 4 for i in range(4)}]  # fmt: skip
    assert results["pruning"]["actual_ratio"] == 0.5 and results["pruning"]["target_ratio"] == 0.5
    assert results["pruning"]["experts_before"] == {str(i): 8 for i in range(4)}
    assert results["training"]["global_step"] == 3 and results["training"]["progressive_ratios"] == [0.25]
    saved = json.loads((tmp_path / "prog" / "results.json").read_text())
    assert saved["model_dir"] == str(tmp_path / "prog" / "stage-2-r0.5" / "model")
    assert find_moe(load_pruned_model(saved["model_dir"])).experts_per_layer == {i: 4 for i in range(4)}


def test_stage_arithmetic():
    assert stage_ratios([0.5, 0.625], 0.75) == [0.5, 0.625, 0.75]
    assert stage_steps(200, 3) == [66, 66, 68]
    assert round(64 * (1 - relative_ratio(0.625, 0.5))) == 48 and round(48 * (1 - relative_ratio(0.75, 0.625))) == 32
    with pytest.raises(ConfigurationError, match="increase strictly"):
        stage_ratios([0.8], 0.75)
    with pytest.raises(ConfigurationError, match="at least 3 steps"):
        stage_steps(2, 3)


# ---- recipe errors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--recovery", "distill"], "recovery must be one of sft, kd, kd+ce, router_kd"),
        (["--recovery", "kd", "--teacher_logits", "t", "--kd_beta", "0.5"], "precomputed teacher_logits hold"),
        (["--recovery", "router_kd", "--freeze_router", "true"], "router_kd trains the routers"),
        (["--kd_alpha", "1.5"], "kd_alpha must be in [0, 1]"),
        (["--kd_temperature", "0"], "kd_temperature must be positive"),
    ],
)
def test_recovery_recipe_errors_are_one_paragraph(flags, message, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "moe_specialist.train", "--config", str(TINY), "--model_name_or_path", "demo",
         "--output_dir", str(tmp_path / "out"), *flags],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("moe-specialist train: error: ") and message in done.stderr
    assert "Traceback" not in done.stderr


def test_lora_distils_from_the_model_copied_before_pruning(tiny_translator, tmp_path):
    """LoRA prunes before the trainer exists, so the teacher is a copy taken earlier; its adapters start at zero, so
    the first KD equals a full fine-tune's (the same pruned student, the same teacher), live or precomputed."""
    from moe_specialist.training.pipeline import load_teacher

    lora = ("--use_peft", "true", "--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj")
    flags = ("--max_steps", "1", "--recovery", "kd")
    run(*recipe(tiny_translator, tmp_path / "full", *flags))
    run(*recipe(tiny_translator, tmp_path / "lora", *flags, *lora))
    table = ("--teacher_logits", str(tmp_path / "t"), "--teacher_top_k", "4096")  # the whole vocabulary
    run(*recipe(tiny_translator, tmp_path / "pre", *flags, *lora, *table))
    kd = first_log(tmp_path / "full")["kd"]
    assert first_log(tmp_path / "lora")["kd"] == pytest.approx(kd, rel=1e-5)
    assert first_log(tmp_path / "pre")["kd"] == pytest.approx(kd, rel=2e-3)  # float16 logits

    model_args, *_, training_args = recipe(tiny_translator, tmp_path / "x", "--recovery", "kd", "--teacher_logits",
                                           str(tmp_path / "new"))  # fmt: skip
    assert load_teacher(torch.nn.Linear(1, 1), model_args, training_args) is None  # computed by the model itself


def test_precomputed_logits_of_other_data_are_refused_before_training(tiny_translator, tmp_path):
    table = ("--teacher_logits", str(tmp_path / "t"), "--max_steps", "1", "--recovery", "kd")
    run(*recipe(tiny_translator, tmp_path / "a", *table))
    with pytest.raises(MissingInputError, match=r"lacks \d+ of this run's \d+ SFT sequences"):
        run(*recipe(tiny_translator, tmp_path / "b", *table, "--max_train_examples", "12"))
    assert not (tmp_path / "b" / "trainer_state.json").exists()
