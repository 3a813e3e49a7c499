"""Physical expert pruning: slice expert tensors, router rows and every per-expert tensor; fix the config.

Two paths give identical tensors:

- :func:`prune_model` works in memory on an instantiated model;
- :func:`prune_checkpoint` rewrites a safetensors checkpoint shard by shard without instantiating the model (the way
  to prune checkpoints larger than memory).

A uniform plan (same count in every MoE layer) gives a standard checkpoint that plain
``AutoModelForCausalLM.from_pretrained`` reloads. A non-uniform plan records the per-layer counts under the config
key ``moe_experts_per_layer``; :func:`load_pruned_model` builds the model with exactly those counts, and so does
``from_pretrained(path, trust_remote_code=True)`` through the checkpoint's own ``modeling_moe_specialist.py``
(without remote code, ``from_pretrained`` refuses it with a size-mismatch error rather than re-initialising anything).

Both paths write ``config.json`` in the source checkpoint's own field names and values, changed only where pruning
changed the model (:mod:`moe_specialist.checkpoint_config`), so stacks that read the source's names read it too.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import re
import shutil
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from moe_specialist.architectures import (
    COUNT_ATTRIBUTES,
    COUNT_FIELDS,
    LAYER_INDEX,
    PER_LAYER_COUNT_KEY,
    TOP_K_ATTRIBUTES,
    TOP_K_FIELDS,
    ExpertTensor,
    MoELayer,
    MoEModel,
    UnsupportedArchitectureError,
    find_moe,
    text_config,
)
from moe_specialist.checkpoint_config import CONFIG_FILE, finish_config, source_config_file
from moe_specialist.compat import causal_lm_class_for, saved_without_quantized_loading
from moe_specialist.errors import ConfigurationError, MissingInputError
from moe_specialist.io import (
    INDEX_FILE,
    atomic_write_json,
    atomic_write_text,
    read_weight_map,
    safe_child,
    staging_dir,
)
from moe_specialist.model_card import pruned_model_card, summarize_moe
from moe_specialist.mxfp4 import BLOCKS_SUFFIX, SCALES_SUFFIX, dequantize_mxfp4, is_mxfp4
from moe_specialist.per_layer_modeling import with_per_layer_experts
from moe_specialist.plan import PLAN_FILE, PrunePlan
from moe_specialist.safetensors_stream import (
    ComputedTensor,
    SourceTensor,
    StreamedTensor,
    TensorInfo,
    read_header,
    write_safetensors,
)

logger = logging.getLogger(__name__)


@dataclass
class PruneReport:
    experts_before: dict[int, int]
    experts_after: dict[int, int]
    parameters_before: dict[str, int]
    parameters_after: dict[str, int]
    top_k_before: int
    top_k_after: int

    @property
    def uniform(self) -> bool:
        return len(set(self.experts_after.values())) == 1

    @property
    def actual_ratio(self) -> float:
        """The share of routed experts removed, whatever the target was."""
        return 1 - sum(self.experts_after.values()) / sum(self.experts_before.values())

    def to_dict(self) -> dict:
        return {
            "experts_before": {str(k): v for k, v in self.experts_before.items()},
            "experts_after": {str(k): v for k, v in self.experts_after.items()},
            "actual_ratio": round(self.actual_ratio, 6),
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "top_k_before": self.top_k_before,
            "top_k_after": self.top_k_after,
        }


def _replace_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[name] = value


def _set_counts(modules: list[nn.Module], old: int, new: int, attributes: tuple[str, ...]) -> None:
    for module in modules:
        for attribute in attributes:
            if getattr(module, attribute, None) == old and not isinstance(
                getattr(type(module), attribute, None), property
            ):
                setattr(module, attribute, new)


def update_config(config, experts_per_layer: dict[int, int], top_k: int | None) -> None:
    """Write the new expert count(s) and top-k into ``config`` (the text config of multimodal models).

    ``experts_per_layer`` covers every MoE layer. The count fields get the largest count; when layers differ, the
    per-layer counts go under ``moe_experts_per_layer``.
    """
    config = text_config(config)
    counts = set(experts_per_layer.values())
    for name in COUNT_FIELDS:
        if getattr(config, name, None) is not None:
            setattr(config, name, max(counts))
    if len(counts) > 1:
        setattr(config, PER_LAYER_COUNT_KEY, {str(k): v for k, v in sorted(experts_per_layer.items())})
    elif hasattr(config, PER_LAYER_COUNT_KEY):
        delattr(config, PER_LAYER_COUNT_KEY)
    if top_k is not None:
        for name in TOP_K_FIELDS:
            if getattr(config, name, None) is not None:
                setattr(config, name, top_k)


def layer_modules(layer: MoELayer) -> list[nn.Module]:
    """The modules of a layer that may cache its expert count or top-k."""
    return [layer.block, layer.experts, *layer.router.modules()]


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-byte float tensor (FP8 weights kept quantized) viewed as uint8: torch has no ``index_copy_`` for it."""
    return tensor.view(torch.uint8) if tensor.is_floating_point() and tensor.element_size() == 1 else tensor


