"""Routing statistics: per group x role x MoE layer x expert sums, collected on routed tokens only.

Three sums per (group, role, layer, expert), all mergeable by addition (files from several runs, processes or data
shards merge exactly):

- ``count``: how many tokens selected the expert;
- ``gate_mass``: the routing weight the model applied to the expert's output, summed over those tokens;
- ``reap_sum``: the router-weighted norm of the expert's output, ``g * ||f_e(x)||`` (REAP = ``reap_sum / count``).

Per-expert outputs come from an experts implementation registered in transformers' ``ExpertsInterface``: it runs
each expert only on the tokens routed to it (REAP's dense observer costs E/k times the MoE compute) and feeds the
statistics before weighting. Tokens are labelled with a *group* (e.g. a direction ``en-fr`` or ``general``) and a
*role* (``source`` = prompt tokens, ``target`` = completion tokens); padding is never counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moe_specialist import __version__
from moe_specialist.architectures import MoEModel, text_config
from moe_specialist.compat import experts_implementation, original_key_names
from moe_specialist.errors import ConfigurationError, MissingInputError
from moe_specialist.io import INDEX_FILE, atomic_path, atomic_write_json, read_weight_map, safe_child

logger = logging.getLogger(__name__)

ROLES = ("source", "target")
METRICS = ("count", "gate_mass", "reap_sum")
PROBE_IMPLEMENTATION = "moe_specialist_probe"
IGNORE = -1
_CONFIG_KEYS_IGNORED = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "architectures",
    "_experts_implementation",
    "output_router_logits",
    "use_cache",
    "auto_map",
}


class StatisticsMismatchError(ConfigurationError):
    """Statistics that do not describe the model or the other statistics they are used with."""


def config_hash(config) -> str:
    """Hash of the model config, without fields that do not change the network (paths, dtype, versions)."""
    data = {k: v for k, v in text_config(config).to_dict().items() if k not in _CONFIG_KEYS_IGNORED}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _router_weights(moe: MoEModel) -> list[tuple[str, torch.Tensor]]:
    """(parameter name, tensor) of each MoE layer's router weight, in layer order."""
    return [
        next((t.path, t.tensor) for t in layer.tensors if t.module in set(layer.router.modules()))
        for layer in moe.layers
    ]


