"""The main job: many pruning ratios x criteria from ONE calibration, compared side by side.

    moe-specialist sweep --config recipes/demo/en-fr/sweep.yaml [--ratios 0,0.5,0.75] [--criteria frequency,reap]
                         [--sft_at 0.75,0.875] [--output_dir outputs/demo-sweep]

Calibrates once (or reuses ``statistics_file``), then for every ratio x criterion: plan, prune (in memory, from the
same base model), evaluate, and at the ``sft_at`` ratios also a short recovery SFT. Every point is written atomically
to ``points/<id>/result.json``; a rerun skips finished points and redoes an interrupted one from scratch. The sweep
ends with ``results.csv``, ``results.json``, plots, and (when W&B is on) one run per point plus a summary run.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoConfig

from moe_specialist.analysis import usage
from moe_specialist.architectures import find_moe
from moe_specialist.calibrate import statistics_for
from moe_specialist.configs import check_calibration_data, split_list
from moe_specialist.data.sources import load_examples
from moe_specialist.errors import ConfigurationError
from moe_specialist.evaluate import evaluate_translations
from moe_specialist.io import atomic_write_json, atomic_write_text, check_not_an_input
from moe_specialist.models import load_model_and_tokenizer, local_model_dirs, resolve_model_path
from moe_specialist.plan import PLAN_FILE, make_plan
from moe_specialist.plots import plot_expert_usage, plot_quality_curve
from moe_specialist.prune import prune_model
from moe_specialist.sensitivity import layer_cost_meter

logger = logging.getLogger(__name__)


@dataclass
class SweepArguments:
    ratios: str = field(default="0,0.25,0.5,0.625,0.75,0.875", metadata={"help": "Pruning ratios to sweep."})
    criteria: str | None = field(
        default=None,
        metadata={
            "help": "Methods to compare: a criterion, or criterion@allocation (e.g. frequency@coverage); "
            "default: the recipe's pruning_criterion with its pruning_allocation."
        },
    )
    random_seeds: int = field(default=3, metadata={"help": "Seeds of the random baseline (reported as their mean)."})
    sft_at: str | None = field(default=None, metadata={"help": "Ratios that also get the short recovery SFT."})
    sft_criteria: str | None = field(
        default=None, metadata={"help": "Criteria that get the SFT at sft_at ratios (default: the first criterion)."}
    )
    heatmap_ratio: float = field(default=0.75, metadata={"help": "Ratio whose kept experts the heat map marks."})

    def __post_init__(self):
        """Refuse a bad grid when the arguments are parsed, before the sweep loads and calibrates the model."""
        from moe_specialist.configs import PruningArguments, check_field_types, check_minimum

        check_field_types(self)
        check_minimum(self, 1, "random_seeds")
        if not self.ratio_values:
            raise ConfigurationError("--ratios is empty: give e.g. 0,0.5,0.75.")
        missing = [r for r in self.sft_ratio_values if r not in self.ratio_values]
        if missing:
            raise ConfigurationError(f"--sft_at ratios {missing} are not among --ratios {self.ratio_values}.")
        for method in [*(split_list(self.criteria) or []), *(split_list(self.sft_criteria) or [])]:
            # only the method's own names: PruningArguments checks the recipe's allocation, which fills in the rest
            split_method(method, PruningArguments.pruning_allocation)

    @property
    def ratio_values(self) -> list[float]:
        from moe_specialist.configs import parse_ratios

        return parse_ratios(self.ratios, "--ratios")

    @property
    def sft_ratio_values(self) -> list[float]:
        from moe_specialist.configs import parse_ratios

        return parse_ratios(self.sft_at, "--sft_at")


def split_method(method: str, default_allocation: str) -> tuple[str, str]:
    """``criterion@allocation`` -> (criterion, allocation); a bare criterion takes the recipe's allocation."""
    from moe_specialist.plan import ALLOCATIONS, CRITERIA

    criterion, _, allocation = method.partition("@")
    allocation = allocation or default_allocation
    if criterion not in CRITERIA:
        raise ConfigurationError(f"Unknown criterion {criterion!r} in --criteria; choose among {sorted(CRITERIA)}.")
    if allocation not in ALLOCATIONS:
        raise ConfigurationError(
            f"Unknown allocation {allocation!r} in --criteria; choose among {sorted(ALLOCATIONS)}."
        )
    return criterion, allocation


@dataclass(frozen=True)
class Point:
    target_ratio: float  # what the plan is asked for; its actual_ratio is in the point's result
    criterion: str
    seed: int
    sft: bool

    @property
    def id(self) -> str:
        seed = f"-s{self.seed}" if self.criterion.startswith("random") else ""
        return f"r{self.target_ratio:.3f}-{self.criterion.replace('@', '-')}{seed}{'-sft' if self.sft else ''}"


