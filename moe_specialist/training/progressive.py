"""Progressive pruning: remove experts in stages (e.g. 50% -> 62.5% -> 75%), recovering between them, within the
recipe's total step budget (SlimQwen: progressive beats one-shot at equal tokens).

``progressive_ratios: [0.5, 0.625]`` with ``pruning_ratio: 0.75`` runs three stages of the pipeline
(:func:`~moe_specialist.training.pipeline.run`), each in ``output_dir/stage-<k>-r<ratio>``: stage k loads the model
stage k - 1 saved, calibrates it again (routing changes as experts go and recovery moves the routers), plans and
prunes it to the stage's share of the ORIGINAL expert count, and trains ``max_steps / stages`` steps (the remainder
goes to the last stage). The teacher stays the original model (``teacher_model_name_or_path``, or the one given).
The final stage's ``results.json`` is the run's, with every stage's scores under ``stages``; its model is the result.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from accelerate import PartialState

from moe_specialist.errors import ConfigurationError
from moe_specialist.io import atomic_write_json, check_not_an_input
from moe_specialist.models import local_model_dirs, resolve_model_path
from moe_specialist.training.outputs import RESULTS_FILE
from moe_specialist.training.pipeline import run


def stage_ratios(intermediate: list[float], final: float) -> list[float]:
    """The share of the original experts each stage removes, checked to grow."""
    ratios = [*intermediate, final]
    if any(not 0 < r < 1 for r in ratios) or any(a >= b for a, b in zip(ratios, ratios[1:], strict=False)):
        raise ConfigurationError(
            f"progressive_ratios must increase strictly in (0, 1) and stay below pruning_ratio ({final}), got "
            f"{intermediate}: e.g. progressive_ratios: [0.5, 0.625] with pruning_ratio: 0.75."
        )
    return ratios


def stage_steps(total: int, stages: int) -> list[int]:
    """``total`` steps split evenly, the remainder to the last stage; every stage trains at least one step."""
    if total < stages:
        raise ConfigurationError(
            f"max_steps {total} cannot be split over {stages} progressive stages: give at least {stages} steps."
        )
    steps = [total // stages] * stages
    steps[-1] += total - sum(steps)
    return steps


def relative_ratio(target: float, previous: float) -> float:
    """The share of the current model's experts to remove to reach ``target`` of the original's (``previous``
    already removed)."""
    return 1.0 - (1.0 - target) / (1.0 - previous)


def run_progressive(model_args, data_args, calibration_args, pruning_args, training_args) -> dict:
    """Stages of prune + recover (see the module docstring); returns the last stage's results with ``stages``."""
    if training_args.prune_only:
        raise ConfigurationError("progressive_ratios needs recovery steps between the stages: set max_steps > 0.")
    if pruning_args.prune_plan:
        raise ConfigurationError("progressive_ratios plans every stage on its own model: drop prune_plan.")
    ratios = stage_ratios(training_args.progressive_ratios, pruning_args.pruning_ratio)
    steps = stage_steps(training_args.max_steps, len(ratios))
    output_dir = Path(training_args.output_dir)
    check_not_an_input(output_dir, local_model_dirs(model_args.model_name_or_path))
    teacher = training_args.teacher_model_name_or_path or resolve_model_path(model_args.model_name_or_path)
    source, previous, stages = model_args.model_name_or_path, 0.0, []
    for index, (ratio, stage_max_steps) in enumerate(zip(ratios, steps, strict=True)):
        first = index == 0
        stage = run(
            replace(model_args, model_name_or_path=source),
            data_args,
            calibration_args,
            replace(
                pruning_args,
                pruning_ratio=relative_ratio(ratio, previous),
                statistics_file=pruning_args.statistics_file if first else None,  # the original model's only
            ),
            replace(
                training_args,
                output_dir=str(output_dir / f"stage-{index + 1}-r{ratio}"),
                run_name=f"{training_args.run_name or output_dir.name}-stage{index + 1}",
                max_steps=stage_max_steps,
                progressive_ratios=None,
                teacher_model_name_or_path=teacher,
                mt_eval_on_start=training_args.mt_eval_on_start and first,
            ),
        )
        kept = {key: stage[key] for key in ("output_dir", "scores", "pruning", "timings")}
        stages.append({"stage": index + 1, "ratio": ratio, "steps": stage_max_steps, **kept})
        source, previous = stage["model_dir"], ratio
    results = {**stage, "output_dir": str(output_dir), "stages": stages}
    before, after = stages[0]["pruning"]["experts_before"], stage["pruning"]["experts_after"]
    results["pruning"] = {
        **stage["pruning"],
        "target_ratio": ratios[-1],  # of the original model, like experts_before
        "experts_before": before,
        "actual_ratio": round(1 - sum(after.values()) / sum(before.values()), 6),
        "parameters_before": stages[0]["pruning"]["parameters_before"],
    }
    results["scores"] = {"start": stages[0]["scores"]["start"], "end": stage["scores"]["end"]}
    results["training"] = {**stage["training"], "global_step": sum(steps), "progressive_ratios": ratios[:-1]}
    results["timings"] = {key: round(sum(s["timings"].get(key, 0.0) for s in stages), 2) for key in ("total", "train")}
    if PartialState().is_main_process:
        atomic_write_json(results, output_dir / RESULTS_FILE)
    return results
