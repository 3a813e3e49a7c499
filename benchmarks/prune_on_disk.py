"""Wall time and peak memory of on-disk pruning against a plain copy of the same files.

    python benchmarks/prune_on_disk.py --workdir /tmp/prune-bench [--size_gb 1.5]

Builds a synthetic Qwen3-MoE checkpoint (random bfloat16 weights, original per-expert key format, 500 MB shards),
then times `cp -r` and `moe-specialist prune --mode disk` (a 50% uniform plan) under `/usr/bin/time -v`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM


def build_checkpoint(path: Path, size_gb: float) -> dict:
    hidden, width, experts, layers = 1024, 512, 64, 1
    per_layer = experts * 3 * hidden * width * 2  # bytes in bf16
    layers = max(1, round(size_gb * 2**30 / per_layer))
    config = Qwen3MoeConfig(
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=2048,
        moe_intermediate_size=width,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        num_experts=experts,
        num_experts_per_tok=8,
        norm_topk_prob=True,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="500MB")
    return {"layers": layers, "experts": experts, "parameters": sum(p.numel() for p in model.parameters())}


def timed(command: list[str]) -> dict:
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", result.stderr).group(1)
    minutes, seconds = wall.split(":")[-2:]
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return {"seconds": round(int(minutes) * 60 + float(seconds), 2), "peak_rss_mb": round(rss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/prune-bench")
    parser.add_argument("--size_gb", type=float, default=1.5)
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    info = build_checkpoint(work / "model", args.size_gb)
    size = sum(f.stat().st_size for f in (work / "model").glob("*.safetensors"))
    plan = {"kept_experts": {str(i): list(range(0, info["experts"], 2)) for i in range(info["layers"])}}
    (work / "plan.json").write_text(json.dumps(plan))
    copy = timed(["cp", "-r", str(work / "model"), str(work / "copy")])
    prune = timed(
        [sys.executable, "-m", "moe_specialist.cli", "prune", "--model", str(work / "model")]
        + ["--prune_plan", str(work / "plan.json"), "--output", str(work / "pruned"), "--mode", "disk"]
    )
    pruned = sum(f.stat().st_size for f in (work / "pruned").glob("*.safetensors"))
    shards = len(list((work / "model").glob("*.safetensors")))
    report = {"checkpoint_gb": round(size / 2**30, 2), "shards": shards, **info, "copy": copy}
    report.update(prune_on_disk=prune, pruned_gb=round(pruned / 2**30, 2))
    print(json.dumps(report, indent=1))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