@torch.no_grad()
def remap_layer(
    layer: MoELayer, slots: list[int | None], fill: Callable[[ExpertTensor], float] = lambda t: 0.0
) -> None:
    """Rebuild one layer's experts as ``slots``: slot ``i`` holds the layer's expert ``slots[i]``, or for ``None`` a
    new expert whose every per-expert value is ``fill(tensor)``. Every per-expert tensor and cached count follows."""
    taken = [i for i, source in enumerate(slots) if source is not None]
    sources = [source for source in slots if source is not None]
    for t in layer.tensors:
        old = t.tensor
        shape = [len(slots) if d == t.dim else size for d, size in enumerate(old.shape)]
        new = torch.full(shape, fill(t), dtype=old.dtype, device=old.device)
        index = torch.tensor(taken, dtype=torch.long, device=old.device)
        kept = old.index_select(t.dim, torch.tensor(sources, device=old.device))
        _bytes(new).index_copy_(t.dim, index, _bytes(kept))
        _replace_tensor(t.module, t.name, new)
    _set_counts(layer_modules(layer), layer.num_experts, len(slots), COUNT_ATTRIBUTES)
    layer.num_experts = len(slots)


def slice_layer(layer: MoELayer, ids: list[int]) -> None:
    """Keep only experts ``ids`` of one layer: every per-expert tensor and the counts its modules cache."""
    remap_layer(layer, list(ids))


@contextmanager
def keeping_only(layer: MoELayer, ids: list[int], top_k: int | None = None):
    """Prune one layer to ``ids`` (routing ``top_k`` experts per token when given: a lowered top-k, as
    :func:`prune_model` sets it) for the duration of the block, then put back the very same tensors and counts."""
    tensors = [(t.module, t.name, t.tensor) for t in layer.tensors]
    attributes = COUNT_ATTRIBUTES + TOP_K_ATTRIBUTES
    counts = [(m, a, getattr(m, a)) for m in layer_modules(layer) for a in attributes if hasattr(m, a)]
    num_experts = layer.num_experts
    slice_layer(layer, ids)
    for module, attribute, value in counts:
        if top_k is not None and attribute in TOP_K_ATTRIBUTES:
            _set_counts([module], value, top_k, (attribute,))
    try:
        yield
    finally:
        for module, name, tensor in tensors:
            (module._parameters if name in module._parameters else module._buffers)[name] = tensor
        for module, attribute, value in counts:
            if getattr(module, attribute) != value:
                setattr(module, attribute, value)
        layer.num_experts = num_experts


def router_aux_loss_applies(experts_per_layer: dict[int, int]) -> bool:
    """Whether transformers' router load-balancing loss can train this model: it assumes one expert count per model.

    The one place this is decided: :func:`prune_model` switches ``output_router_logits`` off otherwise, and the
    training pipeline sets ``router_aux_loss_coef: 0`` before TRL reads it.
    """
    return len(set(experts_per_layer.values())) == 1


# Called for each MoE layer in order with the function that prunes it: what runs before that call sees the layer
# whole (and the earlier layers pruned), what runs after sees it pruned. The compensation re-fits layers this way.
AroundLayer = Callable[[MoELayer, Callable[[], None]], None]


def _prune_only(layer: MoELayer, prune: Callable[[], None]) -> None:
    prune()


