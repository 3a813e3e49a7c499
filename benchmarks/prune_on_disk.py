"""Wall time and peak memory of on-disk pruning against a plain copy of the same files.

    python -m benchmarks.prune_on_disk --workdir /tmp/prune-bench --layout gpt-oss --size_gb 8 [--runs 2]

Writes a synthetic checkpoint of about ``--size_gb`` GiB in the Hub layout of a published model, with its real widths
and expert count (the published config.json) and fewer layers (random weights, 4 GiB shards with their index):

- ``qwen3``: Qwen3-30B-A3B, bfloat16, one key per expert and projection (``mlp.experts.{e}.gate_proj.weight``);
- ``gpt-oss``: GPT-OSS-20B, experts fused and MXFP4-quantized (``mlp.experts.gate_up_proj_blocks`` uint8
  [E, 2I, H/32, 16], ``_scales`` uint8 [E, 2I, H/32], ``_bias`` bf16 [E, 2I], the same for ``down_proj``),
  ``mlp.router.weight/bias``, bfloat16 attention, ``quantization_config`` mxfp4.

Then, ``--runs`` times each, times ``cp -r`` and ``moe-specialist prune --mode disk`` (a 50% uniform plan) under
``/usr/bin/time -v`` (with ``--warm_tool``, the prune's code is imported once, untimed, before each timed prune).
Before each timed command the source files are evicted from the page cache
(``posix_fadvise(DONTNEED)`` after ``sync``: cold reads without dropping other processes' caches) and the previous
output is removed. The prune command also reports its time after importing torch and transformers (a fixed
start-up cost, tens of seconds on a loaded machine, that pruning does not change). Prints a markdown table; GB/s is
the source checkpoint's size over the wall time for both commands; peak RSS is /usr/bin/time's maximum resident set
size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from moe_specialist.io import INDEX_FILE
from moe_specialist.safetensors_stream import ComputedTensor, StreamedTensor, byte_size, read_header, write_safetensors
from tests.real_layouts import GPT_OSS_20B, QWEN3_30B_A3B  # the published config.json files

SHARD_BYTES = 4 << 30
# `moe-specialist prune` itself, with what it imports before reading a byte (torch, transformers) imported first, so
# that the time after those imports, the part pruning can change, is measured in the same run.
WARM_UP = """
import moe_specialist.cli, moe_specialist.models, moe_specialist.prune
import transformers.models.{model_type}.modeling_{model_type}
"""
TIMED_CLI = """
import sys, time
import moe_specialist.cli, moe_specialist.models, moe_specialist.prune
start = time.perf_counter()
moe_specialist.cli.main(sys.argv[1:])
print(f"after imports: {time.perf_counter() - start:.3f} s")
"""


def attention(prefix: str, config: dict, bias: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
    hidden, heads, kv, head = (
        config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    )
    shapes = {"q_proj": (heads * head, hidden), "k_proj": (kv * head, hidden), "v_proj": (kv * head, hidden)}
    shapes["o_proj"] = (hidden, heads * head)
    entries = {f"{prefix}.self_attn.{name}.weight": ("BF16", shape) for name, shape in shapes.items()}
    if bias:
        entries.update({f"{prefix}.self_attn.{name}.bias": ("BF16", shape[:1]) for name, shape in shapes.items()})
    return entries


def qwen3_layer(i: int, config: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    prefix, hidden, width = f"model.layers.{i}", config["hidden_size"], config["moe_intermediate_size"]
    entries = attention(prefix, config, bias=False)
    for name in ("q_norm", "k_norm"):
        entries[f"{prefix}.self_attn.{name}.weight"] = ("BF16", (config["head_dim"],))
    for name in ("input_layernorm", "post_attention_layernorm"):
        entries[f"{prefix}.{name}.weight"] = ("BF16", (hidden,))
    entries[f"{prefix}.mlp.gate.weight"] = ("BF16", (config["num_experts"], hidden))
    for e in range(config["num_experts"]):
        for name, shape in (
            ("gate_proj", (width, hidden)),
            ("up_proj", (width, hidden)),
            ("down_proj", (hidden, width)),
        ):
            entries[f"{prefix}.mlp.experts.{e}.{name}.weight"] = ("BF16", shape)
    return entries


def gpt_oss_layer(i: int, config: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    prefix, hidden, width = f"model.layers.{i}", config["hidden_size"], config["intermediate_size"]
    experts = config["num_local_experts"]
    entries = attention(prefix, config, bias=True)
    entries[f"{prefix}.self_attn.sinks"] = ("BF16", (config["num_attention_heads"],))
    for name in ("input_layernorm", "post_attention_layernorm"):
        entries[f"{prefix}.{name}.weight"] = ("BF16", (hidden,))
    entries[f"{prefix}.mlp.router.weight"] = ("BF16", (experts, hidden))
    entries[f"{prefix}.mlp.router.bias"] = ("BF16", (experts,))
    for name, rows, columns in (("gate_up_proj", 2 * width, hidden), ("down_proj", hidden, width)):
        entries[f"{prefix}.mlp.experts.{name}_blocks"] = ("U8", (experts, rows, columns // 32, 16))
        entries[f"{prefix}.mlp.experts.{name}_scales"] = ("U8", (experts, rows, columns // 32))
        entries[f"{prefix}.mlp.experts.{name}_bias"] = ("BF16", (experts, rows))
    return entries


LAYOUTS = {"qwen3": (QWEN3_30B_A3B, qwen3_layer), "gpt-oss": (GPT_OSS_20B, gpt_oss_layer)}


def random_tensor(dtype: str, shape: tuple[int, ...], seed: int) -> ComputedTensor:
    def compute() -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        if dtype == "U8":
            return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        return torch.randn(shape, dtype=torch.bfloat16, generator=generator).mul_(0.02)

    return ComputedTensor(dtype, shape, compute)


def build_checkpoint(path: Path, layout: str, size_gb: float) -> dict:
    """Write the checkpoint; its layer count, expert count and model type."""
    fields, layer = LAYOUTS[layout]
    config = dict(fields)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    outside = {"model.embed_tokens.weight": ("BF16", (vocab, hidden)), "lm_head.weight": ("BF16", (vocab, hidden))}
    outside["model.norm.weight"] = ("BF16", (hidden,))
    per_layer = sum(byte_size(dtype, shape) for dtype, shape in layer(0, config).values())
    layers = max(1, round((size_gb * 2**30 - sum(byte_size(d, s) for d, s in outside.values())) / per_layer))
    config["num_hidden_layers"] = layers
    if layout == "gpt-oss":
        config["layer_types"] = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (
            layers % 2
        )
    entries = {"model.embed_tokens.weight": outside["model.embed_tokens.weight"]}
    for i in range(layers):
        entries.update(layer(i, config))
    entries.update({k: v for k, v in outside.items() if k != "model.embed_tokens.weight"})
    shards: list[dict[str, StreamedTensor]] = [{}]
    size = 0
    for seed, (name, (dtype, shape)) in enumerate(entries.items()):
        if size and size + byte_size(dtype, shape) > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = random_tensor(dtype, shape, seed)
        size += byte_size(dtype, shape)
    path.mkdir(parents=True)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(path / name, shard, {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    AutoConfig.for_model(**config).save_pretrained(path)
    experts = config.get("num_experts") or config["num_local_experts"]
    return {"layers": layers, "experts": experts, "model_type": config["model_type"]}


def evict(directory: Path) -> None:
    """Drop the page-cache copies of the files in ``directory`` (only those) after writing back what is dirty."""
    subprocess.run(["sync"], check=True)
    for file in directory.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_share(directory: Path) -> float:
    """The share of ``directory``'s bytes in the page cache (``fincore``), to report how cold a run started."""
    files = [str(f) for f in directory.glob("*.safetensors")]
    result = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", *files],
        check=True,
        capture_output=True,
        text=True,
    )
    cached = sizes = 0
    for line in result.stdout.splitlines():
        res, size = map(int, line.split())
        cached, sizes = cached + res, sizes + size
    return cached / sizes


