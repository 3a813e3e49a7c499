"""One prune(+SFT) run, in process: what ``moe_specialist.train`` runs under ``accelerate launch`` and a sweep calls.

    results = run(model_args, data_args, calibration_args, pruning_args, training_args, stats=None)

Order of events (every rank runs all of it; rank 0 alone writes files and talks to W&B):

1. checks: arguments, the distributed setup, the output directory (refused when not empty, unless
   ``overwrite_output_dir`` or ``resume_from_checkpoint``);
2. W&B run (rank 0) with the whole recipe as config;
3. the model, loaded whole on every rank even under a ZeRO-3 launch (``zero.Init`` off), so that pruning sees whole
   expert tensors; DeepSpeed partitions the pruned model when the Trainer prepares it. Sparse-MoE blocks become
   ZeRO-3 leaf modules; the trainable set follows ``train_router_only`` / ``freeze_router``;
4. SFT records (prompt-completion, loss on the completion only) and eval examples;
5. ``SFTTrainer`` with the recipe's callbacks: ``expert_pruning`` prunes in ``on_init_end``, before the optimizer
   exists; with LoRA it prunes just before the trainer is built, because ``SFTTrainer.__init__`` wraps the model
   in PEFT first. Non-uniform expert counts switch the router aux loss off (transformers' assumes one count);
6. ``trainer.train(resume_from_checkpoint=...)``, or, with ``max_steps: 0``, only an evaluation of the pruned model;
7. the final model in its pruned architecture (``output_dir/model``, reloadable with ``load_pruned_model``; LoRA
   adapters merged) with ``prune_plan.json`` and a model card, written atomically; ``results.json`` (atomic) with
   the pruning report, scores at start and end with their signatures, and timings; the W&B summary.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import DistributedType, broadcast_object_list
from datasets import Dataset
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import set_seed

from moe_specialist import __version__
from moe_specialist.architectures import find_moe, text_config
from moe_specialist.calibrate import statistics_for
from moe_specialist.compat import zero3_init_disabled
from moe_specialist.configs import CalibrationArguments, PruningArguments, check_calibration_data
from moe_specialist.data.prompts import sft_record
from moe_specialist.data.sources import check_data_access, load_examples
from moe_specialist.errors import ConfigurationError, MissingInputError, OutputExistsError
from moe_specialist.io import atomic_write_json, check_not_an_input
from moe_specialist.model_card import pruned_model_card
from moe_specialist.models import load_model_and_tokenizer, local_model_dirs
from moe_specialist.plan import PLAN_FILE, PrunePlan, plan_for
from moe_specialist.prune import load_pruned_model, router_aux_loss_applies, save_pruned_model
from moe_specialist.sensitivity import layer_cost_meter
from moe_specialist.stats import RoutingStats
from moe_specialist.training.callbacks import (
    EvaluationOutcome,
    PruningCallback,
    PruningOutcome,
    RunContext,
    TranslationEvalCallback,
    find_callback,
    get_callbacks,
    register_zero3_leaf_modules,
)
from moe_specialist.training.configs import DataArguments, SFTConfig
from moe_specialist.training.wandb_logging import finish_wandb, init_wandb_training, update_wandb_summary

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
MODEL_DIR = "model"
TRANSLATIONS_FILE = "translations.json"


# ---- checks ---------------------------------------------------------------------------------------------------------
def validate_arguments(model_args, training_args: SFTConfig) -> None:
    """Cross-dataclass checks (each dataclass validates its own fields in ``__post_init__``) and the launch."""
    if model_args.model_name_or_path is None:
        raise ConfigurationError("model_name_or_path is required: a Hub id, a local directory or 'demo'.")
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
    if model_args.use_peft and _zero_stage(training_args) == 3:
        raise ConfigurationError(
            "LoRA under DeepSpeed ZeRO-3 is not supported by this pipeline (merging partitioned adapters into the "
            "pruned model): use accelerate_configs/zero2.yaml or ddp.yaml; the pruned model is small enough."
        )
    state = PartialState()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and (state.num_processes != launched or state.distributed_type == DistributedType.NO):
        raise RuntimeError(
            f"{launched} processes were launched, but accelerate sees {state.num_processes} "
            f"({state.distributed_type}): they would not train together. Without a GPU, leave use_cpu and "
            "ddp_backend unset (DDP then runs on CPU with gloo; DeepSpeed needs use_cpu false)."
        )


def _zero_stage(training_args) -> int | None:
    plugin = getattr(training_args, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None else None


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


# What a run leaves in output_dir; an overwrite removes them first, so that nothing stale is read back (a resume
# would otherwise find the old run's checkpoints, and results of a run without translation_eval the old translations).
RUN_ARTEFACTS = (MODEL_DIR, RESULTS_FILE, TRANSLATIONS_FILE, PLAN_FILE, "ranks", "trainer_state.json", "README.md")


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


def restore_checkpoint_weights(model, checkpoint: str) -> bool:
    """Load a full-model checkpoint into ``model`` exactly (strict), before the Trainer resumes from it.

    Checkpoints are saved in the original key format (``experts.0.down_proj.weight``), while transformers 5 holds
    fused expert tensors in memory; the Trainer's own resume loads the file with ``strict=False`` and without key
    conversion, so the experts would silently keep their freshly pruned values. Loading the checkpoint through
    :func:`load_pruned_model` converts the keys (one extra copy of the pruned model in host memory, briefly); the
    Trainer's load that follows only rewrites the other tensors with the same values. LoRA checkpoints (adapters
    only) are left to PEFT, and DeepSpeed restores its own engine state.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel) or not any(Path(checkpoint).glob("model*.safetensors")):
        return False
    saved = load_pruned_model(checkpoint, dtype=next(model.parameters()).dtype).state_dict()
    model.load_state_dict(saved, strict=True)
    return True


