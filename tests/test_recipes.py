"""Recipes and accelerate configs: every recipe parses with the real TrlParser, flags beat YAML, typos fail."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from trl import ModelConfig

from moe_specialist.configs import CalibrationArguments, GenerationArguments, ModelArguments, PruningArguments
from moe_specialist.training.callbacks import CALLBACKS
from moe_specialist.training.configs import DataArguments, SFTConfig, make_parser

ROOT = Path(__file__).parents[1]
RECIPES_DIR = ROOT / "recipes"
# W&B sweep definitions (recipes/sweeps/) have their own schema and tests (tests/test_sweeps.py). Recipes of
# `moe-specialist sweep` (sweep*.yaml) are run recipes plus SweepArguments.
RECIPE_FILES = sorted(p for p in RECIPES_DIR.rglob("*.yaml") if p.relative_to(RECIPES_DIR).parts[0] != "sweeps")
RECIPES = [p for p in RECIPE_FILES if not p.name.startswith("sweep")]
SWEEP_RECIPES = [p for p in RECIPE_FILES if p.name.startswith("sweep")]
ACCELERATE_CONFIGS = sorted((ROOT / "accelerate_configs").rglob("*.yaml"))
GPU_MODELS = ("qwen3-30b-a3b", "gpt-oss-20b", "olmoe-1b-7b")
TINY = ROOT / "tests" / "fixtures" / "recipes" / "tiny_prune_sft.yaml"
README = ROOT / "README.md"


pytestmark = pytest.mark.usefixtures("restore_environment")  # recipes' `env:` blocks are exported


def parse(*args: str):
    return make_parser().parse_args_and_config(args=list(args))


def test_the_required_recipes_exist():
    names = {p.relative_to(RECIPES_DIR).as_posix() for p in RECIPES}
    assert {"demo/en-fr/prune.yaml", "demo/en-fr/prune_sft.yaml"} <= names
    for model in GPU_MODELS:
        assert {f"{model}/en-de/prune_sft.yaml", f"{model}/en-ja/prune_sft.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(RECIPES_DIR).as_posix())
def test_every_recipe_parses(path):
    model, data, calibration, pruning, training = parse("--config", str(path))
    assert isinstance(model, ModelArguments) and isinstance(model, ModelConfig) and isinstance(data, DataArguments)
    assert isinstance(calibration, CalibrationArguments) and isinstance(pruning, PruningArguments)
    assert isinstance(training, SFTConfig)
    assert model.model_name_or_path and training.output_dir
    assert set(training.callbacks) <= set(CALLBACKS)
    text = path.read_text()
    assert text.startswith("# "), "a recipe opens with a comment saying what it is"
    assert "Hardware:" in text
    launch = re.search(r"--config_file (accelerate_configs/\S+\.yaml)", text)
    command = launch or re.search(r"python -m moe_specialist\.train --config (\S+)", text)
    assert command, "the header gives the exact launch command"
    if launch:
        assert (ROOT / launch.group(1)).is_file()
    assert f"--config recipes/{path.relative_to(RECIPES_DIR).as_posix()}" in text


@pytest.mark.parametrize("path", SWEEP_RECIPES, ids=lambda p: p.relative_to(RECIPES_DIR).as_posix())
def test_every_sweep_recipe_parses(path):
    from moe_specialist.entry import ArgumentParser
    from moe_specialist.sweep import SweepArguments
    from moe_specialist.training.configs import RECIPE_TYPES

    parsed = ArgumentParser((*RECIPE_TYPES, SweepArguments), prog="sweep").parse(["--config", str(path)])
    assert isinstance(parsed[4], SFTConfig) and isinstance(parsed[5], SweepArguments)


@pytest.mark.parametrize("model", GPU_MODELS)
def test_gpu_recipes_calibrate_on_train_data_and_evaluate_on_flores_dev(model):
    for path in sorted((RECIPES_DIR / model).rglob("*.yaml")):
        _, data, calibration, _, training = parse("--config", str(path))
        assert calibration.calibration_split == "train" and calibration.calibration_dataset == "bible"
        assert data.dataset_name == "bible" and data.train_split == "train"
        assert (data.eval_dataset_name, data.eval_split) == ("flores_plus", "dev")
        assert data.eval_directions == data.train_directions == calibration.calibration_directions
        assert data.train_directions == [path.parent.name]
        assert training.bf16 and training.report_to == ["wandb"]
        assert "wmt24pp" in path.read_text()  # the final report command


def test_demo_recipes_run_on_cpu():
    for name in ("prune.yaml", "prune_sft.yaml"):
        model, _, _, _, training = parse("--config", str(RECIPES_DIR / "demo" / "en-fr" / name))
        assert model.model_name_or_path == "demo"
        assert training.bf16 is False
        assert training.use_cpu is True  # no GPU and no DeepSpeed launch here
    assert parse("--config", str(RECIPES_DIR / "demo/en-fr/prune.yaml"))[4].prune_only
    assert not parse("--config", str(RECIPES_DIR / "demo/en-fr/prune_sft.yaml"))[4].prune_only


def test_readme_indexes_every_recipe_with_its_accelerate_config():
    readme = (RECIPES_DIR / "README.md").read_text()
    for path in RECIPES:
        relative = path.relative_to(RECIPES_DIR).as_posix()
        line = next((line for line in readme.splitlines() if f"[{relative}]" in line), None)
        assert line is not None, f"{relative} is missing from recipes/README.md"
        configs = re.findall(r"`([\w/]+\.yaml)`", line)
        assert configs and all((ROOT / "accelerate_configs" / c).is_file() for c in configs)
        if "demo" not in relative:
            launch = re.search(r"--config_file accelerate_configs/(\S+\.yaml)", path.read_text()).group(1)
            assert launch in configs  # the recipe's header and the index agree


def test_fsdp_launch_without_gpu_is_refused_not_silently_ddp(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP launch without a GPU.*cpu/zero3.yaml"):
        parse("--config", str(TINY))


def test_cli_flags_override_yaml_which_overrides_defaults():
    model, data, calibration, pruning, training = parse(
        "--config", str(TINY), "--pruning_ratio", "0.75", "--learning_rate", "0.5", "--callbacks", "expert_pruning"
    )
    assert pruning.pruning_ratio == 0.75  # YAML says 0.5
    assert training.learning_rate == 0.5  # YAML says 1e-3
    assert training.callbacks == ["expert_pruning"]
    assert training.max_steps == 2 and data.max_train_examples == 8  # YAML values kept
    assert calibration.calibration_examples == 8
    assert pruning.pruning_top_k is None and data.dataset_seed == 0  # dataclass defaults where YAML is silent
    assert data.eval_dataset_name == "bible" and data.eval_directions == ["en-fr"]  # derived from the train data
    assert model.dtype == "float32"


def test_one_default_per_knob_for_recipes_and_commands():
    """The commands parse the recipe's dataclasses: a knob a recipe leaves out has the command's default."""
    from moe_specialist.cli import _parse

    model, _, _, pruning, training = parse("--output_dir", "out")
    assert (model.model_name_or_path, model.dtype) == ("demo", "auto")  # auto: float32 for demo, else the checkpoint's
    assert training.max_new_tokens == GenerationArguments.max_new_tokens == 256
    assert training.generation_batch_size == GenerationArguments.generation_batch_size
    command_model, _, command_pruning, generation = _parse("x", (PruningArguments, GenerationArguments), [])
    assert command_model == model and command_pruning == pruning
    assert generation.max_new_tokens == training.max_new_tokens
    assert parse("--output_dir", "out", "--model", "x")[0].model_name_or_path == "x"  # --model is short for it


def test_demo_recipes_keep_their_float32_scores():
    from moe_specialist.entry import ArgumentParser
    from moe_specialist.sweep import SweepArguments
    from moe_specialist.training.configs import RECIPE_TYPES

    sweep_parser = ArgumentParser((*RECIPE_TYPES, SweepArguments), prog="sweep")
    for path in sorted((RECIPES_DIR / "demo").rglob("*.yaml")):
        parser = sweep_parser if path in SWEEP_RECIPES else make_parser()
        assert parser.parse(["--config", str(path)])[0].dtype == "float32"


def test_push_to_hub_is_refused_with_how_to_push_the_pruned_model():
    with pytest.raises(ValueError, match=r"push_to_hub is not supported.*hf upload <repo id> <output_dir>/model"):
        parse("--config", str(TINY), "--push_to_hub", "true")


def test_yaml_overrides_defaults_and_env_block_is_exported(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "env:\n  MOE_SPECIALIST_TEST_VAR: exported\n"
        "model_name_or_path: demo\noutput_dir: out\npruning_ratio: 0.25\nmax_new_tokens: 7\n"
    )
    _, _, _, pruning, training = parse("--config", str(recipe))
    assert os.environ["MOE_SPECIALIST_TEST_VAR"] == "exported"
    assert pruning.pruning_ratio == 0.25 and training.max_new_tokens == 7
    assert training.callbacks == ["expert_pruning", "translation_eval"]  # the default


def test_unknown_recipe_key_fails(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("model_name_or_path: demo\noutput_dir: out\npruning_ration: 0.5\n")
    with pytest.raises(ValueError, match=r"Unknown arguments from config file: \['--pruning_ration', '0.5'\]"):
        parse("--config", str(recipe))


def test_unknown_flag_fails():
    with pytest.raises(ValueError, match=r"not used by the HfArgumentParser: \['--pruning_ration', '0.5'\]"):
        parse("--config", str(TINY), "--pruning_ration", "0.5")


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (
            ["--callbacks", "expert_pruning", "mt_eval"],
            r"Unknown callback\(s\) 'mt_eval'.*known callbacks: expert_pruning, ",
        ),
        (["--train_router_only", "true", "--freeze_router", "true"], "contradict each other"),
        (["--max_new_tokens", "0"], "max_new_tokens must be positive"),
        (["--generation_batch_size", "0"], "generation_batch_size must be positive"),
        (["--train_directions", " , "], "train_directions is empty: give at least one direction"),
        (["--pruning_ratio", "1.0"], r"pruning_ratio must be in \[0, 1\)"),
        (["--dataset_name", "flores_plus"], "is a test set and must not be trained on"),
        (["--max_train_examples", "0"], "max_train_examples must be positive, got 0"),
        (["--max_steps", "-3"], "max_steps must be -1"),
        (["--eval_split", "train"], r"The eval data \(bible:train\) overlaps the SFT data \(bible:train\)"),
        (["--train_split", "dev", "--eval_split", "validation"], r"The eval data \(bible:validation\) overlaps"),
        (
            ["--dataset_name", "data/train.tsv", "--eval_split", "test"],
            r"\(data/train.tsv\) overlaps the SFT data \(data/train.tsv\): evaluate on other files",
        ),
    ],
)
def test_invalid_values_fail_with_clear_errors(flags, error):
    with pytest.raises(ValueError, match=error):
        parse("--config", str(TINY), *flags)


def test_use_cpu_under_deepspeed_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="accelerate would silently run without DeepSpeed"):
        parse("--config", str(TINY), "--use_cpu", "true")


# The distributed types the README documents (DDP, DeepSpeed ZeRO-2 / ZeRO-3; no FSDP config), as accelerate names them
DOCUMENTED_TYPES = {"MULTI_GPU": "DDP", "DEEPSPEED": "ZeRO"}


@pytest.mark.parametrize(
    "path", ACCELERATE_CONFIGS, ids=lambda p: p.relative_to(ROOT / "accelerate_configs").as_posix()
)
def test_accelerate_configs_load_and_launch_what_the_readme_documents(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))  # accelerate launch's own loader: an unknown key fails here
    readme = README.read_text()
    documented = DOCUMENTED_TYPES[config.distributed_type]
    assert documented in readme
    assert config.use_cpu is False  # `use_cpu: true` makes accelerate start a single process
    if documented == "ZeRO":
        stage = config.deepspeed_config["zero_stage"]
        assert f"ZeRO-{stage}" in readme and path.stem == f"zero{stage}"
        if stage == 3:  # the final model is saved from gathered 16-bit shards
            assert config.deepspeed_config["zero3_save_16bit_model"] is True
    if path.parent.name == "cpu":  # README: "cpu/ (2 processes on gloo)"
        assert config.num_processes == 2 and config.gpu_ids is None and config.mixed_precision == "no"
    else:
        assert config.num_processes > 1 and config.mixed_precision == "bf16"


def test_recipes_readme_describes_exactly_the_accelerate_configs_and_the_readme_names_only_existing_ones():
    files = {p.relative_to(ROOT).as_posix() for p in ACCELERATE_CONFIGS}
    described = re.findall(r"^\| `(accelerate_configs/\S+\.yaml)` \|", (RECIPES_DIR / "README.md").read_text(), re.M)
    assert sorted(described) == sorted(files)
    named = set()
    for prefix, stages in re.findall(r"(accelerate_configs/\S*?)(\w+|zero\{[\d,]+\})\.yaml", README.read_text()):
        group = re.fullmatch(r"zero\{([\d,]+)\}", stages)
        named |= {f"{prefix}zero{n}.yaml" for n in group.group(1).split(",")} if group else {f"{prefix}{stages}.yaml"}
    assert named and named <= files, named - files
