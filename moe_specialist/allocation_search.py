"""Allocation refined end to end: a seeded local search over per-layer counts and kept sets, scored on the whole
pruned model's next-token KL to the unpruned model.

The ``sensitivity`` allocation prices each layer alone and adds the prices up, but losses of layers pruned together
do not add up. The ``search`` allocation starts from the sensitivity plan and tries one change at a time, keeping it
only when it lowers the objective (a (1+1) local search, so the result is never worse than its start):

- *move*: one unit (one expert per routing group) goes from one layer to another: the giver drops its lowest-scored
  kept expert of each group, the taker adds its highest-scored removed one;
- *swap*: in one layer and routing group, a kept expert and a removed one, both drawn at random, trade places.

Every candidate keeps exactly the budget, at least the fewest experts each layer may keep (top-k, and what
group-limited routing needs) and the same count in every routing group. The objective is the mean KL from the
unpruned model's next-token distribution to the pruned model's, teacher-forced on the target tokens of held-out
calibration sequences; the unpruned side is computed once (:class:`TargetKL`), so a sweep reuses it for every ratio.
``onset_weight`` adds that KL on the first :data:`ONSET_TOKENS` target tokens of each sequence, weighted: there the
output language is chosen, and a plan whose model starts its translations in the source language (off-target output)
loses little on the mean over every token, which teacher forcing puts back on track after the first word.
Candidates are pruned in memory, layer by layer, with :func:`~moe_specialist.prune.keeping_only` (exactly what
:func:`~moe_specialist.prune.prune_model` does to routing), and no candidate is scored twice.

The search stops before an evaluation would start past ``seconds``, or after ``evaluations`` evaluations. A time
budget makes the plan depend on the machine's speed; the evaluation cap does not, so a fixed cap (with a time budget
that does not bind) gives the same plan for the same seed.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_specialist.architectures import MoEModel
from moe_specialist.errors import ConfigurationError
from moe_specialist.plan import Budget, SearchSettings
from moe_specialist.prune import keeping_only
from moe_specialist.selection import rank_and_world
from moe_specialist.stats import ROLES

logger = logging.getLogger(__name__)

REFERENCE_TOP = 64  # next-token probabilities kept of the unpruned model per target token; the rest is one bucket
ONSET_TOKENS = 4  # the first target tokens of a sequence, where the output language is chosen
PROPOSAL_TRIES = 1000  # draws for a candidate not yet scored before the neighbourhood counts as exhausted

Kept = tuple[tuple[int, ...], ...]  # per MoE layer (position): the kept expert ids, sorted


def _log_rest(top_logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(top_logprobs))) per row: the log mass outside the top tokens (at least log 1e-30, whatever
    the rounding of a sum close to 1)."""
    return (-torch.expm1(torch.logsumexp(top_logprobs, dim=-1))).clamp_min(1e-30).log()


@dataclass
class _Reference:
    """The unpruned model's next-token distribution at the target positions of one batch."""

    top_logprobs: torch.Tensor  # [tokens, top]
    top_ids: torch.Tensor  # [tokens, top]
    log_rest: torch.Tensor  # [tokens]
    onset: torch.Tensor  # [tokens]: among the first ONSET_TOKENS target tokens of its sequence