def check_recipe_data(
    data_args, calibration_args, *, train: bool = True, evaluate: bool = True, calibrate: bool = True
) -> None:
    """Every data source a run will read, checked before any model loads (a gated or missing file fails now)."""
    check_calibration_data(
        calibration_args, data_args.eval_dataset_name, data_args.eval_split, data_args.eval_target_files
    )
    selections = [
        (
            train,
            data_args.dataset_name,
            data_args.train_directions,
            data_args.train_split,
            data_args.dataset_target_files,
        ),
        (
            evaluate,
            data_args.eval_dataset_name,
            data_args.eval_directions,
            data_args.eval_split,
            data_args.eval_target_files,
        ),
        (
            calibrate,
            calibration_args.calibration_dataset,
            calibration_args.calibration_directions,
            calibration_args.calibration_split,
            calibration_args.calibration_target_files,
        ),
    ]
    for needed, *selection in selections:
        if needed:
            check_data_access(*selection)


def check_output_dir(output_dir: Path, overwrite: bool, resuming: bool) -> None:
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (overwrite or resuming):
        raise OutputExistsError(
            f"output_dir {output_dir} exists and is not empty: choose another output_dir, pass "
            "--overwrite_output_dir true to replace its results, or --resume_from_checkpoint true to resume its last "
            "checkpoint."
        )


# ---- model and data -------------------------------------------------------------------------------------------------
def load_model(model_args, training_args):
    """Model and tokenizer, whole on every rank (see :func:`zero3_init_disabled`)."""
    extra = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    with zero3_init_disabled():
        model, tokenizer = load_model_and_tokenizer(
            model_args.model_name_or_path,
            model_args.dtype,
            model_args.model_revision,
            training_args.trust_remote_code,
            **extra,
        )
    return model.train(), tokenizer


def prepare_model(model, training_args) -> dict:
    """Sparse-MoE blocks as ZeRO-3 leaf modules, the trainable set; returns the router settings to save back."""
    moe = find_moe(model)
    if _zero_stage(training_args) == 3:
        logger.info("ZeRO-3 leaf modules: %s", register_zero3_leaf_modules(model, moe))
    configure_trainable(model, moe, training_args)
    config = text_config(model.config)
    return {
        name: getattr(config, name)
        for name in ("output_router_logits", "router_aux_loss_coef")
        if getattr(config, name, None) is not None
    }


