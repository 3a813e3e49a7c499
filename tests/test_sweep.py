"""Sweep grid, table and resumability."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from moe_specialist.sweep import Point, SweepArguments, format_table, run_sweep_cli, sweep_points, table_rows


def test_points_grid_shares_the_baseline_and_seeds_random():
    args = SweepArguments(ratios="0,0.5,0.75", criteria="frequency,random", random_seeds=3, sft_at="0.75")
    points = sweep_points(args, "frequency", 0, "uniform")
    ids = [p.id for p in points]
    assert ids[0] == "r0.000-frequency-uniform" and "r0.000-random-uniform-s0" not in ids  # one unpruned baseline
    assert {"r0.500-random-uniform-s0", "r0.500-random-uniform-s1", "r0.500-random-uniform-s2"} <= set(ids)
    assert "r0.750-frequency-uniform-sft" in ids
    assert not any(i.startswith("r0.750-random") and i.endswith("sft") for i in ids)
    assert len(ids) == len(set(ids))


def test_grid_errors():
    with pytest.raises(ValueError, match=r"--sft_at ratios \[0.9\] are not among --ratios"):
        sweep_points(SweepArguments(ratios="0,0.5", sft_at="0.9"), "frequency", 0, "uniform")
    with pytest.raises(ValueError, match="--sft_criteria"):
        sweep_points(
            SweepArguments(ratios="0,0.5", criteria="reap", sft_at="0.5", sft_criteria="gate_mass"),
            "frequency",
            0,
            "uniform",
        )
    with pytest.raises(ValueError, match="Unknown allocation 'smart' in --criteria"):
        sweep_points(SweepArguments(ratios="0,0.5", criteria="reap@smart"), "frequency", 0, "uniform")


def test_methods_combine_criteria_and_allocations():
    args = SweepArguments(ratios="0,0.5", criteria="frequency@coverage,frequency,random@global", random_seeds=2)
    ids = [p.id for p in sweep_points(args, "frequency", 0, "uniform")]
    assert ids == [
        "r0.000-frequency-coverage",
        "r0.500-frequency-coverage",
        "r0.500-frequency-uniform",
        "r0.500-random-global-s0",
        "r0.500-random-global-s1",
    ]


def result(ratio, criterion, chrf, seed=0, sft=False):
    point = Point(ratio, criterion, seed, sft)
    return {
        "point": point.id,
        "ratio": ratio,
        "criterion": criterion,
        "seed": seed,
        "sft": sft,
        "pruning_ratio": ratio,
        "experts_per_layer": [8, 8],
        "parameters": {"total": 100, "active": 50},
        "checkpoint_bytes": 2**20,
        "average": {"chrf++": chrf, "bleu": chrf / 3, "off_target_rate": 0.0},
    }


def test_table_averages_random_seeds_and_relates_to_the_baseline():
    results = [
        result(0, "frequency", 40.0),
        result(0.5, "frequency", 38.0),
        result(0.5, "random", 10.0, 0),
        result(0.5, "random", 20.0, 1),
        result(0.5, "random", 30.0, 2),
        result(0.5, "frequency", 41.0, sft=True),
    ]
    rows = table_rows(results)
    random_row = next(r for r in rows if r["criterion"] == "random" and r["pruning_ratio"] == 0.5)
    assert random_row["chrf++"] == 20.0 and random_row["seeds"] == 3
    assert (random_row["chrf++_min"], random_row["chrf++_max"]) == (10.0, 30.0)
    assert random_row["relative_chrf"] == 0.5
    sft_row = next(r for r in rows if r["sft"])
    assert sft_row["relative_chrf"] == round(41 / 40, 4)
    # the unpruned point starts every criterion's curve
    assert {r["criterion"] for r in rows if r["pruning_ratio"] == 0} == {"frequency", "random"}
    text = format_table(rows)
    assert "0.500 + SFT" in text and "41.00 (102%)" in text
    json.dumps(rows)


RECIPE = Path(__file__).parent / "fixtures" / "recipes" / "tiny_prune_sft.yaml"


@pytest.mark.slow
def test_sweep_end_to_end_and_resume(tiny_translator, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "sweep"
    argv = [
        "--config",
        str(RECIPE),
        "--model_name_or_path",
        str(tiny_translator),
        "--output_dir",
        str(out),
        "--ratios",
        "0,0.5",
        "--criteria",
        "frequency,random",
        "--random_seeds",
        "2",
        "--sft_at",
        "0.5",
        "--max_eval_examples",
        "3",
        "--mt_eval_max_new_tokens",
        "4",
        "--report_to",
        "wandb",
        "--heatmap_ratio",
        "0.5",
    ]
    run_sweep_cli(argv)
    points = sorted(p.name for p in (out / "points").iterdir())
    assert points == [
        "r0.000-frequency-uniform",
        "r0.500-frequency-uniform",
        "r0.500-frequency-uniform-sft",
        "r0.500-random-uniform-s0",
        "r0.500-random-uniform-s1",
    ]
    sft = json.loads((out / "points" / "r0.500-frequency-uniform-sft" / "result.json").read_text())
    assert sft["experts_per_layer"] == [4, 4, 4, 4] and sft["sft"] is True
    pruned = json.loads((out / "points" / "r0.500-frequency-uniform" / "result.json").read_text())
    assert pruned["parameters"]["routed_experts"] == 4 * 4 * 3 * 64 * 24
    assert set(pruned["directions"]["en-fr"]) >= {"chrf++", "bleu", "chrf++_signature", "off_target_rate"}
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["pruning_ratio"], r["criterion"], r["sft"]) for r in rows} == {
        ("0.0", "frequency@uniform", "False"),
        ("0.0", "random@uniform", "False"),
        ("0.5", "frequency@uniform", "False"),
        ("0.5", "frequency@uniform", "True"),
        ("0.5", "random@uniform", "False"),
    }
    summary = json.loads((out / "results.json").read_text())
    assert summary["eval"]["examples_per_direction"] == {"en-fr": 3}
    assert len(summary["points"]) == 5
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("| pruned | frequency@uniform | random@uniform |")
    assert "| 0.500 + SFT |" in markdown and "nrefs:3|" in markdown
    for plot in ("chrf_vs_ratio.png", "expert_usage.png"):
        assert (out / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
    # one W&B run per point and a summary run; the SFT's own training run lives in its output directory
    assert len(list((out / "wandb").glob("offline-run-*"))) == 5 + 1
    assert len(list((out / "points" / "r0.500-frequency-uniform-sft" / "sft" / "wandb").glob("offline-run-*"))) == 1
    # resume: finished points are kept, an interrupted one is redone from scratch
    kept = (out / "points" / "r0.500-random-uniform-s0" / "result.json").stat().st_mtime_ns
    (out / "points" / "r0.500-random-uniform-s1" / "result.json").unlink()
    (out / "points" / "r0.500-random-uniform-s1" / "stale.tmp").write_text("half-written")
    run_sweep_cli([*argv[:-4], "--report_to", "none", "--heatmap_ratio", "0.5"])
    assert (out / "points" / "r0.500-random-uniform-s0" / "result.json").stat().st_mtime_ns == kept
    assert (out / "points" / "r0.500-random-uniform-s1" / "result.json").is_file()
    assert not (out / "points" / "r0.500-random-uniform-s1" / "stale.tmp").exists()
    # another configuration must not reuse these points
    with pytest.raises(ValueError, match=r"another configuration \(max_eval_examples differ\)"):
        run_sweep_cli([*argv, "--max_eval_examples", "2"])
