"""The ``config.json`` of a pruned checkpoint: the source checkpoint's own file, changed only where the model changed.

transformers 5 writes configs in its own form (Qwen3's ``num_experts`` as ``num_local_experts``, ``rope_theta``
inside ``rope_parameters``, ``torch_dtype`` as ``dtype``). A transformers 4 stack, or a serving engine pinned to one,
reads only the old names and silently falls back to defaults (128 experts and rope_theta 10000 for Qwen3). So a
pruned checkpoint's config is the source's ``config.json`` with exactly the fields whose value changed (expert
counts, a lowered top-k, per-layer counts, the dtype if the weights changed it...) replaced, each under the name the
source uses; every other field keeps its name and value. What changed is decided by transformers itself: both files
are read by the same config class and their normalised forms compared, and the result must read back exactly as the
config transformers wrote (otherwise that one is kept, with a warning).

A checkpoint whose MoE layers keep different expert counts also carries ``modeling_moe_specialist.py`` (see
:mod:`moe_specialist.per_layer_modeling`) and an ``auto_map`` naming it.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from moe_specialist.io import atomic_write_json, atomic_write_text
from moe_specialist.per_layer_modeling import MODELING_FILE, PER_LAYER_COUNT_KEY, checkpoint_modeling_source

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
# Written by whoever saved the file, not a property of the model: the source's values stay.
_PROVENANCE_FIELDS = ("transformers_version", "_name_or_path")
# Names transformers 5 reads but no longer writes (not in any ``attribute_map``).
_LEGACY_NAMES = {"dtype": "torch_dtype"}
# What ``save_pretrained`` records about the written weights: updated where the source states it, never added.
_WEIGHT_FIELDS = ("dtype",)


def source_config_file(name_or_path: str | Path | None) -> Path | None:
    """The ``config.json`` a model was loaded from: in its directory, or in the Hub cache (never downloaded)."""
    if not name_or_path:
        return None
    local = Path(name_or_path) / CONFIG_FILE
    if local.is_file():
        return local
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(str(name_or_path), CONFIG_FILE)
    except ValueError:  # not a Hub id either (e.g. a missing local path)
        return None
    return Path(cached) if isinstance(cached, str) else None


def _normalised(config: dict, config_class: type[PretrainedConfig]) -> dict:
    """What transformers understands ``config`` to say, whatever names and forms it uses."""
    values = config_class.from_dict(copy.deepcopy(config)).to_dict()  # from_dict edits nested values in place
    return {key: value for key, value in values.items() if key not in _PROVENANCE_FIELDS}


def _source_names(source: dict, config_class: type[PretrainedConfig]) -> dict[str, str]:
    """transformers' field name -> the name ``source`` stores it under, where they differ."""
    aliases = {**getattr(config_class, "attribute_map", {}), **{old: new for new, old in _LEGACY_NAMES.items()}}
    return {aliases[name]: name for name in source if name in aliases}


def in_source_form(source: dict, written: dict) -> dict:
    """``source`` with the fields whose value differs in ``written`` (a config transformers wrote) replaced.

    Fields are compared as transformers reads them, so renamings and re-encodings (``rope_theta`` vs
    ``rope_parameters``) are not changes. A field ``written`` drops (e.g. a quantization config after dequantizing)
    is dropped. Returns ``written`` itself when ``source`` is another model type or the merge would not read back as
    ``written`` does.
    """
    if source.get("model_type") != written.get("model_type"):
        return written
    config_class = type(AutoConfig.for_model(written["model_type"]))
    before, after = _normalised(source, config_class), _normalised(written, config_class)
    names = _source_names(source, config_class)
    merged, expected = dict(source), dict(after)
    for field in before.keys() | after.keys():
        if before.get(field, ...) == after.get(field, ...):
            continue
        name = names.get(field, field)
        if field in _WEIGHT_FIELDS and name not in source:
            expected[field] = before[field]
        elif field in after:
            merged[name] = after[field]
        else:
            merged.pop(name, None)
    if _normalised(merged, config_class) != expected:
        logger.warning("The pruned config cannot be written in the source's field names; writing transformers' form.")
        return written
    return merged


def with_remote_code(config: dict, directory: Path) -> dict:
    """``config`` naming only code that ``directory`` holds, plus, for per-layer expert counts, this package's
    modeling file (written there) for ``AutoModelForCausalLM``: such a checkpoint then loads with
    ``trust_remote_code=True`` where moe-specialist is not installed. Uniform checkpoints name none of ours."""
    auto_map = {
        auto_class: reference
        for auto_class, reference in (config.get("auto_map") or {}).items()
        if (directory / f"{reference.split('--')[-1].rsplit('.', 1)[0]}.py").is_file()
    }
    text = config.get("text_config") or config
    if text.get(PER_LAYER_COUNT_KEY):
        class_name = config["architectures"][0]
        atomic_write_text(checkpoint_modeling_source(class_name), directory / MODELING_FILE)
        auto_map["AutoModelForCausalLM"] = f"{Path(MODELING_FILE).stem}.{class_name}"
    config = {key: value for key, value in config.items() if key != "auto_map"}
    return {**config, "auto_map": auto_map} if auto_map else config


def finish_config(directory: Path, source_file: Path | None) -> None:
    """Rewrite the ``config.json`` transformers just wrote in ``directory``: in the form of ``source_file`` (the
    source checkpoint's config, when there is one) and naming the code the checkpoint needs."""
    path = directory / CONFIG_FILE
    config = json.loads(path.read_text(encoding="utf-8"))
    if source_file is not None and source_file.is_file():
        config = in_source_form(json.loads(source_file.read_text(encoding="utf-8")), config)
    atomic_write_json(with_remote_code(config, directory), path)
