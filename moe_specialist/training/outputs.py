"""What a run leaves: the saved model with its card, ``results.json``, and the W&B summary."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import DistributedType

from moe_specialist import __version__
from moe_specialist.architectures import text_config
from moe_specialist.configs import PruningArguments
from moe_specialist.io import atomic_write_json
from moe_specialist.model_card import pruned_model_card
from moe_specialist.plan import PLAN_FILE
from moe_specialist.prune import save_pruned_model
from moe_specialist.training.callbacks import EvaluationOutcome, PruningOutcome
from moe_specialist.training.setup import MODEL_DIR, RESULTS_FILE, TRANSLATIONS_FILE, RunSetup, zero_stage
from moe_specialist.training.wandb_logging import score_summary, update_wandb_summary

logger = logging.getLogger(__name__)


def trainable_summary(model) -> dict:
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
        if entry is not None:
            summary |= score_summary(prefix, entry["directions"], entry["average"])
    return summary


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
        "zero_stage": zero_stage(training_args),
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
            "recovery": training_args.recovery,
            "progressive_ratios": training_args.progressive_ratios,
            "prune_mode": training_args.prune_mode,
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
            "compensation": pruning.compensation,
            "statistics_file": setup.pruning_args.statistics_file,
            "routing": {"kind": pruning.routing.kind, "exact": pruning.routing.exact},
        }
    return results


def save_run_model(
    trainer, tokenizer, model_args, output_dir: Path, pruning: PruningOutcome | None, sft_section: str, router_settings
) -> None:
    """``output_dir/model``: the model in its pruned architecture with ``prune_plan.json`` and its card."""
    extra_files = {"README.md": model_card(model_args, pruning, sft_section)}
    if pruning is not None:
        extra_files[PLAN_FILE] = json.dumps(pruning.plan.to_dict(), indent=2) + "\n"
        if "output_router_logits" in router_settings:  # the aux loss needs one expert count per model
            uniform = router_settings["output_router_logits"] and pruning.report.uniform
            router_settings = {**router_settings, "output_router_logits": uniform}
    save_final_model(trainer, tokenizer, output_dir / MODEL_DIR, extra_files, router_settings)


def write_results(results: dict, scores: EvaluationOutcome | None, output_dir: Path, pruning_args) -> None:
    """``results.json`` and ``translations.json`` (atomic) and the W&B summary, on rank 0."""
    if not PartialState().is_main_process:
        return
    atomic_write_json(results, output_dir / RESULTS_FILE)
    if scores is not None and scores.records:
        atomic_write_json(scores.records, output_dir / TRANSLATIONS_FILE)
    update_wandb_summary(wandb_summary(results, pruning_args))
