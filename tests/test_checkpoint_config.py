"""Pruned configs keep the source checkpoint's own field names and values; only what pruning changed is replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_specialist.architectures import PER_LAYER_COUNT_KEY, find_moe
from moe_specialist.checkpoint_config import in_source_form
from moe_specialist.per_layer_modeling import MODELING_FILE
from moe_specialist.plan import PrunePlan
from moe_specialist.prune import load_pruned_model, prune_checkpoint, prune_model, save_pruned_model

INPUT = torch.tensor([[5, 17, 42, 8, 63]])
TINY = dict(
    vocab_size=97,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    use_cache=True,
    output_router_logits=False,
)
# The field names of the real checkpoints' config.json files (Qwen/Qwen3-30B-A3B, openai/gpt-oss-20b,
# mistralai/Mixtral-8x7B-v0.1, all written by transformers 4), with tiny sizes. The count field is the one pruning
# changes.
SOURCES = {
    "qwen3_moe": (
        "num_experts",
        dict(
            TINY,
            architectures=["Qwen3MoeForCausalLM"],
            model_type="qwen3_moe",
            intermediate_size=48,
            moe_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            rope_theta=1000000.0,
            rope_scaling=None,
            sliding_window=None,
            use_sliding_window=False,
            torch_dtype="float32",
            transformers_version="4.51.0",
        ),
    ),
    "gpt_oss": (
        "num_local_experts",
        dict(
            TINY,
            architectures=["GptOssForCausalLM"],
            model_type="gpt_oss",
            intermediate_size=24,
            num_local_experts=8,
            experts_per_token=2,
            num_experts_per_tok=2,
            initial_context_length=64,
            layer_types=["sliding_attention", "full_attention"] * 2,
            sliding_window=16,
            swiglu_limit=7.0,
            rope_theta=150000,
            rope_scaling={
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "factor": 2.0,
                "original_max_position_embeddings": 64,
                "rope_type": "yarn",
                "truncate": False,
            },
            transformers_version="4.55.0.dev0",
        ),
    ),
    "mixtral": (
        "num_local_experts",
        dict(
            TINY,
            architectures=["MixtralForCausalLM"],
            model_type="mixtral",
            intermediate_size=24,
            num_local_experts=8,
            num_experts_per_tok=2,
            rope_theta=1000000.0,
            sliding_window=None,
            torch_dtype="float32",
            transformers_version="4.36.0.dev0",
        ),
    ),
}
PLANS = {  # decoder layer -> kept experts
    "uniform": {layer: [1, 3, 4, 6, 7] for layer in range(4)},
    "non_uniform": {0: [0, 1, 2, 3, 4, 5], 1: [2, 5], 2: [0, 1, 2, 3], 3: [1, 3, 4, 6, 7]},
}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def source_checkpoint(arch: str, directory: Path) -> dict:
    """A tiny random checkpoint in ``directory`` whose config.json is the transformers-4 file of ``SOURCES``."""
    _, source = SOURCES[arch]
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(source))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    model.save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps(source))  # what transformers 5 wrote, replaced
    return source


@pytest.mark.parametrize("arch", sorted(SOURCES))
@pytest.mark.parametrize("kind", sorted(PLANS))
@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_pruned_config_is_the_source_config_with_new_counts(arch, kind, mode, tmp_path):
    source = source_checkpoint(arch, tmp_path / "original")
    count_field = SOURCES[arch][0]
    lowered = arch == "qwen3_moe" and kind == "uniform"  # one case also lowers top-k
    plan = PrunePlan(PLANS[kind], top_k=1 if lowered else None)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "original").eval()
    prune_model(model, plan)
    expected = logits(model)
    out = tmp_path / "pruned"
    if mode == "memory":
        save_pruned_model(model, out)
    else:
        prune_checkpoint(tmp_path / "original", plan, out)

    config = json.loads((out / "config.json").read_text())
    counts = {str(layer): len(ids) for layer, ids in PLANS[kind].items()}
    changed = {count_field: max(counts.values())}
    if lowered:
        changed["num_experts_per_tok"] = 1
    if kind == "non_uniform":  # the per-layer counts, and the code that loads them with plain transformers
        changed[PER_LAYER_COUNT_KEY] = counts
        changed["auto_map"] = {"AutoModelForCausalLM": f"modeling_moe_specialist.{source['architectures'][0]}"}
    assert (out / MODELING_FILE).is_file() == (kind == "non_uniform")
    assert {key: config[key] for key in changed} == changed
    assert {key: value for key, value in config.items() if key not in changed} == {
        key: value for key, value in source.items() if key not in changed
    }  # every other field of the source, under its own name, with its own value; nothing else

    reloaded = AutoModelForCausalLM.from_pretrained(out) if kind == "uniform" else load_pruned_model(out)
    assert find_moe(reloaded).experts_per_layer == {int(k): v for k, v in counts.items()}
    assert (logits(reloaded.eval()) - expected).abs().max().item() <= 1e-6


def test_a_source_of_another_model_type_is_ignored():
    written = {"model_type": "qwen3_moe", "num_local_experts": 4, "num_experts_per_tok": 2}
    assert in_source_form({"model_type": "mixtral", "num_local_experts": 8}, written) == written


def test_a_field_transformers_drops_is_dropped_from_the_source_form():
    _, source = SOURCES["gpt_oss"]
    quantized = dict(source, quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]})
    dequantized = AutoConfig.for_model(**source).to_dict()  # what transformers writes after dequantizing
    assert in_source_form(quantized, dequantized) == {
        key: value for key, value in quantized.items() if key != "quantization_config"
    }


def test_a_model_built_in_memory_keeps_transformers_form(tmp_path):
    from tests.tiny_models import tiny_model

    model = tiny_model("qwen3_moe")
    save_pruned_model(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "num_local_experts" in config and "dtype" in config


# Loads each checkpoint given with plain transformers and remote code, in a process where moe_specialist cannot be
# imported, and saves its logits and tensor shapes.
WITHOUT_THIS_PACKAGE = """
import importlib.abc
import sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "moe_specialist":
            raise ImportError(f"{name} is not installed in this process")

