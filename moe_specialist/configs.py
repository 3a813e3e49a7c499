"""Argument dataclasses shared by the CLI, the recipes (``TrlParser``) and the sweep: one name, one default per knob.

Every field is a flat, top-level value so that a recipe key, a CLI flag and a W&B sweep parameter are the same thing.
List-valued knobs are lists: a YAML list, ``--knob a b`` or ``--knob a,b`` on the command line (and, for older
recipes, a comma-separated YAML string) all give the same list.

The names of the pruning criteria and allocations live here; :mod:`moe_specialist.plan` registers one function per
name (it imports this module, never the other way round).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field

from trl import ModelConfig

from moe_specialist.errors import ConfigurationError

# Knobs that take the reference files of a plain-text source, aligned with it line by line.
TARGET_FILES_HELP = "Reference file(s) aligned line by line with a plain-text source file."

# The data a run calibrates and trains on unless told otherwise, and so what it (and `moe-specialist evaluate`) scores.
DEFAULT_DATASET = "bible"
DEFAULT_DIRECTIONS = ("en-fr",)

CRITERION_NAMES = ("frequency", "gate_mass", "reap", "output_mass", "language_aware", "random")
ALLOCATION_NAMES = ("uniform", "global", "coverage", "sensitivity", "search")
SELECTION_NAMES = ("ranked", "greedy")
COMPENSATION_NAMES = ("none", "refit")


def split_list(value: str | list | None) -> list | None:
    """``"en-fr, de-en"`` or ``["en-fr,de-en"]`` -> ``["en-fr", "de-en"]``: strings are split at commas, other items
    pass through; None, "" and [] give None."""
    if value is None:
        return None
    items = []
    for item in [value] if isinstance(value, str) else value:
        if isinstance(item, str):
            items.extend(part.strip() for part in item.split(",") if part.strip())
        else:
            items.append(item)
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


def _list_item_type(hint: typing.Any) -> typing.Any:
    """The item type of a list annotation (``list[float] | None`` -> float), or None for any other annotation."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        items = [_list_item_type(arg) for arg in typing.get_args(hint)]
        return next((item for item in items if item is not None), None)
    return typing.get_args(hint)[0] if typing.get_origin(hint) is list else None


def list_fields(cls: type) -> dict[str, typing.Any]:
    """The list-valued fields of a dataclass and their item types."""
    hints = _type_hints(cls)
    items = {f.name: _list_item_type(hints[f.name]) for f in dataclasses.fields(cls)}
    return {name: item for name, item in items.items() if item is not None}


def own_list_fields(cls: type) -> set[str]:
    """The list-valued fields that this project's classes declare (not those inherited from TRL or transformers)."""
    declared = {
        name
        for klass in cls.__mro__
        if klass.__module__.startswith("moe_specialist.")
        for name in inspect.get_annotations(klass)
    }
    return declared & list_fields(cls).keys()


def normalize_lists(args: object, names: Iterable[str] | None = None) -> None:
    """Turn the list-valued fields (all, or ``names``) into lists: comma-separated strings are split, so that
    ``en-fr,de-en``, ``[en-fr, de-en]`` and ``--knob en-fr de-en`` mean the same; an empty value becomes None (or []
    where None is not allowed); the items of a ``list[float]`` are converted. Values of any other type are left for
    :func:`check_field_types`."""
    fields = list_fields(type(args))
    hints = _type_hints(type(args))
    for name in fields if names is None else [n for n in names if n in fields]:
        value = getattr(args, name)
        if not isinstance(value, (str, list)):
            continue
        items = split_list(value)
        if items is None and not _matches(None, hints[name]):
            items = []
        if items and fields[name] is float:
            items = [_number(item, name) for item in items]
        setattr(args, name, items)


def _number(item: object, name: str) -> object:
    if isinstance(item, int) and not isinstance(item, bool):
        return float(item)  # YAML reads 0 as an integer
    if not isinstance(item, str):
        return item
    try:
        return float(item)
    except ValueError:
        raise ConfigurationError(f"{name}: {item!r} is not a number; give numbers such as 0,0.5,0.75.") from None


