"""Tiny random MoE causal LMs built from configs (no Hub): one per architecture family the tool supports.

Hidden size 64, 8 experts, top-2, expert width 24, 4 decoder layers; hidden size != expert count so that no tensor
dimension is ambiguous. Router biases are randomised so that slicing them is actually tested.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

E, K, H, WIDTH = 8, 2, 64, 24
COMMON = dict(
    vocab_size=97,
    hidden_size=H,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# model_type -> extra config fields
TINY_CONFIGS: dict[str, dict] = {
    "qwen3_moe": dict(
        head_dim=16,
        intermediate_size=48,
        moe_intermediate_size=WIDTH,
        num_experts=E,
        num_experts_per_tok=K,
        norm_topk_prob=True,
    ),
    "qwen2_moe": dict(
        intermediate_size=48,
        moe_intermediate_size=WIDTH,
        num_experts=E,
        num_experts_per_tok=K,
        shared_expert_intermediate_size=32,
        norm_topk_prob=True,
    ),
    "mixtral": dict(intermediate_size=WIDTH, num_local_experts=E, num_experts_per_tok=K, head_dim=16),
    "olmoe": dict(intermediate_size=WIDTH, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True),
    "deepseek_v3": dict(
        intermediate_size=48,
        moe_intermediate_size=WIDTH,
        n_routed_experts=E,
        num_experts_per_tok=K,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=2,
        norm_topk_prob=True,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        rope_interleave=True,
    ),
    "gpt_oss": dict(
        intermediate_size=WIDTH,
        num_local_experts=E,
        num_experts_per_tok=K,
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"] * 2,
    ),
    "granitemoe": dict(intermediate_size=WIDTH, num_local_experts=E, num_experts_per_tok=K),
    "phimoe": dict(
        intermediate_size=WIDTH,
        num_local_experts=E,
        num_experts_per_tok=K,
        router_jitter_noise=0.01,
        input_jitter_noise=0.0,
    ),
    "glm4_moe": dict(
        intermediate_size=48,
        moe_intermediate_size=WIDTH,
        n_routed_experts=E,
        num_experts_per_tok=K,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        head_dim=16,
    ),
    "ernie4_5_moe": dict(
        intermediate_size=48,
        moe_intermediate_size=WIDTH,
        moe_num_experts=E,
        moe_k=K,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
        head_dim=16,
    ),
    "llama4_text": dict(
        intermediate_size=WIDTH,
        intermediate_size_mlp=48,
        num_local_experts=E,
        num_experts_per_tok=K,
        head_dim=16,
        interleave_moe_layer_step=1,
        no_rope_layers=[1, 1, 1, 1],
        attention_chunk_size=64,
    ),
}


def tiny_config(model_type: str, **overrides):
    return AutoConfig.for_model(model_type, **{**COMMON, **TINY_CONFIGS[model_type], **overrides})


def randomise_routing_biases(model) -> None:
    """Zero-initialised router biases would make slicing them untestable."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("router.bias", "e_score_correction_bias", "expert_bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    if model_type != "ernie4_5_moe":  # a non-zero Ernie bias makes its routing inexact by design
        randomise_routing_biases(model)
    return model.eval()
