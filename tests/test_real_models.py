"""The real checkpoints, from their published files (no download): what is fetched, and the parameter counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoConfig

from moe_specialist.models import download_checkpoint
from moe_specialist.plan import PrunePlan
from moe_specialist.prune import prune_model, structure_from_config
from tests.helpers import routed_counts
from tests.real_layouts import GPT_OSS_20B, QWEN3_30B_A3B
from tests.tiny_models import tiny_model


def test_active_parameters_leave_out_the_input_embedding_as_published():
    """OpenAI's gpt-oss model card: gpt-oss-20b has 20.91B parameters, 3.61B active per token, counting the
    unembedding but not the embedding. Qwen's Qwen3-30B-A3B card: 30.5B parameters, 29.9B without the embedding and
    LM head, 3.3B activated: 3.35B counts the input embedding (151936 x 2048 = 311.2M), 3.04B leaves it out."""
    gpt_oss = structure_from_config(AutoConfig.for_model(**GPT_OSS_20B)).parameter_counts()
    assert round(gpt_oss["total"] / 1e9, 2) == 20.91
    assert round(gpt_oss["active"] / 1e9, 2) == 3.61  # 4.19B when the embedding table was counted
    qwen = structure_from_config(AutoConfig.for_model(**QWEN3_30B_A3B)).parameter_counts()
    embedding = 151936 * 2048
    assert round(qwen["total"] / 1e9, 1) == 30.5
    assert round((qwen["total"] - 2 * embedding) / 1e9, 1) == 29.9
    assert 3.3e9 <= qwen["active"] + embedding < 3.4e9  # 3.35B, published as 3.3B
    assert round(qwen["active"] / 1e9, 2) == 3.04


def test_a_tied_embedding_counts_once_as_the_lm_head():
    untied = tiny_model("qwen3_moe")
    tied = tiny_model("qwen3_moe", tie_word_embeddings=True)
    table = untied.get_input_embeddings().weight.numel()
    counts = {name: structure_from_config(m.config).parameter_counts() for name, m in (("u", untied), ("t", tied))}
    assert counts["u"]["total"] - counts["t"]["total"] == table  # one matrix fewer
    assert counts["u"]["active"] == counts["t"]["active"]  # the head is active either way; the lookup never


# The files of the Hub repositories (`hf_api.list_repo_files`), as published.
REPO_FILES = {
    "openai/gpt-oss-20b": [
        ".gitattributes",
        "LICENSE",
        "README.md",
        "USAGE_POLICY",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "metal/model.bin",
        "model-00000-of-00002.safetensors",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "original/config.json",
        "original/dtypes.json",
        "original/model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ],
    "Qwen/Qwen3-30B-A3B": [
        ".gitattributes",
        "LICENSE",
        "README.md",
        "config.json",
        "generation_config.json",
        "merges.txt",
        *[f"model-{i:05d}-of-00016.safetensors" for i in range(1, 17)],
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ],
}
UNUSED = {".gitattributes", "LICENSE", "README.md", "USAGE_POLICY"}


@pytest.mark.parametrize("repo", sorted(REPO_FILES))
def test_hub_checkpoints_download_only_the_files_pruning_reads(repo, monkeypatch):
    import huggingface_hub

    def listing(repo_id, revision=None, allow_patterns=None, ignore_patterns=None):
        return list(
            filter_repo_objects(REPO_FILES[repo_id], allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        )

    monkeypatch.setattr(huggingface_hub, "snapshot_download", listing)
    fetched = set(download_checkpoint(repo))
    assert fetched == {name for name in REPO_FILES[repo] if "/" not in name} - UNUSED
    assert not any(name.startswith(("original/", "metal/")) for name in fetched)  # 13 GB for gpt-oss-20b


@pytest.mark.parametrize(
    "recipe",
    sorted((Path(__file__).parents[1] / "recipes/olmoe-1b-7b").glob("*/prune_sft.yaml")),
    ids=lambda p: p.parent.name,
)
def test_olmoe_recipes_say_that_pruning_rescales_every_routing_weight(recipe):
    """allenai/OLMoE-1B-7B-0125-Instruct's config.json has norm_topk_prob: false; what the recipes say about it holds:
    removing experts that no token selects changes the outputs (the same removal is exact when top-k is
    renormalised)."""
    text = " ".join(recipe.read_text().split())
    assert "Routing is NOT exact under pruning here" in text and "norm_topk_prob: false" in text
    for renormalised in (True, False):
        model = tiny_model("olmoe", norm_topk_prob=renormalised)
        ids = torch.tensor([[5, 17, 42]])
        with torch.no_grad():
            before = model(ids).logits
        used = routed_counts(model, ids)
        prune_model(model, PrunePlan({layer: [e for e in range(8) if used[layer][e] > 0] for layer in used}))
        with torch.no_grad():
            change = (model(ids).logits - before).abs().max().item()
        assert (change <= 1e-5) if renormalised else (change > 1e-4)
