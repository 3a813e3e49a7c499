"""``prune_mode: disk``: plan with the unpruned model, prune its checkpoint on disk once, load only the pruned model.

``prune_mode: memory`` loads the whole unpruned model into every rank's host memory before pruning it in the
Trainer's ``on_init_end`` (about 8 x 56 GiB of host RAM for Qwen3-30B-A3B on an 8-GPU node). Here instead:

1. :func:`measuring_model`: each rank loads the unpruned model straight onto its own device (``device_map``, never
   whole in host memory) to calibrate its shard of the data and measure layer costs; the pipeline plans with it and
   frees it (none of this when the plan is given);
2. :func:`prune_source_once`: rank 0 rewrites the checkpoint with the plan into ``output_dir/pruned_source``
   (tensor by tensor, :func:`moe_specialist.prune.prune_checkpoint`; the ranks share a filesystem) while the others
   wait; MXFP4 experts (GPT-OSS) are dequantized there, once, on every core, instead of by every rank as it loads; a
   rerun or a resumed run reuses a pruned source that holds the same plan;
3. :func:`load_pruned_source`: every rank loads the pruned checkpoint; under ZeRO-3 ``zero.Init`` partitions it as
   it loads, so that no rank ever holds the whole model; otherwise straight onto the rank's device.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoConfig

from moe_specialist.architectures import Routing
from moe_specialist.compat import zero3_init_disabled
from moe_specialist.model_card import summarize_moe
from moe_specialist.models import download_checkpoint, load_from_arguments, resolve_dtype, resolve_model_path
from moe_specialist.plan import PLAN_FILE, PrunePlan
from moe_specialist.prune import PruneReport, prune_checkpoint, structure_from_config
from moe_specialist.training.setup import PRUNED_SOURCE_DIR

logger = logging.getLogger(__name__)


@dataclass
class PrunedSource:
    """A checkpoint pruned on disk with the run's plan: where it is, and what pruning did (for cards and results)."""

    path: Path
    report: PruneReport
    summary_before: dict
    summary_after: dict
    routing: Routing
    seconds: float


def measuring_model(model_args, training_args):
    """The unpruned model, loaded straight onto this rank's device, and its tokenizer: for calibration and planning
    only (whole on every rank even under ZeRO-3, see :func:`~moe_specialist.compat.zero3_init_disabled`)."""
    with zero3_init_disabled():
        return load_from_arguments(model_args, training_args.trust_remote_code, device_map=training_args.device)


def free_memory() -> None:
    """Return freed models' memory now (host and device), before the next model loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _holds_plan(path: Path, plan: PrunePlan) -> bool:
    saved = path / PLAN_FILE
    if not saved.is_file():
        return False
    previous = PrunePlan.load(saved)
    return previous.kept_experts == plan.kept_experts and previous.top_k == plan.top_k


def _local_checkpoint(model_args) -> str:
    source = resolve_model_path(model_args.model_name_or_path)
    return source if Path(source).is_dir() else download_checkpoint(source, model_args.model_revision)


def prune_source_once(model_args, plan: PrunePlan, output_dir: str | Path) -> PrunedSource:
    """Rank 0 prunes the checkpoint on disk into ``output_dir/pruned_source`` (kept when it holds this plan already);
    every rank returns where it is and the pruning report, read from the two configs (no weights loaded)."""
    state = PartialState()
    target = Path(output_dir) / PRUNED_SOURCE_DIR
    start = time.time()
    with state.main_process_first():
        source = _local_checkpoint(model_args)
    if state.is_main_process:
        if _holds_plan(target, plan):
            logger.info("Reusing %s: it was pruned with this plan.", target)
        else:
            logger.info("Pruning %s on disk into %s (once, on rank 0).", source, target)
            prune_checkpoint(
                source, plan, target, overwrite=True, source_name=model_args.model_name_or_path, dequantize=True
            )
    state.wait_for_everyone()
    before = structure_from_config(AutoConfig.from_pretrained(source))
    after = structure_from_config(AutoConfig.from_pretrained(target))
    report = PruneReport(
        before.experts_per_layer, after.experts_per_layer, before.parameter_counts(), after.parameter_counts(),
        before.top_k, after.top_k,
    )  # fmt: skip
    seconds = round(time.time() - start, 2)
    return PrunedSource(target, report, summarize_moe(before), summarize_moe(after), before.routing, seconds)


def load_pruned_source(pruned: PrunedSource, model_args, training_args, partitioned: bool):
    """The pruned model and its tokenizer, in the dtype the recipe asks of the source (``auto`` as for the source):
    ``partitioned`` (ZeRO-3) while it loads, else loaded straight onto this rank's device."""
    dtype = resolve_dtype(model_args.model_name_or_path, model_args.dtype)
    as_source = replace(model_args, dtype=dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch."))
    onto = None if partitioned else training_args.device
    return load_from_arguments(as_source, training_args.trust_remote_code, source=str(pruned.path), device_map=onto)
