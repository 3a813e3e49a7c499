"""Where the experts are: one generic adapter for every transformers MoE causal LM that follows the fused convention.

transformers (>= 5) stores each layer's routed experts as fused tensors with the expert dimension first, in a class
decorated with ``@use_experts_implementation``; the router (``gate`` or ``router``) is its sibling. This module finds,
for every MoE layer, the experts module, the router and *every* tensor that has one slot per routed expert (expert
weights and biases, router rows and biases, score-correction biases on the router or on the block), the config fields
that hold the expert count and top-k, and how the architecture routes (which decides whether pruning is exact).
Architectures that break the convention are handled explicitly (Llama-4) or refused with a message saying why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from moe_specialist.errors import ConfigurationError
from moe_specialist.per_layer_modeling import COUNT_FIELDS, PER_LAYER_COUNT_KEY

# Config fields holding the number of experts per token (the count fields: COUNT_FIELDS), across the MoE families.
TOP_K_FIELDS = ("num_experts_per_tok", "moe_k", "moe_topk", "num_experts_per_token", "experts_per_token")
GROUP_FIELDS = ("n_group", "num_expert_group")
TOPK_GROUP_FIELDS = ("topk_group", "topk_groups")
RENORM_FIELDS = ("norm_topk_prob", "moe_renormalize")
# Module attributes caching a count (the causal LM's ``num_experts`` used by the aux loss, ``Linear.out_features``).
COUNT_ATTRIBUTES = COUNT_FIELDS + ("out_features",)
TOP_K_ATTRIBUTES = ("top_k", "num_experts_per_tok", "moe_k")
# Per-expert tensors that live on the router or on the block rather than in the experts module.
PER_EXPERT_TENSOR_NAMES = ("bias", "e_score_correction_bias", "expert_bias", "per_expert_scale")
# Those among them that are added to the experts' scores before the top-k selection (a router's own bias, the
# score-correction biases): the only handle that can keep an expert from ever being selected.
SELECTION_BIAS_NAMES = ("bias", "e_score_correction_bias", "expert_bias")

LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|decoder_layers)\.(\d+)(?:\.|$)")


class UnsupportedArchitectureError(ConfigurationError):
    """The model's MoE layout cannot be pruned by this tool; the message says what is missing."""


@dataclass(frozen=True)
class Routing:
    """How an architecture turns router scores into expert weights, and whether pruning can be exact.

    ``exact`` is True when removing experts that the router never selects on an input leaves the outputs on that
    input unchanged; False when it cannot (the reason says why); None when it holds only under conditions.
    """

    kind: str
    exact: bool | None
    reason: str


@dataclass
class ExpertTensor:
    """A parameter or buffer with one slot per routed expert along ``dim``."""

    module: nn.Module
    name: str
    path: str
    dim: int

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.name)


@dataclass
class MoELayer:
    layer_index: int  # index of the decoder layer
    block_path: str
    block: nn.Module
    experts: nn.Module
    experts_path: str
    router: nn.Module
    router_path: str
    num_experts: int
    tensors: list[ExpertTensor]
    shared_expert_paths: list[str] = field(default_factory=list)

    @property
    def expert_parameters(self) -> int:
        return sum(t.tensor.numel() for t in self.tensors if t.module is self.experts)

    @property
    def selection_biases(self) -> list[ExpertTensor]:
        """The per-expert tensors added to the routing scores before the top-k selection."""
        return [t for t in self.tensors if t.module is not self.experts and t.name in SELECTION_BIAS_NAMES]


