"""sacreBLEU scores with their signatures. References are passed as a list of streams (``refs[k][i]``)."""

from __future__ import annotations

from sacrebleu.metrics import BLEU, CHRF

from moe_specialist.data.example import ParallelExample


def reference_streams(examples: list[ParallelExample]) -> list[list[str | None]]:
    """Transpose per-example references into sacreBLEU streams; missing references are ``None`` (nrefs:var)."""
    n = max(len(ex.references) for ex in examples)
    return [[ex.references[k] if k < len(ex.references) else None for ex in examples] for k in range(n)]


def score_translations(hypotheses: list[str], examples: list[ParallelExample]) -> dict:
    """Corpus chrF++ and BLEU of ``hypotheses`` against every reference of ``examples``."""
    if len(hypotheses) != len(examples):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(examples)} examples.")
    if not examples:
        raise ValueError("No examples to score.")
    refs = reference_streams(examples)
    chrf = CHRF(word_order=2)
    bleu = BLEU(trg_lang=examples[0].tgt.short)
    chrf_score = chrf.corpus_score(hypotheses, refs)
    bleu_score = bleu.corpus_score(hypotheses, refs)
    return {
        "chrf++": round(chrf_score.score, 2),
        "bleu": round(bleu_score.score, 2),
        "chrf++_signature": str(chrf.get_signature()),
        "bleu_signature": str(bleu.get_signature()),
        "num_segments": len(examples),
    }
