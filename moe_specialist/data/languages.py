"""Language codes: one place that maps FLORES-200 codes, short ISO codes and English names.

The pipeline speaks FLORES-200 codes (``eng_Latn``) internally, like FLORES+ and the NLLB/smollm task lists; users may
write the short ISO 639-1 code (``en``) anywhere a language is asked for (``--eval_directions en-fr``).
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_specialist.errors import ConfigurationError


@dataclass(frozen=True)
class Language:
    code: str  # FLORES-200 style: ISO 639-3 + "_" + ISO 15924 script
    short: str  # ISO 639-1 where it exists, used in direction names such as "en-fr"
    name: str  # English name, used in prompts


LANGUAGES: tuple[Language, ...] = (
    Language("eng_Latn", "en", "English"),
    Language("fra_Latn", "fr", "French"),
    Language("deu_Latn", "de", "German"),
    Language("spa_Latn", "es", "Spanish"),
    Language("ita_Latn", "it", "Italian"),
    Language("por_Latn", "pt", "Portuguese"),
    Language("nld_Latn", "nl", "Dutch"),
    Language("ron_Latn", "ro", "Romanian"),
    Language("pol_Latn", "pl", "Polish"),
    Language("tur_Latn", "tr", "Turkish"),
    Language("ind_Latn", "id", "Indonesian"),
    Language("vie_Latn", "vi", "Vietnamese"),
    Language("tgl_Latn", "tl", "Tagalog"),
    Language("swh_Latn", "sw", "Swahili"),
    Language("ces_Latn", "cs", "Czech"),
    Language("rus_Cyrl", "ru", "Russian"),
    Language("ukr_Cyrl", "uk", "Ukrainian"),
    Language("arb_Arab", "ar", "Arabic"),
    Language("pes_Arab", "fa", "Persian"),
    Language("hin_Deva", "hi", "Hindi"),
    Language("ben_Beng", "bn", "Bengali"),
    Language("zho_Hans", "zh", "Chinese (Simplified)"),
    Language("zho_Hant", "zh-Hant", "Chinese (Traditional)"),
    Language("jpn_Jpan", "ja", "Japanese"),
    Language("kor_Hang", "ko", "Korean"),
)

_BY_KEY: dict[str, Language] = {}
for _lang in LANGUAGES:
    for _key in (_lang.code, _lang.short, _lang.code.split("_")[0]):
        _BY_KEY.setdefault(_key.lower(), _lang)


def get_language(key: str) -> Language:
    """Resolve ``eng_Latn``, ``eng`` or ``en`` (case-insensitive) to a :class:`Language`."""
    try:
        return _BY_KEY[key.strip().lower()]
    except KeyError:
        known = ", ".join(f"{lang.short} ({lang.code})" for lang in LANGUAGES)
        raise ConfigurationError(f"Unknown language code {key!r}. Known languages: {known}.") from None


def parse_direction(direction: str) -> tuple[Language, Language]:
    """Parse ``en-fr`` or ``eng_Latn-fra_Latn`` into (source, target)."""
    # FLORES codes contain "_" but never "-"; short codes such as "zh-Hant" do, so split on the first "-" that
    # leaves two known languages.
    parts = direction.split("-")
    for cut in range(1, len(parts)):
        left, right = "-".join(parts[:cut]), "-".join(parts[cut:])
        if left.lower() in _BY_KEY and right.lower() in _BY_KEY:
            src, tgt = get_language(left), get_language(right)
            if src == tgt:
                raise ConfigurationError(f"Direction {direction!r} translates a language into itself.")
            return src, tgt
    raise ConfigurationError(
        f"Cannot parse direction {direction!r}: expected 'SRC-TGT' with known language codes, e.g. 'en-fr' or "
        f"'eng_Latn-fra_Latn'."
    )


def direction_name(src: Language, tgt: Language) -> str:
    """The group key of a direction in statistics and results: ``en-fr``."""
    return f"{src.short}-{tgt.short}"


def parse_directions(spec: str | list[str]) -> list[tuple[Language, Language]]:
    """Parse ``"en-fr,de-en"`` (or a list) into directions, keeping order and refusing duplicates."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [s.strip() for s in spec]
    items = [s for s in items if s]
    if not items:
        raise ConfigurationError("No translation direction given: pass e.g. 'en-fr,de-en'.")
    directions = [parse_direction(s) for s in items]
    names = [direction_name(*d) for d in directions]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigurationError(f"Direction(s) listed twice: {', '.join(duplicates)}.")
    return directions