def configure_trainable(model, moe, training_args) -> None:
    """Routers only, everything but the routers, or everything (LoRA: PEFT freezes the base model itself)."""
    routers = [p for layer in moe.layers for p in layer.router.parameters()]
    if training_args.train_router_only:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in routers:
            p.requires_grad_(True)
        if training_args.gradient_checkpointing:
            model.enable_input_require_grads()
    elif training_args.freeze_router:
        for p in routers:
            p.requires_grad_(False)


def check_routers_frozen(model, moe) -> None:
    """freeze_router must hold after PEFT wrapping too (``all-linear`` LoRA adapts the routers)."""
    routers = tuple(f"{layer.router_path}." for layer in moe.layers)
    trained = [name for name, p in model.named_parameters() if p.requires_grad and any(r in name for r in routers)]
    if trained:
        raise ConfigurationError(
            f"freeze_router is set but router parameters are trainable ({trained[0]}, ...): with LoRA, choose "
            "lora_target_modules that leave the routers out (e.g. q_proj k_proj v_proj o_proj)."
        )


def training_mode(model_args, training_args) -> str:
    if training_args.prune_only:
        return "prune_only"
    if model_args.use_peft:
        return "lora"
    return "router_only" if training_args.train_router_only else "full"


def load_data(data_args: DataArguments, training_args: SFTConfig, need_eval: bool):
    """SFT examples and eval examples per direction (every rank reads the same seeded samples)."""
    with training_args.main_process_first(desc="load data"):
        train = load_examples(
            data_args.dataset_name,
            data_args.train_directions,
            data_args.train_split,
            limit=data_args.max_train_examples,
            seed=data_args.dataset_seed,
            target_files=data_args.dataset_target_files,
        )
        evaluation = data_args.load_eval_examples() if need_eval else {}
    return train, evaluation


def needs_eval_examples(training_args) -> bool:
    return TranslationEvalCallback.name in training_args.callbacks or training_args.eval_strategy != "no"


def sft_dataset(tokenizer, examples) -> Dataset:
    return Dataset.from_list([sft_record(tokenizer, ex) for items in examples.values() for ex in items])


def sft_datasets(tokenizer, train_examples, eval_examples, training_args) -> tuple[Dataset, Dataset | None]:
    """Prompt-completion records (loss on the completion only); the eval set only for the Trainer's own eval loss."""
    evaluation = sft_dataset(tokenizer, eval_examples) if training_args.eval_strategy != "no" else None
    return sft_dataset(tokenizer, train_examples), evaluation


# ---- outputs --------------------------------------------------------------------------------------------------------
def outcome_of(callbacks, kind: type):
    """What a callback of ``kind`` found (its ``outcome``), or None when the recipe does not use it."""
    callback = find_callback(callbacks, kind)
    return callback.outcome if callback is not None else None


def _trainable_summary(model) -> dict:
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    return {
        "parameters": sum(
            p.numel() if not hasattr(p, "ds_numel") else p.ds_numel for p in model.parameters() if p.requires_grad
        ),
        "tensors": sorted({re.sub(r"\.\d+\.", ".*.", name) for name in names}),
    }


def _scores_entry(entry: dict | None) -> dict | None:
    if entry is None:
        return None
    return {key: entry[key] for key in ("label", "step", "directions", "average")}


