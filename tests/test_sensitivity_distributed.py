"""What ranks must agree on: the layer sensitivity two gloo processes measure, each its share.

Run as a script under ``torch.distributed.run`` this file is the worker: each rank measures the tiny model's layer
costs and writes its table and the cuts it measured to ``<output>/rank-<i>.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
import torch.distributed as dist

from moe_specialist import sensitivity
from moe_specialist.architectures import find_moe
from moe_specialist.calibrate import calibration_batches
from moe_specialist.plan import Budget
from tests.tiny_models import tiny_model

ROOT = Path(__file__).parents[1]
SCORES = torch.rand(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def measured_costs(scores: torch.Tensor) -> tuple[torch.Tensor, list[list[list[int]]]]:
    """Layer costs of the tiny Qwen3-MoE on random token batches, and each measured cut: [[layer, experts kept]]."""
    model = tiny_model("qwen3_moe")
    moe = find_moe(model)
    generator = torch.Generator().manual_seed(0)
    sequences = [(0, torch.randint(3, 97, (16,), generator=generator).tolist(), [0] * 6 + [1] * 10) for _ in range(6)]
    batches = list(calibration_batches(sequences, 3, 0))
    cuts = []
    target_loss = sensitivity.target_loss

    def counted_loss(model, batches) -> float:
        cuts.append([[layer.layer_index, layer.num_experts] for layer in moe.layers if layer.num_experts < 8])
        return target_loss(model, batches)

    with patch.object(sensitivity, "target_loss", counted_loss):
        costs = sensitivity.layer_costs(model, moe, batches, scores, Budget([8] * 4, 16, 2), progress=False)
    return costs, cuts


def worker(output: Path) -> None:
    """One rank: another ranking than rank 0's on the other ranks, which must measure with rank 0's anyway."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    costs, cuts = measured_costs(SCORES if rank == 0 else SCORES.flip(1))
    (output / f"rank-{rank}.json").write_text(json.dumps({"costs": costs.tolist(), "cuts": cuts}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_share_the_sensitivity_measurements(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.time()
    done = subprocess.run([*command, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.time() - start
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


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
