"""Which experts to keep: score experts (a *criterion*), spread a budget over layers (an *allocation*), write a plan.

A :class:`PrunePlan` is the one artefact every later step replays: ``{"kept_experts": {"<decoder layer>": [ids]}}``
plus metadata. It can be written by hand, replayed on the same or a sibling checkpoint (one of another architecture
is refused), and layers it does not list are left untouched.

Budgets are exact: a plan for ratio ``r`` keeps ``round(total * (1 - r))`` experts, the ratio in whole experts,
whatever the allocation and however many experts each layer has. Each layer keeps whole *units* (one expert per
routing group under group-limited routing, so every group keeps the same count) and at least what top-k and
group-limited routing need. A ratio no such per-layer counts add up to is refused, with the nearest ratios that
can be met, rather than met approximately.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch

from moe_specialist import __version__
from moe_specialist.architectures import MoEModel
from moe_specialist.configs import ALLOCATION_NAMES, SELECTION_NAMES, PruningArguments, validate_ratio
from moe_specialist.errors import ConfigurationError, MissingInputError
from moe_specialist.io import atomic_write_json
from moe_specialist.stats import ROLES, RoutingStats

# ---- criteria: RoutingStats -> scores [layer, expert] (higher = keep) -----------------------------------------------
Criterion = Callable[[RoutingStats, "list[str] | None", "list[str] | None", int], torch.Tensor]
CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str):
    def wrap(fn: Criterion) -> Criterion:
        CRITERIA[name] = fn
        return fn

    return wrap


@register_criterion("frequency")
def frequency(stats: RoutingStats, groups, roles, seed: int) -> torch.Tensor:
    """How often the router selects the expert."""
    return stats.select(groups, roles)["count"]


@register_criterion("gate_mass")
def gate_mass(stats: RoutingStats, groups, roles, seed: int) -> torch.Tensor:
    """Total routing weight the model gives the expert's output."""
    return stats.select(groups, roles)["gate_mass"]


@register_criterion("reap")
def reap(stats: RoutingStats, groups, roles, seed: int) -> torch.Tensor:
    """REAP (Lasby et al.): mean over routed tokens of gate weight x expert-output norm."""
    selected = stats.select(groups, roles)
    return selected["reap_sum"] / selected["count"].clamp_min(1)


@register_criterion("output_mass")
def output_mass(stats: RoutingStats, groups, roles, seed: int) -> torch.Tensor:
    """Total router-weighted output the expert adds on the data (sum of g * ||f_e(x)||): frequency x REAP."""
    return stats.select(groups, roles)["reap_sum"]