def sft_card_section(
    mode, model_args, data_args, training_args, train_counts, global_step, aux, evaluation: EvaluationOutcome | None
) -> str:
    world = PartialState().num_processes
    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world
    modes = {
        "prune_only": "none (prune only: no SFT step)",
        "full": "full fine-tune",
        "lora": f"LoRA (r={model_args.lora_r}, alpha={model_args.lora_alpha}), merged into the weights",
        "router_only": "routers only (everything else frozen)",
    }
    lines = [
        "",
        "## Recovery fine-tuning (SFT)",
        "",
        f"- Training: {modes[mode]}{'; routers frozen' if training_args.freeze_router else ''}.",
        f"- Data: `{data_args.dataset_name}` ({data_args.train_split}), "
        + ", ".join(f"{d}: {n} examples" for d, n in train_counts.items())
        + "; prompt-completion records, loss on the completion only.",
        f"- Steps: {global_step}; learning rate {training_args.learning_rate}; effective batch {batch}; "
        f"seed {training_args.seed}; router load-balancing loss: {aux}.",
    ]
    if evaluation is not None and evaluation.history:
        start, end = evaluation.start, evaluation.end
        lines += [
            f"- Translation quality on `{data_args.eval_dataset_name}` ({data_args.eval_split}), greedy decoding, "
            f"max_new_tokens {evaluation.decoding['max_new_tokens']}:",
            "",
            "| direction | chrF++ after pruning | chrF++ final | BLEU after pruning | BLEU final |",
            "|---|---|---|---|---|",
        ]
        for name, final in end["directions"].items():
            first = (start or end)["directions"][name]
            lines.append(f"| {name} | {first['chrf++']} | {final['chrf++']} | {first['bleu']} | {final['bleu']} |")
        signatures = next(iter(end["directions"].values()))
        lines += ["", f"sacreBLEU: `{signatures['chrf++_signature']}`, `{signatures['bleu_signature']}`."]
    return "\n".join(lines) + "\n"


def model_card(model_args, pruning: PruningOutcome | None, sft_section: str) -> str:
    if pruning is not None:
        card = pruned_model_card(
            model_args.model_name_or_path, pruning.plan, pruning.summary_before, pruning.summary_after, pruning.routing
        )
    else:
        card = f"---\nlibrary_name: transformers\nbase_model: {model_args.model_name_or_path}\n---\n\n"
        card += f"# {model_args.model_name_or_path}, fine-tuned with moe-specialist {__version__} (not pruned)\n"
    return card + sft_section


def save_final_model(trainer, tokenizer, model_dir: Path, extra_files: dict[str, str], router_settings: dict) -> None:
    """The trained model in its pruned architecture, atomically (a collective under ZeRO-3).

    ``router_settings`` (``output_router_logits``, ``router_aux_loss_coef``) are written back as the model was
    loaded, but for the aux loss of a model whose layers keep different counts: the run changed them for training.
    """
    from peft import PeftModel

    accelerator = trainer.accelerator
    model = trainer.model
    state_dict = None
    prepared = trainer.model_wrapped is not trainer.model
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    elif prepared and accelerator.distributed_type == DistributedType.DEEPSPEED:
        state_dict = accelerator.get_state_dict(trainer.model_wrapped)  # gathers ZeRO-3 shards on rank 0
    if accelerator.is_main_process:
        model.config.use_cache = True
        for name, value in router_settings.items():
            setattr(text_config(model.config), name, value)
        save_pruned_model(model, model_dir, tokenizer, overwrite=True, extra_files=extra_files, state_dict=state_dict)
        logger.info("Saved the final model to %s", model_dir)
    accelerator.wait_for_everyone()


def recipe_config(model_args, data_args, calibration_args, pruning_args, training_args) -> dict:
    """The whole recipe as one flat mapping (TrlParser guarantees unique names across the dataclasses)."""
    return {
        **asdict(model_args),
        **asdict(data_args),
        **asdict(calibration_args),
        **asdict(pruning_args),
        **training_args.to_dict(),
    }


def wandb_summary(results: dict, pruning_args: PruningArguments) -> dict:
    """The run summary (one row per run in the W&B runs table): pruning report and scores, from results.json.

    The ratios are the plan's target (``None`` for a hand-written plan) and the share actually removed; a run that
    prunes nothing has neither.
    """
    summary = {"pruning/criterion": pruning_args.pruning_criterion}
    report = results["pruning"]
    if report is not None:
        summary |= {
            "pruning/target_ratio": report["target_ratio"],
            "pruning/actual_ratio": report["actual_ratio"],
            "pruning/experts_kept_per_layer": report["experts_after"],
            "pruning/top_k": report["top_k_after"],
            "pruning/params_total_before": report["parameters_before"]["total"],
            "pruning/params_total_after": report["parameters_after"]["total"],
            "pruning/params_active_before": report["parameters_before"]["active"],
            "pruning/params_active_after": report["parameters_after"]["active"],
        }
    for label, prefix in (("start", "start"), ("end", "final")):
        entry = results["scores"].get(label)
        if entry is None:
            continue
        for name, values in [*entry["directions"].items(), ("avg", entry["average"])]:
            for metric, value in values.items():
                if metric in ("chrf++", "bleu", "off_target_rate", "chrf++_signature", "bleu_signature"):
                    summary[f"{prefix}/{name}/{metric}"] = value
    return summary


