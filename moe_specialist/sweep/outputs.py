"""What a sweep writes: the table of its points (``results.csv``, ``results.json``, ``results.md``), the expert-usage
heat map, and its W&B runs (one per point plus a summary run)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

from moe_specialist.analysis import usage
from moe_specialist.io import atomic_write_json, atomic_write_text
from moe_specialist.plan import PLAN_FILE
from moe_specialist.plots import plot_expert_usage
from moe_specialist.sweep.grid import Point
from moe_specialist.training.wandb_logging import score_summary


def recovery_label(training: dict) -> str:
    """How a point recovered, as its table row names it, e.g. ``kd, 100 steps``."""
    progressive = " (progressive)" if training.get("progressive_ratios") else ""
    return f"{training.get('recovery', 'sft')}{progressive}, {training['global_step']} steps"


def table_rows(results: list[dict]) -> list[dict]:
    """One row per (target ratio, criterion, sft) with random seeds averaged; relative to the unpruned score.

    Budgets are exact, so every point of a target ratio removes the same share: the row's ``actual_ratio``.
    """
    baseline = next((r["average"]["chrf++"] for r in results if r["target_ratio"] == 0 and not r["sft"]), None)
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["target_ratio"], r["criterion"], r["sft"]), []).append(r)
    rows = []
    for (ratio, criterion, sft), items in sorted(groups.items()):

        def mean(key: str, items=items) -> float:
            return sum(i["average"][key] for i in items) / len(items)

        row = {
            "target_ratio": ratio,
            "actual_ratio": items[0]["actual_ratio"],
            "criterion": criterion,
            "sft": sft,
            "seeds": len(items),
            "chrf++": round(mean("chrf++"), 2),
            "bleu": round(mean("bleu"), 2),
            "off_target_rate": round(mean("off_target_rate"), 4),
            "relative_chrf": round(mean("chrf++") / baseline, 4) if baseline else None,
            "experts_per_layer": items[0]["experts_per_layer"],
            "parameters_total": items[0]["parameters"]["total"],
            "parameters_active": items[0]["parameters"]["active"],
            "checkpoint_mb": round(items[0]["checkpoint_bytes"] / 2**20, 2),
        }
        if sft:
            row["recovery"] = recovery_label(items[0]["training"])
        if len(items) > 1:
            row["chrf++_min"] = round(min(i["average"]["chrf++"] for i in items), 2)
            row["chrf++_max"] = round(max(i["average"]["chrf++"] for i in items), 2)
        rows.append(row)
    # the unpruned baseline belongs to every criterion's curve
    for criterion in {r["criterion"] for r in rows} - {r["criterion"] for r in rows if r["target_ratio"] == 0}:
        base = next((r for r in rows if r["target_ratio"] == 0 and not r["sft"]), None)
        if base:
            rows.append({**base, "criterion": criterion})
    return sorted(rows, key=lambda r: (r["target_ratio"], r["sft"], r["criterion"]))


CSV_COLUMNS = [
    "target_ratio",
    "actual_ratio",
    "criterion",
    "sft",
    "seeds",
    "chrf++",
    "bleu",
    "relative_chrf",
    "off_target_rate",
    "parameters_total",
    "parameters_active",
    "checkpoint_mb",
    "experts_per_layer",
]


def write_outputs(run_dir: Path, results: list[dict], rows: list[dict], metadata: dict) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "experts_per_layer": " ".join(map(str, row["experts_per_layer"]))})
    atomic_write_text(buffer.getvalue(), run_dir / "results.csv")
    atomic_write_json({**metadata, "table": rows, "points": results}, run_dir / "results.json")
    evaluation = metadata["eval"]
    notes = [
        f"chrF++ on {evaluation['dataset']} {evaluation['split']} ({evaluation['examples_per_direction']} "
        f"segments), greedy, max_new_tokens={evaluation['decoding']['max_new_tokens']}; rows: target_ratio, with the "
        "actual_ratio where it differs; in parentheses the share of the unpruned score; random: mean [min-max] over "
        "seeds.",
        *(f"{d}: `{s['chrf++_signature']}`" for d, s in metadata["signatures"].items()),
    ]
    atomic_write_text(format_table(rows, markdown=True) + "\n\n" + "\n\n".join(notes) + "\n", run_dir / "results.md")


def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    text = f"{row['chrf++']:.2f}"
    if row.get("relative_chrf"):
        text += f" ({row['relative_chrf']:.0%})"
    if "chrf++_min" in row:
        text += f" [{row['chrf++_min']:.1f}-{row['chrf++_max']:.1f}]"
    return text


def _ratio_label(row: dict) -> str:
    """The target ratio, and the actual one where whole experts make it differ at the precision shown."""
    target, actual = f"{row['target_ratio']:.3f}", f"{row['actual_ratio']:.3f}"
    return target if actual == target else f"{target} (actual {actual})"


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """chrF++ (share of the unpruned score) per ratio x method, prune-only and recovered (the row names the recovery:
    ``0.750 + kd, 100 steps``); random: mean [min-max]."""
    methods = sorted({r["criterion"] for r in rows})
    lookup = {(r["target_ratio"], r["criterion"], r["sft"]): r for r in rows}
    labels = {r["target_ratio"]: _ratio_label(r) for r in rows}
    lines = []
    for ratio in sorted(labels):
        for sft in (False, True):
            cells = [_cell(lookup.get((ratio, m, sft))) for m in methods]
            if any(cells):
                recovery = next(
                    (lookup[ratio, m, True]["recovery"] for m in methods if (ratio, m, True) in lookup), ""
                )
                lines.append([f"{labels[ratio]}{' + ' + recovery if sft else ''}", *cells])
    header = ["pruned", *methods]
    if markdown:
        table = [header, ["---"] * len(header), *lines]
        return "\n".join("| " + " | ".join(row) + " |" for row in table)
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def render(row: list[str]) -> str:
        return " | ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))

    return "\n".join([render(header), "-" * len(render(header)), *(render(row) for row in lines)])


def heatmap(
    results: list[dict],
    ratio: float,
    path: Path,
    stats,
    groups: list[str] | None,
    roles: list[str] | None,
    point_dir: Callable[[Point], Path],
) -> None:
    """Expert usage on the calibration ``stats``, marking the experts kept by the best method at ``ratio``."""
    candidates = [
        r for r in results if r["target_ratio"] == ratio and not r["sft"] and not r["criterion"].startswith("random")
    ]
    if not candidates:
        return
    best = max(candidates, key=lambda r: r["average"]["chrf++"])
    from moe_specialist.plan import PrunePlan

    plan = PrunePlan.load(point_dir(Point(best["target_ratio"], best["criterion"], best["seed"], False)) / PLAN_FILE)
    shares = usage(stats, groups, roles)
    plot_expert_usage(
        shares.float(),
        stats.layers,
        plan,
        path,
        f"expert usage on the calibration data; white: kept by {best['criterion']} at {ratio:.1%}",
    )


class SweepWandb:
    """One W&B run per point and a summary run, all in the sweep's group (rank 0, offline without credentials)."""

    def __init__(self, training_args, recipe: dict, run_dir: Path):
        self.training_args, self.recipe, self.run_dir = training_args, recipe, run_dir
        self.group = training_args.wandb_run_group or run_dir.name

    def _init(self, name: str, job_type: str, config: dict):
        from moe_specialist.training.wandb_logging import start_wandb_run

        return start_wandb_run(
            self.training_args, name=name, job_type=job_type, group=self.group, config=config, directory=self.run_dir
        )

    def log_point(self, result: dict, plan) -> None:
        import wandb

        config = {
            **self.recipe,
            "pruning_ratio": result["target_ratio"],  # the recipe's knob is the target
            "pruning_criterion": result["criterion"].partition("@")[0],
            "pruning_allocation": result["allocation"],
            "pruning_seed": result["seed"],
            "sft": result["sft"],
            "kept_experts": plan.to_dict()["kept_experts"],
        }
        run = self._init(result["point"], "sweep_point", config)
        if run is None:
            return
        run.summary.update(
            {
                "pruning/target_ratio": result["target_ratio"],
                "pruning/actual_ratio": result["actual_ratio"],
                "pruning/experts_kept_per_layer": result["experts_per_layer"],
                "pruning/params_total": result["parameters"]["total"],
                "pruning/params_active": result["parameters"]["active"],
                "pruning/checkpoint_bytes": result["checkpoint_bytes"],
                **score_summary("final", result["directions"], result["average"]),
            }
        )
        wandb.finish()

    def log_summary(self, rows: list[dict], plots: Path) -> None:
        import wandb

        run = self._init(f"{self.group}-summary", "sweep_summary", self.recipe)
        if run is None:
            return
        columns = [
            "target_ratio",
            "actual_ratio",
            "criterion",
            "sft",
            "chrf++",
            "bleu",
            "relative_chrf",
            "parameters_total",
        ]
        table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
        curves = {}
        for sft in (False, True):
            subset = [r for r in rows if r["sft"] == sft]
            if subset:
                t = wandb.Table(
                    columns=["actual_ratio", "chrf++", "criterion"],
                    data=[[r["actual_ratio"], r["chrf++"], r["criterion"]] for r in subset],
                )
                key = "chrf_vs_ratio_sft" if sft else "chrf_vs_ratio"
                curves[key] = wandb.plot.line(
                    t,
                    x="actual_ratio",
                    y="chrf++",
                    stroke="criterion",
                    title=f"chrF++ vs actual_ratio (share of experts removed){' after recovery' if sft else ''}",
                )
        images = {p.stem: wandb.Image(str(p)) for p in sorted(plots.glob("*.png"))}
        run.log({"results": table, **curves, **images})
        wandb.finish()
