"""Seconds per recovery step on the demo (75% pruned, batch 16), per recovery mode, against TRL's own SFTTrainer loss.

    OMP_NUM_THREADS=2 python benchmarks/recovery_step_time.py --plan outputs/rb/plans/r0.75.json

Each mode trains ``--steps`` steps of ``recipes/demo/en-fr/prune_sft.yaml`` (no evaluation, no checkpoint) with the
given plan; the first ``--warmup`` steps are not timed. Run it alone: two CPU-heavy jobs at once distort it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

from moe_specialist.training import pipeline
from moe_specialist.training.pipeline import parse_recipe, run

MODES = {
    "sft (TRL's SFTTrainer loss)": ["--recovery", "sft"],
    "sft": ["--recovery", "sft"],
    "kd (live teacher)": ["--recovery", "kd"],
    "kd+ce (live teacher)": ["--recovery", "kd+ce"],
    "kd (precomputed top-32)": ["--recovery", "kd", "--teacher_logits", "{tmp}/teacher"],
    "router_kd": ["--recovery", "router_kd"],
}


class StepClock(TrainerCallback):
    """Wall time of the steps after the warm-up ones."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.steps = warmup, None, 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.start = time.perf_counter()
        elif state.global_step > self.warmup:
            self.steps += 1

    def seconds_per_step(self) -> float:
        return (time.perf_counter() - self.start) / self.steps


def time_mode(name: str, flags: list[str], plan: str, steps: int, warmup: int, tmp: str) -> float:
    clock = StepClock(warmup)
    args = parse_recipe(
        ["--config", "recipes/demo/en-fr/prune_sft.yaml", "--prune_plan", plan, "--max_steps", str(steps),
         "--report_to", "none", "--output_dir", f"{tmp}/{len(name)}-{time.time_ns()}", "--eval_strategy", "no",
         "--save_strategy", "no", "--callbacks", "expert_pruning", *[f.format(tmp=tmp) for f in flags]]
    )  # fmt: skip
    original = pipeline.RecoveryTrainer

    def trainer(*a, callbacks=None, teacher_snapshot=None, teacher_name=None, **k):
        if name.startswith("sft (TRL"):
            from trl import SFTTrainer

            return SFTTrainer(*a, callbacks=[*callbacks, clock], **k)
        return original(*a, callbacks=[*callbacks, clock], teacher_snapshot=teacher_snapshot,
                        teacher_name=teacher_name, **k)  # fmt: skip

    pipeline.RecoveryTrainer = trainer
    try:
        run(*args)
    finally:
        pipeline.RecoveryTrainer = original
    return clock.seconds_per_step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", required=True, help="A prune_plan.json of the demo (e.g. from recovery_budget.py).")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--output", default=None, help="Also write the timings to this JSON file.")
    args = parser.parse_args()
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in MODES.items():
            timings[name] = round(time_mode(name, flags, args.plan, args.steps, args.warmup, tmp), 3)
            print(f"{name}: {timings[name]:.3f} s/step", flush=True)
        table = sum(f.stat().st_size for f in Path(tmp, "teacher").glob("*"))
        timings["precomputed table MB"] = round(table / 1e6, 1)
        print(f"precomputed top-32 teacher logits: {table / 1e6:.1f} MB", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(timings, indent=2) + "\n")


if __name__ == "__main__":
    main()