def check_minimum(args: object, minimum: int, *names: str) -> None:
    """Refuse values below ``minimum`` (None means unset), so that a batch size of 0 fails here, not inside torch."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            bound = "positive" if minimum == 1 else f"at least {minimum}"
            raise ConfigurationError(f"{name} must be {bound}, got {value}.")


def validate_ratio(ratio: float) -> float:
    if not 0.0 <= ratio < 1.0:
        raise ConfigurationError(f"pruning_ratio must be in [0, 1) (share of routed experts removed), got {ratio}.")
    return ratio


def check_ratios(args: object, *names: str) -> None:
    """Each pruning ratio of the list-valued fields ``names`` is in [0, 1) (the share of routed experts removed)."""
    for name in names:
        for ratio in getattr(args, name) or []:
            if not 0 <= ratio < 1:
                raise ConfigurationError(
                    f"{name}: {ratio} is not in [0, 1) (the share of routed experts removed); give ratios such as "
                    "0,0.5,0.75."
                )


@dataclass
class ModelArguments(ModelConfig):
    """``trl.ModelConfig`` with this project's defaults: the embedded demo model, the checkpoint's dtype, and
    ``--model`` as a short alias of ``--model_name_or_path``. ``trust_remote_code`` is transformers' field of the
    recipe's ``SFTConfig``; the commands take it on their own."""

    model_name_or_path: str = field(
        default="demo", metadata={"aliases": ["--model"], "help": "Hub id, local directory, or 'demo'."}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "auto (the checkpoint's dtype; float32 for demo), float32, bfloat16 or float16.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )

    def __post_init__(self):
        check_field_types(self, ["model_name_or_path", "dtype"])
        super().__post_init__()


@dataclass
class CalibrationArguments:
    calibration_dataset: str = field(
        default=DEFAULT_DATASET, metadata={"help": "bible, a local file (TSV/JSONL) or glob. Never a test set."}
    )
    calibration_directions: list[str] = field(
        default_factory=lambda: list(DEFAULT_DIRECTIONS),
        metadata={"help": "Directions, each a statistics group (e.g. en-fr de-en, or en-fr,de-en)."},
    )
    calibration_split: str = field(default="train")
    calibration_target_files: list[str] | None = field(default=None, metadata={"help": TARGET_FILES_HELP})
    calibration_examples: int = field(default=256, metadata={"help": "Examples per direction."})
    calibration_general_languages: list[str] | None = field(
        default=None,
        metadata={"help": "Languages whose monolingual text is also calibrated, one group each (e.g. en fr)."},
    )
    calibration_batch_size: int = field(default=16)
    calibration_max_length: int = field(default=512)
    calibration_seed: int = field(default=0)

    def __post_init__(self):
        from moe_specialist.data.sources import check_target_files, check_trainable

        normalize_lists(self)
        check_field_types(self)
        check_trainable(self.calibration_dataset)
        check_target_files(self.calibration_dataset, self.calibration_target_files, "calibration_target_files")
        if not self.calibration_directions:
            raise ConfigurationError("calibration_directions is empty: give at least one direction such as en-fr.")
        check_minimum(self, 1, "calibration_examples", "calibration_batch_size")
        check_minimum(self, 2, "calibration_max_length")  # room for a prompt token and a target token

    @property
    def calibration_selection(self):
        """The translation pairs calibrated on (monolingual texts come from ``calibration_general_languages``)."""
        from moe_specialist.data.sources import DataSelection

        return DataSelection(
            self.calibration_dataset,
            self.calibration_split,
            self.calibration_target_files,
            self.calibration_directions,
            self.calibration_examples,
            self.calibration_seed,
        )


@dataclass
class PruningArguments:
    pruning_ratio: float = field(default=0.5, metadata={"help": "Share of routed experts removed, in [0, 1)."})
    pruning_criterion: str = field(default="frequency", metadata={"help": " | ".join(CRITERION_NAMES)})
    pruning_allocation: str = field(
        default="uniform",
        metadata={
            "help": "uniform | global | coverage | sensitivity (measured per-layer loss; needs the model) | search "
            "(the sensitivity plan refined by a local search over per-layer counts and kept sets on the whole pruned "
            "model's next-token KL to the unpruned model; needs the model)"
        },
    )
    allocation_search_seconds: float = field(
        default=60.0, metadata={"help": "search: the time budget; no candidate is scored after it."}
    )
    allocation_search_evaluations: int | None = field(
        default=None,
        metadata={
            "help": "search: at most this many candidates scored (set it, with enough seconds, for plans that do "
            "not depend on the machine's speed)."
        },
    )
    allocation_search_seed: int = field(default=0, metadata={"help": "search: the seed of its moves."})
    allocation_search_onset_weight: float = field(
        default=0.0,
        metadata={
            "help": "search: add this times the KL on the first 4 target tokens of each sequence to the objective "
            "(where the output language is chosen: against wrong-language output at high ratios)."
        },
    )
    compensation: str = field(
        default="none",
        metadata={
            "help": "none | refit (after pruning, each MoE layer's kept experts are re-fitted, layer by layer, to "
            "reproduce the unpruned layer's output on sensitivity_examples calibration sequences, checked on as many "
            "held-out ones; needs the unpruned model in memory: prune_mode memory)"
        },
    )
    refit_steps: int = field(
        default=200,
        metadata={
            "help": "refit: Adam steps per MoE layer, each on 1,024 calibration tokens; the step with the lowest "
            "held-out error is kept."
        },
    )
    pruning_selection: str = field(
        default="ranked",
        metadata={
            "help": "ranked (each layer keeps its best-scored experts) | greedy (each layer's kept set chosen by "
            "greedy elimination on the MoE block's output error on calibration tokens, the criterion breaking ties; "
            "needs the model)"
        },
    )
    selection_candidates: int | None = field(
        default=None,
        metadata={
            "help": "greedy: try removing only the criterion's N lowest-scored experts left at each step (per routing "
            "group), to bound the cost (default: every expert left)."
        },
    )
    pruning_groups: list[str] | None = field(
        default=None,
        metadata={"help": "Statistics groups to score with (default: every calibrated direction, not monolingual)."},
    )
    pruning_roles: list[str] | None = field(default=None, metadata={"help": "source, target or both (default)."})
    pruning_top_k: int | None = field(
        default=None, metadata={"help": "Lower top-k explicitly (allows keeping fewer experts than top-k)."}
    )
    pruning_seed: int = field(default=0, metadata={"help": "Seed of the random criterion."})
    statistics_file: str | None = field(
        default=None,
        metadata={
            "help": "Routing statistics to plan from (`moe-specialist calibrate` writes them). In a run or sweep: "
            "reused when the file exists, else calibrated and saved there."
        },
    )
    prune_plan: str | None = field(
        default=None, metadata={"help": "A plan JSON to replay instead of planning (`moe-specialist plan`)."}
    )
    sensitivity_examples: int = field(
        default=64,
        metadata={
            "help": "Calibration sequences the sensitivity allocation, the greedy selection and the refit "
            "compensation measure on (the search allocation and the refit's check use as many others)."
        },
    )

    def __post_init__(self):
        normalize_lists(self)
        check_field_types(self)
        validate_ratio(self.pruning_ratio)
        if self.pruning_criterion not in CRITERION_NAMES:
            raise ConfigurationError(
                f"Unknown pruning_criterion {self.pruning_criterion!r}; choose one of {sorted(CRITERION_NAMES)}."
            )
        if self.pruning_allocation not in ALLOCATION_NAMES:
            raise ConfigurationError(
                f"Unknown pruning_allocation {self.pruning_allocation!r}; choose one of {sorted(ALLOCATION_NAMES)}."
            )
        if self.compensation not in COMPENSATION_NAMES:
            raise ConfigurationError(
                f"Unknown compensation {self.compensation!r}; choose one of {list(COMPENSATION_NAMES)}."
            )
        if self.pruning_selection not in SELECTION_NAMES:
            raise ConfigurationError(
                f"Unknown pruning_selection {self.pruning_selection!r}; choose one of {list(SELECTION_NAMES)}."
            )
        unknown_roles = set(self.pruning_roles or []) - {"source", "target"}
        if unknown_roles:
            raise ConfigurationError(f"Unknown pruning_roles {sorted(unknown_roles)}; roles are source and target.")
        check_minimum(self, 1, "pruning_top_k", "sensitivity_examples", "selection_candidates", "refit_steps")
        check_minimum(self, 1, "allocation_search_evaluations")
        if not 0 < self.allocation_search_seconds < float("inf"):
            raise ConfigurationError(
                f"allocation_search_seconds must be a positive number of seconds, got {self.allocation_search_seconds}"
                ": it bounds the search allocation's time (cap its evaluations with allocation_search_evaluations)."
            )
        if not 0 <= self.allocation_search_onset_weight < float("inf"):
            raise ConfigurationError(
                f"allocation_search_onset_weight must be a finite number >= 0, got "
                f"{self.allocation_search_onset_weight}: it weighs the KL on the first target tokens (0: off)."
            )


@dataclass
class GenerationArguments:
    """Greedy decoding of every translation scored: ``moe-specialist evaluate``, a run's ``translation_eval``
    callback and every sweep point (the recipe's ``SFTConfig`` holds these fields)."""

    max_new_tokens: int = field(default=256, metadata={"help": "Always set: generate() defaults to 20 tokens."})
    generation_batch_size: int = field(default=32, metadata={"help": "Generation batch size per process."})
    no_repeat_ngram_size: int = field(
        default=0, metadata={"help": "Repetition guard (0 = off); reported with scores."}
    )

    def __post_init__(self):
        check_field_types(self, [f.name for f in dataclasses.fields(GenerationArguments)])
        check_minimum(self, 1, "max_new_tokens", "generation_batch_size")
        check_minimum(self, 0, "no_repeat_ngram_size")

    @property
    def decoding_kwargs(self) -> dict:
        """These knobs as :func:`moe_specialist.evaluate.evaluate_translations` takes them."""
        return {
            "batch_size": self.generation_batch_size,
            "max_new_tokens": self.max_new_tokens,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }


@dataclass
class EvalDataArguments:
    """The translations scored: by ``moe-specialist evaluate``, during a run (dev data) and at every sweep point.

    A recipe's :class:`~moe_specialist.training.configs.DataArguments` adds the SFT data to these fields; unset, the
    evaluated source and directions are the SFT data's (``dataset_name``, ``train_directions``), whose defaults
    (bible, en-fr) are what ``evaluate`` scores.
    """

    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "bible, flores_plus, wmt24pp or a local file (TSV/JSONL/plain text). Default: dataset_name "
            f"({DEFAULT_DATASET})."
        },
    )
    eval_directions: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Directions, e.g. en-fr de-en. Default: train_directions ({' '.join(DEFAULT_DIRECTIONS)})."
        },
    )
    eval_split: str = field(default="dev", metadata={"help": "dev for choosing; report on devtest/test."})
    eval_target_files: list[str] | None = field(default=None, metadata={"help": TARGET_FILES_HELP})
    max_eval_examples: int | None = field(
        default=None, metadata={"help": "Examples per direction (a seeded sample; default: all)."}
    )
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the data samples (not of training)."})

    def __post_init__(self):
        from moe_specialist.data.sources import check_target_files

        normalize_lists(self)
        check_field_types(self)
        self.eval_dataset_name = self.eval_dataset_name or DEFAULT_DATASET
        self.eval_directions = self.eval_directions or list(DEFAULT_DIRECTIONS)
        check_target_files(self.eval_dataset_name, self.eval_target_files, "eval_target_files")
        check_minimum(self, 1, "max_eval_examples")

    @property
    def eval_selection(self):
        """The evaluated examples: the same seeded sample on every rank and in every command."""
        from moe_specialist.data.sources import DataSelection

        return DataSelection(
            self.eval_dataset_name,
            self.eval_split,
            self.eval_target_files,
            self.eval_directions,
            self.max_eval_examples,
            self.dataset_seed,
        )


