"""Argument dataclasses shared by the CLI, the recipes (``TrlParser``) and the sweep: one name per knob.

Every field is a flat, top-level scalar so that a recipe key, a CLI flag and a W&B sweep parameter are the same
thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_specialist.errors import ConfigurationError


def split_list(value: str | list[str] | None) -> list[str] | None:
    """``"en-fr, de-en"`` -> ``["en-fr", "de-en"]``; lists pass through; None and "" give None."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    items = [item.strip() for item in items if item.strip()]
    return items or None


@dataclass
class CalibrationArguments:
    calibration_dataset: str = field(
        default="bible", metadata={"help": "bible, a local file (TSV/JSONL) or glob. Never a test set."}
    )
    calibration_directions: str = field(
        default="en-fr", metadata={"help": "Comma-separated directions, each a statistics group (e.g. en-fr,de-en)."}
    )
    calibration_split: str = field(default="train")
    calibration_examples: int = field(default=256, metadata={"help": "Examples per direction."})
    calibration_general_languages: str | None = field(
        default=None,
        metadata={"help": "Languages whose monolingual text is also calibrated, one group each (e.g. en,fr)."},
    )
    calibration_batch_size: int = field(default=16)
    calibration_max_length: int = field(default=512)
    calibration_seed: int = field(default=0)
    statistics_file: str | None = field(
        default=None, metadata={"help": "Statistics to reuse (skips calibration when the file exists)."}
    )


@dataclass
class PruningArguments:
    pruning_ratio: float = field(default=0.5, metadata={"help": "Share of routed experts removed, in [0, 1)."})
    pruning_criterion: str = field(
        default="frequency",
        metadata={"help": "frequency | gate_mass | reap | output_mass | language_aware | random"},
    )
    pruning_allocation: str = field(
        default="uniform",
        metadata={"help": "uniform | global | coverage | sensitivity (measured per-layer loss; needs the model)"},
    )
    pruning_groups: str | None = field(
        default=None,
        metadata={"help": "Statistics groups to score with (default: every calibrated direction, not monolingual)."},
    )
    pruning_roles: str | None = field(default=None, metadata={"help": "source, target or both (default)."})
    pruning_top_k: int | None = field(
        default=None, metadata={"help": "Lower top-k explicitly (allows keeping fewer experts than top-k)."}
    )
    pruning_seed: int = field(default=0, metadata={"help": "Seed of the random criterion."})
    prune_plan: str | None = field(default=None, metadata={"help": "A plan JSON to replay instead of planning."})
    sensitivity_examples: int = field(
        default=64, metadata={"help": "Calibration sequences the sensitivity allocation measures each layer on."}
    )

    def __post_init__(self):
        from moe_specialist.plan import ALLOCATIONS, CRITERIA, validate_ratio

        validate_ratio(self.pruning_ratio)
        if self.pruning_criterion not in CRITERIA:
            raise ConfigurationError(
                f"Unknown pruning_criterion {self.pruning_criterion!r}; choose one of {sorted(CRITERIA)}."
            )
        if self.pruning_allocation not in ALLOCATIONS:
            raise ConfigurationError(
                f"Unknown pruning_allocation {self.pruning_allocation!r}; choose one of {sorted(ALLOCATIONS)}."
            )
        unknown_roles = set(split_list(self.pruning_roles) or []) - {"source", "target"}
        if unknown_roles:
            raise ConfigurationError(f"Unknown pruning_roles {sorted(unknown_roles)}; roles are source and target.")
        if self.pruning_top_k is not None and self.pruning_top_k < 1:
            raise ConfigurationError(f"pruning_top_k must be a positive integer, got {self.pruning_top_k}.")
        if self.sensitivity_examples < 1:
            raise ConfigurationError(f"sensitivity_examples must be positive, got {self.sensitivity_examples}.")


@dataclass
class GenerationArguments:
    max_new_tokens: int = field(default=256, metadata={"help": "Always set: generate() defaults to 20 tokens."})
    generation_batch_size: int = field(default=32)
    no_repeat_ngram_size: int = field(
        default=0, metadata={"help": "Repetition guard (0 = off); reported with scores."}
    )


def check_calibration_data(calibration: CalibrationArguments, eval_dataset: str, eval_split: str) -> None:
    """Statistics from the evaluation split would tune the pruning on the very sentences it is scored on."""
    if calibration.calibration_dataset == eval_dataset and calibration.calibration_split == eval_split:
        raise ConfigurationError(
            f"Calibrating on {eval_dataset}:{eval_split}, the split being evaluated, would choose experts on the test "
            "sentences: calibrate on training data (calibration_split: train)."
        )
