"""Several sweeps of one model on one eval set side by side: one table and one chrF++ curve of all their methods.

A sweep's grid is fixed once it runs (a resumed sweep refuses another configuration), so a comparison added later
(e.g. the ``+refit`` methods beside a sweep of the baselines) is its own sweep; this reads their ``results.json``
and refuses sweeps scored on different data or decoding. The README's training-free retention tables and plots:

    python -m benchmarks.retention_table --sweeps outputs/compare-test outputs/refit-test \
        --plot docs/retention_en-fr.png --title "demo, en->fr (test)"
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


def merged_points(sweep_dirs: list[Path]) -> list[dict]:
    """Every point of the sweeps; the unpruned baseline once (every sweep scores the same unpruned model)."""
    points, evaluation = [], None
    for sweep_dir in sweep_dirs:
        results = json.loads((sweep_dir / "results.json").read_text())
        if evaluation is not None and (results["model"], results["eval"]) != evaluation:
            raise ConfigurationError(
                f"{sweep_dir} was scored on another model, eval set or decoding than {sweep_dirs[0]}: "
                f"{results['model']}, {results['eval']} against {evaluation}; compare sweeps of one setup only."
            )
        evaluation = results["model"], results["eval"]
        baseline_seen = any(p["target_ratio"] == 0 for p in points)
        new = [p for p in results["points"] if not (baseline_seen and p["target_ratio"] == 0)]
        twice = {p["point"] for p in points} & {p["point"] for p in new}
        if twice:
            raise ConfigurationError(
                f"{sweep_dir} has points another sweep has too ({sorted(twice)[:3]}...): the table would average "
                "them as seeds of one method; compare sweeps of different methods."
            )
        points += new
    return points


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweeps", type=Path, nargs="+", required=True, help="Sweep output directories.")
    parser.add_argument("--plot", type=Path, required=True, help="Where the chrF++ curve is written (PNG).")
    parser.add_argument("--title", default="chrF++ vs share of experts removed")
    args = parser.parse_args(argv)
    rows = table_rows(merged_points(args.sweeps))
    plot_quality_curve(rows, args.plot, title=args.title)
    print(format_table(rows, markdown=True))


if __name__ == "__main__":
    run_entry_point("retention_table", main, sys.argv[1:])