def check_calibration_data(calibration: CalibrationArguments, evaluated) -> None:
    """Statistics from the ``evaluated`` data (a DataSelection) would tune the pruning on the very sentences it is
    scored on.

    The monolingual texts of ``calibration_general_languages`` are Bible verses of ``calibration_split``, so they
    are checked too.
    """
    from moe_specialist.data.sources import DataSelection, selections_overlap

    used = [calibration.calibration_selection]
    if calibration.calibration_general_languages:
        used.append(DataSelection("bible", calibration.calibration_split))
    for selection in used:
        if selections_overlap(selection, evaluated):
            fix = "other files" if selection.local else "training data (calibration_split: train)"
            raise ConfigurationError(
                f"Calibrating on {selection} would choose experts on the sentences being evaluated ({evaluated}): "
                f"calibrate on {fix}."
            )


HELD_OUT_OPTIONS = ("search", "refit")  # pruning_allocation search and compensation refit score on held-out sequences


def check_held_out_room(sequences: int, sensitivity_examples: int, bound: str = "") -> None:
    """``pruning_allocation: search`` and ``compensation: refit`` score on calibration sequences that the
    ``sensitivity_examples`` sample leaves out, so there must be more than that many ``sequences`` (``bound``: why
    that count is only an upper bound)."""
    if sequences <= sensitivity_examples:
        there = f"at most {sequences} ({bound})" if bound else f"{sequences}"
        raise ConfigurationError(
            "pruning_allocation search and compensation refit score on calibration sequences that the "
            f"sensitivity_examples={sensitivity_examples} sample leaves out, but there are {there}: raise "
            "calibration_examples or lower sensitivity_examples."
        )


def check_held_out_calibration(
    calibration: CalibrationArguments, sensitivity_examples: int, options: Iterable[str]
) -> None:
    """:func:`check_held_out_room` before any model loads, when ``options`` (allocations and compensations) hold
    one that scores on held-out sequences: with the most the arguments allow, ``calibration_examples`` per direction
    and general language."""
    if not any(option in HELD_OUT_OPTIONS for option in options):
        return
    groups = len(calibration.calibration_directions) + len(calibration.calibration_general_languages or [])
    examples = calibration.calibration_examples
    bound = f"calibration_examples={examples} for each of {groups} directions and general languages"
    check_held_out_room(examples * groups, sensitivity_examples, bound)
