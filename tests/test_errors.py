"""What a user sees for bad input: one paragraph on stderr, ``moe-specialist <command>: error: ...``, exit status 2,
no traceback (``--debug`` shows it); and the input checks that run before any model is loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_specialist.cli import main
from moe_specialist.errors import ConfigurationError
from tests.conftest import build_tiny_translator

TINY_RECIPE = Path(__file__).parent / "fixtures" / "recipes" / "tiny_prune_sft.yaml"


def user_error(capsys, *argv) -> str:
    """Run the CLI as a user would (no --debug); return the one line it printed on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def stats_file(tiny_translator, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stats") / "stats.safetensors"
    main(["calibrate", "--model", str(tiny_translator), "--calibration_examples", "4", "--output", str(path)])
    return path


@pytest.fixture
def write(tmp_path):
    def write(name: str, content) -> Path:
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return path

    return write


def test_ten_bad_inputs_get_one_paragraph_each(capsys, tiny_translator, stats_file, tmp_path, write):
    model = str(tiny_translator)
    cases = [
        (
            ("frobnicate",),
            "moe-specialist: error: unknown command 'frobnicate'; commands: inspect, calibrate, plan, prune",
        ),
        (("inspect", tmp_path / "missing"), f"moe-specialist inspect: error: No model at {tmp_path / 'missing'}"),
        (
            (
                "plan",
                "--model",
                model,
                "--statistics_file",
                stats_file,
                "--pruning_rat",
                "0.5",
                "--output",
                tmp_path / "p",
            ),
            "moe-specialist plan: error: Unknown argument(s) --pruning_rat 0.5: flags are spelled out in full",
        ),
        (
            (
                "plan",
                "--model",
                model,
                "--statistics_file",
                stats_file,
                "--pruning_ratio",
                "1.5",
                "--output",
                "p.json",
            ),
            "moe-specialist plan: error: pruning_ratio must be in [0, 1)",
        ),
        (
            ("plan", "--model", model, "--pruning_criterion", "magic", "--output", tmp_path / "p.json"),
            "moe-specialist plan: error: Unknown pruning_criterion 'magic'",
        ),
        (
            (
                "prune",
                "--model",
                model,
                "--prune_plan",
                write("list.json", {"kept_experts": [[0, 1]]}),
                "--output",
                "o",
            ),
            "moe-specialist prune: error:",
        ),
        (
            (
                "prune",
                "--model",
                model,
                "--prune_plan",
                write("few.json", {"kept_experts": {"0": [3]}}),
                "--output",
                "o",
            ),
            "moe-specialist prune: error: Layer 0 would keep 1 experts, fewer than top-k=2",
        ),
        (
            ("prune", "--model", model, "--prune_plan", tmp_path / "absent.json", "--output", tmp_path / "o"),
            "moe-specialist prune: error: No prune plan at",
        ),
        (
            ("prune", "--model", model, "--output", tmp_path / "o"),
            "moe-specialist prune: error: --prune_plan is required",
        ),
        (
            ("prune", "--model", model, "--plan", tmp_path / "absent.json", "--output", tmp_path / "o"),
            "moe-specialist prune: error: Unknown argument(s) --plan",  # one name per knob: the recipe's
        ),
        (
            ("calibrate", "--model", model, "--output", stats_file),
            f"moe-specialist calibrate: error: Output {stats_file} already exists",
        ),
        (
            ("calibrate", "--model", model, "--calibration_batch_size", "0", "--output", tmp_path / "s.safetensors"),
            "moe-specialist calibrate: error: calibration_batch_size",
        ),
        (
            ("calibrate", "--config", write("float.yaml", "calibration_examples: 2.5\n"), "--output", "s.safetensors"),
            "moe-specialist calibrate: error: calibration_examples",
        ),
        (
            ("calibrate", "--config", write("unknown.yaml", "calibration_exampels: 4\n"), "--output", "s.safetensors"),
            "moe-specialist calibrate: error: Unknown recipe key(s) calibration_exampels: remove them",
        ),
        (
            (
                "evaluate",
                "--model",
                model,
                "--eval_dataset_name",
                tmp_path / "nowhere.tsv",
                "--eval_directions",
                "en-fr",
            ),
            "moe-specialist evaluate: error: Data source",
        ),
    ]
    for argv, expected in cases:
        line = user_error(capsys, *argv)
        assert line.startswith(expected), f"{argv}: {line}"
    assert not (tmp_path / "o").exists() and not Path("o").exists() and not Path("p.json").exists()


def test_debug_shows_the_traceback(tiny_translator):
    with pytest.raises(ConfigurationError, match="pruning_ratio must be in"):
        main(["plan", "--model", str(tiny_translator), "--pruning_ratio", "2", "--output", "p.json", "--debug"])


def test_unwritable_output_is_refused_before_calibrating(capsys, tiny_translator, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    line = user_error(
        capsys, "calibrate", "--model", tiny_translator, "--output", blocker / "stats.safetensors"
    )  # the parent is a file: nothing can be written there
    assert line.startswith(f"moe-specialist calibrate: error: Cannot write to {blocker}")
    assert "calibrate" not in capsys.readouterr().err  # no progress bar: nothing was computed


def test_plan_refuses_statistics_of_another_checkpoint_with_the_same_config(
    capsys, tiny_translator, stats_file, tmp_path, demo_tokenizer
):
    sibling = build_tiny_translator(tmp_path / "sibling", demo_tokenizer, seed=1)  # same config, other weights
    capsys.readouterr()
    line = user_error(
        capsys, "plan", "--model", sibling, "--statistics_file", stats_file, "--output", tmp_path / "p.json"
    )
    assert "collected on a model with other router weights" in line
    main(
        [
            "plan",
            "--model",
            str(tiny_translator),
            "--statistics_file",
            str(stats_file),
            "--output",
            str(tmp_path / "ok"),
        ]
    )
    assert json.loads((tmp_path / "ok").read_text())["kept_experts"]


def test_plan_reads_routers_under_their_checkpoint_names(capsys, stats_file, tiny_translator, tmp_path):
    """Mixtral saves ``mlp.gate`` as ``block_sparse_moe.gate``: the check must find it, and a changed router fails."""
    from moe_specialist.stats import RoutingStats, checkpoint_router_fingerprint, router_fingerprint
    from tests.tiny_models import tiny_model

    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "mixtral")
    weights = load_file(tmp_path / "mixtral" / "model.safetensors")
    assert "model.layers.0.block_sparse_moe.gate.weight" in weights
    from moe_specialist.architectures import find_moe
    from moe_specialist.prune import structure_from_config

    meta = structure_from_config(model.config)
    assert checkpoint_router_fingerprint(meta, tmp_path / "mixtral") == router_fingerprint(find_moe(model))
    stats = RoutingStats.empty(["en-fr"], meta.layer_indices, [8] * len(meta.layers))
    stats.metadata["router_fingerprint"] = router_fingerprint(find_moe(model))
    stats.validate_for(meta, checkpoint=tmp_path / "mixtral")
    weights["model.layers.3.block_sparse_moe.gate.weight"] += 1e-3
    save_file(weights, tmp_path / "mixtral" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigurationError, match="other router weights"):
        stats.validate_for(meta, checkpoint=tmp_path / "mixtral")


def test_inspect_trust_remote_code_false_runs_no_remote_code(capsys, tiny_translator, tmp_path):
    import shutil

    model = tmp_path / "remote"
    shutil.copytree(tiny_translator, model)
    marker = tmp_path / "remote-code-ran"
    (model / "configuration_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import Qwen3MoeConfig\n\nclass EvilConfig(Qwen3MoeConfig):\n    model_type = 'evil'\n"
    )
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps(config))
    main(["inspect", str(model), "--trust_remote_code", "false"])
    assert "Qwen3MoeForCausalLM" in capsys.readouterr().out  # the built-in class, from model_type
    assert not marker.exists()
    with pytest.raises(SystemExit):  # the flag's value counts: true runs the remote code (here an error follows)
        main(["inspect", str(model), "--trust_remote_code", "true"])
    assert marker.read_text() == "ran"