def timed(command: list[str]) -> dict:
    """Wall seconds and peak RSS of ``command`` under /usr/bin/time -v, and the seconds it reports after imports."""
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", result.stderr).group(1)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    row = {"seconds": sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":")))), "rss": rss << 10}
    after = re.search(r"after imports: (\S+) s", result.stdout)
    return row | ({"after_imports": float(after.group(1))} if after else {})


def read(directory: Path, shard: str, key: str) -> torch.Tensor:
    with safe_open(directory / shard, "pt") as f:
        return f.get_tensor(key)


def check_pruned(source: Path, pruned: Path, kept: list[int]) -> int:
    """Spot check of the first layer: its MoE tensors in the output are the source's, kept experts only, and nothing
    else of that layer's experts is left; the number of tensors checked."""
    source_map, pruned_map = (json.loads((p / INDEX_FILE).read_text())["weight_map"] for p in (source, pruned))
    moe = re.compile(r"model\.layers\.0\.mlp\.(experts|router|gate)\.")
    expected = {}
    for key, shard in source_map.items():
        expert = re.match(r"(model\.layers\.0\.mlp\.experts)\.(\d+)\.(.+)$", key)
        if expert and int(expert.group(2)) in kept:
            new = f"{expert.group(1)}.{kept.index(int(expert.group(2)))}.{expert.group(3)}"
            expected[new] = read(source, shard, key)
        elif moe.match(key) and not expert:
            expected[key] = read(source, shard, key)[kept]
    assert expected.keys() == {key for key in pruned_map if moe.match(key)}
    for key, tensor in expected.items():
        assert torch.equal(read(pruned, pruned_map[key], key), tensor), key
    return len(expected)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/prune-bench")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="qwen3")
    parser.add_argument("--size_gb", type=float, default=1.5)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the workdir (checkpoint, plan, last output)")
    parser.add_argument(
        "--warm_tool",
        action="store_true",
        help="before each timed prune, import its code once, untimed (torch, transformers and the model's modeling "
        "module in the page cache, as on a machine that runs the tool often); the checkpoint stays cold",
    )
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = work / "model"
    info = build_checkpoint(model, args.layout, args.size_gb)
    shards = sorted(model.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in shards)
    largest = max(t.end - t.start for shard in shards for t in read_header(shard)[0].values())
    kept = list(range(0, info["experts"], 2))
    (work / "plan.json").write_text(json.dumps({"kept_experts": {str(i): kept for i in range(info["layers"])}}))
    prune = [sys.executable, "-c", TIMED_CLI, "prune", "--model", str(model), "--prune_plan", str(work / "plan.json")]
    prune += ["--output", str(work / "out"), "--mode", "disk"]
    commands = {"`cp -r`": ["cp", "-r", str(model), str(work / "out")], "`moe-specialist prune --mode disk`": prune}
    load = os.getloadavg()[0]
    rows = []
    for run in range(1, args.runs + 1):
        for name, command in commands.items():
            shutil.rmtree(work / "out", ignore_errors=True)
            if args.warm_tool and command is prune:
                subprocess.run([sys.executable, "-c", WARM_UP.format(model_type=info["model_type"])], check=True)
            evict(model)
            rows.append({"run": run, "command": name, "cached": cached_share(model), **timed(command)})
    checked = check_pruned(model, work / "out", kept)
    pruned = sum(f.stat().st_size for f in (work / "out").glob("*.safetensors"))
    copy_seconds = {row["run"]: row["seconds"] for row in rows if row["command"] == "`cp -r`"}
    print(
        f"{args.layout} layout: {size / 2**30:.2f} GiB in {len(shards)} shards, {info['layers']} layers x "
        f"{info['experts']} experts, largest tensor {largest / 2**20:.0f} MiB; 50% plan -> {pruned / 2**30:.2f} GiB "
        f"({checked} MoE tensors of layer 0 checked against the source); load average {load:.1f} -> "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n"
    )
    print(
        "| run | command | source in page cache | seconds | GB/s | cp time / time | seconds after imports "
        "| cp time / time after imports | peak RSS (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        copy = copy_seconds[row["run"]]
        after = row.get("after_imports")
        print(
            f"| {row['run']} | {row['command']} | {row['cached']:.0%} | {row['seconds']:.2f} | "
            f"{size / 1e9 / row['seconds']:.2f} | {copy / row['seconds']:.2f} | "
            f"{'' if after is None else f'{after:.2f}'} | {'' if after is None else f'{copy / after:.2f}'} | "
            f"{row['rss'] / 2**20:.0f} |"
        )
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