class Timer:
    """Seconds per stage: ``with timer("train"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.time()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.time() - start, 2)


# ---- the stages -----------------------------------------------------------------------------------------------------
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
    check_recipe_data(
        data_args,
        calibration_args,
        train=not training_args.prune_only,
        evaluate="translation_eval" in training_args.callbacks or training_args.eval_strategy != "no",
        calibrate=calibrate and "expert_pruning" in training_args.callbacks and not pruning_args.prune_plan,
    )
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


def plan_pruning(
    model, tokenizer, model_args, calibration_args, pruning_args, training_args, stats: RoutingStats | None, timer
) -> PrunePlan:
    """Statistics (given, reused from ``statistics_file``, or calibrated: every rank a shard) and the plan.

    Rank 0's plan is broadcast, so that every rank prunes identically whatever floating-point noise the reductions
    had; rank 0 saves it to ``output_dir/prune_plan.json`` (what a resumed run replays).
    """
    state = PartialState()
    moe = find_moe(model)
    if not pruning_args.prune_plan and next(model.parameters()).device != training_args.device:
        logger.info("Moving the model to %s to measure its routing (the Trainer has not placed it yet).", state.device)
        model.to(training_args.device)
    if stats is None and not pruning_args.prune_plan:
        with timer("calibrate"):
            stats = statistics_for(
                model,
                tokenizer,
                calibration_args,
                model_args.model_name_or_path,
                statistics_file=pruning_args.statistics_file,
                progress=state.is_main_process,
            )
    with timer("plan"):
        meter = layer_cost_meter(
            model, moe, tokenizer, calibration_args, pruning_args.sensitivity_examples,
            progress=state.is_main_process,
        )  # fmt: skip
        plan = plan_for(moe, stats, pruning_args, meter)
    if pruning_args.statistics_file and not pruning_args.prune_plan:
        plan.metadata.setdefault("statistics", pruning_args.statistics_file)
    if state.num_processes > 1:
        payload = [plan.to_dict()]
        broadcast_object_list(payload, from_process=0)
        plan = PrunePlan.from_dict(payload[0])
    if state.is_main_process:
        plan.save(Path(training_args.output_dir) / PLAN_FILE)
    return plan


def build_trainer(model, tokenizer, model_args, training_args, datasets, callbacks, uneven_counts: bool):
    """``SFTTrainer`` with the recipe's callbacks; ``expert_pruning`` prunes in ``on_init_end``.

    With LoRA the model is pruned first, because ``SFTTrainer.__init__`` wraps it in PEFT before ``on_init_end``.
    Layers left with different expert counts (``uneven_counts``) switch the router aux loss off before TRL reads
    ``router_aux_loss_coef``.
    """
    from trl import SFTTrainer, get_peft_config

    pruning = find_callback(callbacks, PruningCallback)
    if uneven_counts:
        training_args.router_aux_loss_coef = 0.0
        logger.warning(
            "MoE layers keep different numbers of experts: the router load-balancing aux loss of transformers "
            "assumes one count per model, so it is switched off for this run."
        )
    if pruning is not None and model_args.use_peft:
        pruning.prune(model, when="before PEFT wrapping")
    train_dataset, eval_dataset = datasets
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=callbacks,
    )
    for callback in callbacks:
        if hasattr(callback, "bind"):
            callback.bind(trainer)
    return trainer


def aux_loss_description(trainer, uneven_counts: bool) -> str:
    if trainer.aux_loss_enabled:
        return f"on (coefficient {trainer.router_aux_loss_coef})"
    return "off (per-layer expert counts differ)" if uneven_counts else "off"


def train_model(trainer, training_args, checkpoint: str | None, evaluation) -> dict:
    """The SFT (resumed from ``checkpoint`` with exactly its weights), or, prune-only, one evaluation."""
    metrics = {}
    if training_args.prune_only:
        if evaluation is not None:
            evaluation.evaluate("end")
    else:
        if checkpoint is not None and restore_checkpoint_weights(trainer.model, checkpoint):
            logger.info(
                "Restored the weights of %s (the Trainer's missing-keys warning that follows is moot).", checkpoint
            )
        metrics = dict(trainer.train(resume_from_checkpoint=checkpoint).metrics)
    trainer.save_state()  # trainer_state.json: the log history, eval_mt/... scores included
    return metrics


def run(
    model_args,
    data_args: DataArguments,
    calibration_args: CalibrationArguments,
    pruning_args: PruningArguments,
    training_args: SFTConfig,
    stats: RoutingStats | None = None,
) -> dict:
    """Prune (and fine-tune) one model as the recipe says; returns what ``results.json`` holds (on every rank).

    ``stats`` (routing statistics computed by the caller, e.g. once for a whole sweep) skip the calibration.
    """
    start, timer, state = time.time(), Timer(), PartialState()

    # Checks (before any model loads), the output directory, and the W&B run (rank 0)
    setup = prepare_run(model_args, data_args, calibration_args, pruning_args, training_args, calibrate=stats is None)
    pruning_args = setup.pruning_args
    set_seed(training_args.seed)
    wandb_run = init_wandb_training(
        training_args, recipe_config(model_args, data_args, calibration_args, pruning_args, training_args)
    )
    try:
        # Model and data
        with timer("load_model"):
            model, tokenizer = load_model(model_args, training_args)
        router_settings = prepare_model(model, training_args)
        with timer("load_data"):
            train_examples, eval_examples = load_data(data_args, training_args, needs_eval_examples(training_args))
            datasets = sft_datasets(tokenizer, train_examples, eval_examples, training_args)

        # Routing statistics and the prune plan
        plan = None
        if PruningCallback.name in training_args.callbacks:
            plan = plan_pruning(
                model, tokenizer, model_args, calibration_args, pruning_args, training_args, stats, timer
            )

        # Trainer (expert_pruning prunes in on_init_end, before the optimizer exists)
        callbacks = get_callbacks(
            training_args.callbacks, RunContext(model_args.model_name_or_path, training_args, plan, eval_examples)
        )
        moe = find_moe(model)  # before PEFT wraps the experts
        uneven_counts = plan is not None and not router_aux_loss_applies(plan.experts_after(moe))
        with timer("build_trainer"):
            trainer = build_trainer(model, tokenizer, model_args, training_args, datasets, callbacks, uneven_counts)
        if training_args.freeze_router:
            check_routers_frozen(trainer.model, moe)
        pruning = outcome_of(callbacks, PruningCallback)
        evaluation = find_callback(callbacks, TranslationEvalCallback)
        trainable = _trainable_summary(trainer.model)
        mode = training_mode(model_args, training_args)
        if state.is_main_process:
            logger.info(
                "Mode %s; trainable: %s parameters in %s", mode, f"{trainable['parameters']:,}", trainable["tensors"]
            )

        # Train (or, prune-only, score the pruned model)
        with timer("train"):
            train_metrics = train_model(trainer, training_args, setup.checkpoint, evaluation)
        scores = outcome_of(callbacks, TranslationEvalCallback)

        # Save the model with its plan and card
        aux = aux_loss_description(trainer, uneven_counts)
        train_counts = {d: len(v) for d, v in train_examples.items()}
        section = sft_card_section(
            mode, model_args, data_args, training_args, train_counts, trainer.state.global_step, aux, scores
        )
        extra_files = {"README.md": model_card(model_args, pruning, section)}
        if pruning is not None:
            extra_files[PLAN_FILE] = json.dumps(pruning.plan.to_dict(), indent=2) + "\n"
            if "output_router_logits" in router_settings:
                router_settings["output_router_logits"] &= pruning.report.uniform
        with timer("save"):
            save_final_model(trainer, tokenizer, setup.output_dir / MODEL_DIR, extra_files, router_settings)
    except BaseException:
        finish_wandb(exit_code=1)
        raise

    # Results: results.json, translations.json, the W&B summary
    timings = {**timer.seconds, "total": round(time.time() - start, 2)}
    if pruning is not None:
        timings["prune"] = pruning.seconds
    if scores is not None:
        timings["mt_eval"] = scores.seconds
    results = results_record(
        model_args, data_args, calibration_args, training_args, setup, mode, train_counts, eval_examples,
        trainer, trainable, aux, train_metrics, pruning, scores, timings,
    )  # fmt: skip
    results["wandb"] = {"id": wandb_run.id, "dir": wandb_run.dir} if wandb_run is not None else None
    if state.is_main_process:
        atomic_write_json(results, setup.output_dir / RESULTS_FILE)
        if scores is not None and scores.records:
            atomic_write_json(scores.records, setup.output_dir / TRANSLATIONS_FILE)
        update_wandb_summary(wandb_summary(results, pruning_args))
    finish_wandb()
    state.wait_for_everyone()
    return results


def results_record(
    model_args, data_args, calibration_args, training_args, setup: RunSetup, mode, train_counts, eval_examples,
    trainer, trainable, aux, train_metrics, pruning: PruningOutcome | None, scores: EvaluationOutcome | None, timings,
) -> dict:  # fmt: skip
    """What ``results.json`` holds: the run, its data, the pruning report, training, scores and timings."""
    state = PartialState()
    history = scores.history if scores is not None else []
    results = {
        "model": model_args.model_name_or_path,
        "output_dir": str(setup.output_dir),
        "model_dir": str(setup.output_dir / MODEL_DIR),
        "run_name": training_args.run_name or setup.output_dir.name,
        "mode": mode,
        "freeze_router": training_args.freeze_router,
        "world_size": state.num_processes,
        "distributed_type": str(state.distributed_type.value),
        "zero_stage": _zero_stage(training_args),
        "data": {
            "train": {"dataset": data_args.dataset_name, "split": data_args.train_split, "examples": train_counts},
            "eval": {
                "dataset": data_args.eval_dataset_name,
                "split": data_args.eval_split,
                "examples": {d: len(v) for d, v in eval_examples.items()},
            },
        },
        "pruning": None,
        "training": {
            "global_step": trainer.state.global_step,
            "resumed_from": setup.checkpoint,
            "trainable": trainable,
            "aux_loss": aux,
            "metrics": train_metrics,
        },
        "decoding": scores.decoding if scores is not None else None,
        "scores": {
            "start": _scores_entry(scores.start if scores is not None else None),
            "end": _scores_entry(scores.end if scores is not None else None),
        },
        "history": [{"label": h["label"], "step": h["step"], "average": h["average"]} for h in history],
        "translations_file": str(setup.output_dir / TRANSLATIONS_FILE) if scores and scores.records else None,
        "timings": timings,
        "version": __version__,
    }
    if pruning is not None:
        results["pruning"] = {
            "target_ratio": pruning.plan.metadata.get("target_ratio"),  # None for a hand-written plan
            **pruning.report.to_dict(),
            "uniform": pruning.report.uniform,
            "plan_file": str(setup.output_dir / PLAN_FILE),
            "criterion": pruning.plan.metadata.get("criterion"),
            "allocation": pruning.plan.metadata.get("allocation"),
            "statistics_file": setup.pruning_args.statistics_file,
            "routing": {"kind": pruning.routing.kind, "exact": pruning.routing.exact},
        }
    return results


def parse_recipe(args: list[str] | None = None):
    """``(model_args, data_args, calibration_args, pruning_args, training_args)`` from ``--config FILE`` and flags."""
    from moe_specialist.training.configs import make_parser

    return make_parser().parse(args)
