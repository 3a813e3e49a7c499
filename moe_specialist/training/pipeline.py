"""One prune(+recovery) run, in process: what ``moe_specialist.train`` runs under ``accelerate launch`` and a sweep
calls.

    results = run(model_args, data_args, calibration_args, pruning_args, training_args, stats=None)

:func:`run` reads top to bottom, one stage after another, each returning what the next needs (every rank runs all
of them; rank 0 alone writes files and talks to W&B):

1. checks and the output directory (:mod:`moe_specialist.training.setup`), then the W&B run with the whole recipe;
2. the model, loaded whole on every rank even under a ZeRO-3 launch (``zero.Init`` off), so that pruning sees whole
   expert tensors; sparse-MoE blocks become ZeRO-3 leaf modules; the trainable set; the teacher a distillation
   recovery needs besides the model (:func:`load_teacher`); then the SFT and eval data;
3. routing statistics (given, reused or calibrated, sharded across ranks) and the prune plan (rank 0's, broadcast);
4. ``RecoveryTrainer`` (``SFTTrainer`` with the recipe's ``recovery`` loss) with the recipe's callbacks: its teacher
   is set up first (precomputed logits computed by the model itself), then ``expert_pruning`` prunes with the plan in
   ``on_init_end``, before the optimizer exists (with LoRA just before the trainer is built: ``SFTTrainer.__init__``
   wraps the model in PEFT first). Uneven expert counts switch the router aux loss off before TRL reads it;
5. ``trainer.train(resume_from_checkpoint=...)`` (the checkpoint's weights restored exactly), or, with
   ``max_steps: 0``, one evaluation of the pruned model;
6. the scores the ``translation_eval`` callback gathered;
7. the model in its pruned architecture (``output_dir/model``, reloadable with ``load_pruned_model``; LoRA adapters
   merged) with ``prune_plan.json`` and a model card; ``results.json``, ``translations.json`` and the W&B summary
   (:mod:`moe_specialist.training.outputs`), all written atomically.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from contextlib import contextmanager
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from datasets import Dataset
from transformers.trainer_utils import set_seed

from moe_specialist.architectures import find_moe, text_config
from moe_specialist.calibrate import statistics_for
from moe_specialist.compat import zero3_init_disabled
from moe_specialist.compensation import named_compensation
from moe_specialist.configs import CalibrationArguments, PruningArguments
from moe_specialist.data.prompts import sft_record
from moe_specialist.errors import ConfigurationError
from moe_specialist.models import load_config, load_from_arguments, resolve_model_path
from moe_specialist.plan import PLAN_FILE, PrunePlan, plan_for
from moe_specialist.prune import load_pruned_model, router_aux_loss_applies, structure_from_config
from moe_specialist.sensitivity import layer_cost_meter
from moe_specialist.stats import RoutingStats
from moe_specialist.training.callbacks import (
    PruningCallback,
    RunContext,
    TranslationEvalCallback,
    find_callback,
    get_callbacks,
    register_zero3_leaf_modules,
)
from moe_specialist.training.configs import DataArguments, SFTConfig
from moe_specialist.training.on_disk import (
    PrunedSource,
    free_memory,
    load_pruned_source,
    measuring_model,
    prune_source_once,
)
from moe_specialist.training.outputs import (
    recipe_config,
    results_record,
    save_run_model,
    sft_card_section,
    trainable_summary,
    write_results,
)
from moe_specialist.training.recovery import RecoveryTrainer, add_compact_lm_head
from moe_specialist.training.setup import prepare_run, zero_stage
from moe_specialist.training.teacher import teacher_logits_ready
from moe_specialist.training.wandb_logging import finish_wandb, init_wandb_training

logger = logging.getLogger(__name__)


# ---- checks ---------------------------------------------------------------------------------------------------------


# What a run leaves in output_dir; an overwrite removes them first, so that nothing stale is read back (a resume
# would otherwise find the old run's checkpoints, and results of a run without translation_eval the old translations).


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


# ---- model and data -------------------------------------------------------------------------------------------------
def load_model(model_args, training_args):
    """Model and tokenizer, whole on every rank (see :func:`zero3_init_disabled`)."""
    with zero3_init_disabled():
        model, tokenizer = load_from_arguments(model_args, training_args.trust_remote_code)
    return model.train(), tokenizer


def prepare_model(model, training_args) -> dict:
    """Sparse-MoE blocks as ZeRO-3 leaf modules, the trainable set; returns the router settings to save back."""
    moe = find_moe(model)
    if zero_stage(training_args) == 3:
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
        return data_args.train_selection.load(), data_args.eval_selection.load() if need_eval else {}


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
        logger.info(
            "Moving the model to %s to measure its routing (the Trainer has not placed it yet).", training_args.device
        )
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
        plan = plan_for(
            moe, stats, pruning_args, meter,
            measure_kept_sets=meter.greedy_sets, search_allocation=meter.search_allocation,
        )  # fmt: skip
    if state.num_processes > 1:
        payload = [plan.to_dict()]
        broadcast_object_list(payload, from_process=0)
        plan = PrunePlan.from_dict(payload[0])
    if state.is_main_process:
        plan.save(Path(training_args.output_dir) / PLAN_FILE)
    return plan


def plan_before_loading(
    model_args, calibration_args, pruning_args, training_args, stats: RoutingStats | None, timer
) -> PrunePlan:
    """``prune_mode: disk``: the plan before the model the run trains loads. Unless the plan is given (a file, or a
    resumed run's), the unpruned model is loaded onto each rank's device to measure, then freed."""
    if pruning_args.prune_plan:
        config = load_config(model_args.model_name_or_path, model_args.model_revision, training_args.trust_remote_code)
        model, tokenizer = structure_from_config(config).model, None  # weightless: the plan is only validated
    else:
        with timer("load_model"):
            model, tokenizer = measuring_model(model_args, training_args)
    plan = plan_pruning(model, tokenizer, model_args, calibration_args, pruning_args, training_args, stats, timer)
    del model
    free_memory()
    return plan


def load_teacher(model, model_args, training_args, pruned_source: PrunedSource | None = None):
    """The teacher model a distillation recovery needs besides the student, loaded before pruning: None for plain
    SFT, for precomputed logits that exist, and for logits still to compute (the model computes them itself just
    before it is pruned); else ``teacher_model_name_or_path``, or a copy of the model about to be pruned (a live
    teacher, or LoRA, whose model is pruned before the trainer exists). With ``prune_mode: disk`` the model is pruned
    already: the teacher is loaded from the source checkpoint, partitioned while it loads under ZeRO-3."""
    if not training_args.uses_teacher or teacher_logits_ready(training_args):
        return None
    if training_args.teacher_model_name_or_path or pruned_source is not None:
        source = resolve_model_path(training_args.teacher_model_name_or_path or model_args.model_name_or_path)
        with zero3_init_disabled() if pruned_source is None else contextlib.nullcontext():
            teacher, _ = load_from_arguments(model_args, training_args.trust_remote_code, source=source)
        return teacher
    if training_args.teacher_logits and not model_args.use_peft:
        return None
    return copy.deepcopy(model)


def teacher_name(model_args, training_args) -> str:
    """Which model teaches, as precomputed logits record it."""
    return resolve_model_path(training_args.teacher_model_name_or_path or model_args.model_name_or_path)


def build_trainer(model, tokenizer, model_args, training_args, datasets, callbacks, uneven_counts: bool, teacher=None):
    """``RecoveryTrainer`` (``SFTTrainer`` with the recipe's recovery loss) with the recipe's callbacks;
    ``expert_pruning`` prunes in ``on_init_end``.

    With LoRA the model is pruned first, because ``SFTTrainer.__init__`` wraps it in PEFT before ``on_init_end``.
    Layers left with different expert counts (``uneven_counts``) switch the router aux loss off before TRL reads
    ``router_aux_loss_coef``. ``teacher`` is :func:`load_teacher`'s.
    """
    from trl import get_peft_config

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
    add_compact_lm_head(model)
    trainer = RecoveryTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=callbacks,
        teacher_snapshot=teacher,
        teacher_name=teacher_name(model_args, training_args),
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
        # prune_mode disk: the plan first (the unpruned model measured on each device), the checkpoint pruned on
        # disk once, then only the pruned model loads
        plan = pruned_source = None
        if training_args.prune_mode == "disk":
            plan = plan_before_loading(model_args, calibration_args, pruning_args, training_args, stats, timer)
            pruned_source = prune_source_once(model_args, plan, setup.output_dir)

        # Model and data
        with timer("load_model"):
            if pruned_source is not None:
                model, tokenizer = load_pruned_source(
                    pruned_source, model_args, training_args, partitioned=zero_stage(training_args) == 3
                )
            else:
                model, tokenizer = load_model(model_args, training_args)
        router_settings = prepare_model(model, training_args)
        teacher = load_teacher(model, model_args, training_args, pruned_source)
        with timer("load_data"):
            train_examples, eval_examples = load_data(data_args, training_args, needs_eval_examples(training_args))
            datasets = sft_datasets(tokenizer, train_examples, eval_examples, training_args)

        # Routing statistics and the prune plan (prune_mode memory)
        if plan is None and PruningCallback.name in training_args.callbacks:
            plan = plan_pruning(
                model, tokenizer, model_args, calibration_args, pruning_args, training_args, stats, timer
            )

        # Trainer (expert_pruning prunes in on_init_end, before the optimizer exists, then compensates)
        compensation = named_compensation(pruning_args.compensation, tokenizer, calibration_args, pruning_args)
        context = RunContext(training_args, plan, eval_examples, pruned_source, compensation)
        callbacks = get_callbacks(training_args.callbacks, context)
        moe = find_moe(model)  # before PEFT wraps the experts
        uneven_counts = plan is not None and not router_aux_loss_applies(plan.experts_after(moe))
        with timer("build_trainer"):
            trainer = build_trainer(
                model, tokenizer, model_args, training_args, datasets, callbacks, uneven_counts, teacher
            )
        del teacher  # a live teacher now lives in the trainer; one used for precomputed logits is freed
        if training_args.freeze_router:
            check_routers_frozen(trainer.model, moe)
        pruning = outcome_of(callbacks, PruningCallback)
        evaluation = find_callback(callbacks, TranslationEvalCallback)
        trainable = trainable_summary(trainer.model)
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
        with timer("save"):
            card = sft_card_section(
                mode, model_args, data_args, training_args, train_counts, trainer.state.global_step, aux, scores
            )
            save_run_model(trainer, tokenizer, model_args, setup.output_dir, pruning, card, router_settings)
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
    write_results(results, scores, setup.output_dir, pruning_args)
    finish_wandb()
    state.wait_for_everyone()
    return results


def parse_recipe(args: list[str] | None = None):
    """``(model_args, data_args, calibration_args, pruning_args, training_args)`` from ``--config FILE`` and flags."""
    from moe_specialist.training.configs import make_parser

    return make_parser().parse(args)
