"""Layer sensitivity: how much the calibration loss rises when one MoE layer alone keeps only its best experts.

Routing statistics rank the experts of a layer; they do not say how much a layer can lose. On the demo generalist
the first layer's routing looks like the others' (balanced, shared by every language), yet keeping its best 16 of
32 experts drops dev chrF++ from 38 to 14, while layers 1-3 each lose under 2 points keeping 8. The ``sensitivity``
allocation measures this directly: for each layer and a grid of counts, the mean loss on the calibration targets
with only that layer pruned to the experts it would keep at that count (the criterion's best, or the greedy set of
:mod:`moe_specialist.selection`), then spends the budget where it costs least.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from moe_specialist.allocation_search import TargetKL, search_allocation
from moe_specialist.architectures import MoEModel
from moe_specialist.calibrate import calibration_batches, calibration_data, encode_calibration_data
from moe_specialist.configs import CalibrationArguments, check_held_out_room
from moe_specialist.errors import ConfigurationError
from moe_specialist.plan import Budget, KeptSets, SearchSettings
from moe_specialist.prune import keeping_only
from moe_specialist.selection import from_rank_zero, greedy_sets, rank_and_world
from moe_specialist.stats import IGNORE, ROLES

logger = logging.getLogger(__name__)

GRID_STEPS = 8  # counts measured per layer: multiples of num_experts / GRID_STEPS, plus the minimum


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
    model, moe: MoEModel, batches: list, kept: KeptSets, budget: Budget, progress: bool = True
) -> torch.Tensor:
    """``[layer, count]``: loss increase when only that layer keeps its ``count`` experts of ``kept``.

    Counts between measured ones are interpolated linearly; keeping every expert costs 0; counts below the
    minimum are infinite. Under torch.distributed (a collective: every rank must call it, with the same model and
    batches) each rank measures every ``world``-th loss with rank 0's kept sets and the losses are all-reduced, so the
    work is split and every rank returns the same table as one process would.
    """
    device = next(model.parameters()).device
    rank, world = rank_and_world()
    kept = from_rank_zero(kept, device)  # one set per count, so that every rank's share cuts what the others' do
    cuts: list[tuple[int, int] | None] = [None]  # None: the unpruned model, whose loss every cost is relative to
    cuts += [(p, count) for p in range(len(moe.layers)) for count in grid_counts(budget.counts(p))]
    losses = torch.zeros(len(cuts), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for job in tqdm(range(rank, len(cuts), world), desc="layer sensitivity", disable=not progress):
        with _cut(moe, kept, cuts[job], budget.top_k):
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


def _cut(moe: MoEModel, kept: KeptSets, cut: tuple[int, int] | None, top_k: int | None):
    """The model as ``cut`` (layer position, count) leaves it: that layer alone keeps its kept set (routing ``top_k``
    experts when lowered); None: as is."""
    if cut is None:
        return nullcontext()
    position, count = cut
    return keeping_only(moe.layers[position], kept.sets[position][count], top_k)


class ModelMeter:
    """What ``make_plan`` measures on the model, on ``examples`` calibration sequences read on first use: layer costs
    (called as :data:`~moe_specialist.plan.LayerCosts`) and greedy kept sets (:meth:`greedy_sets`); and the
    ``search`` allocation (:meth:`search_allocation`), scored on as many other calibration sequences.

    Each result is kept per ranking and kept sets, so a sweep measures each criterion once for all its ratios. Under
    torch.distributed every rank must ask for the same measurements in the same order, since each is shared out over
    the ranks (:func:`layer_costs`, :func:`~moe_specialist.selection.greedy_sets`).
    """

    def __init__(
        self, model, moe: MoEModel, tokenizer, calibration: CalibrationArguments, examples: int, progress: bool = True
    ):
        self.model, self.moe, self.tokenizer, self.progress = model, moe, tokenizer, progress
        self.calibration, self.examples = calibration, examples
        self.measured: dict[tuple, torch.Tensor | KeptSets | tuple] = {}

    @functools.cached_property
    def batches(self) -> list:
        return calibration_sample(self.tokenizer, self.calibration, self.examples)

    @functools.cached_property
    def held_out(self) -> TargetKL:
        """The search objective, with the unpruned model's distributions computed once for every plan."""
        batches = calibration_sample(self.tokenizer, self.calibration, self.examples, held_out=True)
        return TargetKL(self.model, self.moe, batches)

    def __call__(self, kept: KeptSets, budget: Budget) -> torch.Tensor:
        key = ("costs", kept.fingerprint(), budget.top_k)
        if key not in self.measured:
            self.measured[key] = layer_costs(self.model, self.moe, self.batches, kept, budget, self.progress)
        return self.measured[key]

    def greedy_sets(self, scores: torch.Tensor, budget: Budget, candidates: int | None) -> KeptSets:
        limits = (budget.min_keep, budget.n_group, budget.min_per_group, budget.top_k)
        key = ("greedy", scores.numpy().tobytes(), *limits, candidates)
        if key not in self.measured:
            self.measured[key] = greedy_sets(
                self.model, self.moe, self.batches, scores, budget, candidates, self.progress
            )
        return self.measured[key]

    def search_allocation(
        self, kept: list[list[int]], scores: torch.Tensor, budget: Budget, settings: SearchSettings
    ) -> tuple[list[list[int]], dict]:
        """:data:`~moe_specialist.plan.SearchAllocation`: ``kept`` refined by
        :func:`~moe_specialist.allocation_search.search_allocation` on the held-out sequences. The same search
        (start, scores, budget, settings) is run once per meter: a sweep's methods that differ only in their
        compensation share the plan."""
        fields = ("num_experts", "keep_total", "min_keep", "n_group", "min_per_group", "top_k")
        key = ("search", str(kept), scores.numpy().tobytes(), str([getattr(budget, f) for f in fields]), settings)
        if key not in self.measured:
            started = time.monotonic()
            objective = self.held_out
            reference_seconds = time.monotonic() - started  # 0 once a plan of the sweep computed it
            indices = [layer.layer_index for layer in self.moe.layers]
            refined, trace = search_allocation(objective, kept, scores, budget, settings, indices)
            measured_on = {"examples": objective.sequences, "target_tokens": objective.tokens}
            self.measured[key] = refined, {**trace, **measured_on, "reference_seconds": round(reference_seconds, 2)}
        refined, trace = self.measured[key]
        return [list(ids) for ids in refined], dict(trace)


