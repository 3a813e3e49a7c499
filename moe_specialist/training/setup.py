"""A run's setup, decided before any model loads: the arguments and the launch, every data source, the checkpoint to
resume (the last complete one), and the output directory (refused when not empty unless ``overwrite_output_dir`` or
``resume_from_checkpoint``; never the model directory)."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType
from transformers.trainer import TRAINER_STATE_NAME

from moe_specialist.configs import PruningArguments, check_calibration_data, check_held_out_calibration
from moe_specialist.errors import ConfigurationError, LaunchError, MissingInputError, OutputExistsError
from moe_specialist.io import check_not_an_input
from moe_specialist.models import local_model_dirs
from moe_specialist.plan import PLAN_FILE, PrunePlan
from moe_specialist.training.configs import SFTConfig

logger = logging.getLogger(__name__)

# The run directory: what a run writes there (an overwrite removes exactly these, see clear_previous_run)
RESULTS_FILE = "results.json"
MODEL_DIR = "model"
PRUNED_SOURCE_DIR = "pruned_source"  # prune_mode: disk
TRANSLATIONS_FILE = "translations.json"


def validate_arguments(model_args, training_args: SFTConfig) -> None:
    """Cross-dataclass checks (each dataclass validates its own fields in ``__post_init__``) and the launch."""
    if getattr(model_args, "load_in_4bit", False) or getattr(model_args, "load_in_8bit", False):
        raise ConfigurationError(
            "Quantized loading is not supported: pruning and SFT need the full-precision expert tensors."
        )
    if model_args.use_peft and not (model_args.lora_target_modules or model_args.lora_target_parameters):
        raise ConfigurationError(
            "use_peft needs lora_target_modules (PEFT has no default for most MoE architectures): e.g. "
            "`q_proj k_proj v_proj o_proj` (attention only), or `all-linear` with lora_dropout 0 (PEFT then also "
            "adapts the fused experts and the routers)."
        )
    if model_args.use_peft and training_args.train_router_only:
        raise ConfigurationError(
            "use_peft and train_router_only contradict each other: LoRA trains adapters, not routers."
        )
    if model_args.use_peft and zero_stage(training_args) == 3:
        raise ConfigurationError(
            "LoRA under DeepSpeed ZeRO-3 is not supported by this pipeline (merging partitioned adapters into the "
            "pruned model): use accelerate_configs/zero2.yaml or ddp.yaml; the pruned model is small enough."
        )
    state = PartialState()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and (state.num_processes != launched or state.distributed_type == DistributedType.NO):
        raise LaunchError(
            f"{launched} processes were launched, but accelerate sees {state.num_processes} "
            f"({state.distributed_type}): they would not train together. Without a GPU, leave use_cpu and "
            "ddp_backend unset (DDP then runs on CPU with gloo; DeepSpeed needs use_cpu false)."
        )


def zero_stage(training_args) -> int | None:
    plugin = getattr(training_args, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None else None


def check_compensation(pruning_args: PruningArguments, training_args) -> None:
    """``compensation: refit`` fits each pruned layer's experts against the same layer before pruning: the unpruned
    model must be whole in memory on every rank (it is pruned in place, layer by layer, before DeepSpeed shards it
    under ZeRO-3)."""
    if pruning_args.compensation == "none":
        return
    if "expert_pruning" not in training_args.callbacks:
        raise ConfigurationError(
            f"compensation {pruning_args.compensation} follows pruning, but `callbacks` has no expert_pruning: add "
            "it, or set compensation: none."
        )
    if training_args.prune_mode == "disk":
        raise ConfigurationError(
            f"compensation {pruning_args.compensation} re-fits the kept experts against the unpruned model, whole "
            "in memory on every rank, but prune_mode disk never holds it: use prune_mode memory, or prune and "
            f"compensate once with `moe-specialist prune --mode memory --compensation {pruning_args.compensation}` "
            "and train that checkpoint, or set compensation: none."
        )


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-<step>`` directories in step order, leaving out any a killed run was still writing.

    The Trainer writes a checkpoint in place and ``trainer_state.json`` last, so a checkpoint without it is partial.
    """
    found = []
    for path in output_dir.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if path.is_dir() and step.isdigit():
            if (path / TRAINER_STATE_NAME).is_file():
                found.append((int(step), path))
            else:
                logger.warning(
                    "Skipping %s: it has no %s (a run was killed while saving it).", path, TRAINER_STATE_NAME
                )
    return [path for _, path in sorted(found)]


