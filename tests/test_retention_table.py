"""benchmarks/retention_table.py: sweeps of one setup side by side, refused when they differ or overlap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.retention_table import main, merged_points
from moe_specialist.errors import ConfigurationError
from moe_specialist.sweep.grid import Point

EVAL = {"dataset": "bible", "split": "test", "directions": ["en-fr"], "decoding": {"max_new_tokens": 160}}


def point(ratio: float, method: str, chrf: float) -> dict:
    return {
        "point": Point(ratio, method, 0, False).id,
        "target_ratio": ratio,
        "actual_ratio": ratio,
        "criterion": method,
        "seed": 0,
        "sft": False,
        "average": {"chrf++": chrf, "bleu": chrf / 2, "off_target_rate": 0.0},
        "experts_per_layer": [4],
        "parameters": {"total": 10, "active": 5},
        "checkpoint_bytes": 2**20,
    }


def sweep(path: Path, points: list[dict], evaluation: dict = EVAL) -> Path:
    path.mkdir()
    (path / "results.json").write_text(json.dumps({"model": "demo", "eval": evaluation, "points": points}))
    return path


def test_sweeps_side_by_side(tmp_path, capsys):
    plain = sweep(tmp_path / "plain", [point(0, "gate_mass@search", 40.0), point(0.5, "gate_mass@search", 30.0)])
    refit = sweep(
        tmp_path / "refit", [point(0, "gate_mass@search+refit", 40.0), point(0.5, "gate_mass@search+refit", 36.0)]
    )
    assert [p["point"] for p in merged_points([plain, refit])] == [
        "r0.000-gate_mass-search",
        "r0.500-gate_mass-search",
        "r0.500-gate_mass-search-refit",
    ]
    main(["--sweeps", str(plain), str(refit), "--plot", str(tmp_path / "curve.png")])
    table = capsys.readouterr().out
    assert table.startswith("| pruned | gate_mass@search | gate_mass@search+refit |")
    assert "| 0.500 | 30.00 (75%) | 36.00 (90%) |" in table
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_a_label_makes_the_same_method_another_column(tmp_path, capsys):
    first = sweep(
        tmp_path / "first",
        [point(0, "gate_mass@sensitivity+refit", 40.0), point(0.5, "gate_mass@sensitivity+refit", 36.0)],
    )
    again = sweep(
        tmp_path / "again",
        [point(0, "gate_mass@sensitivity+refit", 40.0), point(0.5, "gate_mass@sensitivity+refit", 38.0)],
    )
    with pytest.raises(ConfigurationError, match=r"compare sweeps of different methods, or label one \(DIR=LABEL\)"):
        merged_points([first, again])
    main(["--sweeps", f"{first}=64 fit", str(again), "--plot", str(tmp_path / "curve.png")])
    table = capsys.readouterr().out
    assert table.startswith("| pruned | gate_mass@sensitivity+refit | gate_mass@sensitivity+refit (64 fit) |")
    assert "| 0.500 | 38.00 (95%) | 36.00 (90%) |" in table


def test_other_data_or_the_same_points_are_refused(tmp_path):
    first = sweep(tmp_path / "first", [point(0.5, "reap@uniform", 30.0)])
    dev = sweep(tmp_path / "dev", [point(0.5, "frequency@uniform", 31.0)], {**EVAL, "split": "dev"})
    with pytest.raises(ConfigurationError, match="was scored on another model, eval set or decoding than"):
        merged_points([first, dev])
    again = sweep(tmp_path / "again", [point(0.5, "reap@uniform", 32.0)])
    with pytest.raises(ConfigurationError, match=r"has points another sweep has too \(\['r0.500-reap-uniform'\]"):
        merged_points([first, again])