def layer_cost_meter(
    model, moe: MoEModel, tokenizer, calibration: CalibrationArguments, examples: int, progress: bool = True
) -> ModelMeter:
    """The :class:`ModelMeter` a run or a sweep passes to planning (``measure_layer_costs``, and its
    ``greedy_sets`` as ``measure_kept_sets``)."""
    return ModelMeter(model, moe, tokenizer, calibration, examples, progress)


def calibration_sample(tokenizer, calibration: CalibrationArguments, examples: int, held_out: bool = False) -> list:
    """Batches of ``examples`` calibration sequences, spread over every direction and group; ``held_out``: as many
    (or all there are) spread over the sequences the first sample leaves out, so that a search is scored on other
    tokens than the layer costs it starts from."""
    pairs, general = calibration_data(calibration)
    sequences = encode_calibration_data(tokenizer, pairs, general, calibration.calibration_max_length)
    chosen = list(range(len(sequences)))[:: max(1, len(sequences) // examples)][:examples]
    if held_out:
        check_held_out_room(len(sequences), examples)
        left = sorted(set(range(len(sequences))) - set(chosen))
        chosen = left[:: max(1, len(left) // examples)][:examples]
    sequences = [sequences[i] for i in chosen]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return list(calibration_batches(sequences, calibration.calibration_batch_size, pad_id))