@register_criterion("random")
def random(stats: RoutingStats, groups, roles, seed: int) -> torch.Tensor:
    """Seeded random scores: the baseline every criterion must beat."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(stats.count.shape[2:], generator=generator, dtype=torch.float64)


@register_criterion("language_aware")
def language_aware(stats: RoutingStats, groups, roles, seed: int) -> torch.Tensor:
    """Router-weighted output mass as a share of each (direction, role) slice, averaged over the slices.

    In early and late layers the source (prompt) and target (completion) tokens of a direction route to different,
    language-specific experts; summing raw mass lets whichever side has more tokens (and any direction with more
    calibration data) decide which language keeps its experts. Normalising each slice per layer gives every language
    side of every direction an equal say, and weighting by output norm keeps the experts that change the residual
    stream most.
    """
    chosen_groups = groups or stats.groups
    chosen_roles = roles or list(ROLES)
    slices = []
    for group in chosen_groups:
        for role in chosen_roles:
            mass = stats.select([group], [role])["reap_sum"]
            total = mass.sum(dim=1, keepdim=True)
            if float(total.sum()) > 0:
                slices.append(mass / total.clamp_min(1e-300))
    if not slices:
        raise ConfigurationError(f"No routed tokens in groups {chosen_groups} and roles {chosen_roles}.")
    return torch.stack(slices).mean(0)


def score_experts(stats: RoutingStats, criterion: str, groups=None, roles=None, seed: int = 0) -> torch.Tensor:
    if criterion not in CRITERIA:
        raise ConfigurationError(f"Unknown criterion {criterion!r}; choose one of {sorted(CRITERIA)}.")
    scores = CRITERIA[criterion](stats, groups, roles, seed).double().clone()
    for position, count in enumerate(stats.num_experts):
        scores[position, count:] = -math.inf  # padding of layers with fewer experts
    return scores


# ---- allocations: how many experts each layer keeps -----------------------------------------------------------------
@dataclass
class Budget:
    """What an allocation must meet: exactly ``keep_total`` experts, each layer a count from :meth:`counts`.

    A budget no choice of per-layer counts adds up to is refused when it is made, naming the nearest that can be met,
    so that no allocation ever lands on another ratio than the one asked for.
    """

    num_experts: list[int]  # per MoE layer
    keep_total: int
    min_keep: int  # per layer: top-k (or the lowered top-k), and what group-limited routing needs
    n_group: int = 1
    min_per_group: int = 1
    layer_costs: torch.Tensor | None = None  # [layer, count]: loss increase when the layer alone keeps ``count``
    top_k: int | None = None  # a lowered top-k the pruned layers will route with (measurements route with it too)

    def __post_init__(self) -> None:
        if self.keep_total not in self.totals():
            raise self._unreachable()

    def counts(self, position: int) -> range:
        """The counts a layer may keep: whole units (one expert per routing group), from the fewest top-k and
        group-limited routing need up to all its experts."""
        n, step = self.num_experts[position], self.n_group
        fewest = max(self.min_keep, self.min_per_group * step)
        return range(min(n, math.ceil(fewest / step) * step), n + 1, step)

    def totals(self) -> range:
        """Every total some choice of per-layer counts adds up to (every layer steps by ``n_group``)."""
        fewest = sum(self.counts(position).start for position in range(len(self.num_experts)))
        return range(fewest, sum(self.num_experts) + 1, self.n_group)

    def _unreachable(self) -> ConfigurationError:
        total, keep, totals = sum(self.num_experts), self.keep_total, self.totals()
        if keep < totals.start:
            groups = f" and {self.min_per_group} in each of {self.n_group} routing groups" if self.n_group > 1 else ""
            reason = f"every MoE layer keeps at least top-k experts{groups}, {totals.start} in all"
        elif keep > total:
            reason = "that is more than there are"
        else:
            reason = (
                f"group-limited routing (n_group={self.n_group}) needs the same count in every group, so each layer "
                f"keeps a multiple of {self.n_group}"
            )
        nearest = [(t, "below") for t in totals if t > keep][:1] + [(t, "above") for t in totals if t < keep][-1:]
        options = " and ".join(f"{1 - t / total:.6g} {side} (keeps {t})" for t, side in nearest)
        lower_top_k = "; or lower top-k explicitly (--pruning_top_k)" if keep < totals.start else ""
        return ConfigurationError(
            f"Keeping {keep} of the {total} routed experts (pruning ratio {1 - keep / total:.6g} in whole experts) is "
            f"not possible: {reason}. The nearest pruning ratio{'s' * (len(nearest) > 1)} that can be met exactly: "
            f"{options}{lower_top_k}."
        )


@dataclass
class KeptSets:
    """Which experts each layer keeps at every count :meth:`Budget.counts` allows, as a *selection* chooses them.

    ``ranked`` (:func:`ranked_sets`) keeps the criterion's best experts; ``greedy`` (:mod:`moe_specialist.selection`)
    measures sets on the model and records, per layer and count, the block reconstruction error of its set and of the
    ranked one (``errors``), so that a plan can say what measuring bought.
    """

    sets: list[dict[int, list[int]]]  # per MoE layer (position): count -> expert ids
    errors: list[dict[int, tuple[float, float]]] = field(default_factory=list)  # count -> (this set's, ranked set's)

    def fingerprint(self) -> str:
        """Identifies the sets, so that measurements made on them are reused (a sweep's ratios share one ranking)."""
        return hashlib.sha256(json.dumps(self.sets).encode()).hexdigest()


def ranked_sets(scores: torch.Tensor, budget: Budget) -> KeptSets:
    """The criterion's best experts at every count (:func:`select_experts`)."""
    sets = [
        {count: select_experts(scores[position, :n], count, budget) for count in budget.counts(position)}
        for position, n in enumerate(budget.num_experts)
    ]
    return KeptSets(sets)


# Measures ``Budget.layer_costs`` for the kept sets of each count (moe_specialist.sensitivity).
LayerCosts = Callable[[KeptSets, Budget], torch.Tensor]
# Chooses kept sets on the model: scores (the criterion's, which break ties), budget, candidates per step.
MeasureKeptSets = Callable[[torch.Tensor, Budget, "int | None"], KeptSets]


@dataclass(frozen=True)
class SearchSettings:
    """What bounds and steers the ``search`` allocation (:mod:`moe_specialist.allocation_search`): seconds, an
    optional cap on evaluations (for plans that do not depend on the machine's speed), the seed of its moves, and the
    weight of the KL on the first target tokens, where the output language is chosen."""

    seconds: float = 60.0
    evaluations: int | None = None
    seed: int = 0
    onset_weight: float = 0.0


def search_settings(args: PruningArguments) -> SearchSettings:
    return SearchSettings(
        args.allocation_search_seconds,
        args.allocation_search_evaluations,
        args.allocation_search_seed,
        args.allocation_search_onset_weight,
    )


# Refines per-layer kept sets on the model: start kept ids per layer, scores, budget, limits -> (kept ids, trace).
SearchAllocation = Callable[[list[list[int]], torch.Tensor, Budget, SearchSettings], "tuple[list[list[int]], dict]"]

GREEDY_NEEDS_THE_MODEL = (
    "pruning_selection greedy measures each MoE block's output on calibration tokens, so it needs the model: it "
    "runs in `moe-specialist sweep` and `python -m moe_specialist.train`, not from a statistics file alone "
    "(`moe-specialist plan`); plan here with --pruning_selection ranked, or choose greedy in a sweep or training "
    "recipe."
)

SEARCH_NEEDS_THE_MODEL = (
    "pruning_allocation search scores candidate plans by pruning the model and measuring its next-token KL to the "
    "unpruned model on calibration tokens, so it needs the model: it runs in `moe-specialist sweep` and `python -m "
    "moe_specialist.train`, not from a statistics file alone (`moe-specialist plan`); plan here with another "
    "allocation (uniform, global or coverage), or choose search in a sweep or training recipe."
)


def _shares(scores: torch.Tensor) -> torch.Tensor:
    """Per-layer normalised scores (non-negative, summing to 1 over a layer's experts)."""
    finite = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
    shifted = finite - finite.min(dim=1, keepdim=True).values.clamp_max(0)
    shifted = torch.where(torch.isfinite(scores), shifted, torch.zeros_like(scores))
    total = shifted.sum(dim=1, keepdim=True)
    uniform = torch.isfinite(scores).double() / torch.isfinite(scores).sum(dim=1, keepdim=True)
    return torch.where(total > 0, shifted / total.clamp_min(1e-300), uniform)


def _fewest(budget: Budget) -> list[int]:
    return [budget.counts(position).start for position in range(len(budget.num_experts))]


def _unit_values(scores: torch.Tensor, budget: Budget) -> list[list[float]]:
    """Per layer, the normalised score each further unit adds: the sum over groups of the u-th best share of each
    group, which is what :func:`select_experts` keeps. Never increasing along a layer."""
    shares = _shares(scores)
    values = []
    for position, n in enumerate(budget.num_experts):
        blocks = shares[position, :n].reshape(budget.n_group, n // budget.n_group)
        values.append(blocks.sort(dim=1, descending=True).values.sum(0).tolist())
    return values


def _fill(values: list[list], counts: list[int], budget: Budget) -> list[int]:
    """Add the most valuable units left, across all layers, to ``counts`` until exactly ``keep_total`` are kept.

    ``values[i][u]`` is what layer i's (u+1)-th unit is worth; as it never increases along a layer, the best units
    overall are a run of next units in each layer. Ties go to the earlier layer.
    """
    step = budget.n_group
    candidates = [
        (value, position, unit)
        for position, layer_values in enumerate(values)
        for unit, value in enumerate(layer_values)
        if unit >= counts[position] // step
    ]
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    counts = list(counts)
    for _, position, _ in candidates[: (budget.keep_total - sum(counts)) // step]:
        counts[position] += step
    return counts


def allocate_uniform(scores: torch.Tensor, budget: Budget) -> list[int]:
    """The same share of every layer's experts, as nearly as whole units allow.

    Webster's rounding: each further unit goes to the layer whose share, counting half of that unit, is lowest, so
    layers of one size keep one count whenever the budget divides evenly, and the first ones keep a unit more when
    it does not; layers of other sizes keep the same share, not the same count.
    """
    values = []
    for n in budget.num_experts:
        units = n // budget.n_group
        values.append([-Fraction(2 * u + 1, 2 * units) for u in range(units)])
    return _fill(values, _fewest(budget), budget)


def allocate_global(scores: torch.Tensor, budget: Budget) -> list[int]:
    """One ranking across layers after per-layer normalisation; every layer keeps at least its fewest."""
    return _fill(_unit_values(scores, budget), _fewest(budget), budget)


def allocate_coverage(scores: torch.Tensor, budget: Budget) -> list[int]:
    """Each layer keeps the fewest units holding a share ``p`` of its mass; ``p`` found by bisection."""
    values = _unit_values(scores, budget)
    cumulative = [torch.tensor(v, dtype=torch.float64).cumsum(0) for v in values]
    fewest = _fewest(budget)

    def counts_at(p: float) -> list[int]:
        return [
            max(low, min(len(cum), int((cum < p - 1e-12).sum().item()) + 1) * budget.n_group)
            for cum, low in zip(cumulative, fewest, strict=True)
        ]

    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if sum(counts_at(middle)) <= budget.keep_total:
            low = middle
        else:
            high = middle
    return _fill(values, counts_at(low), budget)


def allocate_sensitivity(scores: torch.Tensor, budget: Budget) -> list[int]:
    """The counts that minimise the summed per-layer loss increases (``budget.layer_costs``) within the budget.

    Exact dynamic programming over layers and kept totals; layer costs are treated as additive.
    """
    if budget.layer_costs is None:
        raise ConfigurationError(
            "The sensitivity allocation needs measured layer costs (moe_specialist.sensitivity): it runs where the "
            "model and calibration data are at hand (`moe-specialist sweep`, `moe_specialist.train`), not from a "
            "statistics file alone."
        )
    costs = budget.layer_costs.double()
    size = budget.keep_total + 1
    best = torch.full((size,), math.inf, dtype=torch.float64)  # best[t]: least cost of the layers so far keeping t
    best[0] = 0.0
    choices = []
    for position in range(len(budget.num_experts)):
        step = torch.full((size,), math.inf, dtype=torch.float64)
        choice = torch.zeros(size, dtype=torch.long)
        for count in budget.counts(position):
            if count >= size:
                break
            candidate = torch.full((size,), math.inf, dtype=torch.float64)
            candidate[count:] = best[: size - count] + float(costs[position, count])
            better = candidate < step
            step = torch.where(better, candidate, step)
            choice = torch.where(better, torch.full_like(choice, count), choice)
        best = step
        choices.append(choice)
    if math.isinf(best[budget.keep_total]):
        raise ConfigurationError(
            f"The measured layer costs price no per-layer counts that add up to {budget.keep_total} experts (counts "
            "without a cost are infinite): measure the counts the budget allows."
        )
    kept = budget.keep_total
    counts = []
    for choice in reversed(choices):
        counts.append(int(choice[kept]))
        kept -= counts[-1]
    return counts[::-1]


ALLOCATIONS: dict[str, Callable[[torch.Tensor, Budget], list[int]]] = {
    "uniform": allocate_uniform,
    "global": allocate_global,
    "coverage": allocate_coverage,
    "sensitivity": allocate_sensitivity,
}  # and "search": the sensitivity counts refined on the model by make_plan (moe_specialist.allocation_search)


PLAN_FILE = "prune_plan.json"  # the plan's name next to every checkpoint, run and sweep point


# ---- the plan -------------------------------------------------------------------------------------------------------
ARCHITECTURE_KEYS = ("model_type", "architecture")  # what a plan records of the model it was made for


@dataclass
class PrunePlan:
    kept_experts: dict[int, list[int]]
    top_k: int | None = None  # a lowered top-k, or None to keep the model's
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "kept_experts": {str(layer): ids for layer, ids in sorted(self.kept_experts.items())},
            "top_k": self.top_k,
            **self.metadata,
        }

    def save(self, path: str | Path) -> None:
        atomic_write_json(self.to_dict(), path)

    @classmethod
    def from_dict(cls, data: dict, source: str = "plan") -> PrunePlan:
        if not isinstance(data, dict) or not isinstance(data.get("kept_experts"), dict):
            raise ConfigurationError(
                f'{source} is not a prune plan: it needs a "kept_experts" mapping from decoder-layer index to the '
                'expert ids kept, e.g. {"kept_experts": {"0": [1, 4, 7]}}.'
            )
        kept = {}
        for layer, ids in data["kept_experts"].items():
            if not (_is_integer(layer) or (isinstance(layer, str) and layer.isdigit())):
                raise ConfigurationError(f"{source}: layer key {layer!r} is not a decoder-layer index.")
            if not isinstance(ids, list) or not all(_is_integer(i) for i in ids):
                raise ConfigurationError(
                    f"{source}: layer {layer} must map to a list of expert ids (integers, not booleans), got {ids!r}."
                )
            if len(set(ids)) != len(ids):
                raise ConfigurationError(f"{source}: layer {layer} lists an expert twice: {ids}.")
            kept[int(layer)] = sorted(ids)
        top_k = data.get("top_k")
        if top_k is not None and (not _is_integer(top_k) or top_k < 1):
            raise ConfigurationError(f"{source}: 'top_k' must be a positive integer or null, got {top_k!r}.")
        metadata = {k: v for k, v in data.items() if k not in ("kept_experts", "top_k")}
        if "pruning_ratio" in metadata:  # the target's name in plans written before target_ratio / actual_ratio
            metadata.setdefault("target_ratio", metadata.pop("pruning_ratio"))
        return cls(kept, top_k, metadata)

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"No prune plan at {path}; create one with `moe-specialist plan`.")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigurationError(f"{path} is not valid JSON: {error}.") from error
        return cls.from_dict(data, str(path))

    def experts_after(self, moe: MoEModel) -> dict[int, int]:
        """How many experts every MoE layer keeps (layers the plan does not list keep all)."""
        return {layer: len(self.kept_experts.get(layer, range(n))) for layer, n in moe.experts_per_layer.items()}

    def validate(self, moe: MoEModel) -> None:
        """A clear error for any architecture, layer, expert or count the model cannot take."""
        model = {"model_type": moe.model_type, "architecture": moe.architecture}
        recorded = {key: self.metadata[key] for key in ARCHITECTURE_KEYS if self.metadata.get(key) is not None}
        if any(model[key] != value for key, value in recorded.items()):
            raise ConfigurationError(
                f"The plan was made for {_describe(recorded)}, not for this model ({_describe(model)}): expert ids "
                "and routing groups do not carry over between architectures, even with the same expert counts. "
                "Make a plan for this model (`moe-specialist plan`)."
            )
        counts = moe.experts_per_layer
        recorded_counts = {int(k): v for k, v in (self.metadata.get("num_experts") or {}).items()}
        differing = {k: (v, counts.get(k)) for k, v in recorded_counts.items() if counts.get(k) != v}
        if differing:
            raise ConfigurationError(
                f"The plan was made for a model with other expert counts (layer: plan's, this model's): {differing}; "
                "make a plan for this model."
            )
        top_k = self.top_k or moe.top_k
        if self.top_k is not None and not 1 <= self.top_k <= moe.top_k:
            raise ConfigurationError(f"Plan top_k={self.top_k} must be between 1 and the model's top-k ({moe.top_k}).")
        for layer, ids in self.kept_experts.items():
            if layer not in counts:
                raise ConfigurationError(
                    f"The plan names decoder layer {layer}, which is not an MoE layer of {moe.architecture}; MoE "
                    f"layers are {moe.layer_indices}."
                )
            bad = [i for i in ids if not 0 <= i < counts[layer]]
            if bad:
                raise ConfigurationError(f"Layer {layer} has experts 0..{counts[layer] - 1}; the plan names {bad}.")
            if len(ids) < top_k:
                raise ConfigurationError(
                    f"Layer {layer} would keep {len(ids)} experts, fewer than top-k={top_k}: every token needs "
                    f"{top_k} experts. Keep more experts or lower top-k explicitly (plan 'top_k')."
                )
            if moe.n_group > 1:
                check_groups(ids, counts[layer], moe.n_group, layer)


def _is_integer(value) -> bool:
    """JSON integers only: ``True`` is an ``int`` in Python, but no expert id, layer or top-k."""
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(architecture: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in architecture.items())


def check_groups(ids: list[int], num_experts: int, n_group: int, layer: int) -> None:
    """Group-limited routers index groups as contiguous blocks: each must keep the same number of experts."""
    size = num_experts // n_group
    per_group = [sum(1 for i in ids if i // size == g) for g in range(n_group)]
    if len(set(per_group)) != 1:
        raise ConfigurationError(
            f"Layer {layer} uses group-limited routing (n_group={n_group}); every group must keep the same number "
            f"of experts, but the plan keeps {per_group} per group."
        )


def make_plan(
    moe: MoEModel,
    stats: RoutingStats,
    ratio: float,
    criterion: str = "frequency",
    allocation: str = "uniform",
    groups: list[str] | None = None,
    roles: list[str] | None = None,
    top_k: int | None = None,
    seed: int = 0,
    measure_layer_costs: LayerCosts | None = None,
    checkpoint: str | Path | None = None,
    selection: str = "ranked",
    selection_candidates: int | None = None,
    measure_kept_sets: MeasureKeptSets | None = None,
    search_allocation: SearchAllocation | None = None,
    search: SearchSettings = SearchSettings(),
) -> PrunePlan:
    """Keep the experts ``selection`` chooses (the best-scored under ``criterion``, or ``greedy`` sets measured on the
    model), as many per layer as ``allocation`` spreads the budget.

    The plan keeps exactly ``round(total * (1 - ratio))`` experts (the ratio in whole experts), or :class:`Budget`
    refuses the ratio with the nearest ones that can be met. ``measure_layer_costs`` and ``measure_kept_sets``
    (:func:`moe_specialist.sensitivity.layer_cost_meter` and its ``greedy_sets``) measure on the model: the costs the
    ``sensitivity`` allocation minimises, of the sets the layers will keep, and the ``greedy`` sets;
    ``search_allocation`` (its ``search_allocation``) refines the sensitivity plan within ``search`` for the
    ``search`` allocation.
    """
    validate_ratio(ratio)
    if selection not in SELECTION_NAMES:
        raise ConfigurationError(f"Unknown selection {selection!r}; choose one of {list(SELECTION_NAMES)}.")
    if selection == "greedy" and measure_kept_sets is None:
        raise ConfigurationError(GREEDY_NEEDS_THE_MODEL)
    if allocation not in ALLOCATION_NAMES:
        raise ConfigurationError(f"Unknown allocation {allocation!r}; choose one of {sorted(ALLOCATION_NAMES)}.")
    if allocation == "search" and (search_allocation is None or measure_layer_costs is None):
        raise ConfigurationError(SEARCH_NEEDS_THE_MODEL)
    stats.validate_for(moe, checkpoint)  # a model on the meta device: routers read from the checkpoint
    if top_k is not None and not 1 <= top_k <= moe.top_k:
        raise ConfigurationError(f"top_k={top_k} must be between 1 and the model's top-k ({moe.top_k}).")
    groups = groups or stats.direction_groups()
    scores = score_experts(stats, criterion, groups, roles, seed)
    num_experts = stats.num_experts
    min_keep = top_k or moe.top_k
    min_per_group = 1
    if moe.n_group > 1:
        topk_group = _topk_group(moe)
        min_per_group = max(2, math.ceil(min_keep / topk_group))
        min_keep = max(min_keep, min_per_group * moe.n_group)
    total = sum(num_experts)
    budget = Budget(num_experts, round(total * (1 - ratio)), min_keep, moe.n_group, min_per_group, top_k=top_k)
    if selection == "greedy":
        sets = measure_kept_sets(scores, budget, selection_candidates)
    else:
        sets = ranked_sets(scores, budget)
    if allocation in ("sensitivity", "search") and measure_layer_costs is not None:
        budget.layer_costs = measure_layer_costs(sets, budget)
    counts = ALLOCATIONS["sensitivity" if allocation == "search" else allocation](scores, budget)
    kept_ids = [sets.sets[position][count] for position, count in enumerate(counts)]
    trace = None
    if allocation == "search":
        kept_ids, trace = search_allocation(kept_ids, scores, budget, search)
        counts = [len(ids) for ids in kept_ids]
    kept = dict(zip(stats.layers, kept_ids, strict=True))
    plan = PrunePlan(
        kept,
        top_k,
        {
            "target_ratio": ratio,
            "actual_ratio": round(1 - sum(counts) / total, 6),
            "criterion": criterion,
            "allocation": allocation,
            "selection": selection,
            **(_selection_metadata(sets, stats.layers, kept_ids, selection_candidates) if sets.errors else {}),
            **({"allocation_search": trace} if trace is not None else {}),
            "groups": groups,
            "roles": roles,
            "seed": seed,
            "model": stats.metadata.get("model"),
            "config_hash": stats.metadata.get("config_hash"),
            "model_type": moe.model_type,
            "architecture": moe.architecture,
            "num_experts": {str(layer): n for layer, n in zip(stats.layers, num_experts, strict=True)},
            **({"layer_costs": _json_costs(budget.layer_costs)} if budget.layer_costs is not None else {}),
            "created_by": f"moe-specialist {__version__}",
        },
    )
    plan.validate(moe)
    return plan


def _selection_metadata(sets: KeptSets, layers: list[int], kept_ids: list[list[int]], candidates: int | None) -> dict:
    """What a measured selection bought: per layer, the block reconstruction error (mean squared error against the
    unpruned block on the calibration tokens) of the kept experts and of the criterion's best as many (layers whose
    set the allocation search changed have no measured error, and are left out)."""
    errors = {}
    for position, (layer, ids) in enumerate(zip(layers, kept_ids, strict=True)):
        if sets.sets[position][len(ids)] != ids:
            continue
        kept, ranked = sets.errors[position][len(ids)]
        errors[str(layer)] = {"kept": float(f"{kept:.6g}"), "ranked": float(f"{ranked:.6g}")}
    return {"selection_candidates": candidates, "reconstruction_error": errors}


def _json_costs(costs: torch.Tensor) -> list[list[float | None]]:
    """Layer costs for the plan file: strict JSON, ``null`` where a count is not allowed."""
    return [[None if math.isinf(v) else round(v, 5) for v in row] for row in costs.tolist()]


def _topk_group(moe: MoEModel) -> int:
    """How many routing groups a group-limited router picks per token (every group when the config does not say)."""
    from moe_specialist.architectures import TOPK_GROUP_FIELDS, text_config

    config = text_config(moe.model.config)
    for name in TOPK_GROUP_FIELDS:
        if getattr(config, name, None) is not None:
            return int(getattr(config, name))
    return moe.n_group


def select_experts(scores: torch.Tensor, count: int, budget: Budget) -> list[int]:
    """The ``count`` best experts of a layer: the ``count / n_group`` best of every routing group.

    ``count`` must be one of :meth:`Budget.counts` (a whole number of units): a count that is not would have to be
    rounded, and the plan would miss its budget.
    """
    per_group, remainder = divmod(count, budget.n_group)
    if remainder or count > len(scores):
        raise ValueError(
            f"A layer of {len(scores)} experts in {budget.n_group} routing group(s) cannot keep {count}: "
            f"group-limited routing keeps the same count in every group (a multiple of {budget.n_group})."
        )
    blocks = scores.reshape(budget.n_group, -1)
    offsets = torch.arange(budget.n_group).unsqueeze(1) * blocks.shape[1]
    return sorted((blocks.topk(per_group, dim=1).indices + offsets).flatten().tolist())


def plan_for(
    moe: MoEModel,
    stats: RoutingStats | None,
    args: PruningArguments,
    measure_layer_costs: LayerCosts | None = None,
    checkpoint: str | Path | None = None,
    measure_kept_sets: MeasureKeptSets | None = None,
    search_allocation: SearchAllocation | None = None,
) -> PrunePlan:
    """Replay ``args.prune_plan`` if given, else plan from ``stats`` with the arguments' criterion and allocation
    (``checkpoint``: the directory of a model built on the meta device, whose routers the statistics are checked
    against; ``measure_layer_costs``, ``measure_kept_sets`` and ``search_allocation`` measure on the model, e.g. a
    :class:`~moe_specialist.sensitivity.ModelMeter` and its methods)."""
    if args.prune_plan:
        plan = PrunePlan.load(args.prune_plan)
        plan.validate(moe)
        return plan
    if stats is None:
        raise ConfigurationError("Planning needs routing statistics (calibrate first) or a plan file (--prune_plan).")
    plan = make_plan(
        moe,
        stats,
        args.pruning_ratio,
        criterion=args.pruning_criterion,
        allocation=args.pruning_allocation,
        groups=args.pruning_groups,
        roles=args.pruning_roles,
        top_k=args.pruning_top_k,
        seed=args.pruning_seed,
        measure_layer_costs=measure_layer_costs,
        checkpoint=checkpoint,
        selection=args.pruning_selection,
        selection_candidates=args.selection_candidates,
        measure_kept_sets=measure_kept_sets,
        search_allocation=search_allocation,
        search=search_settings(args),
    )
    plan.metadata.setdefault("statistics", args.statistics_file)
    return plan
