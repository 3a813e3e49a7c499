"""Argument dataclasses: YAML values checked against their annotations, ranges, the one leak check, and the
reference-file knobs of aligned plain-text data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moe_specialist import plan
from moe_specialist.calibrate import calibration_data, calibration_settings
from moe_specialist.configs import (
    ALLOCATION_NAMES,
    CRITERION_NAMES,
    CalibrationArguments,
    EvalDataArguments,
    GenerationArguments,
    check_calibration_data,
)
from moe_specialist.data.sources import DataSelection, load_examples
from moe_specialist.entry import ArgumentParser
from moe_specialist.errors import ConfigurationError
from moe_specialist.sweep import SweepArguments, runner
from moe_specialist.training.configs import RECIPE_TYPES, DataArguments
from moe_specialist.training.pipeline import load_data

ROOT = Path(__file__).parents[1]
TINY = ROOT / "tests" / "fixtures" / "recipes" / "tiny_prune_sft.yaml"
SWEEP_RECIPE = ROOT / "recipes" / "demo" / "en-fr" / "sweep.yaml"
FILES = ROOT / "tests" / "fixtures" / "files"


pytestmark = pytest.mark.usefixtures("restore_environment")  # recipes' `env:` blocks are exported


def parse_recipe(tmp_path: Path, yaml_lines: str = "", *flags: str, types=RECIPE_TYPES):
    """TINY plus ``yaml_lines`` (keys given twice: the last wins), parsed like `python -m moe_specialist.train`."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TINY.read_text() + yaml_lines)
    return ArgumentParser(types, prog="test").parse(["--config", str(recipe), *flags])


def parse_flags(types, *flags: str):
    return ArgumentParser(types, prog="test").parse(list(flags))


# --- YAML values against the annotations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_line", "message"),
    [
        ("calibration_examples: 2.5", "calibration_examples must be an integer, got 2.5 (float)"),
        ("calibration_batch_size: true", "calibration_batch_size must be an integer, got True (bool)"),
        ("calibration_general_languages: no", "calibration_general_languages must be a list of strings or null, got"),
        ("calibration_directions: 7", "calibration_directions must be a list of strings, got 7 (int)"),
        ("pruning_ratio: [0.5]", "pruning_ratio must be a number, got [0.5] (list)"),
        ("pruning_top_k: 1.0", "pruning_top_k must be an integer or null, got 1.0 (float)"),
        ("max_eval_examples: 2.0", "max_eval_examples must be an integer or null, got 2.0"),
        ("train_split: 2024", "train_split must be a string, got 2024 (int)"),
        ("mt_eval_on_start: 1", "mt_eval_on_start must be true or false, got 1 (int)"),
        ("max_new_tokens: 12.5", "max_new_tokens must be an integer, got 12.5 (float)"),
        ("callbacks: 7", "callbacks must be a list of strings, got 7 (int)"),
        ("wandb_tags: [sweep, 7]", "wandb_tags must be a list of strings or null, got ['sweep', 7]"),
        ("calibration_target_files: {a: b}", "calibration_target_files must be a list of strings or null"),
        ("model_name_or_path: 7", "model_name_or_path must be a string, got 7 (int)"),
    ],
)
def test_yaml_values_of_the_wrong_type_are_refused_when_parsed(tmp_path, yaml_line, message):
    with pytest.raises(ConfigurationError, match=re.escape(message)) as error:
        parse_recipe(tmp_path, yaml_line + "\n")
    assert str(error.value).endswith("fix it in the recipe or on the command line.")


def test_yaml_values_of_the_right_type_pass(tmp_path):
    _, data, calibration, pruning, training = parse_recipe(
        tmp_path, "pruning_ratio: 0\nmax_eval_examples: null\nwandb_tags: [a, b]\ncalibration_split: train\n"
    )
    assert pruning.pruning_ratio == 0  # an integer is a number
    assert data.max_eval_examples is None and training.wandb_tags == ["a", "b"]