class TargetKL:
    """The search objective: mean KL(unpruned || pruned) of the next-token distributions on the target tokens of
    ``batches`` (calibration batches), over the top :data:`REFERENCE_TOP` tokens of the unpruned model plus one bucket
    for the rest (exact when the vocabulary is no larger), plus ``onset_weight`` times the mean KL on the onset tokens.

    Under torch.distributed each rank scores every ``world``-th batch and the sums are all-reduced, so every rank
    gets the same value (a collective: every rank must score the same candidates in the same order).
    """

    def __init__(self, model, moe: MoEModel, batches: list):
        rank, world = rank_and_world()
        self.model, self.moe, self.batches = model, moe, batches[rank::world]
        self.sequences = sum(len(batch[0]) for batch in batches)
        self.device = next(model.parameters()).device
        self.references = [self._reference(batch) for batch in self.batches]
        counts = [[float(r.log_rest.numel()), float(r.onset.sum())] for r in self.references]
        self.tokens, self.onset_tokens = (int(n) for n in self._all_reduce(torch.tensor(counts).reshape(-1, 2).sum(0)))
        if self.tokens == 0:
            raise ConfigurationError(
                "The held-out calibration sequences have no target tokens to score the allocation search on: "
                "calibrate on translation pairs (calibration_directions) or raise calibration_examples."
            )

    def _targets(self, batch) -> torch.Tensor:
        """``[batch, length - 1]``: whether the next token is a target (padding is IGNORE, never a target)."""
        return (batch[3] == ROLES.index("target"))[:, 1:].to(self.device)

    @torch.no_grad()
    def _logprobs(self, batch) -> torch.Tensor:
        """``[target tokens, vocabulary]``: the model's next-token log-probabilities where the next is a target."""
        input_ids, attention, _, _ = batch
        was_training = self.model.training
        self.model.eval()
        logits = self.model(
            input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device), use_cache=False
        ).logits
        self.model.train(was_training)
        return logits[:, :-1][self._targets(batch)].float().log_softmax(-1)

    def _reference(self, batch) -> _Reference:
        logprobs = self._logprobs(batch)
        top = logprobs.topk(min(REFERENCE_TOP, logprobs.shape[-1]), dim=-1)
        whole = top.values.shape[-1] == logprobs.shape[-1]  # no rest: the objective is the exact KL
        log_rest = torch.full_like(top.values[:, 0], -math.inf) if whole else _log_rest(top.values)
        targets = self._targets(batch)
        onset = (targets.cumsum(dim=1) <= ONSET_TOKENS)[targets]
        return _Reference(top.values, top.indices, log_rest, onset)

    def _all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        if rank_and_world()[1] > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values.cpu()

    def __call__(self, kept: Kept, top_k: int | None = None, onset_weight: float = 0.0) -> float:
        """The objective of the model pruned to ``kept`` (routing ``top_k`` experts when lowered)."""
        sums = torch.zeros(2, dtype=torch.float64)  # KL summed over every target token, over the onset tokens
        with pruned(self.moe, kept, top_k):
            for batch, reference in zip(self.batches, self.references, strict=True):
                kl = token_kl(reference, self._logprobs(batch)).double().cpu()
                sums += torch.stack([kl.sum(), kl[reference.onset.cpu()].sum()])
        total, onset = self._all_reduce(sums).tolist()
        return total / self.tokens + (onset_weight * onset / self.onset_tokens if onset_weight else 0.0)


def token_kl(reference: _Reference, logprobs: torch.Tensor) -> torch.Tensor:
    """``[tokens]``: KL(reference || pruned) per target token, on the reference's top tokens plus the rest bucket."""
    pruned_top = logprobs.gather(-1, reference.top_ids)
    kl = (reference.top_logprobs.exp() * (reference.top_logprobs - pruned_top)).sum(-1)
    rest_mass = reference.log_rest.exp()
    rest = torch.where(rest_mass > 0, rest_mass * (reference.log_rest - _log_rest(pruned_top)), 0.0)
    return kl + rest


