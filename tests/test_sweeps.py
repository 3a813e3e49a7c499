"""W&B sweep definitions: every swept parameter is a recipe field, the command runs `accelerate launch` correctly."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from moe_specialist.training.configs import RECIPE_TYPES, make_parser

ROOT = Path(__file__).parents[1]
SWEEPS = sorted((ROOT / "recipes" / "sweeps").glob("*.yaml"))
FIELDS = {f.name for cls in RECIPE_TYPES for f in dataclasses.fields(cls)}


def test_there_are_sweeps():
    assert SWEEPS


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_definition(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] == "grid"  # a 1-D curve: bayes with parallel agents duplicates points
    unknown = set(sweep["parameters"]) - FIELDS
    assert not unknown, f"swept parameters that no recipe dataclass has: {unknown}"
    command = sweep["command"]
    assert command[1:3] == ["accelerate", "launch"]  # separate tokens ("accelerate launch" fails)
    assert command[-1] == "${args}"
    config_file = ROOT / command[command.index("--config_file") + 1]
    recipe = ROOT / command[command.index("--config") + 1]
    assert config_file.is_file() and recipe.is_file()
    # the recipe with one grid point's values parses (as every rank parses it)
    point = [f"--{name}={spec['values'][-1]}" for name, spec in sweep["parameters"].items()]
    parsed = make_parser().parse_args_and_config(args=["--config", str(recipe), *point])
    values = {f.name: getattr(obj, f.name) for obj in parsed for f in dataclasses.fields(obj)}
    for name, spec in sweep["parameters"].items():
        assert values[name] == spec["values"][-1]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_the_header_states_the_grid_size(path):
    sweep = yaml.safe_load(path.read_text())
    points = math.prod(len(spec["values"]) for spec in sweep["parameters"].values())
    header = " ".join(line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#"))
    assert f" {points} points" in header, f"the header comment must say what the sweep runs: {points} points"


def test_each_grid_point_of_a_wandb_sweep_gets_its_own_output_dir():
    from moe_specialist.configs import PruningArguments
    from moe_specialist.training.setup import sweep_point_dir

    a = sweep_point_dir("outputs/x", PruningArguments(pruning_ratio=0.5, pruning_criterion="frequency"), 42)
    b = sweep_point_dir("outputs/x", PruningArguments(pruning_ratio=0.75, pruning_criterion="frequency"), 42)
    c = sweep_point_dir("outputs/x", PruningArguments(pruning_ratio=0.75, pruning_criterion="reap"), 42)
    assert len({a, b, c}) == 3 and a == "outputs/x/frequency-uniform-r0.5-s42"
