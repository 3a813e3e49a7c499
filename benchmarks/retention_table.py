"""Several sweeps of one model on one eval set side by side: one table and one chrF++ curve of all their methods.

A sweep's grid is fixed once it runs (a resumed sweep refuses another configuration), so a comparison added later
(e.g. the ``+refit`` methods beside a sweep of the baselines) is its own sweep; this reads their ``results.json``
and refuses sweeps scored on different data or decoding. The README's training-free retention tables and plots:

    python -m benchmarks.retention_table --sweeps outputs/compare-test outputs/refit-test="64 fit" \
        outputs/fit256-test --plot docs/retention_en-fr.png --title "demo, en->fr (test)"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_specialist.entry import run_entry_point
from moe_specialist.errors import ConfigurationError
from moe_specialist.plots import plot_quality_curve
from moe_specialist.sweep.outputs import format_table, table_rows


def labelled(points: list[dict], label: str) -> list[dict]:
    """``points`` as a method of their own: ``criterion (label)``, so that one method measured under two settings
    (e.g. two fit sizes of the re-fit, which point ids do not name) gets two columns."""
    return [{**p, "criterion": f"{p['criterion']} ({label})", "point": f"{p['point']}-{label}"} for p in points]


def merged_points(sweep_dirs: list[Path], labels: list[str | None] | None = None) -> list[dict]:
    """Every point of the sweeps (those of a sweep with a label renamed by :func:`labelled`); the unpruned baseline
    once (every sweep scores the same unpruned model)."""
    points, evaluation = [], None
    for sweep_dir, label in zip(sweep_dirs, labels or [None] * len(sweep_dirs), strict=True):
        results = json.loads((sweep_dir / "results.json").read_text())
        if evaluation is not None and (results["model"], results["eval"]) != evaluation:
            raise ConfigurationError(
                f"{sweep_dir} was scored on another model, eval set or decoding than {sweep_dirs[0]}: "
                f"{results['model']}, {results['eval']} against {evaluation}; compare sweeps of one setup only."
            )
        evaluation = results["model"], results["eval"]
        baseline_seen = any(p["target_ratio"] == 0 for p in points)
        new = [p for p in results["points"] if not (baseline_seen and p["target_ratio"] == 0)]
        new = labelled(new, label) if label else new
        twice = {p["point"] for p in points} & {p["point"] for p in new}
        if twice:
            raise ConfigurationError(
                f"{sweep_dir} has points another sweep has too ({sorted(twice)[:3]}...): the table would average "
                "them as seeds of one method; compare sweeps of different methods, or label one (DIR=LABEL)."
            )
        points += new
    return points


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sweeps",
        nargs="+",
        required=True,
        help="Sweep output directories; DIR=LABEL names the methods of that sweep 'method (LABEL)'.",
    )
    parser.add_argument("--plot", type=Path, required=True, help="Where the chrF++ curve is written (PNG).")
    parser.add_argument("--title", default="chrF++ vs share of experts removed")
    args = parser.parse_args(argv)
    sweeps = [arg.partition("=") for arg in args.sweeps]
    rows = table_rows(merged_points([Path(path) for path, _, _ in sweeps], [label or None for _, _, label in sweeps]))
    plot_quality_curve(rows, args.plot, title=args.title)
    print(format_table(rows, markdown=True))


if __name__ == "__main__":
    run_entry_point("retention_table", main, sys.argv[1:])