@torch.no_grad()
def prune_model(
    model: nn.Module, plan: PrunePlan, moe: MoEModel | None = None, around_layer: AroundLayer = _prune_only
) -> PruneReport:
    """Prune ``model`` in place following ``plan``, layer by layer through ``around_layer``; shared experts and
    dense layers are untouched."""
    moe = moe or find_moe(model)
    plan.validate(moe)
    before = moe.experts_per_layer
    parameters_before = moe.parameter_counts()
    top_k_before = moe.top_k
    new_top_k = plan.top_k if plan.top_k is not None and plan.top_k != moe.top_k else None

    def prune_layer(layer: MoELayer) -> None:
        if new_top_k is not None:  # every MoE layer, listed in the plan or not: the config's top-k is global
            _set_counts(layer_modules(layer), top_k_before, new_top_k, TOP_K_ATTRIBUTES)
        ids = plan.kept_experts.get(layer.layer_index)
        if ids is not None and len(ids) != layer.num_experts:
            slice_layer(layer, ids)

    for layer in moe.layers:
        around_layer(layer, functools.partial(prune_layer, layer))
    after = {layer.layer_index: layer.num_experts for layer in moe.layers}
    original = max(before.values())
    update_config(model.config, after, new_top_k)
    # cached counts outside the blocks (e.g. the causal LM's num_experts, used by the aux loss)
    inside = {id(m) for layer in moe.layers for m in layer.block.modules()}
    outside = [m for m in model.modules() if id(m) not in inside]
    _set_counts(outside, original, max(after.values()), COUNT_FIELDS)
    if new_top_k is not None:
        _set_counts(outside, moe.top_k, new_top_k, TOP_K_ATTRIBUTES)
        moe.top_k = new_top_k
    if not router_aux_loss_applies(after):
        logger.warning(
            "Layers keep different numbers of experts %s: the router aux loss of transformers assumes one count and "
            "is switched off (output_router_logits=False) for this model.",
            sorted(set(after.values())),
        )
        text_config(model.config).output_router_logits = False
    return PruneReport(before, after, parameters_before, moe.parameter_counts(), top_k_before, moe.top_k)


# ---- loading a non-uniform checkpoint -------------------------------------------------------------------------------
def structure_from_config(config) -> MoEModel:
    """The MoE structure a config describes (per-layer counts included), without allocating weights."""
    per_layer = getattr(text_config(config), PER_LAYER_COUNT_KEY, None)
    base = causal_lm_class(config)
    with torch.device("meta"):
        model = (with_per_layer_experts(base) if per_layer else base)(config)
    return find_moe(model)


def causal_lm_class(config) -> type:
    cls = causal_lm_class_for(config)
    if cls is None:
        raise UnsupportedArchitectureError(
            f"transformers has no causal-LM class for {type(config).__name__} (a multimodal or remote-code config): "
            "point the tool at the text model's checkpoint."
        )
    return cls