def test_sweep_and_generation_values_are_checked(tmp_path):
    with pytest.raises(ConfigurationError, match=r"ratios must be a list of numbers, got 0.5 \(float\)"):
        parse_recipe(tmp_path, "ratios: 0.5\n", types=(*RECIPE_TYPES, SweepArguments))
    (tmp_path / "generation.yaml").write_text("max_new_tokens: 12.5\n")
    with pytest.raises(ConfigurationError, match=r"max_new_tokens must be an integer, got 12.5"):
        parse_flags((GenerationArguments,), "--config", str(tmp_path / "generation.yaml"))


# --- Lists -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        ("train_directions: [en-fr, de-en]\n",),  # a YAML list
        ("train_directions: en-fr,de-en\n",),  # a comma-separated YAML string (older recipes)
        ("", "--train_directions", "en-fr", "de-en"),
        ("", "--train_directions", "en-fr,de-en"),
        ("", "--train_directions=en-fr, de-en"),  # as a W&B sweep passes it
    ],
)
def test_list_knobs_take_yaml_lists_words_and_commas(tmp_path, spelling):
    _, data, _, _, _ = parse_recipe(tmp_path, *spelling)
    assert data.train_directions == ["en-fr", "de-en"] and data.eval_directions == ["en-fr", "de-en"]


def test_list_knobs_of_every_dataclass_are_lists(tmp_path):
    *_, calibration, pruning, training, grid = parse_recipe(
        tmp_path,
        "calibration_general_languages: fr\nwandb_tags: demo,en-fr\nsft_criteria: reap\n",
        "--pruning_groups",
        "en-fr",
        "de-en",
        "--ratios",
        "0,0.5",
        "0.75",
        "--criteria",
        "reap,gate_mass@global",
        "--sft_at",
        "0.75",
        "--callbacks",
        "expert_pruning,translation_eval",
        types=(*RECIPE_TYPES, SweepArguments),
    )
    assert calibration.calibration_general_languages == ["fr"] and pruning.pruning_groups == ["en-fr", "de-en"]
    assert training.wandb_tags == ["demo", "en-fr"] and training.callbacks == ["expert_pruning", "translation_eval"]
    assert grid.ratios == [0.0, 0.5, 0.75] and grid.sft_at == [0.75]
    assert grid.criteria == ["reap", "gate_mass@global"] and grid.sft_criteria == ["reap"]
    assert SweepArguments(ratios=[0, 0.5]).ratios == [0.0, 0.5]  # YAML integers are numbers too
    assert SweepArguments(ratios="0,0.5", sft_at="0.5").sft_at == [0.5]


def test_criterion_and_allocation_names_are_the_registries():
    """configs names them (for checks before any model loads), plan registers one function per name (but search,
    which refines the sensitivity allocation on the model: moe_specialist.allocation_search)."""
    assert set(CRITERION_NAMES) == set(plan.CRITERIA) and set(ALLOCATION_NAMES) == {*plan.ALLOCATIONS, "search"}


# --- Ranges ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--calibration_batch_size", "0"], "calibration_batch_size must be positive, got 0"),
        (["--calibration_max_length", "1"], "calibration_max_length must be at least 2, got 1"),
        (["--calibration_examples", "0"], "calibration_examples must be positive, got 0"),
        (["--random_seeds", "0"], "random_seeds must be positive, got 0"),
        (["--ratios", "0,1.5"], r"ratios: 1.5 is not in \[0, 1\)"),
        (["--ratios", "0", "1.5"], r"ratios: 1.5 is not in \[0, 1\)"),
        (["--ratios", "0,half"], r"ratios: 'half' is not a number"),
        (["--ratios", " , "], "--ratios is empty"),
        (["--sft_at", "0.5,2"], r"sft_at: 2.0 is not in \[0, 1\)"),
        (["--sft_at", "0.9"], r"--sft_at ratios \[0.9\] are not among --ratios"),
        (["--criteria", "frequency,bogus"], "Unknown criterion 'bogus' in --criteria"),
        (["--criteria", "frequency@smart"], "Unknown allocation 'smart' in --criteria"),
        (["--sft_criteria", "reaper"], "Unknown criterion 'reaper' in --criteria"),
    ],
)
def test_ranges_are_checked_when_the_arguments_are_built(tmp_path, flags, message):
    with pytest.raises(ConfigurationError, match=message):
        parse_recipe(tmp_path, "", *flags, types=(*RECIPE_TYPES, SweepArguments))


