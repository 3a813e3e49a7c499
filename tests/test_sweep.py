"""Sweep grid, table and resumability."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from moe_specialist import plots
from moe_specialist.plan import PrunePlan
from moe_specialist.prune import prune_model
from moe_specialist.sweep import Point, SweepArguments, format_table, run_sweep_cli, sweep_points, table_rows
from tests.helpers import wandb_records
from tests.tiny_models import tiny_model


def test_points_grid_shares_the_baseline_and_seeds_random():
    args = SweepArguments(ratios="0,0.5,0.75", criteria="frequency,random", random_seeds=3, sft_at="0.75")
    points = sweep_points(args, "frequency", 0, "uniform", "none")
    ids = [p.id for p in points]
    assert ids[0] == "r0.000-frequency-uniform" and "r0.000-random-uniform-s0" not in ids  # one unpruned baseline
    assert {"r0.500-random-uniform-s0", "r0.500-random-uniform-s1", "r0.500-random-uniform-s2"} <= set(ids)
    assert "r0.750-frequency-uniform-sft" in ids
    assert not any(i.startswith("r0.750-random") and i.endswith("sft") for i in ids)
    assert len(ids) == len(set(ids))


def test_grid_errors():
    with pytest.raises(ValueError, match=r"--sft_at ratios \[0.9\] are not among --ratios"):
        sweep_points(SweepArguments(ratios="0,0.5", sft_at="0.9"), "frequency", 0, "uniform", "none")
    with pytest.raises(ValueError, match="--sft_criteria"):
        sweep_points(
            SweepArguments(ratios="0,0.5", criteria="reap", sft_at="0.5", sft_criteria="gate_mass"),
            "frequency",
            0,
            "uniform",
            "none",
        )
    with pytest.raises(ValueError, match="Unknown allocation 'smart' in --criteria"):
        sweep_points(SweepArguments(ratios="0,0.5", criteria="reap@smart"), "frequency", 0, "uniform", "none")


def test_methods_combine_criteria_and_allocations():
    args = SweepArguments(ratios="0,0.5", criteria="frequency@coverage,frequency,random@global", random_seeds=2)
    ids = [p.id for p in sweep_points(args, "frequency", 0, "uniform", "none")]
    assert ids == [
        "r0.000-frequency-coverage",
        "r0.500-frequency-coverage",
        "r0.500-frequency-uniform",
        "r0.500-random-global-s0",
        "r0.500-random-global-s1",
    ]


def result(ratio, criterion, chrf, seed=0, sft=False, actual=None):
    point = Point(ratio, criterion, seed, sft)
    training = {"training": {"recovery": "kd", "global_step": 100}} if sft else {}
    return {
        **training,
        "point": point.id,
        "target_ratio": ratio,
        "criterion": criterion,
        "seed": seed,
        "sft": sft,
        "actual_ratio": ratio if actual is None else actual,
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
    random_row = next(r for r in rows if r["criterion"] == "random" and r["target_ratio"] == 0.5)
    assert random_row["chrf++"] == 20.0 and random_row["seeds"] == 3
    assert (random_row["chrf++_min"], random_row["chrf++_max"]) == (10.0, 30.0)
    assert random_row["relative_chrf"] == 0.5
    sft_row = next(r for r in rows if r["sft"])
    assert sft_row["relative_chrf"] == round(41 / 40, 4)
    # the unpruned point starts every criterion's curve
    assert {r["criterion"] for r in rows if r["target_ratio"] == 0} == {"frequency", "random"}
    text = format_table(rows)
    assert "0.500 + kd, 100 steps" in text and "41.00 (102%)" in text
    json.dumps(rows)


def test_rows_name_the_target_and_the_actual_ratio():
    """Whole experts put the actual ratio off the target (0.3 of 32 experts keeps 22: 0.3125 removed)."""
    rows = table_rows([result(0, "frequency", 40.0), result(0.3, "frequency", 30.0, actual=0.3125)])
    assert [(r["target_ratio"], r["actual_ratio"]) for r in rows] == [(0, 0), (0.3, 0.3125)]
    assert all("pruning_ratio" not in r for r in rows)
    lines = format_table(rows).splitlines()
    assert lines[0].split(" | ")[0].strip() == "pruned"
    assert lines[2].lstrip().startswith("0.000 |") and lines[3].startswith("0.300 (actual 0.312) |")
    assert len({len(line) for line in lines}) == 1  # columns stay aligned
    assert "| 0.300 (actual 0.312) | 30.00 (75%) |" in format_table(rows, markdown=True)


def test_quality_curve_is_drawn_against_the_actual_ratio(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    rows = table_rows([result(0, "frequency", 40.0), result(0.3, "frequency", 30.0, actual=0.3125)])
    plots.plot_quality_curve(rows, tmp_path / "curve.png")
    (axes,) = figures[0].axes
    assert axes.get_xlabel() == "actual_ratio: share of routed experts removed"
    line = next(line for line in axes.get_lines() if line.get_label() == "frequency")
    assert list(line.get_xdata()) == [0, 0.3125]
    plt.close(figures[0])


def test_the_run_summary_names_the_target_and_the_actual_ratio():
    from moe_specialist.configs import PruningArguments
    from moe_specialist.training.outputs import wandb_summary

    model = tiny_model("qwen3_moe")
    report = prune_model(model, PrunePlan({0: [0, 1], 1: [0, 1, 2, 3], 2: list(range(8)), 3: list(range(8))}))
    pruning = {"target_ratio": 0.3, **report.to_dict()}  # the plan's target, as the pipeline's results hold it
    summary = wandb_summary({"pruning": pruning, "scores": {}}, PruningArguments(pruning_ratio=0.3))
    assert (summary["pruning/target_ratio"], summary["pruning/actual_ratio"]) == (0.3, 0.3125)
    assert "pruning/ratio" not in summary and "pruning_ratio" not in report.to_dict()
    unpruned = wandb_summary({"pruning": None, "scores": {}}, PruningArguments(pruning_ratio=0.3))
    assert not any("ratio" in key for key in unpruned)  # nothing was removed: no ratio to report


RECIPE = Path(__file__).parent / "fixtures" / "recipes" / "tiny_prune_sft.yaml"


def wandb_bytes(run_dir: Path) -> bytes:
    """An offline W&B run's records (config, history and summary are in its .wandb file)."""
    return b"".join(wandb_records(path) for path in run_dir.glob("run-*.wandb"))


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
        "--max_new_tokens",
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
    assert (pruned["target_ratio"], pruned["actual_ratio"]) == (0.5, 0.5) and "pruning_ratio" not in pruned
    assert pruned["parameters"]["routed_experts"] == 4 * 4 * 3 * 64 * 24
    assert set(pruned["directions"]["en-fr"]) >= {"chrf++", "bleu", "chrf++_signature", "off_target_rate"}
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["target_ratio"], r["actual_ratio"], r["criterion"], r["sft"]) for r in rows} == {
        ("0.0", "0.0", "frequency@uniform", "False"),
        ("0.0", "0.0", "random@uniform", "False"),
        ("0.5", "0.5", "frequency@uniform", "False"),
        ("0.5", "0.5", "frequency@uniform", "True"),
        ("0.5", "0.5", "random@uniform", "False"),
    }
    summary = json.loads((out / "results.json").read_text())
    assert summary["eval"]["examples_per_direction"] == {"en-fr": 3}
    assert len(summary["points"]) == 5
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("| pruned | frequency@uniform | random@uniform |")
    assert "| 0.500 + sft, 2 steps |" in markdown and "nrefs:3|" in markdown
    for plot in ("chrf_vs_ratio.png", "expert_usage.png"):
        assert (out / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
    # one W&B run per point and a summary run; an SFT point's run is its training run, in its output directory,
    # and its score is that run's end score (scored once, not reloaded and scored again)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 4 + 1
    (sft_run,) = (out / "points" / "r0.500-frequency-uniform-sft" / "sft" / "wandb").glob("offline-run-*")
    assert b"sweep_point" in wandb_bytes(sft_run) and out.name.encode() in wandb_bytes(sft_run)  # job type, group
    trained = json.loads((out / "points" / "r0.500-frequency-uniform-sft" / "sft" / "results.json").read_text())
    assert sft["average"] == trained["scores"]["end"]["average"] and sft["training"] == trained["training"]
    assert [h["label"] for h in trained["history"]] == ["end"]  # no second prune-only score
    point_run = next(run for run in runs if any(run.glob("run-*.wandb")) and b"sweep_point" in wandb_bytes(run))
    assert b"pruning/target_ratio" in wandb_bytes(point_run) and b"pruning/actual_ratio" in wandb_bytes(point_run)
    assert b"pruning/ratio" not in wandb_bytes(point_run)
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


def test_sweep_with_the_sensitivity_allocation_measures_each_ranking_once(tiny_translator, tmp_path, caplog):
    import logging

    from moe_specialist.plan import PrunePlan

    out = tmp_path / "sensitivity"
    argv = [
        "--config", str(RECIPE), "--model_name_or_path", str(tiny_translator), "--output_dir", str(out),
        "--ratios", "0,0.5,0.75", "--criteria", "frequency@sensitivity,gate_mass@sensitivity",
        "--sensitivity_examples", "4", "--max_eval_examples", "2", "--max_new_tokens", "4", "--report_to", "none",
    ]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="moe_specialist.sensitivity"):
        run_sweep_cli(argv)
    measured = [r for r in caplog.records if r.getMessage().startswith("Layer sensitivity")]
    assert len(measured) == 2  # one measurement per criterion's ranking, reused across the ratios
    for criterion in ("frequency", "gate_mass"):
        plans = [
            PrunePlan.load(out / "points" / f"r{ratio}-{criterion}-sensitivity" / "prune_plan.json")
            for ratio in ("0.500", "0.750")
        ]
        assert [p.metadata["allocation"] for p in plans] == ["sensitivity"] * 2
        assert plans[0].metadata["layer_costs"] == plans[1].metadata["layer_costs"]
        assert [p.metadata["actual_ratio"] for p in plans] == [0.5, 0.75]
        assert [sum(len(ids) for ids in p.kept_experts.values()) for p in plans] == [16, 8]
