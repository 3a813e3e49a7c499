"""Off-target detection: is a translation in the language it was asked for?

Uses the ``langid`` package restricted to the pipeline's languages (a guess among 25 languages goes wrong less often
than among 97) through a private identifier, so the package's global one is left as it was. langid does not tell
Chinese scripts apart, so "off-target" means the wrong language, not the wrong script.
"""

from __future__ import annotations

import functools
import re

from langid.langid import LanguageIdentifier, model

from moe_specialist.data.languages import LANGUAGES, Language, get_language
from moe_specialist.errors import ConfigurationError

# langid speaks ISO 639-1; the first of our languages with a code wins (Simplified Chinese for "zh").
_CODE_BY_LANGID: dict[str, str] = {}
for _lang in LANGUAGES:
    _CODE_BY_LANGID.setdefault(_lang.short.split("-")[0], _lang.code)
# langid takes short Chinese sentences for Japanese, which almost always has kana.
_KANA = re.compile(r"[\u3040-\u30ff]")


@functools.cache
def _identifier() -> LanguageIdentifier:
    """Built on first use (about a second), once per process."""
    identifier = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    identifier.set_languages(sorted(_CODE_BY_LANGID))
    return identifier


def detect_language(text: str) -> str | None:
    """The FLORES-200 code of the language ``text`` is in, or None when it has no letters to judge by."""
    if not any(ch.isalpha() for ch in text):
        return None
    code, _ = _identifier().classify(text)
    if code == "ja" and not _KANA.search(text):
        code = "zh"
    return _CODE_BY_LANGID[code]


def _same_language(code: str | None, target: Language) -> bool:
    return code is not None and code.split("_")[0] == target.code.split("_")[0]


def off_target_rate(hypotheses: list[str], tgt_lang: str | Language) -> float:
    """Share of hypotheses not in ``tgt_lang``; an empty one (or one without letters) counts as off-target."""
    if not hypotheses:
        raise ConfigurationError("off_target_rate needs at least one hypothesis.")
    target = tgt_lang if isinstance(tgt_lang, Language) else get_language(tgt_lang)
    off = sum(not _same_language(detect_language(h), target) for h in hypotheses)
    return off / len(hypotheses)
