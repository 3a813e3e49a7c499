"""Kept sets chosen as sets: greedy elimination on each MoE block's reconstruction error (the NAEE objective).

A per-expert criterion scores experts one at a time: two experts that do the same job both score high and are both
kept, while the set may lose what only a lower-scored expert did (the other language of a direction, say). The
``greedy`` selection measures sets instead. It captures the input of every MoE block on calibration tokens once,
then, block by block, removes one expert at a time (one per routing group under group-limited routing, so that every
group keeps the same count): the one whose removal changes the block's output least, as mean squared error against
the unpruned block. The block runs pruned in place (:func:`~moe_specialist.prune.keeping_only`), so it routes as the
pruned model will: removed router rows and selection biases gone, top-k and renormalisation as the architecture does.
The criterion's ranking breaks ties and, with ``candidates``, limits the experts tried at each step.

Each count a layer may keep gets the set left on this path, or the criterion's own set where that reconstructs the
block better (one step at a time, elimination can miss it), so a greedy set is never worse than the ranked one.

A better block reconstruction is not a lower loss. On the demo generalist (gate_mass scores, 16 calibration
sequences, 8 candidates per step) greedy sets cut the block error by 66-98% against the ranked ones, yet raised the
held-out target loss at 50%, 62.5% and 75% pruned (at 75%: 3.36 -> 4.41 with the sensitivity allocation): a few
tokens with massive activations (a fixed prompt position in layer 2, 2,000x the median squared norm) dominate the
mean squared error, and greedy spends the budget on them. Measure before choosing it.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from moe_specialist.architectures import MoELayer, MoEModel
from moe_specialist.plan import Budget, KeptSets, select_experts
from moe_specialist.prune import keeping_only

logger = logging.getLogger(__name__)

CHUNK_TOKENS = 4096  # tokens per block call: bounds the memory of the routed experts' activations


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def from_rank_zero(value, device: torch.device):
    """Rank 0's ``value`` on every rank (itself outside torch.distributed): ranks measure what rank 0 chose, whatever
    floating-point noise their own copies of the statistics had."""
    if rank_and_world()[1] == 1:
        return value
    payload = [value]
    dist.broadcast_object_list(payload, src=0, device=device)
    return payload[0]


@torch.no_grad()
def block_inputs(model, moe: MoEModel, batches: list, positions: list[int]) -> dict[int, torch.Tensor]:
    """The input of the MoE blocks at ``positions`` on every real (not padding) token of ``batches``: one forward
    pass with hooks; ``[tokens, hidden]`` per block, on the CPU."""
    device = next(model.parameters()).device
    captured: dict[int, list[torch.Tensor]] = {position: [] for position in positions}
    real = torch.empty(0, dtype=torch.bool)

    def capture(position: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[position].append(hidden[real].cpu())

        return hook

    hooks = [moe.layers[p].block.register_forward_pre_hook(capture(p), with_kwargs=True) for p in positions]
    try:
        for input_ids, attention, *_ in batches:
            real = attention.bool().to(device)
            model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {position: torch.cat(chunks) for position, chunks in captured.items()}


@torch.no_grad()
def block_outputs(layer: MoELayer, inputs: torch.Tensor):
    """The block's output on ``inputs`` (``[tokens, hidden]``), chunk by chunk, in float32; blocks that also return
    router outputs (GPT-OSS, Llama 4) give their first output, the hidden states."""
    for chunk in inputs.split(CHUNK_TOKENS):
        output = layer.block(chunk.unsqueeze(0))
        yield (output[0] if isinstance(output, tuple) else output).squeeze(0).float()


@torch.no_grad()
def reconstruction_error(
    layer: MoELayer, inputs: torch.Tensor, reference: torch.Tensor, ids: list[int], top_k: int | None = None
) -> float:
    """Mean squared error of the block keeping only ``ids`` (routing ``top_k`` experts when lowered) against
    ``reference``, the unpruned block's output."""
    if len(ids) == layer.num_experts and top_k is None:
        return 0.0
    total = 0.0
    with keeping_only(layer, ids, top_k):
        for output, expected in zip(block_outputs(layer, inputs), reference.split(CHUNK_TOKENS), strict=True):
            total += float((output - expected).pow(2).sum())
    return total / reference.numel()


