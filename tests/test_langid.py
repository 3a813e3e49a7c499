"""Off-target detection with the langid package restricted to the pipeline's languages."""

from __future__ import annotations

import langid
import pytest

from moe_specialist.data.langid import detect_language, off_target_rate

SENTENCES = {
    "eng_Latn": "The committee will publish its final report on the state of the railways next spring.",
    "fra_Latn": "Le comité publiera son rapport final sur l'état des chemins de fer au printemps prochain.",
    "deu_Latn": "Der Ausschuss wird seinen Abschlussbericht über den Zustand der Eisenbahnen im nächsten Frühjahr "
    "veröffentlichen.",
    "spa_Latn": "El comité publicará su informe final sobre el estado de los ferrocarriles la próxima primavera.",
}


@pytest.mark.parametrize("code", sorted(SENTENCES))
def test_detects_real_sentences(code):
    assert detect_language(SENTENCES[code]) == code


def test_short_chinese_is_not_taken_for_japanese():
    assert detect_language("我今天很忙。") == "zho_Hans"
    assert detect_language("今日はとても忙しいです。") == "jpn_Jpan"


def test_nothing_to_detect_without_letters():
    assert detect_language("") is None
    assert detect_language(" 1990 - 2024. ") is None


def test_off_target_rate_counts_wrong_languages_and_empty_hypotheses():
    hypotheses = [SENTENCES["fra_Latn"], SENTENCES["eng_Latn"], "", SENTENCES["fra_Latn"]]
    assert off_target_rate(hypotheses, "fr") == 0.5
    assert off_target_rate(hypotheses, "eng_Latn") == 0.75


def test_chinese_scripts_are_one_language():
    assert off_target_rate(["我們今天很忙，沒有時間。"], "zh-Hant") == 0.0


def test_the_global_langid_identifier_is_left_alone():
    danish = "Udvalget vil offentliggøre sin endelige rapport om jernbanernes tilstand næste forår."
    detect_language(danish)  # builds the identifier restricted to the pipeline's languages, which lack Danish
    assert langid.classify(danish)[0] == "da"


def test_no_hypotheses_is_an_error():
    with pytest.raises(ValueError, match="at least one hypothesis"):
        off_target_rate([], "fr")
