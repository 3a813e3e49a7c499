"""Running a sweep: load the base model, calibrate once (or reuse ``statistics_file``), then run every point of the
grid (plan, prune in memory from the same base model, evaluate, and at the ``sft_at`` ratios a short recovery SFT),
each written atomically to ``points/<id>/result.json`` so that a rerun resumes; ``moe-specialist sweep``."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoConfig

from moe_specialist.architectures import find_moe
from moe_specialist.calibrate import statistics_for
from moe_specialist.compensation import Compensation, named_compensation, prune_and_compensate
from moe_specialist.configs import check_held_out_calibration
from moe_specialist.errors import ConfigurationError
from moe_specialist.evaluate import evaluate_translations
from moe_specialist.io import atomic_write_json, check_not_an_input
from moe_specialist.models import load_from_arguments, local_model_dirs, resolve_model_path
from moe_specialist.plan import PLAN_FILE, PrunePlan, make_plan, search_settings
from moe_specialist.plots import plot_quality_curve
from moe_specialist.sensitivity import layer_cost_meter
from moe_specialist.sweep.grid import Point, SweepArguments, sweep_points
from moe_specialist.sweep.outputs import SweepWandb, format_table, heatmap, table_rows, write_outputs

logger = logging.getLogger(__name__)


def checkpoint_bytes(model, dtype: torch.dtype) -> int:
    """Size of the weights saved in ``dtype`` (the checkpoint's own; tied weights counted once)."""
    unique = {tensor.data_ptr(): tensor.numel() for tensor in model.state_dict().values()}
    return sum(unique.values()) * torch.empty((), dtype=dtype).element_size()


def saved_dtype(name_or_path: str) -> torch.dtype:
    """The dtype a checkpoint is stored in (what its pruned copies would be saved in)."""
    dtype = getattr(AutoConfig.from_pretrained(resolve_model_path(name_or_path)), "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


class Sweep:
    """Runs the points of a sweep; ``sft(point, point_dir)`` runs the recovery SFT of a point through
    ``training.pipeline.run`` and returns its results."""

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
        self.device = PartialState().device
        self.base, self.tokenizer = load_from_arguments(model_args, trust_remote_code, device=self.device)
        self.saved_dtype = saved_dtype(model_name)
        self.moe = find_moe(self.base)
        self.statistics_file = pruning.statistics_file or str(run_dir / "stats.safetensors")
        self.stats = statistics_for(
            self.base, self.tokenizer, calibration, model_name, statistics_file=self.statistics_file
        )
        self.measure_layer_costs = layer_cost_meter(
            self.base, self.moe, self.tokenizer, calibration, pruning.sensitivity_examples
        )
        self.examples = data.eval_selection.load()
        self.compensations: dict[str, Compensation | None] = {}

    def compensation(self, name: str) -> Compensation | None:
        """The compensation ``name`` on the sweep's calibration data (encoded once, on first use)."""
        if name not in self.compensations:
            self.compensations[name] = named_compensation(name, self.tokenizer, self.calibration, self.pruning)
        return self.compensations[name]

    def point_dir(self, point: Point) -> Path:
        return self.run_dir / "points" / point.id

    def plan(self, ratio: float, criterion: str, allocation: str, seed: int) -> PrunePlan:
        return make_plan(
            self.moe,
            self.stats,
            ratio,
            criterion=criterion,
            allocation=allocation,
            groups=self.pruning.pruning_groups,
            roles=self.pruning.pruning_roles,
            top_k=self.pruning.pruning_top_k,
            seed=seed,
            measure_layer_costs=self.measure_layer_costs,
            selection=self.pruning.pruning_selection,
            selection_candidates=self.pruning.selection_candidates,
            measure_kept_sets=self.measure_layer_costs.greedy_sets,
            search_allocation=self.measure_layer_costs.search_allocation,
            search=search_settings(self.pruning),
        )

    def run_point(self, point: Point) -> dict:
        done = self.point_dir(point) / "result.json"
        if done.is_file():
            return json.loads(done.read_text())
        shutil.rmtree(self.point_dir(point), ignore_errors=True)  # an interrupted point is redone from scratch
        self.point_dir(point).mkdir(parents=True)
        start = time.time()
        criterion, allocation, compensation = point.method
        compensated = None  # the compensation's trace
        if point.sft:  # the plan of the point without SFT, which always runs first (a search may not repeat itself)
            pruned = self.run_point(replace(point, sft=False))
            plan = PrunePlan.load(self.point_dir(replace(point, sft=False)) / PLAN_FILE)
        else:
            plan = self.plan(point.target_ratio, criterion, allocation, point.seed)
        plan.save(self.point_dir(point) / PLAN_FILE)
        if point.sft:
            parameters, size = pruned["parameters"], pruned["checkpoint_bytes"]
            training = self.sft(point, self.point_dir(point))
            scores, records = training["scores"]["end"], {"file": training["translations_file"]}
        else:
            model = copy.deepcopy(self.base)
            _, compensated = prune_and_compensate(model, plan, None, self.compensation(compensation))
            parameters, size = find_moe(model).parameter_counts(), checkpoint_bytes(model, self.saved_dtype)
            scores = evaluate_translations(model, self.tokenizer, self.examples, **self.generation, progress=False)
            records = {name: direction.pop("records") for name, direction in scores["directions"].items()}
        result = {
            "point": point.id,
            **asdict(point),
            "actual_ratio": plan.metadata["actual_ratio"],
            "allocation": allocation,
            "compensation": compensation,
            "experts_per_layer": [len(v) for v in plan.kept_experts.values()],
            "parameters": parameters,
            "checkpoint_bytes": size,
            "average": scores["average"],
            "directions": scores["directions"],
            "seconds": round(time.time() - start, 1),
        }
        if point.sft:
            result["training"] = training["training"]
            compensated = training.get("pruning", {}).get("compensation")
        if compensation != "none":
            result["compensation_trace"] = compensated
        atomic_write_json({**result, "records": records}, self.point_dir(point) / "records.json")
        atomic_write_json(result, done)
        if self.wandb and not point.sft:  # an SFT point's W&B run is its training run
            self.wandb.log_point(result, plan)
        return result


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
    heatmap(
        results,
        heatmap_ratio,
        plots / "expert_usage.png",
        sweep.stats,
        sweep.pruning.pruning_groups,
        sweep.pruning.pruning_roles,
        sweep.point_dir,
    )
    metadata = {
        "model": sweep.model_name,
        "statistics": sweep.statistics_file,
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


def run_sweep_cli(argv: list[str]) -> None:
    """``moe-specialist sweep``: the recipe's dataclasses plus :class:`SweepArguments`.

    Every input (the grid, the data, the output directory) is checked before the model loads.
    """
    from moe_specialist.entry import ArgumentParser, command_name
    from moe_specialist.training.configs import RECIPE_TYPES
    from moe_specialist.training.outputs import recipe_config
    from moe_specialist.training.pipeline import run
    from moe_specialist.training.progressive import run_progressive
    from moe_specialist.training.setup import check_recipe_data

    model_args, data_args, calibration_args, pruning_args, training_args, sweep_args = ArgumentParser(
        (*RECIPE_TYPES, SweepArguments), prog=command_name("sweep")
    ).parse(argv)
    points = sweep_points(
        sweep_args,
        pruning_args.pruning_criterion,
        pruning_args.pruning_seed,
        pruning_args.pruning_allocation,
        pruning_args.compensation,
    )
    reused = pruning_args.statistics_file and Path(pruning_args.statistics_file).is_file()
    compensated = any(p.method[2] != "none" for p in points)  # a compensation fits on calibration data
    check_recipe_data(
        data_args, calibration_args, train=any(p.sft for p in points), calibrate=not reused or compensated
    )
    methods = [option for point in points for option in point.method[1:]]
    check_held_out_calibration(calibration_args, pruning_args.sensitivity_examples, methods)
    run_dir = Path(training_args.output_dir)
    check_not_an_input(run_dir, local_model_dirs(model_args.model_name_or_path))
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe = recipe_config(model_args, data_args, calibration_args, pruning_args, training_args)
    check_resumable(run_dir / "sweep_config.json", recipe)
    atomic_write_json({**recipe, "sweep": asdict(sweep_args)}, run_dir / "sweep_config.json")
    generation = training_args.decoding_kwargs
    wandb_logger = SweepWandb(training_args, recipe, run_dir) if "wandb" in (training_args.report_to or []) else None

    def sft(point: Point, point_dir: Path) -> dict:
        """Fine-tune with the point's plan through the training pipeline, whose end score (on the sweep's own eval
        set) and W&B run are the point's: nothing is scored or logged twice."""
        point_args = replace(
            training_args,
            output_dir=str(point_dir / "sft"),
            run_name=point.id,
            callbacks=["expert_pruning", "translation_eval"],
            mt_eval_on_start=False,  # the prune-only score is the point without SFT
            wandb_run_group=wandb_logger.group if wandb_logger else training_args.wandb_run_group,
            wandb_job_type="sweep_point",
        )
        if training_args.progressive_ratios:  # every stage plans on its own model, at the point's ratio
            criterion, allocation, compensation = point.method
            point_pruning = replace(
                pruning_args,
                pruning_ratio=point.target_ratio,
                pruning_criterion=criterion,
                pruning_allocation=allocation,
                compensation=compensation,
                pruning_seed=point.seed,
            )
            return run_progressive(model_args, data_args, calibration_args, point_pruning, point_args)
        point_pruning = replace(pruning_args, prune_plan=str(point_dir / PLAN_FILE), compensation=point.method[2])
        return run(model_args, data_args, calibration_args, point_pruning, point_args, stats=sweep.stats)

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