def resolve_checkpoint(training_args) -> str | None:
    """``resume_from_checkpoint``: unset/false -> None; true/last -> the last complete checkpoint-*; a path."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "none", "no"):
        return None
    output_dir = Path(training_args.output_dir)
    if str(value).lower() in ("true", "last", "latest", "yes"):
        checkpoints = complete_checkpoints(output_dir) if output_dir.is_dir() else []
        if not checkpoints:
            raise MissingInputError(
                f"resume_from_checkpoint={value}, but {output_dir} holds no complete checkpoint-* directory to resume "
                "from: start the run again without resume_from_checkpoint (add --overwrite_output_dir true)."
            )
        return str(checkpoints[-1])
    if not (Path(value) / TRAINER_STATE_NAME).is_file():
        raise MissingInputError(
            f"resume_from_checkpoint: {value} is not a complete checkpoint directory (no {TRAINER_STATE_NAME})."
        )
    return str(value)


RUN_ARTEFACTS = (
    MODEL_DIR, RESULTS_FILE, TRANSLATIONS_FILE, PLAN_FILE, "ranks", TRAINER_STATE_NAME, "README.md", PRUNED_SOURCE_DIR,
)  # fmt: skip


def clear_previous_run(output_dir: Path) -> None:
    for path in [*output_dir.glob("checkpoint-*"), *(output_dir / name for name in RUN_ARTEFACTS)]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def sweep_point_dir(output_dir: str, pruning_args: PruningArguments, seed: int) -> str:
    """W&B sweep agents launch every grid point with the same recipe: each point gets its own directory."""
    name = (
        f"{pruning_args.pruning_criterion}-{pruning_args.pruning_allocation}-r{pruning_args.pruning_ratio:g}-s{seed}"
    )
    return str(Path(output_dir) / name)


def check_recipe_data(
    data_args, calibration_args, *, train: bool = True, evaluate: bool = True, calibrate: bool = True
) -> None:
    """Every data source a run will read, checked before any model loads (a gated or missing file fails now)."""
    check_calibration_data(calibration_args, data_args.eval_selection)
    selections = [
        (train, data_args.train_selection),
        (evaluate, data_args.eval_selection),
        (calibrate, calibration_args.calibration_selection),
    ]
    for needed, selection in selections:
        if needed:
            selection.check_access()


def check_output_dir(output_dir: Path, overwrite: bool, resuming: bool) -> None:
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (overwrite or resuming):
        raise OutputExistsError(
            f"output_dir {output_dir} exists and is not empty: choose another output_dir, pass "
            "--overwrite_output_dir true to replace its results, or --resume_from_checkpoint true to resume its last "
            "checkpoint."
        )


def check_run_memory(model_args, calibration_args, pruning_args, training_args, measure: bool) -> None:
    """The memory estimate per rank (logged by rank 0), and a clear refusal of a run that cannot fit: before any
    model loads. The expert counts are the plan's when it is given, else the target ratio's."""
    from trl import get_peft_config

    from moe_specialist.memory import available_memory, check_memory_fits, estimate_for_run
    from moe_specialist.models import load_config, resolve_dtype

    state = PartialState()
    config = load_config(model_args.model_name_or_path, model_args.model_revision, training_args.trust_remote_code)
    pruning: float | dict[int, int] = 0.0
    if "expert_pruning" in training_args.callbacks:
        pruning = pruning_args.pruning_ratio
        if pruning_args.prune_plan:
            from moe_specialist.prune import structure_from_config

            pruning = PrunePlan.load(pruning_args.prune_plan).experts_after(structure_from_config(config))
    dtype = resolve_dtype(model_args.model_name_or_path, model_args.dtype)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.bfloat16
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    estimate = estimate_for_run(
        config, pruning, training_args, state.num_processes, training_args.prune_mode,
        zero_stage=zero_stage(training_args), peft_config=get_peft_config(model_args),
        calibration_args=calibration_args, attn_implementation=model_args.attn_implementation, measure=measure,
        dtype_bytes=dtype.itemsize,
    )  # fmt: skip
    if state.is_main_process:
        logger.info("%s", estimate.describe())
    check_memory_fits(estimate, *available_memory())


@dataclass
class RunSetup:
    """What the checks decided: where the run writes, the checkpoint it resumes, the plan it replays."""

    output_dir: Path
    checkpoint: str | None
    pruning_args: PruningArguments


def prepare_run(model_args, data_args, calibration_args, pruning_args, training_args, calibrate: bool) -> RunSetup:
    """Every check before a model loads (arguments, data, output directory); then the output directory is made."""
    state = PartialState()
    validate_arguments(model_args, training_args)
    check_compensation(pruning_args, training_args)
    plans = "expert_pruning" in training_args.callbacks and not pruning_args.prune_plan
    planned = calibrate and plans  # planned here, on statistics calibrated here
    check_recipe_data(
        data_args,
        calibration_args,
        train=not training_args.prune_only,
        evaluate="translation_eval" in training_args.callbacks or training_args.eval_strategy != "no",
        calibrate=planned or pruning_args.compensation != "none",
    )
    allocation = [pruning_args.pruning_allocation] if plans else []
    check_held_out_calibration(
        calibration_args, pruning_args.sensitivity_examples, [*allocation, pruning_args.compensation]
    )
    if training_args.check_memory:
        check_run_memory(model_args, calibration_args, pruning_args, training_args, planned)
    if os.environ.get("WANDB_SWEEP_ID"):
        training_args.output_dir = sweep_point_dir(training_args.output_dir, pruning_args, training_args.seed)
        training_args.run_name = training_args.run_name or Path(training_args.output_dir).name
    output_dir = Path(training_args.output_dir)
    checkpoint = resolve_checkpoint(training_args)
    check_output_dir(output_dir, training_args.overwrite_output_dir, checkpoint is not None)
    check_not_an_input(output_dir, local_model_dirs(model_args.model_name_or_path))
    state.wait_for_everyone()  # every rank checked before rank 0 writes anything there
    if state.is_main_process:
        if training_args.overwrite_output_dir and checkpoint is None:
            clear_previous_run(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None and (output_dir / PLAN_FILE).is_file() and not pruning_args.prune_plan:
        # the checkpoint holds the pruned architecture: replay its plan rather than re-planning
        pruning_args = replace(pruning_args, prune_plan=str(output_dir / PLAN_FILE))
    return RunSetup(output_dir, checkpoint, pruning_args)
