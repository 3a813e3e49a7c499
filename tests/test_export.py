"""`moe-specialist export --for serving`: non-uniform checkpoints padded to one expert count, outputs unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_specialist.architectures import PER_LAYER_COUNT_KEY, find_moe
from moe_specialist.cli import main
from moe_specialist.export import REPORT_FILE
from moe_specialist.plan import PrunePlan
from moe_specialist.prune import load_pruned_model, prune_model, save_pruned_model
from tests.tiny_models import tiny_model

INPUT = torch.tensor([[5, 17, 42, 8, 63, 11, 30, 2, 77, 9, 54, 21]])
NON_UNIFORM = {1: [0, 1, 4, 5], 2: [0, 1, 2, 4, 5, 6], 3: [2, 3, 6, 7]}  # balanced over deepseek's 2 groups


def run(*argv):
    main([*(str(a) for a in argv), "--debug"])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def pruned_checkpoint(arch: str, directory, kept: dict[int, list[int]] | None = None):
    model = tiny_model(arch)
    if kept is None:  # deepseek's decoder layer 0 is a dense MLP
        kept = NON_UNIFORM if arch == "deepseek_v3" else {0: [0, 1, 2, 3, 4, 6], **NON_UNIFORM}
    prune_model(model, PrunePlan(kept))
    save_pruned_model(model, directory)
    return load_pruned_model(directory)


@pytest.mark.parametrize("arch", ["gpt_oss", "deepseek_v3"])
def test_serving_export_pads_every_layer_and_keeps_the_outputs(arch, tmp_path, capsys):
    pruned = pruned_checkpoint(arch, tmp_path / "pruned")
    run("export", "--for", "serving", "--model", tmp_path / "pruned", "--output", tmp_path / "serving")

    config = json.loads((tmp_path / "serving" / "config.json").read_text())
    assert PER_LAYER_COUNT_KEY not in config and "auto_map" not in config  # a plain checkpoint, one count
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "serving").eval()
    assert set(find_moe(served).experts_per_layer.values()) == {6}
    assert (logits(served) - logits(pruned)).abs().max().item() <= 1e-5
    report = json.loads((tmp_path / "serving" / REPORT_FILE).read_text())
    layers = len(find_moe(pruned).layers)
    assert report["padded_experts"] == 6 * layers - sum(find_moe(pruned).experts_per_layer.values())
    assert report["parameters"]["before"] == find_moe(pruned).parameter_counts()["total"]
    assert report["parameters"]["after"] == sum(p.numel() for p in served.parameters())
    assert report["bytes"]["after"] > report["bytes"]["before"] > 0
    out = capsys.readouterr().out
    assert f"{report['parameters']['before']:,} -> {report['parameters']['after']:,}" in out


def test_a_router_without_bias_is_refused_before_loading(tmp_path):
    pruned_checkpoint("qwen3_moe", tmp_path / "pruned")
    with pytest.raises(ValueError, match="Qwen3MoeForCausalLM.*its router adds no bias to the expert scores"):
        run("export", "--for", "serving", "--model", tmp_path / "pruned", "--output", tmp_path / "serving")
    assert not (tmp_path / "serving").exists()


def test_bad_export_requests_are_refused(tmp_path, capsys):
    pruned_checkpoint("gpt_oss", tmp_path / "pruned")
    pruned_checkpoint("gpt_oss", tmp_path / "uniform", kept={layer: [0, 2, 4, 6] for layer in range(4)})
    arguments = ["export", "--for", "serving", "--model"]
    cases = {
        "keeps 4 experts in every MoE layer: serving engines load it as it is": (tmp_path / "uniform", tmp_path / "o"),
        f"Output {tmp_path / 'exists'} already exists": (tmp_path / "pruned", tmp_path / "exists"),
        "is inside the input": (tmp_path / "pruned", tmp_path / "pruned" / "serving"),
    }
    (tmp_path / "exists").mkdir()
    capsys.readouterr()
    for message, (model, output) in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main([*arguments, str(model), "--output", str(output)])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error  # one paragraph
    with pytest.raises(ValueError, match="--for must be serving"):
        run("export", "--for", "vllm", "--model", tmp_path / "pruned", "--output", tmp_path / "o")
