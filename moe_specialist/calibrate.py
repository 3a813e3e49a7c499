"""Calibration: run the model on translation data and collect :class:`RoutingStats` per direction and role.

Each example is the prompt (role ``source``) followed by its reference translation (role ``target``), teacher-forced;
``general`` text (monolingual, no prompt) counts as ``target``. Under ``accelerate launch`` every process takes its
shard of the examples and the sums are all-reduced, so the result equals a single-process pass.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from moe_specialist.architectures import find_moe
from moe_specialist.configs import CalibrationArguments, split_list
from moe_specialist.data.example import ParallelExample
from moe_specialist.data.languages import get_language
from moe_specialist.data.prompts import encode_prompt_completion
from moe_specialist.data.sources import general_texts
from moe_specialist.errors import ConfigurationError
from moe_specialist.stats import IGNORE, METRICS, ROLES, RoutingCollector, RoutingStats, StatisticsMismatchError

logger = logging.getLogger(__name__)


def encode_calibration_data(
    tokenizer,
    examples: dict[str, list[ParallelExample]],
    general: dict[str, list[str]] | None = None,
    max_length: int = 512,
) -> list[tuple[int, list[int], list[int]]]:
    """``(group index, token ids, role ids)`` per sequence; groups are the keys of ``examples`` then ``general``."""
    sequences = []
    groups = list(examples) + list(general or {})
    for name, items in examples.items():
        for example in items:
            prompt, completion = encode_prompt_completion(tokenizer, example)
            ids = (prompt + completion)[:max_length]
            roles = ([ROLES.index("source")] * len(prompt) + [ROLES.index("target")] * len(completion))[:max_length]
            sequences.append((groups.index(name), ids, roles))
    for name, texts in (general or {}).items():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_length]
            sequences.append((groups.index(name), ids, [ROLES.index("target")] * len(ids)))
    return sequences


def calibration_batches(sequences, batch_size: int, pad_id: int):
    """Right-padded batches of similar lengths; padding is labelled IGNORE."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][1]))
    for start in range(0, len(order), batch_size):
        chunk = [sequences[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for _, ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        group_ids = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        role_ids = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for row, (group, ids, roles) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            group_ids[row, : len(ids)] = group
            role_ids[row, : len(ids)] = torch.tensor(roles)
        yield input_ids, attention, group_ids, role_ids


@torch.no_grad()
def calibrate(
    model,
    tokenizer,
    examples: dict[str, list[ParallelExample]],
    general: dict[str, list[str]] | None = None,
    *,
    batch_size: int = 16,
    max_length: int = 512,
    metadata: dict | None = None,
    progress: bool = True,
) -> RoutingStats:
    """Routing statistics of ``model`` on ``examples`` (by direction) and ``general`` texts (by group name)."""
    moe = find_moe(model)
    groups = list(examples) + list(general or {})
    if not groups:
        raise ConfigurationError("No calibration data: give at least one direction or general-text group.")
    sequences = encode_calibration_data(tokenizer, examples, general, max_length)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    shard = sequences[rank::world]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    data = {
        "examples": {g: len(v) for g, v in examples.items()},
        "general_texts": {g: len(v) for g, v in (general or {}).items()},
        **(metadata or {}).get("data", {}),
    }
    with RoutingCollector(moe, groups, {**(metadata or {}), "data": data}) as collector:
        batches = list(calibration_batches(shard, batch_size, pad_id))
        for input_ids, attention, group_ids, role_ids in tqdm(batches, desc="calibrate", disable=not progress):
            collector.label(group_ids.to(device), role_ids.to(device))
            model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False)
    model.train(was_training)
    stats = collector.stats
    if world > 1:
        for name in (*METRICS, "tokens"):
            tensor = getattr(stats, name).to(device)
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            setattr(stats, name, tensor.cpu())
    return stats


def calibration_data(args: CalibrationArguments) -> tuple[dict[str, list[ParallelExample]], dict[str, list[str]]]:
    """Examples per direction and monolingual texts per language, as the arguments ask."""
    examples = args.calibration_selection.load()
    general = {
        get_language(lang).short: general_texts(
            lang, args.calibration_split, args.calibration_examples, args.calibration_seed
        )
        for lang in args.calibration_general_languages or []
    }
    return examples, general


CALIBRATION_KEYS = (
    "calibration_dataset",
    "calibration_directions",
    "calibration_split",
    "calibration_target_files",
    "calibration_examples",
    "calibration_general_languages",
    "calibration_max_length",
    "calibration_seed",
)


def calibration_settings(args: CalibrationArguments) -> dict:
    """What decides the statistics' content (batch size and file name do not)."""
    return {key: getattr(args, key) for key in CALIBRATION_KEYS}


def _file_exists_on_rank0(path: str | None) -> bool:
    """Every rank must take the same branch (reuse or all-reduce), so rank 0 decides."""
    exists = [bool(path) and Path(path).is_file()]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(exists, src=0)
    return exists[0]


def _comparable(value):
    """Files written before list-valued knobs were lists recorded them as comma-separated strings."""
    return split_list(value) if isinstance(value, (str, list)) else value


def load_matching_statistics(path: str, model, args: CalibrationArguments) -> RoutingStats:
    """A statistics file, refused unless it fits the model and was calibrated with these settings."""
    stats = RoutingStats.load(path)
    stats.validate_for(find_moe(model))
    recorded = stats.metadata.get("calibration")
    if recorded is not None:
        differing = [
            f"{k}={recorded.get(k)!r}"
            for k, v in calibration_settings(args).items()
            if _comparable(recorded.get(k)) != _comparable(v)
        ]
        if differing:
            raise StatisticsMismatchError(
                f"{path} was calibrated with other settings ({', '.join(differing)}); delete it or point "
                "statistics_file elsewhere to calibrate with the current ones."
            )
    return stats


def statistics_for(
    model,
    tokenizer,
    args: CalibrationArguments,
    model_name: str,
    *,
    statistics_file: str | None,
    progress: bool = True,
    reuse: bool = True,
) -> RoutingStats:
    """Reuse ``statistics_file`` (``PruningArguments.statistics_file``) when it exists and fits (``reuse``), else
    calibrate and save it there (None: calibrate without saving)."""
    if reuse and _file_exists_on_rank0(statistics_file):
        stats = load_matching_statistics(statistics_file, model, args)
        logger.info("Reusing routing statistics from %s", statistics_file)
        return stats
    examples, general = calibration_data(args)
    stats = calibrate(
        model,
        tokenizer,
        examples,
        general,
        batch_size=args.calibration_batch_size,
        max_length=args.calibration_max_length,
        metadata={"model": model_name, "calibration": calibration_settings(args)},
        progress=progress,
    )
    if statistics_file and (not dist.is_initialized() or dist.get_rank() == 0):
        stats.save(statistics_file)
    return stats
