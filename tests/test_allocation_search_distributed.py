"""The search allocation under torch.distributed: two gloo ranks, each scoring its share of the batches, agree on
every value, stop at the same candidate when one rank's time budget runs out (rank 0 reads a clock that advances
one second per reading, so where it stops does not depend on the machine's speed), and return the plan one process
finds.

Run as a script under ``torch.distributed.run`` this file is the worker: each rank searches the tiny model's plan
and writes the kept sets and the trace to ``<output>/rank-<i>.json``.
"""

from __future__ import annotations

import itertools
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moe_specialist import allocation_search
from moe_specialist.allocation_search import TargetKL, search_allocation
from moe_specialist.architectures import find_moe
from moe_specialist.calibrate import calibration_batches
from moe_specialist.plan import Budget, SearchSettings
from tests.helpers import run_two_ranks
from tests.tiny_models import tiny_model

SCORES = torch.rand(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
START = [[0, 1, 2, 3]] * 4  # 16 of 32 experts


def search(limits: SearchSettings) -> tuple[list[list[int]], dict]:
    """The search on the tiny Qwen3-MoE, scored on random token batches (two, one per rank under two ranks)."""
    model = tiny_model("qwen3_moe")
    generator = torch.Generator().manual_seed(0)
    sequences = [(0, torch.randint(3, 97, (16,), generator=generator).tolist(), [0] * 6 + [1] * 10) for _ in range(6)]
    objective = TargetKL(model, find_moe(model), list(calibration_batches(sequences, 3, 0)))
    return search_allocation(objective, START, SCORES, Budget([8] * 4, 16, 2), limits, [0, 1, 2, 3])


def worker(output: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 0:  # a clock one second further at every reading: rank 0's time runs out after a known candidate
        ticks = itertools.count()
        allocation_search.time = types.SimpleNamespace(monotonic=lambda: float(next(ticks)))
    kept, trace = search(SearchSettings(seconds=4.0 if rank == 0 else 600.0))  # rank 1 must stop with rank 0
    (output / f"rank-{rank}.json").write_text(json.dumps({"kept": kept, "trace": trace}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_search_as_one_process(tmp_path):
    done, seconds = run_two_ranks(__file__, tmp_path)
    assert done.returncode == 0, f"failed after {seconds:.0f}s:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    trace = ranks[0]["trace"]
    assert trace["stopped"] == "seconds" and trace["evaluations"] > 1
    assert ranks[0]["kept"] == ranks[1]["kept"]
    timing = ("seconds", "seconds_budget")
    assert {k: v for k, v in trace.items() if k not in timing} == {
        k: v for k, v in ranks[1]["trace"].items() if k not in timing
    }  # the same values (all-reduced), the same candidates, the same stop
    # one process scoring both batches, as many candidates: the same values, the same plan
    kept, alone = search(SearchSettings(seconds=600.0, evaluations=trace["evaluations"]))
    assert kept == ranks[0]["kept"] and alone["final_kl"] == pytest.approx(trace["final_kl"], abs=1e-6)
    assert [{**step, "kl": 0} for step in alone["accepted"]] == [{**step, "kl": 0} for step in trace["accepted"]]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