def _fingerprint(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def router_fingerprint(moe: MoEModel) -> str:
    """Hash of every router's weights: tells the model these statistics were collected on from a retrained one."""
    return _fingerprint([tensor for _, tensor in _router_weights(moe)])


def checkpoint_router_fingerprint(moe: MoEModel, checkpoint: str | Path) -> str:
    """:func:`router_fingerprint` of the weights in a safetensors checkpoint, for a model built on the meta device.

    Only the router tensors are read, whatever the checkpoint's size.
    """
    checkpoint = Path(checkpoint)
    names = original_key_names(moe.model, [name for name, _ in _router_weights(moe)])
    weight_map = read_weight_map(checkpoint)
    tensors = []
    for name, original in names.items():
        key = original if original in weight_map or not weight_map else name
        shard = safe_child(checkpoint, weight_map.get(key, "model.safetensors"), f"shard of {key} in {INDEX_FILE}")
        with safe_open(str(shard), framework="pt") as f:
            if key not in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                key = name  # a checkpoint saved in the in-memory format
            tensors.append(f.get_tensor(key))
    return _fingerprint(tensors)


@dataclass
class RoutingStats:
    """Sums over tokens, shaped [group, role, layer, expert]; layers with fewer experts are zero-padded."""

    groups: list[str]
    layers: list[int]
    num_experts: list[int]
    count: torch.Tensor
    gate_mass: torch.Tensor
    reap_sum: torch.Tensor
    tokens: torch.Tensor  # [group, role]: tokens counted
    metadata: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, groups: list[str], layers: list[int], num_experts: list[int], metadata: dict | None = None):
        if len(set(groups)) != len(groups):
            raise ConfigurationError(f"Duplicate statistics groups: {groups}.")
        shape = (len(groups), len(ROLES), len(layers), max(num_experts))
        zeros = lambda: torch.zeros(shape, dtype=torch.float64)  # noqa: E731
        return cls(
            list(groups),
            list(layers),
            list(num_experts),
            zeros(),
            zeros(),
            zeros(),
            torch.zeros(len(groups), len(ROLES), dtype=torch.float64),
            dict(metadata or {}),
        )

    # ---- combining ---------------------------------------------------------------------------------------------
    def check_compatible(self, other: RoutingStats) -> None:
        if self.layers != other.layers or self.num_experts != other.num_experts:
            raise StatisticsMismatchError(
                f"Statistics describe different MoE structures: layers {self.layers} with experts "
                f"{self.num_experts} vs layers {other.layers} with experts {other.num_experts}."
            )
        for key in ("config_hash", "router_fingerprint"):
            mine, theirs = self.metadata.get(key), other.metadata.get(key)
            if mine and theirs and mine != theirs:
                raise StatisticsMismatchError(
                    f"Statistics come from different models ({key} {mine} vs {theirs}); merge only statistics of "
                    "the same model."
                )

    def merge(self, other: RoutingStats) -> RoutingStats:
        """Exact union: the same as one pass over both data sets (groups are matched by name)."""
        self.check_compatible(other)
        groups = list(dict.fromkeys(self.groups + other.groups))
        merged = RoutingStats.empty(groups, self.layers, self.num_experts, self.metadata)
        for source in (self, other):
            index = torch.tensor([groups.index(g) for g in source.groups])
            for name in (*METRICS, "tokens"):
                getattr(merged, name).index_add_(0, index, getattr(source, name))
        merged.metadata["data"] = _merge_data_descriptions(self.metadata.get("data"), other.metadata.get("data"))
        return merged

    def direction_groups(self) -> list[str]:
        """Translation-direction groups (``en-fr``), leaving out monolingual ones; all groups if there are none."""
        directions = [g for g in self.groups if "-" in g]
        return directions or list(self.groups)

    def select(self, groups: list[str] | None = None, roles: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Sum each metric over the chosen groups and roles: ``{metric: [layer, expert]}`` (and ``tokens``)."""
        g_index = self._group_index(groups)
        r_index = self._role_index(roles)
        out = {name: getattr(self, name)[g_index][:, r_index].sum((0, 1)) for name in METRICS}
        out["tokens"] = self.tokens[g_index][:, r_index].sum()
        return out

    def _group_index(self, groups: list[str] | None) -> torch.Tensor:
        if groups is None:
            return torch.arange(len(self.groups))
        missing = [g for g in groups if g not in self.groups]
        if missing:
            raise StatisticsMismatchError(
                f"No statistics for group(s) {missing}; the file has {self.groups}. Calibrate on those directions "
                "or choose among the available groups."
            )
        return torch.tensor([self.groups.index(g) for g in groups])

    @staticmethod
    def _role_index(roles: list[str] | None) -> torch.Tensor:
        if roles is None:
            return torch.arange(len(ROLES))
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise ConfigurationError(f"Unknown token role(s) {unknown}; roles are {list(ROLES)}.")
        return torch.tensor([ROLES.index(r) for r in roles])

    def validate_for(self, moe: MoEModel, checkpoint: str | Path | None = None) -> None:
        """Refuse statistics collected on a model with a different MoE structure or other router weights.

        A model on the meta device has no weights: its routers are read from ``checkpoint`` (its directory) when
        given, and the router check is skipped with a warning otherwise.
        """
        if self.layers != moe.layer_indices or self.num_experts != [layer.num_experts for layer in moe.layers]:
            raise StatisticsMismatchError(
                f"These statistics describe MoE layers {self.layers} with {self.num_experts} experts, but the model "
                f"{moe.architecture} has layers {moe.layer_indices} with "
                f"{[layer.num_experts for layer in moe.layers]} experts: calibrate this model."
            )
        fingerprint = self.metadata.get("router_fingerprint")
        if fingerprint:
            if moe.model.device.type != "meta":
                actual = router_fingerprint(moe)
            elif checkpoint is not None:
                actual = checkpoint_router_fingerprint(moe, checkpoint)
            else:
                actual = fingerprint
                logger.warning("The model's weights are not at hand: the statistics' router weights are not checked.")
            if actual != fingerprint:
                raise StatisticsMismatchError(
                    "These statistics were collected on a model with other router weights (same architecture, "
                    "another checkpoint, or the same one in another dtype): calibrate this model again, or delete "
                    "the stale statistics file."
                )
        ours = self.metadata.get("config_hash")
        if ours and ours != config_hash(moe.model.config):
            logger.warning(
                "Statistics were collected on a model with another config (hash %s); the MoE structure matches, so "
                "they are used (e.g. a sibling checkpoint).",
                ours,
            )

    # ---- files -------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """One safetensors file (tensors + JSON metadata), plus a readable JSON summary next to it."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ConfigurationError(
                f"Statistics files end in .safetensors (the .json next to them is a summary): {path}."
            )
        header = {
            "groups": self.groups,
            "layers": self.layers,
            "num_experts": self.num_experts,
            "roles": list(ROLES),
            **self.metadata,
        }
        tensors = {name: getattr(self, name).contiguous() for name in (*METRICS, "tokens")}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"moe_specialist": json.dumps(header)})
        atomic_write_json({**header, "tokens": self.token_table()}, path.with_suffix(".json"))

    @classmethod
    def load(cls, path: str | Path) -> RoutingStats:
        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"No statistics file at {path}; create one with `moe-specialist calibrate`.")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})["moe_specialist"])
                tensors = {name: f.get_tensor(name) for name in (*METRICS, "tokens")}
        except Exception as error:  # safetensors raises several types for truncated or foreign files
            raise StatisticsMismatchError(
                f"{path} is not a moe-specialist statistics file or is corrupt ({error}); recreate it with "
                "`moe-specialist calibrate`."
            ) from error
        groups, layers, num_experts = header.pop("groups"), header.pop("layers"), header.pop("num_experts")
        header.pop("roles", None)
        return cls(groups, layers, num_experts, **tensors, metadata=header)

    def token_table(self) -> dict[str, dict[str, int]]:
        return {g: {r: int(self.tokens[i, j]) for j, r in enumerate(ROLES)} for i, g in enumerate(self.groups)}


