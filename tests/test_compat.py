"""Each private transformers / TRL internal that moe_specialist.compat relies on, pinned: an upgrade that changes one
fails here, naming it, instead of making a run silently wrong."""

from __future__ import annotations

import pytest
import torch

from moe_specialist.compat import (
    causal_lm_class_for,
    experts_implementation,
    load_balancing_loss,
    log_as_evaluation,
    original_key_names,
    saved_without_quantized_loading,
    trainer_metrics,
    transformers_mxfp4_dequantize,
    zero3_init_disabled,
)
from tests.tiny_models import tiny_model


def test_zero3_init_disabled_hides_the_global_deepspeed_config():
    from transformers.integrations import deepspeed as hf_deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    assert hasattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref"), "transformers moved its global DeepSpeed config"
    config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        with zero3_init_disabled():
            assert not is_deepspeed_zero3_enabled()  # from_pretrained would not enter zero.Init
        assert is_deepspeed_zero3_enabled()
    finally:
        del config
        hf_deepspeed.unset_hf_deepspeed_config()


@pytest.mark.parametrize(
    "model_type, name, on_disk",
    [
        ("mixtral", "model.layers.1.mlp.gate.weight", "model.layers.1.block_sparse_moe.gate.weight"),
        ("qwen3_moe", "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.weight"),
        ("gpt_oss", "model.layers.1.mlp.router.weight", "model.layers.1.mlp.router.weight"),
    ],
)
def test_original_key_names_follow_the_saved_format(model_type, name, on_disk, tmp_path):
    from safetensors import safe_open

    model = tiny_model(model_type)
    assert original_key_names(model, [name]) == {name: on_disk}
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert on_disk in f.keys()  # noqa: SIM118 (a safetensors handle, not a dict)


def test_log_as_evaluation_keeps_the_pending_training_metrics(tiny_translator, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from moe_specialist.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny_translator))
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    dataset = Dataset.from_list([{"prompt": "a", "completion": "b"}])
    trainer = SFTTrainer(model=model.train(), args=args, train_dataset=dataset, processing_class=tokenizer)
    assert hasattr(trainer, "_metrics") and set(trainer._metrics) == {"train", "eval"}, "SFTTrainer's metrics moved"
    trainer._metrics["train"]["entropy"].append(1.5)
    log_as_evaluation(trainer, {"eval_mt/avg/chrf++": 12.5})
    entry = trainer.state.log_history[-1]
    assert entry["eval_mt/avg/chrf++"] == 12.5 and "entropy" not in entry
    assert trainer._metrics["train"]["entropy"] == [1.5]  # still pending for the next training log
    assert trainer.model.training
    trainer.log({"loss": 1.0})  # in train mode TRL folds them in: what log_as_evaluation avoids
    assert trainer.state.log_history[-1]["entropy"] == pytest.approx(1.5)
    assert torch.is_grad_enabled()


def test_causal_lm_class_for_maps_configs_without_building_models():
    from transformers import AutoConfig, Qwen3MoeForCausalLM

    assert causal_lm_class_for(tiny_model("qwen3_moe").config) is Qwen3MoeForCausalLM
    assert causal_lm_class_for(AutoConfig.for_model("clip")) is None  # not a causal LM


def test_experts_implementation_reads_what_set_experts_implementation_set():
    model = tiny_model("qwen3_moe")
    model.set_experts_implementation("eager")
    assert experts_implementation(model) == "eager"
    model.set_experts_implementation("grouped_mm")
    assert experts_implementation(model) == "grouped_mm"


def test_trainer_metrics_are_averaged_into_the_next_log(tiny_translator, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from moe_specialist.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny_translator))
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    dataset = Dataset.from_list([{"prompt": "a", "completion": "b"}])
    trainer = SFTTrainer(model=model.train(), args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer_metrics(trainer, "train")["kd"].extend([1.0, 2.0])
    trainer.log({"loss": 1.0})
    assert trainer.state.log_history[-1]["kd"] == pytest.approx(1.5), "SFTTrainer no longer logs its _metrics"
    assert not trainer_metrics(trainer, "train")["kd"]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_load_balancing_loss_is_the_models_own_aux_loss(model_type):
    model = tiny_model(model_type, router_aux_loss_coef=0.01).eval()
    input_ids = torch.randint(3, model.config.vocab_size, (2, 9))
    attention = torch.ones_like(input_ids)
    attention[0, 6:] = 0
    out = model(input_ids=input_ids, attention_mask=attention, output_router_logits=True)
    assert out.aux_loss is not None
    torch.testing.assert_close(load_balancing_loss(model.config, out.router_logits, attention), out.aux_loss)


def test_transformers_mxfp4_dequantize_keeps_its_values_and_layout():
    """Byte 0x9A of row 1 holds codes 10 (-1.0, low nibble) and 9 (-0.5); scale 126 halves them; rows turn columns."""
    blocks = torch.zeros(1, 2, 1, 16, dtype=torch.uint8)
    scales = torch.tensor([[[127], [126]]], dtype=torch.uint8)
    blocks[0, 1, 0, 3] = 0x9A
    out = transformers_mxfp4_dequantize(blocks, scales, torch.bfloat16)
    expected = torch.zeros(1, 32, 2, dtype=torch.bfloat16)
    expected[0, 6, 1], expected[0, 7, 1] = -0.5, -0.25
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected), "transformers' MXFP4 conversion changed"


@pytest.mark.parametrize("layout", ["gpt-oss-20b", "deepseek-v3"])
def test_saved_without_quantized_loading_saves_a_model_dequantized_on_load(layout, tmp_path):
    """A CPU load dequantizes MXFP4 / FP8 checkpoints but keeps the dequantizing conversions, whose reverse breaks
    the save (the day transformers stops, the first assertion fails and the workaround can go)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from tests.real_layouts import LAYOUTS, build_checkpoint

    model = AutoModelForCausalLM.from_pretrained(build_checkpoint(LAYOUTS[layout], tmp_path / "source")).eval()
    conversions = model._weight_conversions
    assert any(type(op).__name__.endswith("Dequantize") for c in conversions for op in c.operations)
    assert not getattr(model, "is_quantized", False) and getattr(model.config, "quantization_config", None) is None
    with saved_without_quantized_loading(model):
        model.save_pretrained(tmp_path / "saved")
    assert model._weight_conversions is conversions
    for shard in (tmp_path / "saved").glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            assert not any(key.endswith(("_blocks", "_scales", "_scale_inv")) for key in f.keys())  # noqa: SIM118
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.arange(3, 14)[None]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
