"""Trainer callbacks of the prune(+SFT) pipeline, chosen by name in a recipe's ``callbacks:`` list (open-r1 style).

- ``expert_pruning`` (:class:`PruningCallback`): calibrate (or reuse statistics), plan and prune in ``on_init_end``,
  the only Trainer event before the optimizer exists and before ``accelerator.prepare`` wraps or partitions the model.
  Pruning later (``on_train_begin``) fails silently: the new expert tensors would not be in the optimizer.
- ``translation_eval`` (:class:`TranslationEvalCallback`): greedy translation of the eval directions on all ranks at
  train start (the prune-only score), after every ``evaluate()`` and at the end; chrF++ and BLEU with their sacreBLEU
  signatures through ``trainer.log`` (W&B / TensorBoard show them under ``eval/mt/...``) and a W&B table of samples.

Callbacks are built from a :class:`RunContext` by :func:`get_callbacks`; the pipeline passes them all to the Trainer
and binds the ones that need the trainer (``bind``) right after it is built.
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from transformers import TrainerCallback

from moe_specialist.architectures import MoEModel, find_moe
from moe_specialist.configs import CalibrationArguments, PruningArguments
from moe_specialist.data.example import ParallelExample
from moe_specialist.data.prompts import format_prompt
from moe_specialist.errors import ConfigurationError
from moe_specialist.evaluate import average_scores, score_direction
from moe_specialist.generation import generate_texts
from moe_specialist.io import atomic_write_json
from moe_specialist.model_card import summarize_moe
from moe_specialist.plan import PLAN_FILE, PrunePlan, plan_for
from moe_specialist.prune import PruneReport, prune_model
from moe_specialist.sensitivity import layer_cost_meter
from moe_specialist.stats import RoutingStats

logger = logging.getLogger(__name__)

RANK_RECORDS_DIR = "ranks"


@dataclass
class RunContext:
    """What the registered callbacks may need, gathered once by the pipeline."""

    model_name: str
    tokenizer: Any
    calibration_args: CalibrationArguments
    pruning_args: PruningArguments
    training_args: Any  # moe_specialist.training.configs.SFTConfig
    eval_examples: dict[str, list[ParallelExample]]
    stats: RoutingStats | None = None


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

    Under ZeRO-3 each layer's tensors are gathered in turn (a collective: every rank must call this); the bytes are
    hashed in the tensors' own dtype.
    """
    digest = hashlib.sha256()
    shapes = {}
    partitioned = False
    for layer in moe.layers:
        sharded = [t.tensor for t in layer.tensors if hasattr(t.tensor, "ds_id")]
        partitioned |= bool(sharded)
        with _gathered(sharded):
            for t in layer.tensors:
                value = t.tensor.detach().to("cpu").contiguous()
                shapes[t.path] = list(value.shape)
                digest.update(f"{t.path}:{value.dtype}".encode())
                digest.update(value.view(torch.uint8).numpy().tobytes())
    return {"shapes": shapes, "sha256": digest.hexdigest(), "zero3_partitioned": partitioned}


def _gathered(params: list):
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def _rank_record_path(output_dir: str | Path, rank: int) -> Path:
    return Path(output_dir) / RANK_RECORDS_DIR / f"rank-{rank}.json"


