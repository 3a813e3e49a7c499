"""Translation quality: batched greedy generation, chrF++ / BLEU with signatures, off-target rate, records."""

from __future__ import annotations

import time

from moe_specialist.data.example import ParallelExample
from moe_specialist.data.langid import off_target_rate
from moe_specialist.errors import ConfigurationError
from moe_specialist.generation import translate
from moe_specialist.metrics import score_translations


def score_direction(hypotheses: list[str], examples: list[ParallelExample]) -> dict:
    """Scores of one direction plus its per-sentence records (id, source, references, hypothesis)."""
    scores = score_translations(hypotheses, examples)
    scores["off_target_rate"] = round(off_target_rate(hypotheses, examples[0].tgt_lang), 4)
    scores["records"] = [
        {"id": ex.id, "source": ex.source, "references": list(ex.references), "hypothesis": hyp}
        for ex, hyp in zip(examples, hypotheses, strict=True)
    ]
    return scores


def average_scores(directions: dict[str, dict]) -> dict:
    keys = ("chrf++", "bleu", "off_target_rate")
    return {k: round(sum(d[k] for d in directions.values()) / len(directions), 4) for k in keys}


def evaluate_translations(
    model,
    tokenizer,
    examples: dict[str, list[ParallelExample]],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 256,
    no_repeat_ngram_size: int = 0,
    progress: bool = True,
) -> dict:
    """Translate every direction's examples and score them; the dict is what ``scores.json`` holds."""
    if not examples or not all(examples.values()):
        raise ConfigurationError("Nothing to evaluate: every direction needs at least one example.")
    start = time.time()
    directions = {}
    for name, items in examples.items():
        hypotheses = translate(
            model,
            tokenizer,
            items,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            no_repeat_ngram_size=no_repeat_ngram_size,
            progress=progress,
            desc=f"translate {name}",
        )
        directions[name] = score_direction(hypotheses, items)
    return {
        "decoding": {
            "strategy": "greedy",
            "max_new_tokens": max_new_tokens,
            "no_repeat_ngram_size": no_repeat_ngram_size,
            "batch_size": batch_size,
        },
        "average": average_scores(directions),
        "directions": directions,
        "seconds": round(time.time() - start, 1),
    }


def summary_line(result: dict) -> str:
    parts = [f"{name}: chrF++ {d['chrf++']:.1f} BLEU {d['bleu']:.1f}" for name, d in result["directions"].items()]
    return " | ".join(parts) + f" | avg chrF++ {result['average']['chrf++']:.2f}"