@dataclass
class MoEModel:
    """The MoE structure of a causal LM, as the rest of the pipeline needs it."""

    model: nn.Module
    model_type: str
    architecture: str
    layers: list[MoELayer]
    count_fields: list[str]
    top_k_field: str
    top_k: int
    n_group: int
    routing: Routing
    decorated: bool

    @property
    def layer_indices(self) -> list[int]:
        return [layer.layer_index for layer in self.layers]

    @property
    def experts_per_layer(self) -> dict[int, int]:
        return {layer.layer_index: layer.num_experts for layer in self.layers}

    def layer(self, index: int) -> MoELayer:
        for layer in self.layers:
            if layer.layer_index == index:
                return layer
        raise KeyError(f"Decoder layer {index} is not an MoE layer; MoE layers are {self.layer_indices}.")

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters, parameters in routed experts, and parameters active per token.

        Active per token: top-k of each layer's routed experts and every other parameter but the input embedding
        table, of which a token uses one row (the LM head, a full product, counts; tied to the embedding it counts
        once). This is how the published active counts are made, e.g. GPT-OSS-20B's 3.61B.
        """
        total = sum(p.numel() for p in self.model.parameters())
        routed = sum(layer.expert_parameters for layer in self.layers)
        active_routed = sum(layer.expert_parameters * self.top_k / layer.num_experts for layer in self.layers)
        embedding = self.model.get_input_embeddings().weight
        head = self.model.get_output_embeddings()
        lookup_only = 0 if head is not None and head.weight is embedding else embedding.numel()
        return {
            "total": total,
            "routed_experts": routed,
            "other": total - routed,
            "active": int(total - routed + active_routed - lookup_only),
        }


def text_config(config):
    """The config that holds the MoE fields (the text config of multimodal models)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _config_value(config, names: tuple[str, ...]):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return name, value
    return None, None


# Routing families by model_type. Sources: the modeling code of transformers 5.23 (see shared facts, Q4).
_SOFTMAX_OPTIONAL_RENORM = {
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_next",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
    "olmoe",
    "flex_olmo",
    "qwen3_vl_moe",
    "qwen3_vl_moe_text",
    "hunyuan_v1_moe",
}
_SOFTMAX_ALWAYS_RENORM = {"mixtral", "minimax"}
_TOPK_THEN_SOFTMAX = {"gpt_oss", "granitemoe", "granitemoeshared", "granitemoehybrid"}
_SIGMOID_WITH_GROUPS = {
    "deepseek_v3",
    "glm4_moe",
    "glm4_moe_lite",
    "dots1",
    "deepseek_v32",
    "glm_moe_dsa",
    "kimi_linear",
    "mimo_v2_flash",
    "mistral_large4",
}
_SIGMOID_TOPK = {"llama4", "llama4_text"}


def classify_routing(model_type: str, config, router: nn.Module | None = None) -> Routing:
    """Exactness class of an architecture's routing under pruning."""
    config = text_config(config)
    _, renorm = _config_value(config, RENORM_FIELDS)
    _, n_group = _config_value(config, GROUP_FIELDS)
    if model_type in _SOFTMAX_OPTIONAL_RENORM:
        if renorm:
            return Routing("softmax_topk_renorm", True, "softmax, top-k, renormalised over the k selected")
        return Routing(
            "softmax_topk",
            False,
            "softmax over all experts without top-k renormalisation (norm_topk_prob=False): removed experts' "
            "probability mass changes every token's weights",
        )
    if model_type in _SOFTMAX_ALWAYS_RENORM:
        return Routing("softmax_topk_renorm", True, "softmax, top-k, always renormalised")
    if model_type in _TOPK_THEN_SOFTMAX:
        return Routing("topk_softmax", True, "top-k on logits, then softmax over the k selected")
    if model_type in _SIGMOID_TOPK:
        return Routing("sigmoid_topk", True, "each expert scored independently by a sigmoid")
    if model_type in _SIGMOID_WITH_GROUPS:
        if n_group is None or n_group <= 1:
            return Routing("sigmoid_topk", True, "each expert scored independently by a sigmoid (+ bias for choice)")
        return Routing(
            "group_limited",
            None,
            f"group-limited routing (n_group={n_group}): exact only if every group keeps the same number of "
            "experts and no removed expert is among its group's top-2 scores",
        )
    if model_type == "deepseek_v2":
        return Routing(
            "softmax_topk",
            False,
            "softmax over all experts, never renormalised: removed experts' mass changes every token's weights",
        )
    if model_type == "phimoe":
        return Routing(
            "sparsemixer",
            False,
            "sparsemixer: its softmax covers every expert within a band of the maximum, selected or not",
        )
    if model_type in {"ernie4_5_moe", "ernie4_5_vl_moe"}:
        bias = _ernie_bias(router)
        if bias is not None and bias.device.type != "meta" and torch.all(bias == bias.flatten()[0]):
            return Routing("softmax_bias_select", True, "selection on probability + bias; the bias is constant")
        return Routing(
            "softmax_bias_select",
            False,
            "selection on softmax probability + correction bias: pruning rescales the probabilities but not the "
            "bias, so the ranking can change",
        )
    return Routing("unknown", None, f"routing of model_type {model_type!r} is not classified by this version")