def _subprocess(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=300)


def test_train_entry_point_reports_bad_recipes_without_a_traceback(tiny_translator, tmp_path):
    base = ("moe_specialist.train", "--config", str(TINY_RECIPE), "--model_name_or_path", str(tiny_translator))
    result = _subprocess(*base, "--output_dir", str(tmp_path / "run"), "--pruning_ratio", "1.0")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("moe-specialist train: error: pruning_ratio must be in [0, 1)")
    )
    assert "Traceback" not in result.stderr
    debug = _subprocess(*base, "--output_dir", str(tmp_path / "run"), "--pruning_ratio", "1.0", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert not (tmp_path / "run").exists()


def test_tensors_are_untouched_by_a_refused_prune(tiny_translator, tmp_path, capsys):
    before = load_file(Path(tiny_translator) / "model.safetensors")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"kept_experts": {str(i): [0, 1, 2, 3] for i in range(4)}}))
    line = user_error(
        capsys, "prune", "--model", tiny_translator, "--prune_plan", plan, "--output", tiny_translator, "--overwrite"
    )
    assert line.startswith("moe-specialist prune: error:")
    after = load_file(Path(tiny_translator) / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_training_run_or_sweep_never_writes_into_the_model_directory(tiny_translator, tmp_path):
    from moe_specialist.sweep import run_sweep_cli
    from moe_specialist.training import parse_recipe, run

    listing = sorted(p.name for p in Path(tiny_translator).iterdir())
    for output in (tiny_translator, Path(tiny_translator) / "run", Path(tiny_translator).parent):
        flags = [
            "--config",
            str(TINY_RECIPE),
            "--model_name_or_path",
            str(tiny_translator),
            "--output_dir",
            str(output),
        ]
        with pytest.raises(ConfigurationError, match="writing it would modify or delete the input"):
            run(*parse_recipe([*flags, "--overwrite_output_dir", "true"]))
        with pytest.raises(ConfigurationError, match="writing it would modify or delete the input"):
            run_sweep_cli([*flags, "--ratios", "0,0.5", "--report_to", "none"])
    assert sorted(p.name for p in Path(tiny_translator).iterdir()) == listing