sys.meta_path.insert(0, Absent())
try:
    import moe_specialist  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("moe_specialist is importable")

import torch
from transformers import AutoModelForCausalLM

results = {}
for path in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[5, 17, 42, 8, 63]])).logits
    results[path] = {"logits": logits, "shapes": {k: tuple(v.shape) for k, v in model.state_dict().items()}}
torch.save(results, sys.argv[1])
"""


def test_non_uniform_checkpoints_load_with_remote_code_without_this_package(tmp_path):
    from tests.tiny_models import tiny_model

    checkpoints = {}
    for arch in ("qwen3_moe", "gpt_oss", "deepseek_v3"):
        model = tiny_model(arch)
        kept = {1: [0, 1, 4, 5], 2: [0, 1, 2, 4, 5, 6], 3: [2, 3, 6, 7]}  # balanced over deepseek's 2 groups
        prune_model(model, PrunePlan({**kept, **({0: [0, 1, 4, 5, 6, 7]} if arch != "deepseek_v3" else {})}))
        save_pruned_model(model, tmp_path / arch)
        checkpoints[str(tmp_path / arch)] = load_pruned_model(tmp_path / arch)
        assert json.loads((tmp_path / arch / "config.json").read_text())["auto_map"] == {
            "AutoModelForCausalLM": f"modeling_moe_specialist.{type(model).__name__}"
        }
        assert (tmp_path / arch / MODELING_FILE).is_file()
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_THIS_PACKAGE, str(tmp_path / "out.pt"), *checkpoints],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")
    for path, model in checkpoints.items():
        assert results[path]["shapes"] == {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert (results[path]["logits"] - logits(model)).abs().max().item() <= 1e-6


def test_a_model_loaded_by_hub_id_finds_its_config_in_the_hub_cache(tmp_path, monkeypatch):
    """from_pretrained("org/name") leaves the source config.json in the Hub cache: it is read there, never fetched."""
    import huggingface_hub

    source = source_checkpoint("qwen3_moe", tmp_path / "original")
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(source))
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "original")
    model.name_or_path = "org/tiny"  # as from_pretrained("org/tiny") leaves it
    prune_model(model, PrunePlan(PLANS["uniform"]))
    save_pruned_model(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == {**source, "num_experts": 5}


def test_rebuilt_layers_share_the_model_settings(tmp_path):
    """Each non-uniform layer is built from its own config copy; its modules must then read the model's config, or
    switching the attention or experts implementation would miss them."""
    from tests.tiny_models import tiny_model

    model = tiny_model("gpt_oss")
    prune_model(model, PrunePlan(PLANS["non_uniform"]))
    save_pruned_model(model, tmp_path / "out")
    reloaded = load_pruned_model(tmp_path / "out")
    configs = {id(m.config) for m in reloaded.modules() if isinstance(getattr(m, "config", None), type(model.config))}
    assert configs == {id(reloaded.config)}
    reloaded.set_experts_implementation("eager")
    reloaded.set_attn_implementation("eager")
    assert all(m.config._experts_implementation == "eager" for m in reloaded.modules() if hasattr(m, "config"))
