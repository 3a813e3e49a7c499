"""Prune(+SFT) training: recipe dataclasses, the pruning and translation-eval callbacks, W&B, the in-process run."""

from moe_specialist.training.callbacks import (
    CALLBACKS,
    PruningCallback,
    RunContext,
    TranslationEvalCallback,
    get_callbacks,
)
from moe_specialist.training.configs import RECIPE_TYPES, DataArguments, SFTConfig, make_parser
from moe_specialist.training.pipeline import parse_recipe, run

__all__ = [
    "CALLBACKS",
    "RECIPE_TYPES",
    "DataArguments",
    "PruningCallback",
    "RunContext",
    "SFTConfig",
    "TranslationEvalCallback",
    "get_callbacks",
    "make_parser",
    "parse_recipe",
    "run",
]