def _ernie_bias(router: nn.Module | None) -> torch.Tensor | None:
    statics = getattr(router, "moe_statics", None)
    return getattr(statics, "e_score_correction_bias", None)


# Architectures whose experts break the fused convention: class name of the offending module -> why.
_REFUSED = {
    "DbrxExperts": "DBRX stores experts as flattened 2-D tensors [E*I, H] under experts.mlp, outside the fused "
    "convention",
    "JetMoeParallelExperts": "JetMoE also routes attention heads to experts (mixture of attention), which this tool "
    "does not prune",
    "JetMoeMoA": "JetMoE also routes attention heads to experts (mixture of attention), which this tool does not "
    "prune",
    "LongcatFlashExperts": "Longcat-Flash routes to 'zero experts' beyond the real ones (router rows != experts)",
}


def _is_fused_experts(module: nn.Module) -> bool:
    """A ``@use_experts_implementation`` experts module (the decorator sets these attributes)."""
    return all(hasattr(module, a) for a in ("has_gate", "is_transposed", "_is_expert_parallel")) and (
        hasattr(module, "gate_up_proj") or hasattr(module, "up_proj")
    )


def _layer_index(path: str) -> int:
    matches = LAYER_INDEX.findall(path)
    if not matches:
        raise UnsupportedArchitectureError(f"Cannot tell which decoder layer the MoE block {path!r} belongs to.")
    return int(matches[-1])