@contextmanager
def pruned(moe: MoEModel, kept: Kept, top_k: int | None):
    """Every layer pruned in place to its kept set (and a lowered ``top_k``) until the context exits."""
    with ExitStack() as stack:
        for layer, ids in zip(moe.layers, kept, strict=True):
            if len(ids) < layer.num_experts or top_k is not None:
                stack.enter_context(keeping_only(layer, list(ids), top_k))
        yield


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank: every rank stops the search at the same evaluation."""
    if rank_and_world()[1] == 1:
        return flag
    value = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value)
    return bool(value.item())


class _Neighbourhood:
    """The moves and swaps from a candidate that keep the budget, the per-layer minimum and equal group counts."""

    def __init__(self, scores: torch.Tensor, budget: Budget, layer_indices: list[int]):
        self.budget, self.layer_indices = budget, layer_indices
        self.scores = [scores[p, :n].tolist() for p, n in enumerate(budget.num_experts)]

    def _group(self, position: int, expert: int) -> int:
        return expert // (self.budget.num_experts[position] // self.budget.n_group)

    def _in_group(self, position: int, ids, group: int) -> list[int]:
        return sorted(i for i in ids if self._group(position, i) == group)

    def _ranked(self, position: int, ids: list[int]) -> list[int]:
        """``ids`` from the lowest-scored up (ties: lower id first)."""
        return sorted(ids, key=lambda i: (self.scores[position][i], i))

    def propose(self, kept: Kept, rng: random.Random) -> tuple[Kept, dict] | None:
        """A random move or swap from ``kept`` and its description for the trace (None: there is none)."""
        budget, step = self.budget, self.budget.n_group
        positions = range(len(kept))
        givers = [p for p in positions if len(kept[p]) - step >= budget.counts(p).start]
        takers = [p for p in positions if len(kept[p]) < budget.num_experts[p]]
        kinds = (["move"] if any(g != t for g in givers for t in takers) else []) + (["swap"] if takers else [])
        if not kinds:
            return None
        new = [list(ids) for ids in kept]
        if rng.choice(kinds) == "move":
            giver = rng.choice([g for g in givers if any(t != g for t in takers)])
            taker = rng.choice([t for t in takers if t != giver])
            removed, added = [], []
            for group in range(step):
                removed.append(self._ranked(giver, self._in_group(giver, kept[giver], group))[0])
                absent = set(range(budget.num_experts[taker])) - set(kept[taker])
                added.append(self._ranked(taker, self._in_group(taker, absent, group))[-1])
            new[giver] = [i for i in new[giver] if i not in removed]
            new[taker] += added
            move = {"move": "move", "from_layer": self.layer_indices[giver], "to_layer": self.layer_indices[taker]}
        else:
            position, group = rng.choice(takers), rng.randrange(step)
            absent = set(range(budget.num_experts[position])) - set(kept[position])
            removed = [rng.choice(self._in_group(position, kept[position], group))]
            added = [rng.choice(self._in_group(position, absent, group))]
            new[position] = [i for i in new[position] if i not in removed] + added
            move = {"move": "swap", "layer": self.layer_indices[position]}
        return tuple(tuple(sorted(ids)) for ids in new), {**move, "removed": removed, "added": added}

    def unscored(self, kept: Kept, rng: random.Random, scored: dict) -> tuple[Kept, dict] | None:
        """A neighbour of ``kept`` not in ``scored``, or None when :data:`PROPOSAL_TRIES` draws found none."""
        for _ in range(PROPOSAL_TRIES):
            proposal = self.propose(kept, rng)
            if proposal is None:
                return None
            if proposal[0] not in scored:
                return proposal
        return None


def search_allocation(
    objective,
    kept: list[list[int]],
    scores: torch.Tensor,
    budget: Budget,
    settings: SearchSettings,
    layer_indices: list[int],
) -> tuple[list[list[int]], dict]:
    """Refine ``kept`` (per MoE layer, the start's kept ids) by a seeded (1+1) local search on ``objective``
    (candidate kept sets, top-k, onset weight -> value to minimise, e.g. :class:`TargetKL`); ``scores`` (the
    criterion's) choose the experts a move drops and adds. Returns the best kept sets and the search trace for the
    plan's metadata."""
    started = time.monotonic()
    rng = random.Random(settings.seed)
    neighbourhood = _Neighbourhood(scores, budget, layer_indices)
    current: Kept = tuple(tuple(sorted(ids)) for ids in kept)
    best = initial = objective(current, budget.top_k, settings.onset_weight)
    scored = {current: best}
    accepted = []
    while True:
        if settings.evaluations is not None and len(scored) >= settings.evaluations:
            stopped = "evaluations"
            break
        if _any_rank(time.monotonic() - started >= settings.seconds):
            stopped = "seconds"
            break
        proposal = neighbourhood.unscored(current, rng, scored)
        if proposal is None:
            stopped = "exhausted"  # every neighbour drawn was scored already (or there is none)
            break
        candidate, move = proposal
        scored[candidate] = value = objective(candidate, budget.top_k, settings.onset_weight)
        if value < best:
            current, best = candidate, value
            accepted.append({"evaluation": len(scored), **move, "kl": round(value, 6)})
    trace = {
        "seed": settings.seed,
        "seconds_budget": settings.seconds,
        "evaluations_budget": settings.evaluations,
        "onset_weight": settings.onset_weight,
        "start_counts": [len(ids) for ids in kept],
        "initial_kl": round(initial, 6),
        "final_kl": round(best, 6),
        "evaluations": len(scored),
        "accepted": accepted,
        "seconds": round(time.monotonic() - started, 2),
        "stopped": stopped,
    }
    logger.info(
        "Allocation search: KL %.4f -> %.4f, %d of %d candidates accepted in %.1f s (stopped: %s); counts %s -> %s",
        initial,
        best,
        len(accepted),
        len(scored) - 1,
        trace["seconds"],
        stopped,
        trace["start_counts"],
        [len(ids) for ids in current],
    )
    return [list(ids) for ids in current], trace