# ---- pruning --------------------------------------------------------------------------------------------------------
class PruningCallback(TrainerCallback):
    """Prune the model in ``on_init_end`` (or earlier through :meth:`prune`, e.g. before PEFT wrapping).

    Statistics come from ``stats`` (a sweep calibrates once), else :func:`~moe_specialist.calibrate.statistics_for`
    (reuses ``statistics_file`` or calibrates on every rank's shard of the calibration data and all-reduces); a
    ``prune_plan`` file is replayed instead when given. Rank 0's plan is broadcast so every rank prunes identically;
    rank 0 saves it to ``output_dir/prune_plan.json``. Every rank records the shapes and a checksum of its expert
    tensors after pruning and after training in ``output_dir/ranks/rank-<i>.json``.
    """

    name = "expert_pruning"

    def __init__(
        self,
        model_name: str,
        tokenizer,
        calibration_args: CalibrationArguments,
        pruning_args: PruningArguments,
        output_dir: str | Path,
        stats: RoutingStats | None = None,
    ):
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.calibration_args = calibration_args
        self.pruning_args = pruning_args
        self.output_dir = Path(output_dir)
        self.stats = stats
        self.moe: MoEModel | None = None
        self.plan: PrunePlan | None = None
        self.report: PruneReport | None = None
        self.before: dict | None = None
        self.after: dict | None = None
        self.seconds: dict[str, float] = {}
        self._record: dict = {}

    @classmethod
    def from_context(cls, context: RunContext) -> PruningCallback:
        return cls(
            context.model_name,
            context.tokenizer,
            context.calibration_args,
            context.pruning_args,
            context.training_args.output_dir,
            context.stats,
        )

    @property
    def pruned(self) -> bool:
        return self.report is not None

    def prune(
        self, model: torch.nn.Module, device: torch.device | None = None, optimizer=None, when: str = "direct call"
    ) -> PruneReport:
        """Calibrate if needed, plan, prune ``model`` in place; idempotent. A collective under torch.distributed.

        ``when`` (the Trainer event or pipeline step) is recorded with the rank's fingerprint.
        """
        if self.pruned:
            return self.report
        if optimizer is not None:
            raise RuntimeError(
                "An optimizer already exists, so pruning now would leave the new expert tensors out of it and they "
                "would silently never train. Do not pass `optimizers=` to the trainer together with expert_pruning."
            )
        from peft import PeftModel

        if isinstance(model, PeftModel):
            raise RuntimeError(
                "The model is already wrapped by PEFT: experts must be pruned before the LoRA adapters are added. "
                "Call PruningCallback.prune(model) before building the SFTTrainer (moe_specialist.training.pipeline "
                "does this when use_peft is set)."
            )
        if is_zero3_partitioned(model):
            raise RuntimeError(
                "The model's parameters are already partitioned by DeepSpeed ZeRO-3 (it was loaded under zero.Init), "
                "so whole expert tensors are not available to prune. Load the model before the DeepSpeed config is "
                "active (moe_specialist.training.pipeline.load_model does), or prune the checkpoint offline with "
                "`moe-specialist prune` and train the pruned checkpoint."
            )
        state = PartialState()
        start = time.time()
        moe = find_moe(model)
        self.before = summarize_moe(moe)
        stats = self.stats
        if stats is None and not self.pruning_args.prune_plan:
            stats = self._calibrate(model, device, state)
        meter = layer_cost_meter(
            model, moe, self.tokenizer, self.calibration_args, self.pruning_args.sensitivity_examples,
            progress=state.is_main_process,
        )  # fmt: skip
        plan = plan_for(moe, stats, self.pruning_args, meter)
        if self.calibration_args.statistics_file and not self.pruning_args.prune_plan:
            plan.metadata.setdefault("statistics", self.calibration_args.statistics_file)
        if state.num_processes > 1:  # one plan for all ranks, whatever floating-point noise the reductions had
            payload = [plan.to_dict()]
            broadcast_object_list(payload, from_process=0)
            plan = PrunePlan.from_dict(payload[0])
        self.report = prune_model(model, plan, moe)
        self.plan, self.moe = plan, moe
        self.after = summarize_moe(moe)
        self.seconds["prune"] = round(time.time() - start, 2)
        self._log_report(state)
        if state.is_main_process:
            plan.save(self.output_dir / PLAN_FILE)
        self._record = {
            "rank": state.process_index,
            "world_size": state.num_processes,
            "pruned": {"when": when, "optimizer_existed": False, "experts_per_layer": self.after["experts_per_layer"]}
            | expert_fingerprint(moe),
        }
        atomic_write_json(self._record, _rank_record_path(self.output_dir, state.process_index))
        return self.report

    def _calibrate(self, model, device, state) -> RoutingStats:
        from moe_specialist.calibrate import statistics_for

        start = time.time()
        current = next(model.parameters()).device
        if device is not None and current.type == "cpu" and torch.device(device).type != "cpu":
            logger.info("Moving the model to %s for calibration (the Trainer has not placed it yet).", device)
            model.to(device)
        stats = statistics_for(
            model, self.tokenizer, self.calibration_args, self.model_name, progress=state.is_main_process
        )
        self.seconds["calibrate"] = round(time.time() - start, 2)
        return stats

    def _log_report(self, state) -> None:
        if not state.is_main_process:
            return
        report = self.report
        before, after = report.parameters_before, report.parameters_after
        target = self.plan.metadata.get("target_ratio")
        logger.info(
            "Pruned %s: actual_ratio %.4f of routed experts removed (target_ratio %s); experts kept per MoE layer "
            "%s (top-k %d -> %d); parameters %s -> %s total, %s -> %s active per token.",
            self.model_name,
            report.ratio,
            "none: a hand-written plan" if target is None else f"{target:.4f}",
            {k: v for k, v in report.experts_after.items()},
            report.top_k_before,
            report.top_k_after,
            f"{before['total']:,}",
            f"{after['total']:,}",
            f"{before['active']:,}",
            f"{after['active']:,}",
        )

    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.prune(model, device=args.device, optimizer=optimizer, when="on_init_end")

    def on_train_end(self, args, state, control, **kwargs):
        if not self.pruned:
            return
        rank = PartialState().process_index
        self._record["trained"] = {"global_step": state.global_step} | expert_fingerprint(self.moe)
        atomic_write_json(self._record, _rank_record_path(self.output_dir, rank))


