"""Sweep grid, table and resumability."""

from __future__ import annotations

import json

import pytest

from moe_specialist.sweep import Point, SweepArguments, format_table, sweep_points, table_rows


def test_points_grid_shares_the_baseline_and_seeds_random():
    args = SweepArguments(ratios="0,0.5,0.75", criteria="frequency,random", random_seeds=3, sft_at="0.75")
    points = sweep_points(args, "frequency", seed=0)
    ids = [p.id for p in points]
    assert ids[0] == "r0.000-frequency" and "r0.000-random-s0" not in ids  # one unpruned baseline
    assert {"r0.500-random-s0", "r0.500-random-s1", "r0.500-random-s2"} <= set(ids)
    assert "r0.750-frequency-sft" in ids and not any(i.startswith("r0.750-random") and i.endswith("sft") for i in ids)
    assert len(ids) == len(set(ids))


def test_grid_errors():
    with pytest.raises(ValueError, match=r"--sft_at ratios \[0.9\] are not among --ratios"):
        sweep_points(SweepArguments(ratios="0,0.5", sft_at="0.9"), "frequency", 0)
    with pytest.raises(ValueError, match="--sft_criteria"):
        sweep_points(
            SweepArguments(ratios="0,0.5", criteria="reap", sft_at="0.5", sft_criteria="gate_mass"), "frequency", 0
        )


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
    assert "0.500+SFT" in text and "41.00 (102%)" in text
    json.dumps(rows)
