"""What a sweep's grid is: its arguments (ratios x methods, the SFT points) and the points they name."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_specialist.errors import ConfigurationError


@dataclass
class SweepArguments:
    ratios: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.625, 0.75, 0.875], metadata={"help": "Pruning ratios to sweep."}
    )
    criteria: list[str] | None = field(
        default=None,
        metadata={
            "help": "Methods to compare: a criterion, criterion@allocation (e.g. frequency@coverage), and "
            "+compensation after it (e.g. gate_mass@search+refit, or +none); default: the recipe's "
            "pruning_criterion with its pruning_allocation and compensation."
        },
    )
    random_seeds: int = field(default=3, metadata={"help": "Seeds of the random baseline (reported as their mean)."})
    sft_at: list[float] | None = field(default=None, metadata={"help": "Ratios that also get the short recovery SFT."})
    sft_criteria: list[str] | None = field(
        default=None, metadata={"help": "Criteria that get the SFT at sft_at ratios (default: the first criterion)."}
    )
    heatmap_ratio: float = field(default=0.75, metadata={"help": "Ratio whose kept experts the heat map marks."})

    def __post_init__(self):
        """Refuse a bad grid when the arguments are parsed, before the sweep loads and calibrates the model."""
        from moe_specialist.configs import (
            PruningArguments,
            check_field_types,
            check_minimum,
            check_ratios,
            normalize_lists,
        )

        normalize_lists(self)
        check_field_types(self)
        check_minimum(self, 1, "random_seeds")
        check_ratios(self, "ratios", "sft_at")
        if not self.ratios:
            raise ConfigurationError("--ratios is empty: give e.g. 0,0.5,0.75.")
        missing = [r for r in self.sft_at or [] if r not in self.ratios]
        if missing:
            raise ConfigurationError(f"--sft_at ratios {missing} are not among --ratios {self.ratios}.")
        for method in [*(self.criteria or []), *(self.sft_criteria or [])]:
            # only the method's own names: PruningArguments checks the recipe's defaults, which fill in the rest
            split_method(method, PruningArguments.pruning_allocation, PruningArguments.compensation)


def _parts(method: str) -> tuple[str, str, str]:
    """``criterion@allocation+compensation`` as written: what a method leaves out is ''."""
    method, _, compensation = method.partition("+")
    criterion, _, allocation = method.partition("@")
    return criterion, allocation, compensation


def split_method(method: str, default_allocation: str, default_compensation: str) -> tuple[str, str, str]:
    """``criterion@allocation+compensation`` -> (criterion, allocation, compensation); what a method leaves out
    takes the recipe's value."""
    from moe_specialist.configs import ALLOCATION_NAMES, COMPENSATION_NAMES
    from moe_specialist.plan import CRITERIA

    criterion, allocation, compensation = _parts(method)
    allocation, compensation = allocation or default_allocation, compensation or default_compensation
    if criterion not in CRITERIA:
        raise ConfigurationError(f"Unknown criterion {criterion!r} in --criteria; choose among {sorted(CRITERIA)}.")
    if allocation not in ALLOCATION_NAMES:
        raise ConfigurationError(
            f"Unknown allocation {allocation!r} in --criteria; choose among {sorted(ALLOCATION_NAMES)}."
        )
    if compensation not in COMPENSATION_NAMES:
        raise ConfigurationError(
            f"Unknown compensation {compensation!r} in --criteria; choose among {list(COMPENSATION_NAMES)}."
        )
    return criterion, allocation, compensation


def method_name(criterion: str, allocation: str, compensation: str) -> str:
    """The canonical name of a method (a point's id names it): ``criterion@allocation``, then ``+compensation``
    unless it is none (so that sweeps without compensation keep their point ids)."""
    return f"{criterion}@{allocation}" + (f"+{compensation}" if compensation != "none" else "")


@dataclass(frozen=True)
class Point:
    target_ratio: float  # what the plan is asked for; its actual_ratio is in the point's result
    criterion: str
    seed: int
    sft: bool

    @property
    def method(self) -> tuple[str, str, str]:
        """``(criterion, allocation, compensation)`` of the point's canonical method name (:func:`method_name`)."""
        criterion, allocation, compensation = _parts(self.criterion)
        return criterion, allocation, compensation or "none"

    @property
    def id(self) -> str:
        seed = f"-s{self.seed}" if self.criterion.startswith("random") else ""
        method = self.criterion.replace("@", "-").replace("+", "-")
        return f"r{self.target_ratio:.3f}-{method}{seed}{'-sft' if self.sft else ''}"


def sweep_points(
    args: SweepArguments, default_criterion: str, seed: int, default_allocation: str, default_compensation: str
) -> list[Point]:
    """The grid of ratios x methods; ``args`` checked their own values when built (see SweepArguments)."""
    sft_at = args.sft_at or []

    def canonical(method: str) -> str:  # a point's id (and so its reuse on resume) names the whole method
        return method_name(*split_method(method, default_allocation, default_compensation))

    criteria = list(dict.fromkeys(canonical(m) for m in args.criteria or [default_criterion]))  # one point each
    sft_criteria = [canonical(m) for m in args.sft_criteria or []]
    sft_criteria = sft_criteria or criteria[:1]
    unknown = [c for c in sft_criteria if c not in criteria]
    if unknown:
        raise ConfigurationError(f"--sft_criteria {unknown} are not among --criteria {criteria}.")
    points = []
    for ratio in args.ratios:
        for criterion in criteria:
            if ratio == 0 and criterion != criteria[0]:
                continue  # nothing is pruned: one baseline serves every criterion
            is_random = criterion.startswith("random@")
            seeds = range(args.random_seeds) if is_random and ratio > 0 else [seed]
            for s in seeds:
                points.append(Point(ratio, criterion, s, False))
                if ratio in sft_at and criterion in sft_criteria:
                    points.append(Point(ratio, criterion, s, True))
    return points