# ---- translation quality --------------------------------------------------------------------------------------------
class TranslationEvalCallback(TrainerCallback):
    """chrF++ / BLEU of greedy translations of the eval directions, computed on all ranks and logged by the trainer.

    Each rank translates its share of the examples (``split_between_processes`` with padding, so that every rank
    calls ``generate`` as often as the others) under ``unwrap_model_for_generation`` (which gathers ZeRO-3
    parameters); the (index, translation) pairs are gathered on every rank, so every rank scores the same corpus and
    logs the same values. Files and the W&B table are written on rank 0 only.
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
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self.num_samples_table = num_samples_table
        self.on_start = on_start
        self.trainer = None
        self.history: list[dict] = []  # one entry per evaluation: label, step, scores per direction, average
        self.records: dict[str, list[dict]] = {}  # per-sentence records of the latest evaluation
        self.seconds = 0.0

    @classmethod
    def from_context(cls, context: RunContext) -> TranslationEvalCallback:
        args = context.training_args
        return cls(
            context.eval_examples,
            max_new_tokens=args.mt_eval_max_new_tokens,
            batch_size=args.mt_eval_batch_size,
            no_repeat_ngram_size=args.mt_eval_no_repeat_ngram_size,
            num_samples_table=args.mt_eval_num_samples_table,
            on_start=args.mt_eval_on_start,
        )

    def bind(self, trainer) -> None:
        self.trainer = trainer

    @property
    def decoding(self) -> dict:
        return {
            "strategy": "greedy",
            "max_new_tokens": self.max_new_tokens,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }

    def evaluate(self, label: str) -> dict:
        """Translate, score and log every eval direction; a collective (every rank must call it)."""
        if self.trainer is None:
            raise RuntimeError("TranslationEvalCallback.bind(trainer) must be called before it evaluates.")
        from trl.models.utils import unwrap_model_for_generation

        trainer = self.trainer
        accelerator = trainer.accelerator
        start = time.time()
        directions = {}
        with unwrap_model_for_generation(trainer.model_wrapped, accelerator) as model:  # gathers ZeRO-3 shards
            for name, examples in self.examples.items():
                directions[name] = score_direction(self._translate(model, examples), examples)
        self.records = {name: scores.pop("records") for name, scores in directions.items()}
        step = trainer.state.global_step
        result = {"label": label, "step": step, "directions": directions, "average": average_scores(directions)}
        self.seconds += time.time() - start
        result["seconds"] = round(time.time() - start, 2)
        self.history.append(result)
        self._log(result)
        if accelerator.is_main_process:
            self._log_table(step)
            logger.info(
                "MT eval (%s, step %d): %s | avg chrF++ %.2f",
                label,
                step,
                " | ".join(f"{n} chrF++ {d['chrf++']:.2f} BLEU {d['bleu']:.2f}" for n, d in directions.items()),
                result["average"]["chrf++"],
            )
        return result

    def _translate(self, model, examples: list[ParallelExample]) -> list[str]:
        accelerator = self.trainer.accelerator
        tokenizer = self.trainer.processing_class
        with accelerator.split_between_processes(list(range(len(examples))), apply_padding=True) as shard:
            prompts = [format_prompt(tokenizer, examples[i]) for i in shard]
            hypotheses = generate_texts(
                model,
                tokenizer,
                prompts,
                batch_size=self.batch_size,
                max_new_tokens=self.max_new_tokens,
                no_repeat_ngram_size=self.no_repeat_ngram_size,
            )
            pairs = list(zip(shard, hypotheses, strict=True))
        # The padding repeats an index: keying by index (not trimming the gathered list) keeps the order right.
        by_index = dict(gather_object(pairs))
        return [by_index[i] for i in range(len(examples))]

    def _log(self, result: dict) -> None:
        logs = {}
        for name, scores in [*result["directions"].items(), ("avg", result["average"])]:
            for metric in ("chrf++", "bleu", "off_target_rate"):
                logs[f"eval_mt/{name}/{metric}"] = scores[metric]
        # SFTTrainer.log folds its pending metrics of the current mode into the entry: in eval mode there are none.
        model = self.trainer.model
        was_training = model.training
        model.eval()
        try:
            self.trainer.log(logs)
        finally:
            model.train(was_training)

    def _log_table(self, step: int) -> None:
        if self.num_samples_table == 0 or "wandb" not in (self.trainer.args.report_to or []):
            return
        import wandb
        from sacrebleu.metrics import CHRF

        if wandb.run is None:
            return
        chrf = CHRF(word_order=2)
        rows = []
        for name, records in self.records.items():
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
        last = self.history[-1] if self.history else None
        if last is not None and last["step"] == state.global_step and state.global_step > 0:
            self.history.append({**last, "label": "end"})  # already scored at this step
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