def load_pruned_model(path: str | Path, **kwargs) -> nn.Module:
    """Load a checkpoint written by this tool, uniform or not, with exactly its per-layer expert counts."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
    if not getattr(text_config(config), PER_LAYER_COUNT_KEY, None):
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    base = causal_lm_class(config)
    return with_per_layer_experts(base).from_pretrained(path, config=config, **kwargs)


def save_pruned_model(
    model: nn.Module,
    output_dir: str | Path,
    tokenizer=None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    state_dict: dict | None = None,
    protected: Iterable[str | Path] = (),
    companions_from: str | Path | None = None,
) -> Path:
    """Save atomically, in the checkpoint's original key format (what :func:`prune_checkpoint` writes too), with the
    config in the field names of the checkpoint the model was loaded from, when its ``config.json`` is at hand.

    ``state_dict`` replaces the model's own tensors (e.g. the gathered weights of a DeepSpeed ZeRO-3 model).
    ``protected`` are paths the output may not be, contain or lie inside (the checkpoint the model was loaded from).
    ``companions_from`` is a checkpoint directory whose tokenizer and generation files are copied (instead of
    ``tokenizer``).
    """
    with staging_dir(output_dir, overwrite, protected) as tmp:
        with saved_without_quantized_loading(model):
            model.save_pretrained(tmp, state_dict=state_dict)
        finish_config(tmp, source_config_file(getattr(model, "name_or_path", None)))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if companions_from is not None:
            copy_companion_files(Path(companions_from), tmp)
        for name, text in (extra_files or {}).items():
            atomic_write_text(text, tmp / name)
    return Path(output_dir)


# ---- on disk --------------------------------------------------------------------------------------------------------
_EXPERT_KEY = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<rest>.+)$")
# Substrings of on-disk names that can hold per-expert tensors outside an ``experts.{i}`` prefix (fused experts,
# routers, score-correction biases), in the original formats of the supported families.
_MOE_NAME_HINTS = (
    "experts",
    "gate",
    "router",
    "input_linear",
    "output_linear",
    "moe_statics",
    "expert_bias",
    "e_score_correction_bias",
    "per_expert_scale",
)
_SHARED_HINTS = ("shared",)


# Files that travel with the weights (tokenizer, generation config, chat template); never other weight formats
# (pytorch_model*.bin, original/...), which would be unpruned copies.
COMPANION_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template*",
    "generation_config.json",
    "preprocessor_config.json",
)
SNAPSHOT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "config.json", *COMPANION_FILES)
# Hub patterns match whole paths and ``*`` crosses ``/``: without this, ``*.safetensors`` also fetches the copies in
# sub-folders, e.g. GPT-OSS's ``original/`` (13 GB for gpt-oss-20b, a second format the model never reads).
SNAPSHOT_IGNORE = ("*/*",)


def copy_companion_files(model_dir: Path, staging: Path) -> None:
    """Copy the files that travel with the weights (:data:`COMPANION_FILES`) from ``model_dir`` into ``staging``."""
    for item in model_dir.iterdir():
        if item.is_file() and any(fnmatch.fnmatch(item.name, pattern) for pattern in COMPANION_FILES):
            shutil.copy2(*_input_and_output(model_dir, staging, item.name, f"file in {model_dir}"))


def _shard_files(path: Path) -> list[str]:
    """The shard names of the checkpoint in ``path``, unchecked as paths (see :func:`safe_child`)."""
    weight_map = read_weight_map(path)
    if weight_map:
        return sorted(set(weight_map.values()))
    if (path / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise MissingInputError(f"No safetensors checkpoint in {path} (model.safetensors or its index).")


def _input_and_output(model_dir: Path, staging: Path, name: str, what: str) -> tuple[Path, Path]:
    """The paths of an untrusted file name (read from the checkpoint) in the source and in the staging directory."""
    return safe_child(model_dir, name, what), safe_child(staging, name, what)


@dataclass(frozen=True)
class PlannedEntry:
    """One tensor of the pruned checkpoint: the source entry ``source`` under the name ``key``, whole, or only the
    experts ``kept`` (in that order) along dimension ``dim``. Decided from names and shapes, before any tensor is
    read."""

    key: str
    source: str
    kept: tuple[int, ...] | None = None
    dim: int = 0


def plan_entry(
    key: str, shape: list[int], plan_kept: dict[int, list[int]], counts: dict[int, int]
) -> PlannedEntry | None:
    """What the pruned checkpoint holds of entry ``key`` (of ``shape``); None when it belongs to a removed expert."""
    layer_match = LAYER_INDEX.search(key)
    layer = int(layer_match.group(1)) if layer_match else None
    if layer is None or layer not in plan_kept or layer not in counts:
        return PlannedEntry(key, key)
    kept, n = plan_kept[layer], counts[layer]
    expert = _EXPERT_KEY.match(key)
    if expert and not any(h in key for h in _SHARED_HINTS):
        index = int(expert.group("expert"))
        if index not in kept:
            return None
        return PlannedEntry(f"{expert.group('prefix')}.{kept.index(index)}.{expert.group('rest')}", key)
    name = key.lower()
    if any(h in name for h in _MOE_NAME_HINTS) and not any(h in name for h in _SHARED_HINTS) and n in shape:
        dims = [d for d, size in enumerate(shape) if size == n]
        if len(dims) != 1:
            raise ConfigurationError(f"Cannot tell which dimension of {key} {shape} indexes the {n} experts.")
        return PlannedEntry(key, key, tuple(kept), dims[0])
    return PlannedEntry(key, key)


def _read_shard(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors and metadata of a checkpoint shard; a damaged file is a ConfigurationError naming it."""
    try:
        tensors, metadata = read_header(path)
    except (OSError, ValueError) as error:
        raise ConfigurationError(f"Cannot read {path}: truncated or corrupt safetensors ({error}).") from error
    return tensors, metadata or {}


