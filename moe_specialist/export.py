"""Serving export: a non-uniform pruned checkpoint rewritten with one expert count per model, as vLLM and SGLang need.

Serving engines build every MoE layer with the config's single expert count. Each layer is padded to the largest
kept count with experts that are never selected: zero weights, and a selection bias (a router bias or a
score-correction bias) at half the dtype's most negative value, below any score a real expert can get and still
finite after adding one. Where a routing group holds the experts, each group is padded alike. Never selected, a
padded expert changes no output, provided its router score cannot change the weights of the selected experts: the
router must have a selection bias and a routing that is exact under pruning. A router without a bias (Qwen3-MoE,
Mixtral, OLMoE) gives a zero row a score of 0, which wins whenever the real scores are negative: no weights can pad
it exactly, and such a checkpoint is refused rather than served wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moe_specialist.architectures import ExpertTensor, MoELayer, MoEModel, find_moe
from moe_specialist.errors import ConfigurationError
from moe_specialist.io import atomic_write_json
from moe_specialist.models import load_config, load_model
from moe_specialist.plan import PLAN_FILE
from moe_specialist.prune import remap_layer, save_pruned_model, structure_from_config, update_config

REPORT_FILE = "serving_export.json"


def padded_slots(layer: MoELayer, count: int, n_group: int) -> list[int | None]:
    """The layer's experts in ``count`` slots, each routing group's own experts first, then its padding (None)."""
    have, want = layer.num_experts // n_group, count // n_group
    return [g * have + i if i < have else None for g in range(n_group) for i in range(want)]


def _never_selected(tensor: ExpertTensor, selection_biases: list[ExpertTensor]) -> float:
    """A padded expert's value in ``tensor``: zero, except in a selection bias."""
    if any(tensor is bias for bias in selection_biases):
        return torch.finfo(tensor.tensor.dtype).min / 2
    return 0.0


def check_exportable(moe: MoEModel, name: str) -> None:
    """Refuse a uniform model (nothing to pad) and a routing that padding cannot leave exact (see the module doc)."""
    counts = set(moe.experts_per_layer.values())
    if len(counts) == 1:
        raise ConfigurationError(
            f"{name} keeps {counts.pop()} experts in every MoE layer: serving engines load it as it is, there is "
            "nothing to export."
        )
    if moe.routing.exact is False or not all(layer.selection_biases for layer in moe.layers):
        why = moe.routing.reason if moe.routing.exact is False else "its router adds no bias to the expert scores"
        raise ConfigurationError(
            f"{name} ({moe.architecture}) cannot be padded exactly to one expert count per layer: {why}, so a padded "
            "expert would be selected, or change the selected experts' weights, on some tokens. Serve it with "
            "transformers (`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`), or prune with "
            "`--pruning_allocation uniform` for a checkpoint that every engine loads."
        )


@dataclass
class SizeCost:
    """What the padding costs: parameters and checkpoint bytes (safetensors files), before and after."""

    experts_before: dict[int, int]
    experts_after: int
    parameters_before: int
    parameters_after: int
    bytes_before: int
    bytes_after: int

    def to_dict(self) -> dict:
        return {
            "experts_per_layer_before": {str(k): v for k, v in self.experts_before.items()},
            "experts_per_layer_after": self.experts_after,
            "padded_experts": self.experts_after * len(self.experts_before) - sum(self.experts_before.values()),
            "parameters": {"before": self.parameters_before, "after": self.parameters_after},
            "bytes": {"before": self.bytes_before, "after": self.bytes_after},
        }

    def summary(self) -> str:
        added = self.parameters_after / self.parameters_before - 1
        return (
            f"padded every MoE layer to {self.experts_after} experts: parameters {self.parameters_before:,} -> "
            f"{self.parameters_after:,} (+{added:.1%}), checkpoint bytes {self.bytes_before:,} -> {self.bytes_after:,}"
        )


def checkpoint_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


def export_for_serving(
    model_dir: str | Path, output_dir: str | Path, overwrite: bool = False, dtype="auto"
) -> SizeCost:
    """Write ``model_dir`` (a non-uniform pruned checkpoint) padded to one expert count per layer into ``output_dir``.

    Checked before any weight is loaded (:func:`check_exportable`); the output may not be, contain or lie inside
    ``model_dir``. The config keeps the input's field names; tokenizer files and the prune plan are copied; the size
    cost is written to ``serving_export.json`` in the output once the checkpoint is in place.
    """
    model_dir = Path(model_dir)
    check_exportable(structure_from_config(load_config(str(model_dir))), str(model_dir))
    model = load_model(str(model_dir), dtype)
    moe = find_moe(model)
    before, parameters_before = moe.experts_per_layer, moe.parameter_counts()["total"]
    count = max(before.values())
    for layer in moe.layers:
        biases = layer.selection_biases
        remap_layer(layer, padded_slots(layer, count, moe.n_group), lambda t, b=biases: _never_selected(t, b))
    update_config(model.config, moe.experts_per_layer, None)
    plan = (
        {PLAN_FILE: (model_dir / PLAN_FILE).read_text(encoding="utf-8")} if (model_dir / PLAN_FILE).is_file() else {}
    )
    save_pruned_model(
        model, output_dir, overwrite=overwrite, extra_files=plan, protected=[model_dir], companions_from=model_dir
    )
    after = moe.parameter_counts()["total"]
    cost = SizeCost(
        before, count, parameters_before, after, checkpoint_bytes(model_dir), checkpoint_bytes(Path(output_dir))
    )
    atomic_write_json(cost.to_dict(), Path(output_dir) / REPORT_FILE)  # it measures the written files
    return cost
