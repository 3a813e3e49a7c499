"""The main job: many pruning ratios x criteria from ONE calibration, compared side by side.

    moe-specialist sweep --config recipes/demo/en-fr/sweep.yaml [--ratios 0,0.5,0.75] [--criteria frequency,reap]
                         [--sft_at 0.75,0.875] [--output_dir outputs/demo-sweep]

Calibrates once (or reuses ``statistics_file``), then for every ratio x criterion: plan, prune (in memory, from the
same base model), evaluate, and at the ``sft_at`` ratios also a short recovery SFT. Every point is written atomically
to ``points/<id>/result.json``; a rerun skips finished points and redoes an interrupted one from scratch. The sweep
ends with ``results.csv``, ``results.json``, plots, and (when W&B is on) one run per point plus a summary run.

``grid``: what the grid is (``SweepArguments``, ``Point``, ``sweep_points``); ``runner``: running it (``Sweep``,
``run_sweep``, ``run_sweep_cli``, the resumability check); ``outputs``: what it writes (tables, plots, W&B).
"""

from moe_specialist.sweep.grid import Point, SweepArguments, sweep_points
from moe_specialist.sweep.outputs import format_table, table_rows
from moe_specialist.sweep.runner import run_sweep_cli

__all__ = ["Point", "SweepArguments", "format_table", "run_sweep_cli", "sweep_points", "table_rows"]
