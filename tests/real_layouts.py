"""Tiny checkpoints in the on-disk layouts of five published MoE checkpoints, and those checkpoints' config.json.

Each fixture is written from the real ``config.json`` with only depth, widths, expert counts and token ids reduced
(:attr:`Layout.tiny`), with the Hub checkpoint's tensor names, dtypes and storage: GPT-OSS's MXFP4 expert blocks and
scales, DeepSeek-V3's FP8 e4m3 weights with float32 block-128 ``weight_scale_inv`` (and its multi-token-prediction
layer after the last decoder layer), per-expert keys elsewhere, sharded as ``model-0000x-of-0000y.safetensors`` with
``model.safetensors.index.json``. The weights are random (seeded) and the quantized ones really quantized from them.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from tests.tiny_models import randomise_routing_biases

# ---- the published config.json files --------------------------------------------------------------------------------
# openai/gpt-oss-20b, config.json on the Hub.
GPT_OSS_20B = dict(
    architectures=["GptOssForCausalLM"],
    attention_bias=True,
    attention_dropout=0.0,
    eos_token_id=200002,
    experts_per_token=4,
    head_dim=64,
    hidden_act="silu",
    hidden_size=2880,
    initial_context_length=4096,
    initializer_range=0.02,
    intermediate_size=2880,
    layer_types=["sliding_attention", "full_attention"] * 12,
    max_position_embeddings=131072,
    model_type="gpt_oss",
    num_attention_heads=64,
    num_experts_per_tok=4,
    num_hidden_layers=24,
    num_key_value_heads=8,
    num_local_experts=32,
    output_router_logits=False,
    pad_token_id=199999,
    quantization_config={
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    },
    rms_norm_eps=1e-05,
    rope_scaling={
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    rope_theta=150000,
    router_aux_loss_coef=0.9,
    sliding_window=128,
    swiglu_limit=7.0,
    tie_word_embeddings=False,
    transformers_version="4.55.0.dev0",
    use_cache=True,
    vocab_size=201088,
)
# Qwen/Qwen3-30B-A3B, config.json on the Hub.
QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"],
    attention_bias=False,
    attention_dropout=0.0,
    bos_token_id=151643,
    decoder_sparse_step=1,
    eos_token_id=151645,
    head_dim=128,
    hidden_act="silu",
    hidden_size=2048,
    initializer_range=0.02,
    intermediate_size=6144,
    max_position_embeddings=40960,
    max_window_layers=48,
    mlp_only_layers=[],
    model_type="qwen3_moe",
    moe_intermediate_size=768,
    norm_topk_prob=True,
    num_attention_heads=32,
    num_experts=128,
    num_experts_per_tok=8,
    num_hidden_layers=48,
    num_key_value_heads=4,
    output_router_logits=False,
    rms_norm_eps=1e-06,
    rope_scaling=None,
    rope_theta=1000000.0,
    router_aux_loss_coef=0.001,
    sliding_window=None,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
    transformers_version="4.51.0",
    use_cache=True,
    use_sliding_window=False,
    vocab_size=151936,
)
# allenai/OLMoE-1B-7B-0924, config.json on the Hub, written from memory; every field but the two provenance fields
# (torch_dtype, transformers_version) checked against a public copy of an OLMoE-1B-7B intermediate checkpoint's
# config.json (the same architecture fields, "torch_dtype": "float32", "transformers_version": "4.48.1").
OLMOE_1B_7B_0924 = dict(
    architectures=["OlmoeForCausalLM"],
    attention_bias=False,
    attention_dropout=0.0,
    clip_qkv=None,
    eos_token_id=50279,
    hidden_act="silu",
    hidden_size=2048,
    initializer_range=0.02,
    intermediate_size=1024,
    max_position_embeddings=4096,
    model_type="olmoe",
    norm_topk_prob=False,
    num_attention_heads=16,
    num_experts=64,
    num_experts_per_tok=8,
    num_hidden_layers=16,
    num_key_value_heads=16,
    output_router_logits=False,
    pad_token_id=1,
    rms_norm_eps=1e-05,
    rope_scaling=None,
    rope_theta=10000.0,
    router_aux_loss_coef=0.01,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
    transformers_version="4.43.0.dev0",
    use_cache=True,
    vocab_size=50304,
)
# deepseek-ai/DeepSeek-V3, config.json on the Hub; identical to the copies quoted in public code (an Ascend issue
# quoting it whole with its quantization_config swapped, TensorRT-LLM and Megatron-Bridge test fixtures).
DEEPSEEK_V3 = dict(
    architectures=["DeepseekV3ForCausalLM"],
    attention_bias=False,
    attention_dropout=0.0,
    auto_map={
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    aux_loss_alpha=0.001,
    bos_token_id=0,
    eos_token_id=1,
    ep_size=1,
    first_k_dense_replace=3,
    hidden_act="silu",
    hidden_size=7168,
    initializer_range=0.02,
    intermediate_size=18432,
    kv_lora_rank=512,
    max_position_embeddings=163840,
    model_type="deepseek_v3",
    moe_intermediate_size=2048,
    moe_layer_freq=1,
    n_group=8,
    n_routed_experts=256,
    n_shared_experts=1,
    norm_topk_prob=True,
    num_attention_heads=128,
    num_experts_per_tok=8,
    num_hidden_layers=61,
    num_key_value_heads=128,
    num_nextn_predict_layers=1,
    pretraining_tp=1,
    q_lora_rank=1536,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    quantization_config={
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    rms_norm_eps=1e-06,
    rope_scaling={
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    rope_theta=10000,
    routed_scaling_factor=2.5,
    scoring_func="sigmoid",
    seq_aux=True,
    tie_word_embeddings=False,
    topk_group=4,
    topk_method="noaux_tc",
    torch_dtype="bfloat16",
    transformers_version="4.33.1",
    use_cache=True,
    v_head_dim=128,
    vocab_size=129280,
)
# mistralai/Mixtral-8x7B-v0.1, config.json on the Hub; identical to the copies quoted in public code (TensorRT-LLM's
# MIXTRAL_8X7B_CONFIG test fixture, among others).
MIXTRAL_8X7B = dict(
    architectures=["MixtralForCausalLM"],
    attention_dropout=0.0,
    bos_token_id=1,
    eos_token_id=2,
    hidden_act="silu",
    hidden_size=4096,
    initializer_range=0.02,
    intermediate_size=14336,
    max_position_embeddings=32768,
    model_type="mixtral",
    num_attention_heads=32,
    num_experts_per_tok=2,
    num_hidden_layers=32,
    num_key_value_heads=8,
    num_local_experts=8,
    output_router_logits=False,
    rms_norm_eps=1e-05,
    rope_theta=1000000.0,
    router_aux_loss_coef=0.02,
    sliding_window=None,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
    transformers_version="4.36.0.dev0",
    use_cache=True,
    vocab_size=32000,
)


# ---- quantization as the checkpoints store it -----------------------------------------------------------------------
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
MXFP4_BLOCK = 32
FP8_BLOCK = 128
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MXFP4 along the last dim, as GPT-OSS stores it: ``blocks`` uint8 [..., cols/32, 16] (two e2m1 codes per
    byte, the even element in the low nibble) and ``scales`` uint8 [..., cols/32] (a power-of-two exponent + 127)."""
    groups = weight.float().unflatten(-1, (-1, MXFP4_BLOCK))
    largest = groups.abs().amax(-1, keepdim=True).clamp_min(2.0**-100)
    exponent = torch.ceil(torch.log2(largest / FP4_VALUES.max()))
    codes = ((groups / exponent.exp2()).unsqueeze(-1) - FP4_VALUES).abs().argmin(-1)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exponent.squeeze(-1) + 127).to(torch.uint8)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 values of :func:`mxfp4`'s output (the reference the loaded models are checked against)."""
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2).long()
    return (FP4_VALUES[codes] * (scales.float() - 127).exp2().unsqueeze(-1)).flatten(-2)


