"""Does re-fitting the kept experts (:func:`moe_specialist.compensation.prune_and_refit`) beat plain removal on dev?

Replays the plans of a prune-only dev sweep (``points/r{ratio}-{criterion}-{allocation}/prune_plan.json``, e.g.
``outputs/search-dev``), prunes the demo generalist (fp32) with each, re-fits the kept experts on the calibration
sample the sweep measures layer costs on (64 en-fr training sequences, recipes/demo/en-fr/sweep.yaml), scored per
step on the 64 held-out calibration sequences, and translates 200 dev verses en->fr as the sweep does (greedy, 160
new tokens). Plain removal is the sweep point's own ``result.json`` (the same model, plan and decoding).

    OMP_NUM_THREADS=1 python -m benchmarks.compensation_dev --sweep_dir outputs/search-dev \
        --output_dir outputs/compensation-dev --learning_rate 3e-3 --steps 200

Writes ``rows.json`` (one row per plan and setting: plain and re-fit scores, the re-fit trace) and ``results.md``;
a rerun skips finished rows. Dev only: the evaluation split is fixed to dev.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from moe_specialist.compensation import prune_and_refit
from moe_specialist.configs import CalibrationArguments, EvalDataArguments
from moe_specialist.evaluate import evaluate_translations
from moe_specialist.io import atomic_write_json, atomic_write_text
from moe_specialist.models import load_model_and_tokenizer
from moe_specialist.plan import PLAN_FILE, PrunePlan
from moe_specialist.sensitivity import calibration_sample

# recipes/demo/en-fr/sweep.yaml: calibration, sensitivity_examples and decoding
CALIBRATION = CalibrationArguments(
    calibration_dataset="bible",
    calibration_directions=["en-fr"],
    calibration_split="train",
    calibration_examples=256,
    calibration_batch_size=16,
    calibration_max_length=256,
)
FIT_SEQUENCES = 64
DEV = EvalDataArguments(
    eval_dataset_name="bible", eval_directions=["en-fr"], eval_split="dev", max_eval_examples=200
).eval_selection
DECODING = {"batch_size": 50, "max_new_tokens": 160}
UNPRUNED_POINT = "r0.000-gate_mass-sensitivity"


def summary(scores: dict) -> dict:
    return {k: scores["average"][k] for k in ("chrf++", "off_target_rate")}


def run_row(base, tokenizer, batches, held_out, examples, point: Path, settings: dict) -> dict:
    model = copy.deepcopy(base)
    plan = PrunePlan.load(point / PLAN_FILE)
    _, trace = prune_and_refit(model, plan, batches=batches, held_out=held_out, **settings)
    plain = json.loads((point / "result.json").read_text())
    scores = evaluate_translations(model, tokenizer, examples, progress=False, **DECODING)
    return {
        "point": point.name,
        "settings": settings,
        "experts_per_layer": plain["experts_per_layer"],
        "plain": summary(plain),
        "refit": summary(scores),
        "refit_seconds": trace["seconds"],
        "accepted_layers": [layer["layer"] for layer in trace["layers"] if layer["accepted"]],
        "trace": trace,
    }


def table(rows: list[dict], unpruned: float) -> str:
    lines = [
        f"Unpruned dev chrF++ {unpruned:.2f}; share of it in brackets; off-target rate after the slash.",
        "",
        "| point | experts per layer | settings | plain removal | + expert re-fit | re-fit s | layers re-fitted |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        cells = []
        for key in ("plain", "refit"):
            s = row[key]
            cells.append(f"{s['chrf++']:.2f} ({s['chrf++'] / unpruned:.0%}) / {s['off_target_rate']:.1%}")
        knobs = ", ".join(f"{k}={v}" for k, v in row["settings"].items())
        lines.append(
            f"| {row['point']} | {row['experts_per_layer']} | {knobs} | {cells[0]} | {cells[1]} | "
            f"{row['refit_seconds']:.0f} | {row['accepted_layers']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep_dir", type=Path, default=Path("outputs/search-dev"))
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/compensation-dev"))
    parser.add_argument("--ratios", nargs="+", default=["0.500", "0.625", "0.750", "0.875"])
    parser.add_argument("--methods", nargs="+", default=["gate_mass-sensitivity", "gate_mass-search"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--proximal", type=float, default=0.0)
    args = parser.parse_args()
    settings = {"steps": args.steps, "learning_rate": args.learning_rate, "proximal": args.proximal}
    base, tokenizer = load_model_and_tokenizer("demo", "float32")
    batches = calibration_sample(tokenizer, CALIBRATION, FIT_SEQUENCES)
    held_out = calibration_sample(tokenizer, CALIBRATION, FIT_SEQUENCES, held_out=True)
    examples = DEV.load()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    rows_file = args.output_dir / "rows.json"
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else []
    unpruned = json.loads((args.sweep_dir / "points" / UNPRUNED_POINT / "result.json").read_text())
    for ratio in args.ratios:
        for method in args.methods:
            point = args.sweep_dir / "points" / f"r{ratio}-{method}"
            if any(row["point"] == point.name and row["settings"] == settings for row in rows):
                continue
            rows.append(run_row(base, tokenizer, batches, held_out, examples, point, settings))
            atomic_write_json(rows, rows_file)
            atomic_write_text(table(rows, unpruned["average"]["chrf++"]), args.output_dir / "results.md")
            print(table(rows[-1:], unpruned["average"]["chrf++"]).splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
