"""The per-rank memory of the real recipes, estimated by :mod:`moe_specialist.memory` from the models' config.json.

    python -m benchmarks.memory_table [--output docs/memory-estimates.md]

Every ``recipes/<model>/en-de/prune_sft.yaml`` is parsed as ``moe_specialist.train`` parses it; its model is built on
the meta device from the published config.json (no download) and estimated at pruning ratios 0, 0.5 and 0.75, with
both load modes, on 8 processes under ``accelerate_configs/zero3.yaml``, on the recipe's own accelerate config when
it is another, and on one GPU (one process, no DeepSpeed). Prints the Markdown and writes it to ``--output``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from transformers import AutoConfig
from trl import get_peft_config

from moe_specialist.memory import GIB, PRUNE_MODES, estimate_for_run
from moe_specialist.training import parse_recipe
from tests.real_layouts import GPT_OSS_20B, OLMOE_1B_7B_0924, QWEN3_30B_A3B

ROOT = Path(__file__).resolve().parents[1]
RATIOS = (0.0, 0.5, 0.75)
PHASES = ("measure", "prune", "load", "train", "eval")
GPU_BYTES = 81559 * 1024**2  # an H100 80GB as nvidia-smi reports it
# allenai/OLMoE-1B-7B-0125-Instruct's config.json, written from knowledge (not fetched here): the architecture of
# OLMoE-1B-7B-0924 (tests/real_layouts.py) with the OLMo 2 tokenizer (100352 entries, its eos and pad ids).
OLMOE_1B_7B_0125_INSTRUCT = {**OLMOE_1B_7B_0924, "eos_token_id": 100257, "pad_token_id": 100277, "vocab_size": 100352}
RECIPES = {
    "qwen3-30b-a3b": (QWEN3_30B_A3B, "zero3"),
    "gpt-oss-20b": (GPT_OSS_20B, "zero3"),
    "olmoe-1b-7b": (OLMOE_1B_7B_0125_INSTRUCT, "zero2"),
}
SETUPS = {"zero3": (8, 3), "zero2": (8, 2), "1 GPU": (1, None)}


def recipe_estimates(name: str, config_fields: dict, own_setup: str, workdir: Path):
    """(setup, ratio, load mode, estimate) for one recipe."""
    recipe = ROOT / "recipes" / name / "en-de" / "prune_sft.yaml"
    model_args, _, calibration_args, _, training_args = parse_recipe(
        ["--config", str(recipe), "--output_dir", str(workdir / name)]
    )
    config = AutoConfig.for_model(**config_fields)
    setups = dict.fromkeys(["zero3", own_setup, "1 GPU"])
    for setup in setups:
        processes, stage = SETUPS[setup]
        for ratio in RATIOS:
            for prune_mode in PRUNE_MODES:
                estimate = estimate_for_run(
                    config, ratio, training_args, processes, prune_mode,
                    zero_stage=stage, peft_config=get_peft_config(model_args), calibration_args=calibration_args,
                    attn_implementation=model_args.attn_implementation,
                )  # fmt: skip
                yield setup, ratio, prune_mode, estimate


def cell(host: int, gpu: int) -> str:
    return f"{host / GIB:.1f} / {gpu / GIB:.1f}"


def markdown(rows: dict[str, list]) -> str:
    out = [
        "# Memory per rank: estimates for the real recipes",
        "",
        "Made by `python -m benchmarks.memory_table` (writes this file) with `moe_specialist.memory`: host / GPU GiB "
        "per rank, from each model's config.json built on the meta device (exact parameter counts) and each "
        "`recipes/<model>/en-de/prune_sft.yaml` as parsed (full fine-tune, precomputed top-32 teacher logits, "
        "gradient checkpointing, per-device batch x 512 tokens, generation batch 16 x (512 + 256) tokens). `zero3` "
        "is 8 processes under `accelerate_configs/zero3.yaml`, `zero2` 8 under `zero2.yaml`, `1 GPU` one process "
        "without DeepSpeed. Fits: peak GPU within an H100 80GB (79.6 GiB); host memory is not judged (nodes differ). "
        "`prune_mode: memory`: every rank loads the unpruned model in host memory and prunes it; `prune_mode: "
        "disk` (the recipes' setting): measure on the GPU, prune on disk on rank 0, load only the pruned model, "
        "partitioned at load under ZeRO-3. Both generate on partitioned weights under ZeRO-3 (before this release "
        "the eval gathered the whole model on every GPU: 124.3 GiB per GPU for Qwen3-30B-A3B unpruned). The "
        "assumptions behind every number are in the docstring of "
        "`moe_specialist/memory.py`. OLMoE's config.json is written from knowledge of "
        "allenai/OLMoE-1B-7B-0125-Instruct (see `benchmarks/memory_table.py`), the others are the published files "
        "(`tests/test_real_models.py`).",
        "",
        "## Peak per rank",
        "",
        "| recipe | setup | ratio | parameters | memory host / GPU | fits | disk host / GPU | fits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, items in rows.items():
        by_key = {(setup, ratio, mode): e for setup, ratio, mode, e in items}
        for setup, ratio in dict.fromkeys((s, r) for s, r, _, _ in items):
            today, new = by_key[setup, ratio, "memory"], by_key[setup, ratio, "disk"]
            out.append(
                f"| {name} | {setup} | {ratio:g} | {today.after.total / 1e9:.2f}B | "
                f"{cell(today.peak_host_bytes, today.peak_gpu_bytes)} | {fits(today)} | "
                f"{cell(new.peak_host_bytes, new.peak_gpu_bytes)} | {fits(new)} |"
            )
    out += [
        "",
        "## Per phase (host / GPU GiB per rank)",
        "",
        "Phases in the order each load mode runs them: `memory` load (unpruned, host), measure, prune (in "
        "memory), train, eval; `disk` measure, prune (on disk, rank 0's host), load (pruned), train, eval.",
        "",
        f"| recipe | setup | ratio | load mode | {' | '.join(PHASES)} | peak |",
        f"|---|---|---|---|{'---|' * len(PHASES)}---|",
    ]
    for name, items in rows.items():
        for setup, ratio, mode, estimate in items:
            phases = {p.name: cell(p.host_bytes, p.gpu_bytes) for p in estimate.phases}
            out.append(
                f"| {name} | {setup} | {ratio:g} | {mode} | "
                f"{' | '.join(phases.get(p, '-') for p in PHASES)} | "
                f"{cell(estimate.peak_host_bytes, estimate.peak_gpu_bytes)} |"
            )
    return "\n".join(out) + "\n"


def fits(estimate) -> str:
    return "yes" if estimate.peak_gpu_bytes <= GPU_BYTES else "no"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "memory-estimates.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        rows = {
            name: list(recipe_estimates(name, fields, setup, Path(workdir)))
            for name, (fields, setup) in RECIPES.items()
        }
    text = markdown(rows)
    print(text)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
