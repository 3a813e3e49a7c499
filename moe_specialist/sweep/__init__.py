"""The main job: many pruning ratios x criteria from ONE calibration (see ``runner``)."""

from moe_specialist.sweep.runner import Point, SweepArguments, format_table, run_sweep_cli, sweep_points, table_rows

__all__ = ["Point", "SweepArguments", "format_table", "run_sweep_cli", "sweep_points", "table_rows"]