def _router_of(parent: nn.Module, where: str) -> tuple[str, nn.Module]:
    for name in ("gate", "router"):
        router = getattr(parent, name, None)
        if isinstance(router, nn.Module):
            return name, router
    raise UnsupportedArchitectureError(f"No router ('gate' or 'router') next to the experts of {where}.")


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The tensor's shape, also when DeepSpeed ZeRO-3 has partitioned it (each rank then holds an empty ``shape``
    and the whole one in ``ds_shape``), so that MoE layers are found in a model loaded under ``zero.Init``."""
    return torch.Size(getattr(tensor, "ds_shape", tensor.shape))


def _slot_dim(tensor: torch.Tensor, num_experts: int, path: str) -> int:
    shape = full_shape(tensor)
    dims = [d for d, size in enumerate(shape) if size == num_experts]
    if len(dims) != 1:
        raise UnsupportedArchitectureError(
            f"Cannot tell which dimension of {path} {tuple(shape)} indexes the {num_experts} experts."
        )
    return dims[0]


def _router_tensors(router: nn.Module, router_path: str, num_experts: int) -> list[ExpertTensor]:
    tensors = []
    for module_name, module in router.named_modules():
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor is None:
                continue
            path = ".".join(p for p in (router_path, module_name, name) if p)
            shape = full_shape(tensor)
            if name == "weight" and len(shape) == 2:
                if shape[0] != num_experts:
                    raise UnsupportedArchitectureError(
                        f"The router {path} has {shape[0]} rows for {num_experts} experts (extra 'zero' or "
                        "sentinel experts); pruning it is not supported."
                    )
                tensors.append(ExpertTensor(module, name, path, 0))
            elif num_experts in shape:
                tensors.append(ExpertTensor(module, name, path, _slot_dim(tensor, num_experts, path)))
    return tensors


def _block_tensors(block: nn.Module, block_path: str, num_experts: int) -> list[ExpertTensor]:
    tensors = []
    for name, tensor in list(block.named_parameters(recurse=False)) + list(block.named_buffers(recurse=False)):
        if tensor is not None and name in PER_EXPERT_TENSOR_NAMES:
            path = f"{block_path}.{name}"
            tensors.append(ExpertTensor(block, name, path, _slot_dim(tensor, num_experts, path)))
    return tensors


def _shared_experts(block: nn.Module, block_path: str) -> list[str]:
    return [f"{block_path}.{name}" for name, _ in block.named_children() if "shared" in name]


def _fused_layer(path: str, experts: nn.Module, modules: dict[str, nn.Module]) -> MoELayer:
    parent_path = path.rsplit(".", 1)[0]
    block = modules[parent_path]
    num_experts = experts.num_experts
    router_name, router = _router_of(block, parent_path)
    router_path = f"{parent_path}.{router_name}"
    tensors = [
        ExpertTensor(experts, name, f"{path}.{name}", 0)
        for name, tensor in list(experts.named_parameters(recurse=False)) + list(experts.named_buffers(recurse=False))
        if tensor is not None and len(full_shape(tensor)) >= 1 and full_shape(tensor)[0] == num_experts
    ]
    tensors += _router_tensors(router, router_path, num_experts)
    tensors += _block_tensors(block, parent_path, num_experts)
    return MoELayer(
        layer_index=_layer_index(parent_path),
        block_path=parent_path,
        block=block,
        experts=experts,
        experts_path=path,
        router=router,
        router_path=router_path,
        num_experts=num_experts,
        tensors=tensors,
        shared_expert_paths=_shared_experts(block, parent_path),
    )


def _llama4_layer(path: str, block: nn.Module) -> MoELayer:
    """Llama-4: fused experts [E, H, 2I] without the decorator; an nn.Linear router whose scores scale the input."""
    num_experts = block.num_experts
    experts, router = block.experts, block.router
    tensors = [
        ExpertTensor(experts, name, f"{path}.experts.{name}", 0)
        for name, tensor in experts.named_parameters(recurse=False)
        if full_shape(tensor)[0] == num_experts
    ]
    tensors += _router_tensors(router, f"{path}.router", num_experts)
    return MoELayer(
        layer_index=_layer_index(path),
        block_path=path,
        block=block,
        experts=experts,
        experts_path=f"{path}.experts",
        router=router,
        router_path=f"{path}.router",
        num_experts=num_experts,
        tensors=tensors,
        shared_expert_paths=_shared_experts(block, path),
    )


def find_moe(model: nn.Module) -> MoEModel:
    """Describe the MoE structure of ``model``, or raise :class:`UnsupportedArchitectureError` saying why not."""
    config = text_config(model.config)
    model_type = getattr(config, "model_type", type(model).__name__)
    modules = dict(model.named_modules())
    for path, module in modules.items():
        reason = _REFUSED.get(type(module).__name__)
        if reason:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} is not supported: {reason} (module {path}: {type(module).__name__})."
            )
    layers = []
    decorated = True
    for path, module in modules.items():
        if _is_fused_experts(module):
            layers.append(_fused_layer(path, module, modules))
        elif type(module).__name__ == "Llama4TextMoe":
            layers.append(_llama4_layer(path, module))
            decorated = False
    if not layers:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no MoE layer this tool recognises: it looks for experts modules decorated "
            "with transformers' @use_experts_implementation (fused tensors, expert dimension first) or Llama-4's "
            "Llama4TextMoe."
        )
    layers.sort(key=lambda layer: layer.layer_index)
    counts = {layer.num_experts for layer in layers}
    per_layer = getattr(config, PER_LAYER_COUNT_KEY, None)
    count_fields = [
        name
        for name in COUNT_FIELDS
        if getattr(config, name, None) in counts or (per_layer and getattr(config, name, None) is not None)
    ]
    top_k_field, top_k = _config_value(config, TOP_K_FIELDS)
    if top_k_field is None:
        raise UnsupportedArchitectureError(f"No top-k field ({', '.join(TOP_K_FIELDS)}) in the {model_type} config.")
    _, n_group = _config_value(config, GROUP_FIELDS)
    return MoEModel(
        model=model,
        model_type=model_type,
        architecture=type(model).__name__,
        layers=layers,
        count_fields=count_fields,
        top_k_field=top_k_field,
        top_k=int(top_k),
        n_group=int(n_group or 1),
        routing=classify_routing(model_type, config, layers[0].router),
        decorated=decorated,
    )


def stored_field_name(config, name: str) -> str:
    """The key under which ``config.json`` stores an attribute (aliases go through ``attribute_map``)."""
    return getattr(config, "attribute_map", {}).get(name, name)
