"""Argument dataclasses shared by the CLI, the recipes (``TrlParser``) and the sweep: one name per knob.

Every field is a flat, top-level scalar so that a recipe key, a CLI flag and a W&B sweep parameter are the same
thing.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field

from moe_specialist.errors import ConfigurationError

# Knobs that take the reference files of a plain-text source, aligned with it line by line (comma-separated).
TARGET_FILES_HELP = "Reference file(s) aligned line by line with a plain-text source file (comma-separated)."


def split_list(value: str | list[str] | None) -> list[str] | None:
    """``"en-fr, de-en"`` -> ``["en-fr", "de-en"]``; lists pass through; None and "" give None."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    items = [item.strip() for item in items if item.strip()]
    return items or None


@functools.cache
def _type_hints(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)  # resolves the string annotations of ``from __future__ import annotations``


def _matches(value: object, hint: typing.Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool or hint is str:
        return isinstance(value, hint)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    raise TypeError(f"check_field_types cannot check the annotation {hint!r}: add it to _matches.")


def _describe(hint: typing.Any) -> str:
    """``int | None`` -> "an integer or null", as a recipe writer reads it."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in sorted(typing.get_args(hint), key=lambda a: a is type(None)))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names[hint]


def check_field_types(args: object, names: Iterable[str] | None = None) -> None:
    """Refuse a field whose value does not fit its annotation (all fields, or ``names``).

    TrlParser passes YAML values to argparse as defaults, which skip its type conversion: without this check
    ``calibration_examples: 2.5`` would fail only after the model has loaded. Booleans are not integers here.
    """
    hints = _type_hints(type(args))
    for name in names if names is not None else (f.name for f in dataclasses.fields(args)):
        value = getattr(args, name)
        if not _matches(value, hints[name]):
            raise ConfigurationError(
                f"{name} must be {_describe(hints[name])}, got {value!r} ({type(value).__name__}): fix it in the "
                "recipe or on the command line."
            )


def check_minimum(args: object, minimum: int, *names: str) -> None:
    """Refuse values below ``minimum`` (None means unset), so that a batch size of 0 fails here, not inside torch."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            bound = "positive" if minimum == 1 else f"at least {minimum}"
            raise ConfigurationError(f"{name} must be {bound}, got {value}.")


def parse_ratios(value: str | None, name: str) -> list[float]:
    """Comma-separated pruning ratios, each a number in [0, 1) (the share of routed experts removed)."""
    ratios = []
    for item in split_list(value) or []:
        try:
            ratio = float(item)
        except ValueError:
            raise ConfigurationError(f"{name}: {item!r} is not a number; give ratios such as 0,0.5,0.75.") from None
        if not 0 <= ratio < 1:
            raise ConfigurationError(
                f"{name}: {item} is not in [0, 1) (the share of routed experts removed); give ratios such as "
                "0,0.5,0.75."
            )
        ratios.append(ratio)
    return ratios


@dataclass
class CalibrationArguments:
    calibration_dataset: str = field(
        default="bible", metadata={"help": "bible, a local file (TSV/JSONL) or glob. Never a test set."}
    )
    calibration_directions: str = field(
        default="en-fr", metadata={"help": "Comma-separated directions, each a statistics group (e.g. en-fr,de-en)."}
    )
    calibration_split: str = field(default="train")
    calibration_target_files: None | str | list[str] = field(default=None, metadata={"help": TARGET_FILES_HELP})
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

    def __post_init__(self):
        from moe_specialist.data.sources import check_target_files, check_trainable

        check_field_types(self)
        check_trainable(self.calibration_dataset)
        self.calibration_target_files = split_list(self.calibration_target_files)
        check_target_files(self.calibration_dataset, self.calibration_target_files, "calibration_target_files")
        check_minimum(self, 1, "calibration_examples", "calibration_batch_size")
        check_minimum(self, 2, "calibration_max_length")  # room for a prompt token and a target token


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

        check_field_types(self)
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
        check_minimum(self, 1, "pruning_top_k", "sensitivity_examples")


@dataclass
class GenerationArguments:
    max_new_tokens: int = field(default=256, metadata={"help": "Always set: generate() defaults to 20 tokens."})
    generation_batch_size: int = field(default=32)
    no_repeat_ngram_size: int = field(
        default=0, metadata={"help": "Repetition guard (0 = off); reported with scores."}
    )

    def __post_init__(self):
        check_field_types(self)
        check_minimum(self, 1, "max_new_tokens", "generation_batch_size")
        check_minimum(self, 0, "no_repeat_ngram_size")


def check_calibration_data(
    calibration: CalibrationArguments,
    eval_dataset: str,
    eval_split: str,
    eval_target_files: str | list[str] | None = None,
) -> None:
    """Statistics from the evaluated data would tune the pruning on the very sentences it is scored on.

    The monolingual texts of ``calibration_general_languages`` are Bible verses of ``calibration_split``, so they
    are checked too.
    """
    from moe_specialist.data.sources import DataSelection, selections_overlap

    evaluated = DataSelection(eval_dataset, eval_split, split_list(eval_target_files))
    used = [
        DataSelection(
            calibration.calibration_dataset, calibration.calibration_split, calibration.calibration_target_files
        )
    ]
    if split_list(calibration.calibration_general_languages):
        used.append(DataSelection("bible", calibration.calibration_split))
    for selection in used:
        if selections_overlap(selection, evaluated):
            fix = "other files" if selection.local else "training data (calibration_split: train)"
            raise ConfigurationError(
                f"Calibrating on {selection} would choose experts on the sentences being evaluated ({evaluated}): "
                f"calibrate on {fix}."
            )
