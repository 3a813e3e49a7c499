"""sacreBLEU scores with their signatures. References are passed as a list of streams (``refs[k][i]``)."""

from __future__ import annotations

import functools
import logging

from sacrebleu.metrics import BLEU, CHRF

from moe_specialist.data.example import ParallelExample
from moe_specialist.errors import ConfigurationError

logger = logging.getLogger(__name__)


@functools.cache
def bleu_metric(target_language: str) -> BLEU:
    """sacreBLEU's BLEU for a target language (zh / ja-mecab / ko-mecab tokenizers for zh, ja, ko).

    The MeCab tokenizers need ``pip install "sacrebleu[ja,ko]"`` (the ``cjk`` extra of this package); without them
    BLEU falls back to character tokenization, which the signature records as ``tok:char``.
    """
    language = target_language.split("-")[0]
    try:
        return BLEU(trg_lang=language)
    except RuntimeError as error:
        logger.warning("BLEU for %s uses tok:char: %s", language, str(error).strip().splitlines()[0])
        return BLEU(tokenize="char")


def reference_streams(examples: list[ParallelExample]) -> list[list[str | None]]:
    """Transpose per-example references into sacreBLEU streams; missing references are ``None`` (nrefs:var)."""
    n = max(len(ex.references) for ex in examples)
    return [[ex.references[k] if k < len(ex.references) else None for ex in examples] for k in range(n)]


def score_translations(hypotheses: list[str], examples: list[ParallelExample]) -> dict:
    """Corpus chrF++ and BLEU of ``hypotheses`` against every reference of ``examples``."""
    if len(hypotheses) != len(examples):
        raise ConfigurationError(f"{len(hypotheses)} hypotheses for {len(examples)} examples.")
    if not examples:
        raise ConfigurationError("No examples to score.")
    refs = reference_streams(examples)
    chrf = CHRF(word_order=2)
    bleu = bleu_metric(examples[0].tgt.short)
    chrf_score = chrf.corpus_score(hypotheses, refs)
    bleu_score = bleu.corpus_score(hypotheses, refs)
    return {
        "chrf++": round(chrf_score.score, 2),
        "bleu": round(bleu_score.score, 2),
        "chrf++_signature": str(chrf.get_signature()),
        "bleu_signature": str(bleu.get_signature()),
        "num_segments": len(examples),
    }
