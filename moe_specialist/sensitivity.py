"""Layer sensitivity: how much the calibration loss rises when one MoE layer alone keeps only its best experts.

Routing statistics rank the experts of a layer; they do not say how much a layer can lose. On the demo generalist
the first layer's routing looks like the others' (balanced, shared by every language), yet keeping its best 16 of
32 experts drops dev chrF++ from 38 to 14, while layers 1-3 each lose under 2 points keeping 8. The ``sensitivity``
allocation measures this directly: for each layer and a grid of counts, the mean loss on the calibration targets
with only that layer pruned (by the criterion's ranking), then spends the budget where it costs least.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from moe_specialist.architectures import COUNT_ATTRIBUTES, MoELayer, MoEModel
from moe_specialist.calibrate import calibration_batches, calibration_data, encode_calibration_data
from moe_specialist.configs import CalibrationArguments
from moe_specialist.errors import ConfigurationError
from moe_specialist.plan import Budget, LayerCosts, select_experts
from moe_specialist.prune import layer_modules, slice_layer
from moe_specialist.stats import IGNORE, ROLES

logger = logging.getLogger(__name__)

GRID_STEPS = 8  # counts measured per layer: multiples of num_experts / GRID_STEPS, plus the minimum


@contextmanager
def keeping_only(layer: MoELayer, ids: list[int]):
    """Prune one layer to ``ids`` for the duration of the block, then put back the very same tensors and counts."""
    tensors = [(t.module, t.name, t.tensor) for t in layer.tensors]
    counts = [(m, a, getattr(m, a)) for m in layer_modules(layer) for a in COUNT_ATTRIBUTES if hasattr(m, a)]
    num_experts = layer.num_experts
    slice_layer(layer, ids)
    try:
        yield
    finally:
        for module, name, tensor in tensors:
            (module._parameters if name in module._parameters else module._buffers)[name] = tensor
        for module, attribute, value in counts:
            if getattr(module, attribute) != value:
                setattr(module, attribute, value)
        layer.num_experts = num_experts


@torch.no_grad()
def target_loss(model, batches: list[tuple[torch.Tensor, ...]]) -> float:
    """Mean next-token loss on the target-role tokens (translations, general text) of calibration batches."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for input_ids, attention, _, role_ids in batches:
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
        labels = torch.where(role_ids == ROLES.index("target"), input_ids, IGNORE)[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        total += float(loss)
        tokens += int((labels != IGNORE).sum())
    if tokens == 0:
        raise ConfigurationError("The calibration data has no target tokens to measure layer sensitivity on.")
    return total / tokens


def grid_counts(allowed: range) -> list[int]:
    """The counts measured for a layer that may keep ``allowed`` (:meth:`Budget.counts`, whose last is all its
    experts): the fewest, and the allowed counts nearest to the multiples of ``num_experts / GRID_STEPS``."""
    num_experts, step = allowed[-1], allowed.step
    counts = {allowed.start} | {step * round(num_experts * i / GRID_STEPS / step) for i in range(1, GRID_STEPS)}
    return sorted(c for c in counts if c in allowed and c < num_experts)


def layer_costs(
    model, moe: MoEModel, batches: list, scores: torch.Tensor, budget: Budget, progress: bool = True
) -> torch.Tensor:
    """``[layer, count]``: loss increase when only that layer keeps its ``count`` best experts (``scores``).

    Counts between measured ones are interpolated linearly; keeping every expert costs 0; counts below the
    minimum are infinite. Under torch.distributed (a collective: every rank must call it, with the same model and
    batches) each rank measures every ``world``-th loss with rank 0's ranking and the losses are all-reduced, so the
    work is split and every rank returns the same table as one process would.
    """
    device = next(model.parameters()).device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    if world > 1:  # one ranking, so that every rank's share cuts the experts the others' do
        scores = scores.to(device=device, memory_format=torch.contiguous_format, copy=True)
        dist.broadcast(scores, src=0)
        scores = scores.cpu()
    cuts: list[tuple[int, int] | None] = [None]  # None: the unpruned model, whose loss every cost is relative to
    cuts += [(p, count) for p in range(len(moe.layers)) for count in grid_counts(budget.counts(p))]
    losses = torch.zeros(len(cuts), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for job in tqdm(range(rank, len(cuts), world), desc="layer sensitivity", disable=not progress):
        with _cut(moe, scores, budget, cuts[job]):
            losses[job] = target_loss(model, batches)
    model.train(was_training)
    if world > 1:
        dist.all_reduce(losses)  # each loss is set on the one rank that measured it, 0 elsewhere: the sum is exact
    base, *cut_losses = losses.tolist()
    measured: dict[int, dict[int, float]] = {p: {n: 0.0} for p, n in enumerate(budget.num_experts)}
    for (position, count), loss in zip(cuts[1:], cut_losses, strict=True):
        measured[position][count] = loss - base
    costs = torch.full((len(moe.layers), max(budget.num_experts) + 1), math.inf, dtype=torch.float64)
    for position, points in measured.items():
        xs = sorted(points)
        between = np.arange(xs[0], xs[-1] + 1)
        costs[position, xs[0] : xs[-1] + 1] = torch.from_numpy(np.interp(between, xs, [points[x] for x in xs]))
    logger.info(
        "Layer sensitivity (loss increase, base %.4f): %s",
        base,
        {moe.layers[p].layer_index: {c: round(v, 4) for c, v in sorted(pts.items())} for p, pts in measured.items()},
    )
    return costs


def _cut(moe: MoEModel, scores: torch.Tensor, budget: Budget, cut: tuple[int, int] | None):
    """The model as ``cut`` (layer position, count) leaves it: that layer alone keeps its best experts; None: as is."""
    if cut is None:
        return nullcontext()
    position, count = cut
    ids = select_experts(scores[position, : budget.num_experts[position]], count, budget)
    return keeping_only(moe.layers[position], ids)


def layer_cost_meter(
    model, moe: MoEModel, tokenizer, calibration: CalibrationArguments, examples: int, progress: bool = True
) -> LayerCosts:
    """What ``make_plan`` calls for the ``sensitivity`` allocation: layer costs on ``examples`` calibration sequences.

    The data is read on first use only, and the costs are kept per ranking, so a sweep measures each criterion once
    for all its ratios. Under torch.distributed every rank must ask for the same rankings in the same order, since
    each measurement is shared out over the ranks (:func:`layer_costs`).
    """
    batches: list = []
    measured: dict[tuple, torch.Tensor] = {}

    def measure(scores: torch.Tensor, budget: Budget) -> torch.Tensor:
        key = (scores.numpy().tobytes(), budget.min_keep, budget.n_group, budget.min_per_group)
        if key not in measured:
            if not batches:
                batches.extend(calibration_sample(tokenizer, calibration, examples))
            measured[key] = layer_costs(model, moe, batches, scores, budget, progress)
        return measured[key]

    return measure


def calibration_sample(tokenizer, calibration: CalibrationArguments, examples: int) -> list:
    """Batches of ``examples`` calibration sequences, spread over every direction and group."""
    pairs, general = calibration_data(calibration)
    sequences = encode_calibration_data(tokenizer, pairs, general, calibration.calibration_max_length)
    sequences = sequences[:: max(1, len(sequences) // examples)][:examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return list(calibration_batches(sequences, calibration.calibration_batch_size, pad_id))