def test_generation_ranges():
    with pytest.raises(ConfigurationError, match="generation_batch_size must be positive, got 0"):
        GenerationArguments(generation_batch_size=0)
    with pytest.raises(ConfigurationError, match="max_new_tokens must be positive, got 0"):
        GenerationArguments(max_new_tokens=0)
    with pytest.raises(ConfigurationError, match="no_repeat_ngram_size must be at least 0, got -1"):
        GenerationArguments(no_repeat_ngram_size=-1)


@pytest.mark.parametrize("flags", [["--ratios", "0,1.5"], ["--criteria", "frequency,bogus"]])
def test_the_sweep_refuses_a_bad_grid_before_loading_the_model(tmp_path, monkeypatch, flags):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner, "load_from_arguments", never)
    with pytest.raises(ConfigurationError):
        runner.run_sweep_cli(["--config", str(SWEEP_RECIPE), "--output_dir", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


# --- The leak check --------------------------------------------------------------------------------------------------


def test_calibrating_on_the_evaluated_file_is_refused_whatever_the_split(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dev.tsv").write_text("Hello.\tBonjour.\n", encoding="utf-8")
    calibration = CalibrationArguments(calibration_dataset=str(data / "dev.tsv"), calibration_split="train")
    with pytest.raises(ConfigurationError, match=r"Calibrating on .*dev.tsv would choose experts on the sentences"):
        check_calibration_data(calibration, DataSelection(str(data / "*.tsv"), "test"))  # a glob naming the same file
    with pytest.raises(ConfigurationError, match="calibrate on other files"):
        check_calibration_data(calibration, DataSelection(str(tmp_path / "data" / ".." / "data" / "dev.tsv"), "dev"))
    check_calibration_data(calibration, DataSelection(str(data / "other.tsv"), "test"))
    check_calibration_data(calibration, DataSelection("bible", "train"))


def test_calibration_split_aliases_are_resolved():
    with pytest.raises(ConfigurationError, match=r"Calibrating on bible:validation .*\(bible:dev\).*split: train"):
        check_calibration_data(CalibrationArguments(calibration_split="validation"), DataSelection("bible", "dev"))
    check_calibration_data(CalibrationArguments(calibration_split="dev"), DataSelection("flores_plus", "dev"))
    check_calibration_data(CalibrationArguments(calibration_split="train"), DataSelection("bible", "test"))


def test_monolingual_calibration_texts_count_as_calibration_data():
    calibration = CalibrationArguments(
        calibration_dataset="corpus.tsv", calibration_split="test", calibration_general_languages="fr"
    )
    with pytest.raises(ConfigurationError, match=r"Calibrating on bible:test .*\(bible:test\)"):
        check_calibration_data(calibration, DataSelection("bible", "test"))


def test_reference_files_count_as_shared_data():
    # fr->en calibration on the French references of an en->fr evaluation
    calibration = CalibrationArguments(
        calibration_dataset=str(FILES / "aligned.fr"), calibration_target_files=str(FILES / "aligned.en")
    )
    with pytest.raises(ConfigurationError, match=r"aligned.fr \+ .*aligned.en would choose experts"):
        check_calibration_data(
            calibration, DataSelection(str(FILES / "aligned.2.fr"), "test", [str(FILES / "aligned.fr")])
        )
    with pytest.raises(ConfigurationError, match="The eval data .* overlaps the SFT data"):
        DataArguments(
            dataset_name=str(FILES / "aligned.en"),
            dataset_target_files=str(FILES / "aligned.fr"),
            eval_dataset_name=str(FILES / "aligned.2.fr"),
            eval_target_files=[str(FILES / "aligned.fr")],
        )


# --- Aligned plain-text files through the knobs ----------------------------------------------------------------------

ALIGNED_REFERENCES = [
    ("Bonjour, mon ami.", "Bon matin, mon ami."),
    ("Merci beaucoup.", "Merci bien."),
    ("À demain.", "A demain."),
]


def test_calibration_reads_aligned_text_files(tmp_path):
    _, _, calibration, _, _ = parse_recipe(
        tmp_path,
        f"calibration_dataset: {FILES / 'aligned.en'}\n",
        "--calibration_target_files",
        f"{FILES / 'aligned.fr'},{FILES / 'aligned.2.fr'}",
    )
    assert calibration.calibration_target_files == [str(FILES / "aligned.fr"), str(FILES / "aligned.2.fr")]
    examples, general = calibration_data(calibration)
    assert [ex.references for ex in examples["en-fr"]] == ALIGNED_REFERENCES and general == {}
    assert calibration_settings(calibration)["calibration_target_files"] == calibration.calibration_target_files


def test_sft_and_eval_data_read_aligned_text_files(tmp_path):
    (tmp_path / "dev.en").write_text("Yes.\nNo.\n", encoding="utf-8")
    (tmp_path / "dev.fr").write_text("Oui.\nNon.\n", encoding="utf-8")
    recipe = (
        f"dataset_name: {FILES / 'aligned.en'}\n"
        f"dataset_target_files: [{FILES / 'aligned.fr'}, {FILES / 'aligned.2.fr'}]\n"
        f"eval_dataset_name: {tmp_path / 'dev.en'}\n"
        f"eval_target_files: {tmp_path / 'dev.fr'}\n"
        f"output_dir: {tmp_path / 'out'}\n"
    )
    _, data, _, _, training = parse_recipe(tmp_path, recipe)
    train, evaluation = load_data(data, training, need_eval=True)
    assert [ex.references for ex in train["en-fr"]] == ALIGNED_REFERENCES
    assert [(ex.source, ex.references) for ex in evaluation["en-fr"]] == [("Yes.", ("Oui.",)), ("No.", ("Non.",))]


def test_evaluated_data_arguments_take_target_files():
    (evaluation,) = parse_flags(
        (EvalDataArguments,),
        *("--eval_dataset_name", str(FILES / "aligned.en"), "--eval_directions", "en-fr"),
        *("--eval_target_files", str(FILES / "aligned.fr")),
    )
    assert evaluation.eval_target_files == [str(FILES / "aligned.fr")]
    examples = load_examples(
        evaluation.eval_dataset_name,
        evaluation.eval_directions,
        evaluation.eval_split,
        target_files=evaluation.eval_target_files,
    )
    assert [ex.references for ex in examples["en-fr"]] == [(refs[0],) for refs in ALIGNED_REFERENCES]
    with pytest.raises(ConfigurationError, match="eval_target_files only apply to local files .* not to the bible"):
        EvalDataArguments(eval_dataset_name="bible", eval_directions="en-fr", eval_target_files="refs.fr")
    with pytest.raises(ConfigurationError, match="max_eval_examples must be positive, got 0"):
        EvalDataArguments(eval_directions=["en-fr"], max_eval_examples=0)
    default = EvalDataArguments()  # what a recipe's SFT data defaults to
    assert (default.eval_dataset_name, default.eval_directions, default.eval_split) == ("bible", ["en-fr"], "dev")


def test_target_files_of_a_built_in_source_name_their_knob(tmp_path):
    with pytest.raises(ConfigurationError, match="dataset_target_files only apply to local files"):
        parse_recipe(tmp_path, "dataset_target_files: refs.fr\n")
    with pytest.raises(ConfigurationError, match="calibration_target_files only apply to local files"):
        CalibrationArguments(calibration_target_files=["refs.fr"])