def _output_tensors(
    source: BinaryIO, tensors: dict[str, TensorInfo], entries: list[PlannedEntry], dequantize: bool = False
) -> dict[str, StreamedTensor]:
    """The tensors of one output shard, by name, each to be copied from the open shard ``source`` when written;
    with ``dequantize``, each MXFP4 ``X_blocks`` / ``X_scales`` pair of kept experts becomes the bf16 ``X``, computed
    when its turn comes (:func:`~moe_specialist.mxfp4.dequantize_mxfp4`)."""
    planned = {e.key: SourceTensor(source, tensors[e.source], e.kept, e.dim) for e in entries}
    if not dequantize:
        return planned
    out: dict[str, StreamedTensor] = {}
    for key, tensor in planned.items():
        stem = key.removesuffix(BLOCKS_SUFFIX).removesuffix(SCALES_SUFFIX)
        if stem == key:
            out[key] = tensor
            continue
        blocks, scales = planned.get(stem + BLOCKS_SUFFIX), planned.get(stem + SCALES_SUFFIX)
        if blocks is None or scales is None:
            raise ConfigurationError(
                f"{key} has no {'scales' if scales is None else 'blocks'} in the same shard: this checkpoint cannot "
                "be dequantized while it is pruned; prune it without dequantizing (prune_mode: memory)."
            )
        experts, rows, groups, _ = blocks.shape
        out[stem] = ComputedTensor(
            "BF16", (experts, groups * 32, rows), lambda b=blocks, s=scales: dequantize_mxfp4(b.read(), s.read())
        )
    return out


def prune_checkpoint(
    model_dir: str | Path,
    plan: PrunePlan,
    output_dir: str | Path,
    overwrite: bool = False,
    source_name: str | None = None,
    dequantize: bool = False,
) -> dict:
    """Rewrite a safetensors checkpoint tensor by tensor, with config, plan and card; ``dequantize`` writes MXFP4
    experts (GPT-OSS) in bf16, without the quantization config, so that every rank that loads the pruned checkpoint
    skips dequantizing it (a no-op for other checkpoints).

    Each output shard is written header first, then tensor by tensor, copied file to file by the kernel
    (:mod:`moe_specialist.safetensors_stream`): only the kept experts' bytes are read, none passes through this
    process, and the pruned shards hold the tensors :func:`prune_model` gives.

    The output may not be, contain or lie inside ``model_dir``. Every file name read from the checkpoint goes through
    :func:`safe_child`: checkpoints come from the internet.
    """
    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    meta_moe = structure_from_config(config)
    plan.validate(meta_moe)
    counts = meta_moe.experts_per_layer
    after = plan.experts_after(meta_moe)
    weight_map: dict[str, str] = {}
    total_size = 0
    with staging_dir(output_dir, overwrite, protected=[model_dir]) as tmp:
        for shard in _shard_files(model_dir):
            source, target = _input_and_output(model_dir, tmp, shard, f"shard name in {model_dir / INDEX_FILE}")
            tensors, metadata = _read_shard(source)
            entries = [plan_entry(key, list(info.shape), plan.kept_experts, counts) for key, info in tensors.items()]
            with source.open("rb") as f:
                out = _output_tensors(f, tensors, [e for e in entries if e is not None], dequantize)
                total_size += write_safetensors(target, out, {**metadata, "format": metadata.get("format", "pt")})
            weight_map.update(dict.fromkeys(out, shard))
        if (model_dir / INDEX_FILE).is_file():
            atomic_write_json(
                {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
                tmp / INDEX_FILE,
            )
        new_top_k = plan.top_k if plan.top_k is not None and plan.top_k != meta_moe.top_k else None
        update_config(config, after, new_top_k)
        if dequantize and is_mxfp4(config):
            del config.quantization_config
        config.save_pretrained(tmp)
        finish_config(tmp, model_dir / CONFIG_FILE)
        card = pruned_model_card(
            source_name or str(model_dir),
            plan,
            summarize_moe(meta_moe),
            summarize_moe(structure_from_config(config)),
            meta_moe.routing,
        )
        copy_companion_files(model_dir, tmp)
        plan.save(tmp / PLAN_FILE)
        atomic_write_text(card, tmp / "README.md")
    return {"experts_before": counts, "experts_after": after, "total_size": total_size}