def sweep_points(args: SweepArguments, default_criterion: str, seed: int, default_allocation: str) -> list[Point]:
    """The grid of ratios x methods; ``args`` checked their own values when built (see SweepArguments)."""
    ratios, sft_at = args.ratio_values, args.sft_ratio_values
    # always criterion@allocation: a point's id (and so its reuse on resume) names both
    criteria = [
        "@".join(split_method(m, default_allocation)) for m in split_list(args.criteria) or [default_criterion]
    ]
    sft_criteria = ["@".join(split_method(m, default_allocation)) for m in split_list(args.sft_criteria) or []]
    sft_criteria = sft_criteria or criteria[:1]
    unknown = [c for c in sft_criteria if c not in criteria]
    if unknown:
        raise ConfigurationError(f"--sft_criteria {unknown} are not among --criteria {criteria}.")
    points = []
    for ratio in ratios:
        for criterion in criteria:
            if ratio == 0 and criterion != criteria[0]:
                continue  # nothing is pruned: one baseline serves every criterion
            is_random = split_method(criterion, default_allocation)[0] == "random"
            seeds = range(args.random_seeds) if is_random and ratio > 0 else [seed]
            for s in seeds:
                points.append(Point(ratio, criterion, s, False))
                if ratio in sft_at and criterion in sft_criteria:
                    points.append(Point(ratio, criterion, s, True))
    return points


def checkpoint_bytes(model, dtype: torch.dtype) -> int:
    """Size of the weights saved in ``dtype`` (the checkpoint's own; tied weights counted once)."""
    unique = {tensor.data_ptr(): tensor.numel() for tensor in model.state_dict().values()}
    return sum(unique.values()) * torch.empty((), dtype=dtype).element_size()


