"""Helpers shared by several test modules (test modules never import each other)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_specialist.architectures import find_moe
from moe_specialist.compensation import calibration_refit
from moe_specialist.plan import Budget, PrunePlan
from moe_specialist.stats import RoutingCollector, RoutingStats
from moe_specialist.training import parse_recipe

TINY_RECIPE = Path(__file__).parent / "fixtures" / "recipes" / "tiny_prune_sft.yaml"


def stats_with(
    counts: torch.Tensor, gate: torch.Tensor | None = None, reap: torch.Tensor | None = None, layers=None
) -> RoutingStats:
    """Statistics for one group ('en-fr'), all on target tokens; counts shaped [layer, expert]."""
    n_layers, n_experts = counts.shape
    stats = RoutingStats.empty(["en-fr"], layers or list(range(n_layers)), [n_experts] * n_layers)
    stats.count[0, 1] = counts
    stats.gate_mass[0, 1] = gate if gate is not None else counts * 0.5
    stats.reap_sum[0, 1] = reap if reap is not None else counts
    stats.tokens[0, 1] = counts.sum() / 2
    return stats


def skewed_counts() -> torch.Tensor:
    """Layer 0 concentrated on experts 0-1; layers 1-3 spread evenly (decreasing by expert id)."""
    return torch.tensor(
        [[100.0, 90, 2, 2, 1, 1, 1, 1]] + [[20.0, 19, 18, 17, 16, 15, 14, 13]] * 3, dtype=torch.float64
    )


def allowed(budget: Budget) -> list[tuple[int, ...]]:
    """Brute force: every choice of per-layer counts that meets the budget."""
    ranges = [budget.counts(position) for position in range(len(budget.num_experts))]
    return [counts for counts in itertools.product(*ranges) if sum(counts) == budget.keep_total]


def routed_counts(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """How many of ``ids``' tokens each expert of each MoE layer (decoder layer -> [expert]) is selected for."""
    moe = find_moe(model)
    with torch.no_grad(), RoutingCollector(moe, ["x"]) as collector:
        collector.label(torch.zeros_like(ids), torch.zeros_like(ids))
        model(ids)
    count = collector.stats.count[0, 0]
    return {layer: count[i, : moe.layers[i].num_experts] for i, layer in enumerate(moe.layer_indices)}


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def run_two_ranks(script: str | Path, output: Path) -> tuple[subprocess.CompletedProcess, float]:
    """``script`` run as the worker of two gloo ranks (``torch.distributed.run``), its output directory ``output``;
    the finished process and its seconds."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    root = Path(__file__).parents[1]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.time()
    done = subprocess.run([*command, str(output)], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    return done, time.time() - start


W_AND_B_FILE_HEADER = 7  # ":W&B", a 2-byte magic number, a version byte
LOG_BLOCK = 32768  # LevelDB's log format: records are cut into fragments that never cross a 32 KiB block
FRAGMENT_HEADER = 7  # CRC-32 (4 bytes), length (2, little-endian), kind (1): 1 whole, 2 first, 3 middle, 4 last


def wandb_records(path: Path) -> bytes:
    """The records of an offline W&B run file, their fragments joined: a fragment header at a 32 KiB block boundary
    splits any record (and a key in it) that crosses the boundary, so the raw bytes can miss a key that is there."""
    data, records, position = path.read_bytes(), bytearray(), W_AND_B_FILE_HEADER
    while position + FRAGMENT_HEADER <= len(data):
        room = LOG_BLOCK - position % LOG_BLOCK
        if room < FRAGMENT_HEADER:  # the block's tail is zero padding
            position += room
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        end = position + FRAGMENT_HEADER + length
        if kind == 0 or end > len(data):  # padding, or a fragment still being written
            break
        records += data[position + FRAGMENT_HEADER : end]
        if kind in (1, 4):
            records += b"\n"
        position = end
    return bytes(records)


def wandb_record(path: Path, *expected: bytes, seconds: float = 60.0) -> bytes:
    """The records of an offline W&B run file once they hold every ``expected`` bytes: W&B's service process writes
    them after the run's own process has returned (or exited), a test reading at once may find only the header."""
    deadline = time.monotonic() + seconds
    data = wandb_records(path)
    while not all(e in data for e in expected) and time.monotonic() < deadline:
        time.sleep(0.5)
        data = wandb_records(path)
    return data


def refit_by_hand(model_dir: Path, plan: PrunePlan) -> tuple[torch.nn.Module, dict]:
    """The model of ``model_dir`` pruned with ``plan`` and re-fitted by :func:`calibration_refit` directly, on the
    calibration data of the tiny recipe (4 sequences fitted, 4 held out): what a run with ``compensation: refit``
    and ``--sensitivity_examples 4`` must give."""
    *_, calibration, _, _ = parse_recipe(["--config", str(TINY_RECIPE), "--model_name_or_path", str(model_dir)])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    _, trace = calibration_refit(AutoTokenizer.from_pretrained(model_dir), calibration, 4)(model, plan, None)
    return model, trace
