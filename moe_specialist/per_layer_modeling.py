"""Causal LMs whose MoE layers keep different numbers of experts, built from any transformers MoE causal LM.

transformers builds every MoE layer with the one expert count of the config, so it cannot hold a checkpoint whose
layers kept different counts. :func:`with_per_layer_experts` subclasses the model class so that each MoE layer is
rebuilt from a copy of the config carrying that layer's count (``moe_experts_per_layer``), before any weight is
loaded; transformers' own loader then fills it, and a size mismatch stays an error, never a re-initialisation.

This module imports only the standard library, torch and transformers on purpose: it is also written, as
``modeling_moe_specialist.py`` with a line naming the checkpoint's class, into every non-uniform pruned checkpoint,
so that ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` loads it where moe-specialist is not
installed.
"""

from __future__ import annotations

import copy

import transformers  # noqa: F401 (the class line appended to the checkpoint's copy names transformers.<Class>)

# The config key holding {decoder layer: expert count} of a model whose MoE layers keep different counts.
PER_LAYER_COUNT_KEY = "moe_experts_per_layer"
# Config fields holding the number of routed experts, across the MoE families of transformers.
COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
MODELING_FILE = "modeling_moe_specialist.py"


def _layer_config(config, count: int):
    """A copy of the (text) config whose expert count is ``count``."""
    layer_config = copy.deepcopy(config)
    for name in COUNT_FIELDS:
        if getattr(layer_config, name, None) is not None:
            setattr(layer_config, name, count)
    return layer_config


def with_per_layer_experts(base: type) -> type:
    """A subclass of the causal-LM class ``base`` that builds each MoE layer with its own expert count."""

    class PerLayerExperts(base):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            text_config = config.get_text_config()
            layers = self.model.layers  # the decoder layers of every transformers MoE causal LM
            for index, count in (getattr(text_config, PER_LAYER_COUNT_KEY, None) or {}).items():
                layer_config = _layer_config(text_config, count)
                layer = type(layers[int(index)])(layer_config, int(index))
                for module in layer.modules():  # the counts stay cached; settings (attention, experts) are shared
                    if getattr(module, "config", None) is layer_config:
                        module.config = text_config
                layers[int(index)] = layer

    PerLayerExperts.__name__ = PerLayerExperts.__qualname__ = base.__name__
    return PerLayerExperts


def checkpoint_modeling_source(class_name: str) -> str:
    """The text of ``modeling_moe_specialist.py`` for a checkpoint of ``transformers.<class_name>``."""
    with open(__file__, encoding="utf-8") as handle:
        source = handle.read()
    return f"{source}\n\n{class_name} = with_per_layer_experts(transformers.{class_name})\n"