def saved_dtype(name_or_path: str) -> torch.dtype:
    """The dtype a checkpoint is stored in (what its pruned copies would be saved in)."""
    dtype = getattr(AutoConfig.from_pretrained(resolve_model_path(name_or_path)), "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


class Sweep:
    """Runs the points of a sweep; ``sft`` runs the recovery SFT of a point (see ``training.pipeline``)."""

    def __init__(
        self,
        run_dir: Path,
        model_args,
        calibration,
        pruning,
        data,
        generation: dict,
        sft=None,
        wandb_logger=None,
        trust_remote_code: bool = False,
    ):
        self.run_dir = run_dir
        self.model_name = model_name = model_args.model_name_or_path
        self.calibration, self.pruning, self.data, self.generation = calibration, pruning, data, generation
        self.sft = sft
        self.wandb = wandb_logger
        check_calibration_data(calibration, data.eval_dataset_name, data.eval_split, data.eval_target_files)
        self.device = PartialState().device
        self.base, self.tokenizer = load_model_and_tokenizer(
            model_name, model_args.dtype, model_args.model_revision, trust_remote_code, device=self.device
        )
        self.saved_dtype = saved_dtype(model_name)
        self.moe = find_moe(self.base)
        calibration.statistics_file = calibration.statistics_file or str(run_dir / "stats.safetensors")
        self.stats = statistics_for(self.base, self.tokenizer, calibration, model_name)
        self.measure_layer_costs = layer_cost_meter(
            self.base, self.moe, self.tokenizer, calibration, pruning.sensitivity_examples
        )
        self.examples = load_examples(
            data.eval_dataset_name,
            data.eval_directions,
            data.eval_split,
            limit=data.max_eval_examples,
            seed=data.dataset_seed,
            target_files=data.eval_target_files,
        )

    def point_dir(self, point: Point) -> Path:
        return self.run_dir / "points" / point.id

    def run_point(self, point: Point) -> dict:
        done = self.point_dir(point) / "result.json"
        if done.is_file():
            return json.loads(done.read_text())
        shutil.rmtree(self.point_dir(point), ignore_errors=True)  # an interrupted point is redone from scratch
        self.point_dir(point).mkdir(parents=True)
        start = time.time()
        criterion, allocation = split_method(point.criterion, self.pruning.pruning_allocation)
        plan = make_plan(
            self.moe,
            self.stats,
            point.target_ratio,
            criterion=criterion,
            allocation=allocation,
            groups=split_list(self.pruning.pruning_groups),
            roles=split_list(self.pruning.pruning_roles),
            top_k=self.pruning.pruning_top_k,
            seed=point.seed,
            measure_layer_costs=self.measure_layer_costs,
        )
        plan.save(self.point_dir(point) / PLAN_FILE)
        if point.sft:
            scores, model = self.sft(point, plan, self.point_dir(point))
        else:
            model = copy.deepcopy(self.base)
            prune_model(model, plan)
            scores = evaluate_translations(model, self.tokenizer, self.examples, **self.generation, progress=False)
        moe = find_moe(model)
        result = {
            "point": point.id,
            **asdict(point),
            "actual_ratio": plan.metadata["actual_ratio"],
            "allocation": allocation,
            "experts_per_layer": [len(v) for v in plan.kept_experts.values()],
            "parameters": moe.parameter_counts(),
            "checkpoint_bytes": checkpoint_bytes(model, self.saved_dtype),
            "average": scores["average"],
            "directions": {k: {m: v for m, v in d.items() if m != "records"} for k, d in scores["directions"].items()},
            "seconds": round(time.time() - start, 1),
        }
        atomic_write_json(
            {**result, "records": {k: d["records"] for k, d in scores["directions"].items()}},
            self.point_dir(point) / "records.json",
        )
        atomic_write_json(result, done)
        if self.wandb:
            self.wandb.log_point(result, plan)
        return result


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
    """chrF++ (share of the unpruned score) per ratio x method, prune-only and +SFT; random: mean [min-max]."""
    methods = sorted({r["criterion"] for r in rows})
    lookup = {(r["target_ratio"], r["criterion"], r["sft"]): r for r in rows}
    labels = {r["target_ratio"]: _ratio_label(r) for r in rows}
    lines = []
    for ratio in sorted(labels):
        for sft in (False, True):
            cells = [_cell(lookup.get((ratio, m, sft))) for m in methods]
            if any(cells):
                lines.append([f"{labels[ratio]}{' + SFT' if sft else ''}", *cells])
    header = ["pruned", *methods]
    if markdown:
        table = [header, ["---"] * len(header), *lines]
        return "\n".join("| " + " | ".join(row) + " |" for row in table)
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def render(row: list[str]) -> str:
        return " | ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))

    return "\n".join([render(header), "-" * len(render(header)), *(render(row) for row in lines)])


def heatmap(sweep: Sweep, results: list[dict], ratio: float, path: Path) -> None:
    candidates = [
        r for r in results if r["target_ratio"] == ratio and not r["sft"] and not r["criterion"].startswith("random")
    ]
    if not candidates:
        return
    best = max(candidates, key=lambda r: r["average"]["chrf++"])
    from moe_specialist.plan import PrunePlan

    plan = PrunePlan.load(
        sweep.point_dir(Point(best["target_ratio"], best["criterion"], best["seed"], False)) / PLAN_FILE
    )
    shares = usage(sweep.stats, split_list(sweep.pruning.pruning_groups), split_list(sweep.pruning.pruning_roles))
    plot_expert_usage(
        shares.float(),
        sweep.stats.layers,
        plan,
        path,
        f"expert usage on the calibration data; white: kept by {best['criterion']} at {ratio:.1%}",
    )


def run_sweep(sweep: Sweep, points: list[Point], heatmap_ratio: float) -> list[dict]:
    from tqdm.auto import tqdm

    results = []
    for point in tqdm(points, desc="sweep"):
        results.append(sweep.run_point(point))
    rows = table_rows(results)
    plots = sweep.run_dir / "plots"
    plot_quality_curve(
        rows, plots / "chrf_vs_ratio.png", title=f"{sweep.model_name}: chrF++ vs share of experts removed"
    )
    heatmap(sweep, results, heatmap_ratio, plots / "expert_usage.png")
    metadata = {
        "model": sweep.model_name,
        "statistics": sweep.calibration.statistics_file,
        "eval": {
            "dataset": sweep.data.eval_dataset_name or sweep.data.dataset_name,
            "split": sweep.data.eval_split,
            "directions": list(sweep.examples),
            "examples_per_direction": {k: len(v) for k, v in sweep.examples.items()},
            "decoding": sweep.generation,
        },
        "signatures": {
            k: {m: v for m, v in d.items() if m.endswith("signature")} for k, d in results[0]["directions"].items()
        },
    }
    write_outputs(sweep.run_dir, results, rows, metadata)
    if sweep.wandb:
        sweep.wandb.log_summary(rows, plots)
    return rows


# Recipe keys that do not change a point's result: a sweep may be resumed with other values of these.
RESUMABLE_KEYS = {
    "output_dir",
    "logging_dir",
    "run_name",
    "report_to",
    "logging_steps",
    "pruning_ratio",
    "pruning_criterion",
    "pruning_allocation",
    "pruning_seed",
    "prune_plan",
    "callbacks",
}  # point ids name their criterion, allocation and seed: changing those adds points rather than reusing any


def check_resumable(config_file: Path, recipe: dict) -> None:
    """Refuse to mix points of different configurations in one output directory (a resumed sweep reuses points)."""
    if not config_file.is_file():
        return
    previous = json.loads(config_file.read_text())
    differing = sorted(
        key
        for key in set(previous) | set(recipe)
        if key != "sweep"
        and key not in RESUMABLE_KEYS
        and not key.startswith("wandb")
        and json.dumps(previous.get(key), default=str) != json.dumps(recipe.get(key), default=str)
    )
    if differing:
        raise ConfigurationError(
            f"{config_file.parent} holds a sweep run with another configuration ({', '.join(differing)} differ): "
            "its finished points would be reused. Choose another --output_dir, or delete that directory."
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
                **{
                    f"final/{d}/{m}": v
                    for d, s in result["directions"].items()
                    for m, v in s.items()
                    if m in ("chrf++", "bleu", "off_target_rate")
                },
                "final/avg/chrf++": result["average"]["chrf++"],
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
                    title=f"chrF++ vs actual_ratio (share of experts removed){' after SFT' if sft else ''}",
                )
        images = {p.stem: wandb.Image(str(p)) for p in sorted(plots.glob("*.png"))}
        run.log({"results": table, **curves, **images})
        wandb.finish()


def run_sweep_cli(argv: list[str]) -> None:
    """``moe-specialist sweep``: the recipe's dataclasses plus :class:`SweepArguments`.

    Every input (the grid, the data, the output directory) is checked before the model loads.
    """
    from moe_specialist.entry import ArgumentParser, command_name
    from moe_specialist.training.configs import RECIPE_TYPES
    from moe_specialist.training.pipeline import check_recipe_data, recipe_config, run

    model_args, data_args, calibration_args, pruning_args, training_args, sweep_args = ArgumentParser(
        (*RECIPE_TYPES, SweepArguments), prog=command_name("sweep")
    ).parse(argv)
    points = sweep_points(
        sweep_args, pruning_args.pruning_criterion, pruning_args.pruning_seed, pruning_args.pruning_allocation
    )
    reused = calibration_args.statistics_file and Path(calibration_args.statistics_file).is_file()
    check_recipe_data(data_args, calibration_args, train=any(p.sft for p in points), calibrate=not reused)
    run_dir = Path(training_args.output_dir)
    check_not_an_input(run_dir, local_model_dirs(model_args.model_name_or_path))
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe = recipe_config(model_args, data_args, calibration_args, pruning_args, training_args)
    check_resumable(run_dir / "sweep_config.json", recipe)
    atomic_write_json({**recipe, "sweep": asdict(sweep_args)}, run_dir / "sweep_config.json")
    generation = {
        "batch_size": training_args.mt_eval_batch_size,
        "max_new_tokens": training_args.mt_eval_max_new_tokens,
        "no_repeat_ngram_size": training_args.mt_eval_no_repeat_ngram_size,
    }
    wandb_logger = SweepWandb(training_args, recipe, run_dir) if "wandb" in (training_args.report_to or []) else None

    def sft(point: Point, plan, point_dir: Path):
        """Prune with the point's plan and fine-tune, in-process, through the training pipeline."""
        training_args.output_dir = str(point_dir / "sft")
        training_args.run_name = point.id
        training_args.callbacks = ["expert_pruning"]  # scored below on the sweep's own evaluation set
        pruning_args.prune_plan = str(point_dir / PLAN_FILE)
        results = run(model_args, data_args, calibration_args, pruning_args, training_args, stats=sweep.stats)
        model, tokenizer = load_model_and_tokenizer(results["model_dir"], model_args.dtype, device=sweep.device)
        scores = evaluate_translations(model, tokenizer, sweep.examples, **generation, progress=False)
        scores["training"] = results["training"]
        return scores, model

    sweep = Sweep(
        run_dir,
        model_args,
        calibration_args,
        pruning_args,
        data_args,
        generation,
        sft=sft,
        wandb_logger=wandb_logger,
        trust_remote_code=training_args.trust_remote_code,
    )
    rows = run_sweep(sweep, points, sweep_args.heatmap_ratio)
    print(format_table(rows))
    plots = ", ".join(str(p.relative_to(run_dir)) for p in sorted((run_dir / "plots").glob("*.png")))
    print(f"\nwrote {run_dir}: results.csv, results.json, {plots}")
