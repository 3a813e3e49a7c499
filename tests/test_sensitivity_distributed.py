"""What ranks must agree on: the layer sensitivity and greedy kept sets two gloo processes measure, each its share,
and the sampled expert fingerprints that tell whether ranks hold the same model.

Run as a script under ``torch.distributed.run`` this file is the worker: each rank measures the tiny model's layer
costs and greedy kept sets and writes its table, the cuts it measured and the sets to ``<output>/rank-<i>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
import torch.distributed as dist

from moe_specialist import sensitivity
from moe_specialist.architectures import find_moe
from moe_specialist.calibrate import calibration_batches
from moe_specialist.plan import Budget, PrunePlan, ranked_sets
from moe_specialist.prune import prune_model
from moe_specialist.selection import greedy_sets
from moe_specialist.training.callbacks import expert_fingerprint, fingerprint_positions
from tests.helpers import run_two_ranks
from tests.tiny_models import tiny_model

SCORES = torch.rand(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def tiny_setup() -> tuple:
    """The tiny Qwen3-MoE, its MoE structure and random token batches."""
    model = tiny_model("qwen3_moe")
    generator = torch.Generator().manual_seed(0)
    sequences = [(0, torch.randint(3, 97, (16,), generator=generator).tolist(), [0] * 6 + [1] * 10) for _ in range(6)]
    return model, find_moe(model), list(calibration_batches(sequences, 3, 0))


def greedy(scores: torch.Tensor) -> list[dict]:
    """The greedy kept sets of the tiny model (as JSON has them: counts as strings), from the two lowest-scored
    candidates at each step, so that the scores matter."""
    model, moe, batches = tiny_setup()
    kept = greedy_sets(model, moe, batches, scores, Budget([8] * 4, 16, 2), candidates=2, progress=False)
    return json.loads(json.dumps(kept.sets))


def measured_costs(scores: torch.Tensor) -> tuple[torch.Tensor, list[list[list[int]]]]:
    """Layer costs of the tiny Qwen3-MoE on random token batches, and each measured cut: [[layer, experts kept]]."""
    model, moe, batches = tiny_setup()
    cuts = []
    target_loss = sensitivity.target_loss

    def counted_loss(model, batches) -> float:
        cuts.append([[layer.layer_index, layer.num_experts] for layer in moe.layers if layer.num_experts < 8])
        return target_loss(model, batches)

    with patch.object(sensitivity, "target_loss", counted_loss):
        budget = Budget([8] * 4, 16, 2)
        costs = sensitivity.layer_costs(model, moe, batches, ranked_sets(scores, budget), budget, progress=False)
    return costs, cuts


def worker(output: Path) -> None:
    """One rank: another ranking than rank 0's on the other ranks, which must measure with rank 0's anyway."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    scores = SCORES if rank == 0 else SCORES.flip(1)
    costs, cuts = measured_costs(scores)
    record = {"costs": costs.tolist(), "cuts": cuts, "greedy": greedy(scores)}
    (output / f"rank-{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_share_the_sensitivity_and_greedy_measurements(tmp_path):
    done, seconds = run_two_ranks(__file__, tmp_path)
    assert done.returncode == 0, f"failed after {seconds:.0f}s:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    print(f"2 ranks: {seconds:.1f}s")
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    reference, reference_cuts = measured_costs(SCORES)
    assert len(reference_cuts) == 1 + 4 * 6  # the uncut model, then counts 2..7 of each layer
    for record in ranks:  # every rank holds the table one process measures, with rank 0's ranking
        torch.testing.assert_close(torch.tensor(record["costs"], dtype=torch.float64), reference, rtol=0, atol=1e-6)
    assert ranks[0]["costs"] == ranks[1]["costs"]
    assert not torch.equal(measured_costs(SCORES.flip(1))[0], reference)  # so rank 1 did use rank 0's ranking
    # each cut measured once, by one rank: the uncut model (no cut layer) by rank 0, the rest shared out evenly
    assert sorted(ranks[0]["cuts"] + ranks[1]["cuts"]) == sorted(reference_cuts)
    assert [len(record["cuts"]) for record in ranks] == [13, 12] and [] in ranks[0]["cuts"]
    # greedy sets: each rank selects half the layers, with rank 0's scores, and every rank gets them all
    assert ranks[0]["greedy"] == ranks[1]["greedy"] == greedy(SCORES) != greedy(SCORES.flip(1))


# ---- fingerprints ---------------------------------------------------------------------------------------------------
GATE_UP = "model.layers.1.mlp.experts.gate_up_proj"


def fingerprint(model) -> dict:
    return expert_fingerprint(find_moe(model))


def changed_element(position: int) -> dict:
    """The tiny model's fingerprint with one element (flat ``position``) of layer 1's fused gate/up experts moved."""
    model = tiny_model("qwen3_moe")
    tensor = find_moe(model).layers[1].experts.gate_up_proj
    with torch.no_grad():
        tensor.view(-1)[position] += 1e-3
    return fingerprint(model)


def test_fingerprints_hash_a_fixed_sample_of_every_per_expert_tensor():
    reference = fingerprint(tiny_model("qwen3_moe"))
    assert fingerprint(tiny_model("qwen3_moe")) == reference
    assert reference["shapes"][GATE_UP] == [8, 48, 64] and reference["zero3_partitioned"] is False
    assert len(reference["shapes"]) == 4 * 3  # gate_up_proj, down_proj and the router rows of 4 layers
    assert fingerprint(tiny_model("qwen3_moe", seed=1))["sha256"] != reference["sha256"]
    # 64 positions per expert of the 24,576: an element in the sample changes the hash, one outside does not
    positions = fingerprint_positions(8 * 48 * 64, 8)
    assert len(positions) == 512 and positions.max() < 8 * 48 * 64
    unsampled = next(p for p in range(8 * 48 * 64) if p not in set(positions.tolist()))
    assert changed_element(int(positions[100]))["sha256"] != reference["sha256"]
    assert changed_element(unsampled)["sha256"] == reference["sha256"]
    assert torch.equal(fingerprint_positions(8 * 48 * 64, 8), positions)  # fixed: the same on every rank and run
    assert torch.equal(fingerprint_positions(100, 8), torch.arange(100))  # a small tensor is hashed whole


def test_fingerprints_tell_prunings_apart():
    def pruned(ids: list[int]) -> dict:
        model = tiny_model("qwen3_moe")
        prune_model(model, PrunePlan({1: ids}))
        return fingerprint(model)

    kept = pruned([0, 2, 5, 7])
    assert kept == pruned([0, 2, 5, 7])
    assert kept["shapes"][GATE_UP] == [4, 48, 64]
    other = pruned([0, 2, 5, 6])  # one other expert kept
    assert other["shapes"] == kept["shapes"] and other["sha256"] != kept["sha256"]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
