"""Recovery at equal step budgets on the demo: SFT vs KD vs KD+CE vs router-only KD vs progressive pruning.

Every run prunes the demo generalist with the same sensitivity plan per ratio (computed by the first run, then
replayed), trains ``--steps`` steps of ``recipes/demo/en-fr/prune_sft.yaml`` with the variant's recovery, and is
scored on dev (100 verses: what chooses) and on test (200 verses, the decoding of ``make demo``: what is reported).

    OMP_NUM_THREADS=2 python benchmarks/recovery_budget.py --output_dir outputs/recovery-budget \
        --ratios 0.75 0.875 --steps 50 100 200 --variants sft kd kd+ce router_kd progressive

Writes ``runs.json`` (one row per run: scores, signatures, off-target rates, wall time), ``results.md`` and
``chrf_vs_steps.png``; a rerun skips finished runs (delete a run's directory to redo it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from moe_specialist.configs import EvalDataArguments
from moe_specialist.evaluate import evaluate_translations
from moe_specialist.io import atomic_write_json, atomic_write_text
from moe_specialist.models import load_from_arguments
from moe_specialist.plan import PLAN_FILE
from moe_specialist.prune import load_pruned_model
from moe_specialist.training.pipeline import parse_recipe, run

RECIPE = "recipes/demo/en-fr/prune_sft.yaml"
# What a variant changes in the recipe (progressive: prune 50% -> 62.5% -> the ratio, the steps split evenly).
VARIANTS = {
    "sft": ["--recovery", "sft"],
    "kd": ["--recovery", "kd"],
    "kd+ce": ["--recovery", "kd+ce"],
    "router_kd": ["--recovery", "router_kd"],
    "progressive": ["--recovery", "kd+ce", "--progressive_ratios", "0.5", "0.625"],
}
TEST = {"eval_split": "test", "max_eval_examples": 200}
TEST_DECODING = {"batch_size": 50, "max_new_tokens": 160}


def test_scores(model, tokenizer, data_args) -> dict:
    """chrF++ / BLEU / off-target on the test split, decoded as ``make demo`` decodes."""
    selection = replace(EvalDataArguments(), **{**vars_of(data_args), **TEST}).eval_selection
    return evaluate_translations(model, tokenizer, selection.load(), progress=False, **TEST_DECODING)


def vars_of(data_args) -> dict:
    return {k: getattr(data_args, k) for k in EvalDataArguments.__dataclass_fields__}


def summary(scores: dict) -> dict:
    (direction,) = scores["directions"].values()
    keys = ("chrf++", "bleu", "off_target_rate", "chrf++_signature", "bleu_signature")
    return {k: direction[k] for k in keys if k in direction}


def run_one(out: Path, ratio: float, variant: str, steps: int, plan: Path, stats: Path, extra: list[str]) -> dict:
    run_dir = out / f"r{ratio}" / variant / f"s{steps}"
    done = run_dir / "row.json"
    if done.is_file():
        return json.loads(done.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)
    flags = ["--config", RECIPE, "--pruning_ratio", str(ratio), "--max_steps", str(steps), "--report_to", "none",
             "--output_dir", str(run_dir), "--statistics_file", str(stats), "--eval_strategy", "no",
             "--save_strategy", "no", "--callbacks", "expert_pruning", "translation_eval", "--mt_eval_on_start",
             "false", *VARIANTS[variant], *extra]  # fmt: skip
    if plan.is_file() and variant != "progressive":
        flags += ["--prune_plan", str(plan)]
    model_args, data_args, calibration_args, pruning_args, training_args = parse_recipe(flags)
    start = time.time()
    if variant == "progressive":
        from moe_specialist.training.progressive import run_progressive

        results = run_progressive(model_args, data_args, calibration_args, pruning_args, training_args)
    else:
        results = run(model_args, data_args, calibration_args, pruning_args, training_args)
    seconds = time.time() - start
    if not plan.is_file() and variant != "progressive":
        plan.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(run_dir / PLAN_FILE, plan)
    model_dir = Path(results["model_dir"])
    model = load_pruned_model(model_dir, dtype=torch.float32)
    _, tokenizer = load_from_arguments(model_args, False)
    row = {
        "ratio": ratio,
        "variant": variant,
        "steps": steps,
        "dev": summary(results["scores"]["end"]),
        "test": summary(test_scores(model, tokenizer, data_args)),
        "train_seconds": results["timings"].get("train"),
        "wall_seconds": round(seconds, 1),
        "results": str(run_dir),
    }
    atomic_write_json(row, done)
    return row


def baseline(out: Path) -> dict:
    """The unpruned generalist on dev and test (the 100% of the shares)."""
    done = out / "unpruned.json"
    if done.is_file():
        return json.loads(done.read_text())
    model_args, data_args, *_ = parse_recipe(["--config", RECIPE, "--output_dir", str(out / "unused")])
    model, tokenizer = load_from_arguments(model_args, False)
    dev = evaluate_translations(
        model, tokenizer, data_args.eval_selection.load(), progress=False, batch_size=32, max_new_tokens=128
    )
    row = {"dev": summary(dev), "test": summary(test_scores(model, tokenizer, data_args))}
    atomic_write_json(row, done)
    return row


def table(rows: list[dict], unpruned: dict, split: str) -> str:
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    lines = [f"| pruned | steps | {' | '.join(variants)} |", "|---|---|" + "---|" * len(variants)]
    base = unpruned[split]["chrf++"]
    for ratio in sorted({r["ratio"] for r in rows}):
        for steps in sorted({r["steps"] for r in rows}):
            cells = []
            for v in variants:
                match = [r for r in rows if (r["ratio"], r["steps"], r["variant"]) == (ratio, steps, v)]
                score = match[0][split]["chrf++"] if match else None
                cells.append(f"{score:.2f} ({score / base:.0%})" if score is not None else "")
            lines.append(f"| {ratio} | {steps} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(rows: list[dict], unpruned: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["ratio"] for r in rows})
    fig, axes = plt.subplots(1, len(ratios), figsize=(5.5 * len(ratios), 4), sharey=True, squeeze=False)
    for ax, ratio in zip(axes[0], ratios, strict=True):
        for variant in VARIANTS:
            points = sorted(
                (r["steps"], r["test"]["chrf++"]) for r in rows if (r["ratio"], r["variant"]) == (ratio, variant)
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=variant)
        ax.axhline(unpruned["test"]["chrf++"], color="grey", linestyle="--", label="unpruned")
        ax.set_title(f"{ratio:.1%} of experts removed")
        ax.set_xlabel("recovery steps (batch 16)")
    axes[0][0].set_ylabel("chrF++ (test, 200 en->fr verses)")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="outputs/recovery-budget")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.875])
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--pruning_allocation",
        default="sensitivity",
        help="The plans' allocation (the README table used sensitivity, the recipe's default before search).",
    )
    parser.add_argument(
        "--compensation",
        default="none",
        help="The compensation after pruning (the README table used none, the recipe's default before refit).",
    )
    parser.add_argument("--recipe_flags", nargs="*", default=[], help="More recipe flags for every run.")
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    unpruned = baseline(out)
    rows = []
    for ratio in args.ratios:
        for steps in args.steps:
            for variant in args.variants:
                plan, stats = out / "plans" / f"r{ratio}.json", out / "stats.safetensors"
                flags = [
                    "--pruning_allocation", args.pruning_allocation, "--compensation", args.compensation,
                    *args.recipe_flags,
                ]  # fmt: skip
                row = run_one(out, ratio, variant, steps, plan, stats, flags)
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("ratio", "variant", "steps", "wall_seconds")} | {
                    "dev": row["dev"]["chrf++"], "test": row["test"]["chrf++"]}), flush=True)  # fmt: skip
    report = [
        f"Unpruned: dev {unpruned['dev']['chrf++']:.2f}, test {unpruned['test']['chrf++']:.2f} chrF++.",
        "",
        "dev (100 verses, choosing):",
        "",
        table(rows, unpruned, "dev"),
        "",
        "test (200 verses, reporting):",
        "",
        table(rows, unpruned, "test"),
    ]
    atomic_write_text("\n".join(report) + "\n", out / "results.md")
    atomic_write_json(rows, out / "runs.json")
    plot(rows, unpruned, out / "chrf_vs_steps.png")
    print("\n".join(report))


if __name__ == "__main__":
    main()