def fp8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's FP8: e4m3 weight and a float32 ``weight_scale_inv`` per 128 x 128 block (the value each block
    was divided by). Both dims must be multiples of 128 or below it: transformers' dequantization needs that."""
    rows, cols = weight.shape
    block_rows, block_cols = min(rows, FP8_BLOCK), min(cols, FP8_BLOCK)
    blocks = weight.float().reshape(rows // block_rows, block_rows, cols // block_cols, block_cols)
    scale = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp_min(1e-12) / FP8_MAX
    quantized = (blocks / scale).to(torch.float8_e4m3fn).reshape(rows, cols)
    return quantized, scale.reshape(rows // block_rows, cols // block_cols)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    rows, cols = weight.shape
    blocks = weight.float().reshape(scale_inv.shape[0], -1, scale_inv.shape[1], cols // scale_inv.shape[1])
    return (blocks * scale_inv[:, None, :, None]).reshape(rows, cols)


def _store_mxfp4(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' fused GPT-OSS experts ([E, in, out]) -> the Hub's ``*_blocks``/``*_scales`` of [E, out, in]."""
    out = {}
    for key, tensor in tensors.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[f"{key}_blocks"], out[f"{key}_scales"] = mxfp4(tensor.transpose(1, 2))
        else:
            out[key] = tensor
    return out


# Not quantized in DeepSeek-V3's checkpoint: embeddings, the LM heads, norms, the router and its bias, and the
# multi-token-prediction layer's eh_proj (vLLM's DeepSeek MTP module reads it as a plain bf16 nn.Linear).
_FP8_EXCLUDED = re.compile(r"(embed_tokens|lm_head|shared_head\.head|norm|mlp\.gate|eh_proj)\.weight$")


def _store_fp8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in tensors.items():
        if key.endswith(".weight") and tensor.ndim == 2 and not _FP8_EXCLUDED.search(key):
            out[key], out[f"{key}_scale_inv"] = fp8_blocks(tensor)
        else:
            out[key] = tensor
    return out


# ---- the layouts ----------------------------------------------------------------------------------------------------
LAYER = r"model\.layers\.\d+\."


@dataclass(frozen=True)
class Layout:
    """A published checkpoint's layout and the reduced sizes its fixture is built with."""

    name: str
    repo: str
    config: dict  # the published config.json
    tiny: dict  # the fields the fixture changes (depth, widths, expert counts, token ids)
    shard_pattern: str  # the Hub's shard file names, formatted with (index, last index)
    first_shard: int  # gpt-oss-20b numbers its shards from 0 (model-00000-of-00002 ... -00002-of-00002)
    moe_keys: tuple[str, ...]  # every tensor of an MoE layer's block on the Hub (regexes after the layer prefix)
    attention_keys: tuple[str, ...]  # and every other tensor of that decoder layer (attention, norms)
    per_expert_rows: str  # the keys (regex) whose dim 0 has one row per routed expert, outside experts.{i}
    store: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = staticmethod(lambda tensors: tensors)
    mtp: bool = False  # DeepSeek-V3's multi-token-prediction layer follows the last decoder layer
    shards: int = 3

    @property
    def config_json(self) -> dict:
        """The fixture's config.json: the published one with :attr:`tiny` applied."""
        return {**self.config, **self.tiny}

    def shard_names(self) -> list[str]:
        last = self.first_shard + self.shards - 1
        return [self.shard_pattern.format(i, last) for i in range(self.first_shard, last + 1)]


_QWEN_STYLE = (r"mlp\.gate\.weight", r"mlp\.experts\.\d+\.(gate|up|down)_proj\.weight")
_NORMS = r"(input|post_attention)_layernorm\.weight"
_QK_NORMED = (_NORMS, r"self_attn\.[qkvo]_proj\.weight", r"self_attn\.[qk]_norm\.weight")
# Outside the decoder layers (and DeepSeek-V3's multi-token-prediction layer), in every layout.
TOP_LEVEL_KEYS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
LAYOUTS = {
    "gpt-oss-20b": Layout(
        name="gpt-oss-20b",
        repo="openai/gpt-oss-20b",
        config=GPT_OSS_20B,
        tiny=dict(
            hidden_size=64,
            intermediate_size=64,
            head_dim=16,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=8,
            vocab_size=160,
            eos_token_id=2,
            pad_token_id=0,
        ),
        shard_pattern="model-{:05d}-of-{:05d}.safetensors",
        first_shard=0,
        moe_keys=(
            r"mlp\.router\.(weight|bias)",
            r"mlp\.experts\.(gate_up|down)_proj_(blocks|scales|bias)",
        ),
        attention_keys=(_NORMS, r"self_attn\.[qkvo]_proj\.(weight|bias)", r"self_attn\.sinks"),
        per_expert_rows=r"mlp\.(router\.(weight|bias)|experts\.\w+)$",
        store=_store_mxfp4,
    ),
    "qwen3-30b-a3b": Layout(
        name="qwen3-30b-a3b",
        repo="Qwen/Qwen3-30B-A3B",
        config=QWEN3_30B_A3B,
        tiny=dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            head_dim=16,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            max_window_layers=2,
            num_experts=16,
            vocab_size=160,
            bos_token_id=1,
            eos_token_id=2,
        ),
        shard_pattern="model-{:05d}-of-{:05d}.safetensors",
        first_shard=1,
        moe_keys=_QWEN_STYLE,
        attention_keys=_QK_NORMED,
        per_expert_rows=r"mlp\.gate\.weight$",
    ),
    "olmoe-1b-7b-0924": Layout(
        name="olmoe-1b-7b-0924",
        repo="allenai/OLMoE-1B-7B-0924",
        config=OLMOE_1B_7B_0924,
        tiny=dict(
            hidden_size=64,
            intermediate_size=32,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_hidden_layers=2,
            num_experts=16,
            vocab_size=160,
            eos_token_id=2,
            pad_token_id=1,
        ),
        shard_pattern="model-{:05d}-of-{:05d}.safetensors",
        first_shard=1,
        moe_keys=_QWEN_STYLE,
        attention_keys=_QK_NORMED,
        per_expert_rows=r"mlp\.gate\.weight$",
    ),
    "deepseek-v3": Layout(
        name="deepseek-v3",
        repo="deepseek-ai/DeepSeek-V3",
        config=DEEPSEEK_V3,
        # 8 groups of 4 routed experts, top-8 from the best 4 groups (the published routing); every FP8 width a
        # multiple of 128 or below it (kv_a_proj_with_mqa: kv_lora_rank + qk_rope_head_dim = 128).
        tiny=dict(
            hidden_size=256,
            intermediate_size=256,
            moe_intermediate_size=128,
            n_routed_experts=32,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            q_lora_rank=128,
            kv_lora_rank=64,
            qk_nope_head_dim=64,
            qk_rope_head_dim=64,
            v_head_dim=64,
            vocab_size=320,
        ),
        shard_pattern="model-{:05d}-of-{:06d}.safetensors",
        first_shard=1,
        moe_keys=(
            r"mlp\.gate\.(weight|e_score_correction_bias)",
            r"mlp\.experts\.\d+\.(gate|up|down)_proj\.(weight|weight_scale_inv)",
            r"mlp\.shared_experts\.(gate|up|down)_proj\.(weight|weight_scale_inv)",
        ),
        attention_keys=(
            _NORMS,
            r"self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)\.(weight|weight_scale_inv)",
            r"self_attn\.(q_a|kv_a)_layernorm\.weight",
        ),
        per_expert_rows=r"mlp\.gate\.(weight|e_score_correction_bias)$",
        store=_store_fp8,
        mtp=True,
    ),
    "mixtral-8x7b": Layout(
        name="mixtral-8x7b",
        repo="mistralai/Mixtral-8x7B-v0.1",
        config=MIXTRAL_8X7B,
        tiny=dict(
            hidden_size=64,
            intermediate_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            vocab_size=160,
        ),
        shard_pattern="model-{:05d}-of-{:05d}.safetensors",
        first_shard=1,
        moe_keys=(r"block_sparse_moe\.gate\.weight", r"block_sparse_moe\.experts\.\d+\.w[123]\.weight"),
        attention_keys=(_NORMS, r"self_attn\.[qkvo]_proj\.weight"),
        per_expert_rows=r"block_sparse_moe\.gate\.weight$",
    ),
}


def _mtp_tensors(layer: str, hidden: int, vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The tensors DeepSeek-V3's multi-token-prediction layer has besides a decoder layer's (transformers ignores
    them all; they are in the checkpoint)."""

    def random(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    return {
        f"{layer}.embed_tokens.weight": random(vocab, hidden),
        f"{layer}.enorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        f"{layer}.hnorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        f"{layer}.eh_proj.weight": random(hidden, 2 * hidden),
        f"{layer}.shared_head.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        f"{layer}.shared_head.head.weight": random(vocab, hidden),
    }


def build_model_config(layout: Layout, **overrides):
    """The transformers config of the fixture's model, without its quantization (the weights are made unquantized)."""
    fields = {k: v for k, v in {**layout.config_json, **overrides}.items() if k != "quantization_config"}
    return AutoConfig.for_model(**fields)


def _hub_tensors(layout: Layout, seed: int) -> dict[str, torch.Tensor]:
    """The fixture's tensors under the Hub's names, in its dtypes (before quantization)."""
    depth = layout.tiny["num_hidden_layers"]
    torch.manual_seed(seed)
    config = build_model_config(layout, num_hidden_layers=depth + 1 if layout.mtp else depth)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    randomise_routing_biases(model)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # the original (Hub) key format: per-expert keys where the Hub has them
        tensors = {k: v for shard in sorted(Path(tmp).glob("*.safetensors")) for k, v in load_file(shard).items()}
    if layout.mtp:
        generator = torch.Generator().manual_seed(seed)
        tensors.update(_mtp_tensors(f"model.layers.{depth}", config.hidden_size, config.vocab_size, generator))
    return tensors


def build_checkpoint(layout: Layout, directory: Path, seed: int = 0) -> Path:
    """Write the fixture checkpoint of ``layout`` into ``directory``: config.json, shards and index."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = layout.store(_hub_tensors(layout, seed))
    keys = sorted(tensors, key=_natural_key)
    names = layout.shard_names()
    per_shard = -(-len(keys) // len(names))
    weight_map = {}
    for number, name in enumerate(names):
        chunk = keys[number * per_shard : (number + 1) * per_shard]
        save_file({k: tensors[k].contiguous() for k in chunk}, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, name))
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(layout.config_json, indent=2))
    return directory


def _natural_key(key: str) -> list:
    """Layers and experts in numeric order, as the Hub shards them."""
    return [int(part) if part.isdigit() else part for part in key.split(".")]


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint, read through its index."""
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_file(directory / shard))
    return tensors
