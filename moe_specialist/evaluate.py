"""Translation quality: batched greedy generation, chrF++ / BLEU with signatures, off-target rate, records.

:func:`evaluate_translations` is the one scorer: ``moe-specialist evaluate``, the sweep and the in-training
``translation_eval`` callback all call it. Under ``torch.distributed`` each process translates its share of the
examples and every process scores the whole corpus, so all ranks return the same result.
"""

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


def translate_shared(model, tokenizer, examples: list[ParallelExample], **kwargs) -> list[str]:
    """Translations of ``examples``, in order, each process translating its share (one process: all of them).

    Every process calls ``generate`` equally often (the shares are padded by repeating an index, which keying by
    index then drops), as ZeRO-3 requires when parameters are gathered per forward pass.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    if state.num_processes == 1:
        return translate(model, tokenizer, examples, **kwargs)
    with state.split_between_processes(list(range(len(examples))), apply_padding=True) as shard:
        kwargs["progress"] = kwargs.get("progress", False) and state.is_main_process
        pairs = list(zip(shard, translate(model, tokenizer, [examples[i] for i in shard], **kwargs), strict=True))
    by_index = dict(gather_object(pairs))
    return [by_index[i] for i in range(len(examples))]


def evaluate_translations(
    model,
    tokenizer,
    examples: dict[str, list[ParallelExample]],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 256,
    no_repeat_ngram_size: int = 0,
    progress: bool = True,
    synced_gpus: bool = False,
) -> dict:
    """Translate every direction's examples and score them; the dict is what ``scores.json`` holds.

    ``synced_gpus``: every rank keeps stepping until all ranks are done, as generation with ZeRO-3 partitioned
    weights needs (each forward gathers one module at a time, collectively).
    """
    if not examples or not all(examples.values()):
        raise ConfigurationError("Nothing to evaluate: every direction needs at least one example.")
    start = time.time()
    directions = {}
    for name, items in examples.items():
        hypotheses = translate_shared(
            model,
            tokenizer,
            items,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            no_repeat_ngram_size=no_repeat_ngram_size,
            progress=progress,
            desc=f"translate {name}",
            synced_gpus=synced_gpus,
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