def eliminate(
    layer: MoELayer,
    inputs: torch.Tensor,
    reference: torch.Tensor,
    scores: torch.Tensor,
    fewest: int,
    n_group: int = 1,
    candidates: int | None = None,
    top_k: int | None = None,
) -> dict[int, tuple[list[int], float]]:
    """Greedy elimination down to ``fewest`` experts: count -> (the experts left, their reconstruction error).

    Each step removes one expert per routing group. It starts from what the ranking would remove (the lowest-scored
    expert of each group) and, group by group, swaps in the candidate whose removal reconstructs the block best; a
    candidate must be strictly better, so ties go to the lower-scored expert. ``candidates`` limits each group's
    candidates to its lowest-scored experts left; ``top_k``: a lowered top-k the block routes with.
    """
    size = layer.num_experts // n_group
    kept = list(range(layer.num_experts))

    def error(removed: list[int]) -> float:
        return reconstruction_error(layer, inputs, reference, [i for i in kept if i not in removed], top_k)

    path = {len(kept): (kept, error([]))}

    while len(kept) > fewest:
        groups = [sorted((i for i in kept if i // size == g), key=lambda i: float(scores[i])) for g in range(n_group)]
        groups = [group[:candidates] for group in groups]
        removal = [group[0] for group in groups]
        best = error(removal)
        for g, group in enumerate(groups):
            for candidate in group[1:]:
                trial = [*removal[:g], candidate, *removal[g + 1 :]]
                trial_error = error(trial)
                if trial_error < best:
                    removal, best = trial, trial_error
        kept = [i for i in kept if i not in removal]
        path[len(kept)] = (kept, best)
    return path


def select_layer(
    layer: MoELayer, inputs: torch.Tensor, scores: torch.Tensor, allowed: range, budget: Budget, candidates: int | None
) -> tuple[dict[int, list[int]], dict[int, tuple[float, float]]]:
    """One layer's greedy sets at every ``allowed`` count, and (greedy error, ranked error) of each."""
    reference = torch.cat(list(block_outputs(layer, inputs)))
    path = eliminate(layer, inputs, reference, scores, allowed.start, budget.n_group, candidates, budget.top_k)
    sets, errors = {}, {}
    for count in allowed:
        ranked = select_experts(scores, count, budget)
        ranked_error = reconstruction_error(layer, inputs, reference, ranked, budget.top_k)
        greedy, greedy_error = path[count]
        sets[count], chosen_error = (greedy, greedy_error) if greedy_error < ranked_error else (ranked, ranked_error)
        errors[count] = (chosen_error, ranked_error)
    return sets, errors


def greedy_sets(
    model,
    moe: MoEModel,
    batches: list,
    scores: torch.Tensor,
    budget: Budget,
    candidates: int | None = None,
    progress: bool = True,
) -> KeptSets:
    """The ``greedy`` selection of every layer, at every count :meth:`Budget.counts` allows.

    Under torch.distributed (a collective: every rank must call it, with the same model and batches) each rank
    selects every ``world``-th layer with rank 0's scores and the results are gathered, so every rank returns the
    same sets as one process would.
    """
    device = next(model.parameters()).device
    rank, world = rank_and_world()
    scores = from_rank_zero(scores, device)
    positions = list(range(rank, len(moe.layers), world))
    was_training = model.training
    model.eval()
    inputs = block_inputs(model, moe, batches, positions)
    selected = {}
    for position in tqdm(positions, desc="greedy selection", disable=not progress):
        n = budget.num_experts[position]
        layer_inputs = inputs.pop(position).to(device)
        selected[position] = select_layer(
            moe.layers[position], layer_inputs, scores[position, :n], budget.counts(position), budget, candidates
        )
    model.train(was_training)
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, selected)
        selected = {position: result for part in gathered for position, result in part.items()}
    sets = [selected[position][0] for position in range(len(moe.layers))]
    errors = [selected[position][1] for position in range(len(moe.layers))]
    logger.info(
        "Greedy selection, block reconstruction error (greedy, ranked) per layer and count: %s",
        {
            moe.layers[p].layer_index: {c: tuple(f"{e:.3g}" for e in pair) for c, pair in row.items()}
            for p, row in enumerate(errors)
        },
    )
    return KeptSets(sets, errors)
