"""Trainer callbacks of the prune(+SFT) pipeline, chosen by name in a recipe's ``callbacks:`` list (open-r1 style).

- ``expert_pruning`` (:class:`PruningCallback`): prunes the model with the run's plan in ``on_init_end``, the only
  Trainer event before the optimizer exists and before ``accelerator.prepare`` wraps or partitions the model.
  Pruning later (``on_train_begin``) fails silently: the new expert tensors would not be in the optimizer.
- ``translation_eval`` (:class:`TranslationEvalCallback`): greedy translation of the eval directions on all ranks at
  train start (the prune-only score), after every ``evaluate()`` and at the end; chrF++ and BLEU with their sacreBLEU
  signatures through ``trainer.log`` (W&B / TensorBoard show them under ``eval/mt/...``) and a W&B table of samples.

Callbacks are built from a :class:`RunContext` by :func:`get_callbacks`; the pipeline passes them all to the Trainer
and binds the ones that need the trainer (``bind``) right after it is built. What they found is read through one
property each: :attr:`PruningCallback.outcome` and :attr:`TranslationEvalCallback.outcome`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import TrainerCallback

from moe_specialist.architectures import MoEModel, Routing, find_moe, full_shape
from moe_specialist.compat import log_as_evaluation
from moe_specialist.compensation import Compensation, prune_and_compensate
from moe_specialist.data.example import ParallelExample
from moe_specialist.errors import ConfigurationError, LaunchError
from moe_specialist.evaluate import evaluate_translations
from moe_specialist.io import atomic_write_json
from moe_specialist.model_card import summarize_moe
from moe_specialist.plan import PrunePlan
from moe_specialist.prune import PruneReport
from moe_specialist.training.on_disk import PrunedSource

logger = logging.getLogger(__name__)

RANK_RECORDS_DIR = "ranks"


@dataclass
class RunContext:
    """What the registered callbacks may need, gathered once by the pipeline."""

    training_args: Any  # moe_specialist.training.configs.SFTConfig
    plan: PrunePlan | None = None
    eval_examples: dict[str, list[ParallelExample]] = field(default_factory=dict)
    pruned_source: PrunedSource | None = None  # prune_mode: disk
    compensation: Compensation | None = None  # compensation: refit


# ---- helpers --------------------------------------------------------------------------------------------------------
def is_zero3_partitioned(model: torch.nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 (``zero.Init``) already partitioned the parameters (each rank holds a shard)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def register_zero3_leaf_modules(model: torch.nn.Module, moe: MoEModel | None = None) -> list[str]:
    """Make every sparse-MoE block a ZeRO-3 leaf: its parameters are gathered as one unit.

    Without it ZeRO-3 hangs when an expert gets no token on some rank (that rank never fetches the expert's shard
    while the others wait for it; deepspeedai/DeepSpeed#4808).
    """
    from deepspeed.utils import set_z3_leaf_modules

    moe = moe or find_moe(model)
    classes = list({type(layer.block): None for layer in moe.layers})
    set_z3_leaf_modules(model, classes)
    return [cls.__name__ for cls in classes]


def expert_fingerprint(moe: MoEModel) -> dict:
    """Shapes and a SHA-256 of every per-expert tensor (experts, router rows): equal on ranks that hold one model.

    Hashing every byte cost tens of GB per call at 30B (and gathered every layer under ZeRO-3), so only the values at
    :func:`fingerprint_positions` are hashed, with each tensor's path, dtype and shape: other experts kept, another
    order or a training step still change the hash with near certainty, at a cost that does not grow with the tensors.
    Under ZeRO-3 each rank reads the sampled positions its shard holds and the values are all-reduced per tensor (a
    collective: every rank must call this); no layer is gathered.
    """
    digest = hashlib.sha256()
    shapes = {}
    partitioned = False
    for layer in moe.layers:
        for t in layer.tensors:
            tensor = t.tensor
            partitioned |= hasattr(tensor, "ds_id")
            shape = tuple(full_shape(tensor))
            positions = fingerprint_positions(torch.Size(shape).numel(), layer.num_experts)
            values = _sampled(tensor, shape, positions)
            shapes[t.path] = list(shape)
            digest.update(f"{t.path}:{tensor.dtype}:{shape}".encode())
            digest.update(values.view(torch.uint8).numpy().tobytes())
    return {"shapes": shapes, "sha256": digest.hexdigest(), "zero3_partitioned": partitioned}


def fingerprint_positions(numel: int, num_experts: int, per_expert: int = 64) -> torch.Tensor:
    """The flat positions of a per-expert tensor that :func:`expert_fingerprint` hashes, the same on every rank.

    ``per_expert`` x ``num_experts`` positions drawn with a fixed seed (every position of a smaller tensor): the slice
    of a replaced expert gets none of them with probability (1 - 1/E)^(per_expert x E) < e^-per_expert.
    """
    count = per_expert * num_experts
    if numel <= count:
        return torch.arange(numel)
    return torch.randint(numel, (count,), generator=torch.Generator().manual_seed(0)).sort().values


def _sampled(tensor: torch.Tensor, shape: tuple[int, ...], positions: torch.Tensor) -> torch.Tensor:
    """The values at the flat (row-major) ``positions`` of ``tensor``, on the CPU, also when ZeRO-3 partitioned it."""
    if not hasattr(tensor, "ds_id"):
        return tensor.detach()[torch.unravel_index(positions.to(tensor.device), shape)].cpu()
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    if tensor.ds_tensor.final_location == OffloadDeviceEnum.nvme:  # no shard in memory; the config's, so every rank's
        with deepspeed.zero.GatheredParameters([tensor]):
            return _sampled(tensor.data, shape, positions)
    # DeepSpeed's flat partition: rank r of the parameter's group holds elements [r * size, (r + 1) * size)
    shard, group = tensor.ds_tensor, tensor.ds_process_group
    start = dist.get_rank(group=group) * shard.ds_numel
    held = (positions >= start) & (positions < start + shard.ds_numel)
    values = torch.zeros(len(positions), dtype=tensor.dtype, device=get_accelerator().current_device_name())
    values[held.to(values.device)] = shard.detach()[(positions[held] - start).to(shard.device)].to(values.device)
    dist.all_reduce(values.view(torch.uint8), group=group)  # one rank holds each value, the others add 0 bytes: exact
    return values.cpu()


def _rank_record_path(output_dir: str | Path, rank: int) -> Path:
    return Path(output_dir) / RANK_RECORDS_DIR / f"rank-{rank}.json"


# ---- pruning --------------------------------------------------------------------------------------------------------
@dataclass
class PruningOutcome:
    """What pruning did: the plan, its report, and the MoE structure before and after (for cards and results)."""

    plan: PrunePlan
    report: PruneReport
    summary_before: dict
    summary_after: dict
    routing: Routing
    seconds: float
    compensation: dict | None = None  # the compensation's trace (compensation: refit)


class PruningCallback(TrainerCallback):
    """Prune the model with ``plan`` in ``on_init_end`` (or earlier through :meth:`prune`, e.g. before PEFT wrapping).

    Every rank prunes its whole copy identically (the pipeline makes one plan for all ranks). With ``prune_mode:
    disk`` the model was loaded already pruned from ``pruned_source`` (:mod:`moe_specialist.training.on_disk`): the
    callback then only reports what that pruning did. Every rank records the shapes and a checksum of its expert
    tensors after pruning and after training in ``output_dir/ranks/rank-<i>.json``.
    """

    name = "expert_pruning"

    def __init__(
        self,
        plan: PrunePlan,
        output_dir: str | Path,
        pruned_source: PrunedSource | None = None,
        compensation: Compensation | None = None,
    ):
        self.plan = plan
        self.output_dir = Path(output_dir)
        self.pruned_source = pruned_source
        self.compensation = compensation
        self.moe: MoEModel | None = None
        self.outcome: PruningOutcome | None = None
        self._record: dict = {}

    @classmethod
    def from_context(cls, context: RunContext) -> PruningCallback:
        if context.plan is None:
            raise ConfigurationError(
                "expert_pruning needs a prune plan (moe_specialist.training.pipeline makes one from the recipe)."
            )
        return cls(context.plan, context.training_args.output_dir, context.pruned_source, context.compensation)

    def prune(self, model: torch.nn.Module, optimizer=None, when: str = "direct call") -> PruneReport:
        """Prune ``model`` in place with the plan (or adopt the pruned source it was loaded from); idempotent.
        ``when`` (the Trainer event or pipeline step) is recorded with the rank's fingerprint."""
        if self.outcome is not None:
            return self.outcome.report
        self.moe = moe = find_moe(model)
        if self.pruned_source is not None:
            source = self.pruned_source
            self.outcome = PruningOutcome(
                self.plan, source.report, source.summary_before, source.summary_after, source.routing, source.seconds
            )
        else:
            self.outcome = self._prune_in_memory(model, moe, optimizer)
        state = PartialState()
        report = self.outcome.report
        if state.is_main_process:
            logger.info(
                "Pruned%s: actual_ratio %.4f of routed experts removed (target_ratio %s); experts kept per MoE layer "
                "%s (top-k %d -> %d); parameters %s -> %s total, %s -> %s active per token.",
                f" on disk ({self.pruned_source.path})" if self.pruned_source is not None else "",
                report.actual_ratio,
                self.plan.metadata.get("target_ratio"),
                dict(report.experts_after),
                report.top_k_before,
                report.top_k_after,
                f"{report.parameters_before['total']:,}",
                f"{report.parameters_after['total']:,}",
                f"{report.parameters_before['active']:,}",
                f"{report.parameters_after['active']:,}",
            )
        self._record = {
            "rank": state.process_index,
            "world_size": state.num_processes,
            "pruned": {"when": when, "experts_per_layer": self.outcome.summary_after["experts_per_layer"]}
            | expert_fingerprint(moe),
        }
        atomic_write_json(self._record, _rank_record_path(self.output_dir, state.process_index))
        return report

    def _prune_in_memory(self, model: torch.nn.Module, moe: MoEModel, optimizer) -> PruningOutcome:
        if optimizer is not None:
            raise LaunchError(
                "An optimizer already exists, so pruning now would leave the new expert tensors out of it and they "
                "would silently never train. Do not pass `optimizers=` to the trainer together with expert_pruning."
            )
        from peft import PeftModel

        if isinstance(model, PeftModel):
            raise LaunchError(
                "The model is already wrapped by PEFT: experts must be pruned before the LoRA adapters are added. "
                "Call PruningCallback.prune(model) before building the SFTTrainer (moe_specialist.training.pipeline "
                "does this when use_peft is set)."
            )
        if is_zero3_partitioned(model):
            raise LaunchError(
                "The model's parameters are already partitioned by DeepSpeed ZeRO-3 (it was loaded under zero.Init), "
                "so whole expert tensors are not available to prune. Load the model before the DeepSpeed config is "
                "active (moe_specialist.training.pipeline.load_model does), or use prune_mode: disk."
            )
        start = time.time()
        before = summarize_moe(moe)
        report, compensated = prune_and_compensate(model, self.plan, moe, self.compensation)
        seconds = round(time.time() - start, 2)
        return PruningOutcome(self.plan, report, before, summarize_moe(moe), moe.routing, seconds, compensated)

    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.prune(model, optimizer=optimizer, when="on_init_end")

    def on_train_end(self, args, state, control, **kwargs):
        if self.outcome is None:
            return
        rank = PartialState().process_index
        self._record["trained"] = {"global_step": state.global_step} | expert_fingerprint(self.moe)
        atomic_write_json(self._record, _rank_record_path(self.output_dir, rank))


# ---- translation quality --------------------------------------------------------------------------------------------
@dataclass
class EvaluationOutcome:
    """Every translation evaluation of a run: ``history`` (label, step, scores per direction, average), the scores
    after pruning (``start``) and at the end (``end``), the latest per-sentence ``records`` and the decoding used."""

    history: list[dict]
    records: dict[str, list[dict]]
    decoding: dict
    seconds: float

    @property
    def start(self) -> dict | None:
        """The prune-only score: the first one before any step (or, with no step at all, the only one)."""
        first = next((h for h in self.history if h["label"] == "start"), None)
        if first is None and self.history and self.history[-1]["step"] == 0:
            return self.history[-1]
        return first

    @property
    def end(self) -> dict | None:
        return self.history[-1] if self.history else None


class TranslationEvalCallback(TrainerCallback):
    """chrF++ / BLEU of greedy translations of the eval directions, computed on all ranks and logged by the trainer.

    Scoring is :func:`moe_specialist.evaluate.evaluate_translations` (each rank translates its share), so every
    rank logs the same values. Under ZeRO-3 the model is never gathered whole: each forward gathers one module (a
    sparse-MoE block is one leaf) and releases it, the ranks stepping together (``synced_gpus``). Gathering the whole
    model for generation, on top of the optimizer state, is what ran an unpruned 30B model out of GPU memory at the
    step-0 score. The W&B table of samples is written on rank 0 only.
    """

    name = "translation_eval"

    def __init__(
        self,
        examples: dict[str, list[ParallelExample]],
        *,
        max_new_tokens: int = 256,
        batch_size: int = 32,
        no_repeat_ngram_size: int = 0,
        num_samples_table: int = 8,
        on_start: bool = True,
    ):
        if not examples or not all(examples.values()):
            raise ConfigurationError("translation_eval needs at least one example in every eval direction.")
        self.examples = examples
        self.decoding_kwargs = {
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "no_repeat_ngram_size": no_repeat_ngram_size,
        }
        self.num_samples_table = num_samples_table
        self.on_start = on_start
        self.trainer = None
        self.outcome = EvaluationOutcome([], {}, {}, 0.0)

    @classmethod
    def from_context(cls, context: RunContext) -> TranslationEvalCallback:
        args = context.training_args
        return cls(
            context.eval_examples,
            **args.decoding_kwargs,
            num_samples_table=args.mt_eval_num_samples_table,
            on_start=args.mt_eval_on_start,
        )

    def bind(self, trainer) -> None:
        self.trainer = trainer

    def evaluate(self, label: str) -> dict:
        """Translate, score and log every eval direction; a collective (every rank must call it)."""
        if self.trainer is None:
            raise RuntimeError("TranslationEvalCallback.bind(trainer) must be called before it evaluates.")
        from trl.models.utils import unwrap_model_for_generation

        trainer = self.trainer
        partitioned = is_zero3_partitioned(trainer.model)
        with unwrap_model_for_generation(
            trainer.model_wrapped, trainer.accelerator, gather_deepspeed3_params=False
        ) as model:
            scored = evaluate_translations(
                model, trainer.processing_class, self.examples, **self.decoding_kwargs, progress=False,
                synced_gpus=partitioned,
            )  # fmt: skip
        outcome = self.outcome
        outcome.records = {name: scores.pop("records") for name, scores in scored["directions"].items()}
        outcome.decoding = scored["decoding"]
        outcome.seconds = round(outcome.seconds + scored["seconds"], 2)
        step = trainer.state.global_step
        result = {"label": label, "step": step, "directions": scored["directions"], "average": scored["average"]}
        outcome.history.append({**result, "seconds": scored["seconds"]})
        logs = {
            f"eval_mt/{name}/{metric}": scores[metric]
            for name, scores in [*result["directions"].items(), ("avg", result["average"])]
            for metric in ("chrf++", "bleu", "off_target_rate")
        }
        log_as_evaluation(trainer, logs)
        if trainer.accelerator.is_main_process:
            self._log_table(step)
            logger.info(
                "MT eval (%s, step %d): %s | avg chrF++ %.2f",
                label,
                step,
                " | ".join(
                    f"{n} chrF++ {d['chrf++']:.2f} BLEU {d['bleu']:.2f}" for n, d in result["directions"].items()
                ),
                result["average"]["chrf++"],
            )
        return result

    def _log_table(self, step: int) -> None:
        if self.num_samples_table == 0 or "wandb" not in (self.trainer.args.report_to or []):
            return
        import wandb
        from sacrebleu.metrics import CHRF

        if wandb.run is None:
            return
        chrf = CHRF(word_order=2)
        rows = []
        for name, records in self.outcome.records.items():
            for record in records[: self.num_samples_table]:
                sentence = chrf.sentence_score(record["hypothesis"], record["references"]).score
                hypothesis = record["hypothesis"]
                rows.append([step, name, record["source"], record["references"][0], hypothesis, round(sentence, 2)])
        table = wandb.Table(columns=["step", "direction", "source", "reference", "hypothesis", "chrf"], data=rows)
        wandb.log({"mt_samples": table, "train/global_step": step})

    def on_train_begin(self, args, state, control, **kwargs):
        if self.on_start:  # a resumed run scores its checkpoint, which is not the prune-only model
            self.evaluate("start" if state.global_step == 0 else "resume")

    def on_evaluate(self, args, state, control, **kwargs):
        self.evaluate("eval")

    def on_train_end(self, args, state, control, **kwargs):
        last = self.outcome.end
        if last is not None and last["step"] == state.global_step and state.global_step > 0:
            self.outcome.history.append({**last, "label": "end"})  # already scored at this step
            return
        self.evaluate("end")


# ---- registry -------------------------------------------------------------------------------------------------------
CALLBACKS: dict[str, type] = {
    PruningCallback.name: PruningCallback,
    TranslationEvalCallback.name: TranslationEvalCallback,
}


def check_callback_names(names: list[str]) -> None:
    unknown = [name for name in names if name not in CALLBACKS]
    if unknown:
        raise ConfigurationError(
            f"Unknown callback(s) {', '.join(map(repr, unknown))} in `callbacks`; known callbacks: "
            f"{', '.join(sorted(CALLBACKS))}."
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigurationError(f"Callback(s) {', '.join(repeated)} listed more than once in `callbacks`.")


def get_callbacks(names: list[str], context: RunContext) -> list[TrainerCallback]:
    """Instantiate the callbacks ``names`` (registry keys) in order; a clear error names unknown ones."""
    check_callback_names(names)
    return [CALLBACKS[name].from_context(context) for name in names]


def find_callback(callbacks: list[TrainerCallback], kind: type):
    return next((callback for callback in callbacks if isinstance(callback, kind)), None)