def _merge_data_descriptions(a, b):
    items = [x for x in (a, b) if x]
    flat = []
    for x in items:
        flat.extend(x if isinstance(x, list) else [x])
    return flat or None


class RoutingCollector:
    """Collects :class:`RoutingStats` during forward passes of ``moe.model``.

    Use as a context manager; before each forward, call :meth:`label` with per-token group and role ids
    (``IGNORE`` for padding). The experts implementation is swapped for the probe inside the context and restored
    after it.
    """

    _active: dict[int, tuple[RoutingCollector, int]] = {}

    def __init__(self, moe: MoEModel, groups: list[str], metadata: dict | None = None):
        self.moe = moe
        self.stats = RoutingStats.empty(
            groups,
            moe.layer_indices,
            [layer.num_experts for layer in moe.layers],
            {
                "config_hash": config_hash(moe.model.config),
                "router_fingerprint": router_fingerprint(moe),
                "top_k": moe.top_k,
                "library_version": __version__,
                **(metadata or {}),
            },
        )
        self._labels: torch.Tensor | None = None
        self._hooks: list = []
        self._previous_implementation = None
        self._llama4_routing: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- labelling --------------------------------------------------------------------------------------------
    def label(self, group_ids: torch.Tensor, role_ids: torch.Tensor) -> None:
        """Per-token labels of the next forward pass, shaped like ``input_ids``."""
        labels = group_ids * len(ROLES) + role_ids
        labels[(group_ids < 0) | (role_ids < 0)] = IGNORE
        self._labels = labels.reshape(-1)
        valid = self._labels[self._labels >= 0]
        self.stats.tokens.view(-1).index_add_(0, valid.cpu(), torch.ones(valid.numel(), dtype=torch.float64))

    def _token_labels(self, num_tokens: int) -> torch.Tensor:
        if self._labels is None or self._labels.numel() != num_tokens:
            raise RuntimeError(
                "RoutingCollector saw an MoE forward pass over tokens that were not labelled: call "
                "collector.label(group_ids, role_ids) with tensors shaped like input_ids before each forward."
            )
        return self._labels

    # -- accumulation ------------------------------------------------------------------------------------------
    def _accumulate(self, position: int, experts: torch.Tensor, weights: torch.Tensor, norms: torch.Tensor) -> None:
        """Add (token, expert) pairs of one layer: ``experts``, ``weights`` and ``norms`` shaped [tokens, k]."""
        num_tokens, k = experts.shape
        labels = self._token_labels(num_tokens).to(experts.device).repeat_interleave(k)
        valid = labels >= 0
        groups, width = len(self.stats.groups), self.stats.count.shape[-1]
        flat = (labels[valid] * width + experts.reshape(-1)[valid]).cpu()
        g = weights.reshape(-1)[valid].detach().double().cpu()
        n = norms.reshape(-1)[valid].detach().double().cpu()
        for name, values in (("count", torch.ones_like(g)), ("gate_mass", g), ("reap_sum", g * n)):
            increment = torch.bincount(flat, weights=values, minlength=groups * len(ROLES) * width)
            getattr(self.stats, name)[:, :, position] += increment.view(groups, len(ROLES), width)

    def _probe(self, experts_module: nn.Module, hidden: torch.Tensor, top_k_index, top_k_weights) -> torch.Tensor:
        """Experts forward that sees each (token, expert) output before weighting; same result as grouped_mm."""
        num_tokens, k = top_k_index.shape
        pair_hidden = hidden.repeat_interleave(k, dim=0)
        pair_index = top_k_index.reshape(-1, 1)
        ones = torch.ones_like(top_k_weights.reshape(-1, 1))
        from transformers.integrations.moe import grouped_mm_experts_forward

        outputs = grouped_mm_experts_forward(experts_module, pair_hidden, pair_index, ones)  # [T*k, H]
        norms = outputs.float().norm(dim=-1).view(num_tokens, k)
        self._accumulate(self._active[id(experts_module)][1], top_k_index, top_k_weights, norms)
        weighted = outputs * top_k_weights.reshape(-1, 1).to(outputs.dtype)
        return weighted.view(num_tokens, k, -1).sum(dim=1).to(hidden.dtype)

    # -- context -----------------------------------------------------------------------------------------------
    def __enter__(self) -> RoutingCollector:
        model = self.moe.model
        for position, layer in enumerate(self.moe.layers):
            RoutingCollector._active[id(layer.experts)] = (self, position)
        if self.moe.decorated:
            self._previous_implementation = experts_implementation(model)
            register_probe()
            model.set_experts_implementation(PROBE_IMPLEMENTATION)
        else:
            for position, layer in enumerate(self.moe.layers):
                self._hooks.append(layer.router.register_forward_hook(self._llama4_router_hook(position)))
                self._hooks.append(layer.experts.register_forward_hook(self._llama4_experts_hook(position)))
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.moe.layers:
            RoutingCollector._active.pop(id(layer.experts), None)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._previous_implementation is not None:
            self.moe.model.set_experts_implementation(self._previous_implementation)
            self._previous_implementation = None

    # Llama-4 is not decorated: its router output (sigmoid scores of the top-k logits, 0 elsewhere) scales the
    # *input* of every expert, so the contribution of a routed expert is f_e(s * x); REAP there is ||f_e(s * x)||.
    def _llama4_router_hook(self, position: int):
        def hook(module, inputs, output):
            scores, logits = output
            index = logits.topk(self.moe.top_k, dim=-1).indices
            self._llama4_routing[position] = (index, scores.gather(1, index))

        return hook

    def _llama4_experts_hook(self, position: int):
        def hook(module, inputs, output):
            index, weights = self._llama4_routing.pop(position)
            per_expert = output.view(module.num_experts, index.shape[0], -1).float().norm(dim=-1)  # [E, T]
            contribution = per_expert.t().gather(1, index)
            # count and gate mass as for other routers; reap_sum = contribution norm (already scaled by s)
            safe = weights.clamp_min(1e-12)
            self._accumulate(position, index, weights, contribution / safe.float())

        return hook


def _probe_entry(self, hidden_states, top_k_index, top_k_weights):
    collector, _ = RoutingCollector._active[id(self)]
    return collector._probe(self, hidden_states, top_k_index, top_k_weights)


def register_probe() -> None:
    """Register the probe as an experts implementation of transformers, on first use: importing
    ``transformers.integrations.moe`` costs seconds that commands which never calibrate (``prune``) should not pay."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(PROBE_IMPLEMENTATION, _probe_entry)
