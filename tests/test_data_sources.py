"""Data sources (FLORES+, WMT24++, local files), the load_examples entry point, and prompt formatting."""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import GatedRepoError, HTTPError
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from moe_specialist.data import hub
from moe_specialist.data.example import ParallelExample
from moe_specialist.data.files import read_parallel_file
from moe_specialist.data.languages import get_language
from moe_specialist.data.prompts import format_prompt, sft_record
from moe_specialist.data.sources import (
    DataSelection,
    check_data_access,
    check_trainable,
    load_examples,
    selections_overlap,
)
from moe_specialist.errors import ConfigurationError, MissingInputError

FIXTURES = Path(__file__).parent / "fixtures" / "files"
EN, FR, DE, ZH = (get_language(c) for c in ("en", "fr", "de", "zh"))


# --- FLORES+ ---------------------------------------------------------------------------------------------------------


def flores_rows(config: str, texts: dict[int, str]) -> datasets.Dataset:
    """Rows with the schema of openlanguagedata/flores_plus (one config per language)."""
    iso_639_3, iso_15924 = config.split("_")
    return datasets.Dataset.from_list(
        [
            {
                "id": i,
                "iso_639_3": iso_639_3,
                "iso_15924": iso_15924,
                "glottocode": "stan1293",
                "text": text,
                "url": "https://en.wikinews.org/wiki/Example",
                "domain": "wikinews",
                "topic": "science",
                "has_image": False,
                "has_hyperlink": False,
                "last_updated": "1.0",
            }
            for i, text in texts.items()
        ]
    )


ENGLISH = {1: "One sentence.", 2: "Two sentences.", 3: "Three sentences."}
FRENCH = {3: "Trois phrases.", 1: "Une phrase.", 2: "Deux phrases."}  # another row order: pairing goes by id


def test_flores_plus_pairs_rows_on_id():
    examples = hub.flores_plus_examples(
        flores_rows("eng_Latn", ENGLISH), flores_rows("fra_Latn", FRENCH), EN, FR, "devtest"
    )
    assert [(ex.id, ex.source, ex.references) for ex in examples] == [
        ("flores_plus/devtest/1", "One sentence.", ("Une phrase.",)),
        ("flores_plus/devtest/2", "Two sentences.", ("Deux phrases.",)),
        ("flores_plus/devtest/3", "Three sentences.", ("Trois phrases.",)),
    ]
    assert {ex.direction for ex in examples} == {"en-fr"}


def test_flores_plus_names_chinese_by_its_flores_plus_config():
    assert hub.flores_plus_config(ZH) == "cmn_Hans"
    examples = hub.flores_plus_examples(
        flores_rows("eng_Latn", {1: "Hello."}), flores_rows("cmn_Hans", {1: "你好。"}), EN, ZH, "dev"
    )
    assert examples[0].tgt_lang == "zho_Hans"


def test_flores_plus_refuses_misaligned_ids():
    with pytest.raises(ValueError, match=r"do not align on id \(only in eng_Latn: \[3\], only in fra_Latn: \[4\]\)"):
        hub.flores_plus_examples(
            flores_rows("eng_Latn", ENGLISH),
            flores_rows("fra_Latn", {1: "Une.", 2: "Deux.", 4: "Quatre."}),
            EN,
            FR,
            "dev",
        )


def test_flores_plus_refuses_rows_of_another_language():
    with pytest.raises(ValueError, match="is in fra_Latn, expected deu_Latn"):
        hub.flores_plus_examples(flores_rows("eng_Latn", ENGLISH), flores_rows("fra_Latn", FRENCH), EN, DE, "dev")


def test_load_examples_fetches_both_flores_plus_configs(monkeypatch):
    calls = []

    def fake_load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return flores_rows(config, ENGLISH if config == "eng_Latn" else FRENCH)

    monkeypatch.setattr(hub.datasets, "load_dataset", fake_load_dataset)
    result = load_examples("flores_plus", "en-fr,fr-en", "test", limit=2, seed=1)
    assert calls[:2] == [(hub.FLORES_PLUS_REPO, "eng_Latn", "devtest"), (hub.FLORES_PLUS_REPO, "fra_Latn", "devtest")]
    assert list(result) == ["en-fr", "fr-en"]
    assert [len(v) for v in result.values()] == [2, 2]
    assert result["fr-en"][0].references[0] in ENGLISH.values()
    # The same seed picks the same sentences; the original order is kept.
    assert result == load_examples("flores_plus", "en-fr,fr-en", "devtest", limit=2, seed=1)
    ids = [int(ex.id.rsplit("/", 1)[1]) for ex in result["en-fr"]]
    assert ids == sorted(ids)


# --- WMT24++ ---------------------------------------------------------------------------------------------------------


def wmt_row(segment_id: int, domain: str, source: str, target: str, bad: bool = False) -> dict:
    return {
        "lp": "en-de_DE",
        "domain": domain,
        "document_id": f"doc-{domain}",
        "segment_id": segment_id,
        "is_bad_source": bad,
        "source": source,
        "target": target,
        "original_target": target + " (pre-edit)",
    }


WMT_ROWS = datasets.Dataset.from_list(
    [
        wmt_row(0, "canary", "canary GUID 1234", "canary GUID 1234"),
        wmt_row(1, "news", "The minister resigned.", "Der Minister trat zurück."),
        wmt_row(2, "news", "@@@ garbled", "@@@ unleserlich", bad=True),
        wmt_row(3, "social", "lol same", "lol, genau"),
    ]
)


def test_wmt24pp_drops_bad_sources_and_keeps_the_domain():
    examples = hub.wmt24pp_examples(WMT_ROWS, EN, DE)
    assert [ex.id for ex in examples] == ["wmt24pp/en-de_DE/news/1", "wmt24pp/en-de_DE/social/3"]
    assert examples[0].references == ("Der Minister trat zurück.",)


def test_wmt24pp_is_english_to_xx_only():
    assert hub.wmt24pp_config(EN, get_language("tl")) == "en-fil_PH"
    with pytest.raises(ValueError, match=r"English->xx only.*de-en"):
        load_examples("wmt24pp", "de-en", "test")


def test_wmt24pp_refuses_rows_of_another_pair():
    with pytest.raises(ValueError, match="is from en-de_DE, expected en-fr_FR"):
        hub.wmt24pp_examples(WMT_ROWS, EN, FR)


def test_load_examples_reads_wmt24pp_test_from_its_train_split(monkeypatch):
    monkeypatch.setattr(hub.datasets, "load_dataset", lambda repo, config, split: WMT_ROWS)
    assert len(load_examples("wmt24pp", "en-de", "test")["en-de"]) == 2


@pytest.mark.parametrize(
    ("source", "split", "valid"),
    [
        ("wmt24pp", "train", "test"),
        ("flores_plus", "train", "dev, validation, devtest, test"),
        ("bible", "eval", "train, dev, validation, test"),
    ],
)
def test_wrong_split_names_the_valid_ones(source, split, valid):
    with pytest.raises(ValueError, match=f"{source} has no split '{split}'; valid splits: {valid}"):
        load_examples(source, "en-de", split)


def test_evaluation_sets_are_refused_for_training():
    assert sorted(hub.EVALUATION_ONLY_SOURCES) == ["flores_plus", "wmt24pp"]
    for source in hub.EVALUATION_ONLY_SOURCES:
        with pytest.raises(ValueError, match="must not be trained on"):
            check_trainable(source)
    check_trainable("bible")
    check_trainable("my_corpus.tsv")


# --- Local files -----------------------------------------------------------------------------------------------------


def test_tsv_with_header_gives_several_references():
    examples = load_examples(str(FIXTURES / "parallel.tsv"), "en-fr", "test")["en-fr"]
    assert examples == [
        ParallelExample(
            "greeting",
            "eng_Latn",
            "fra_Latn",
            "Good morning, my friend.",
            ("Bonjour, mon ami.", "Bon matin, mon ami."),
        ),
        ParallelExample("thanks", "eng_Latn", "fra_Latn", "Thank you very much.", ("Merci beaucoup.", "Merci bien.")),
    ]


def test_tsv_without_header(tmp_path):
    path = tmp_path / "plain.tsv"
    path.write_text("Hello.\tBonjour.\tSalut.\r\nYes.\tOui.\tOui.\r\n", encoding="utf-8")
    examples = read_parallel_file(path, (EN, FR))
    assert [(ex.id, ex.source, ex.references) for ex in examples] == [
        ("plain.tsv:1", "Hello.", ("Bonjour.", "Salut.")),
        ("plain.tsv:2", "Yes.", ("Oui.", "Oui.")),
    ]


def test_jsonl_records_name_their_directions():
    result = load_examples(str(FIXTURES / "mixed.jsonl"), ["en-fr", "de-en"], "test")
    assert [ex.id for ex in result["en-fr"]] == ["1", "mixed.jsonl:3"]
    assert result["en-fr"][0].references == ("Bonjour, mon ami.", "Bon matin, mon ami.")
    assert result["de-en"] == [
        ParallelExample("mixed.jsonl:2", "deu_Latn", "eng_Latn", "Guten Morgen.", ("Good morning.",))
    ]


def test_aligned_text_files_with_two_references():
    result = load_examples(
        str(FIXTURES / "aligned.en"),
        "en-fr",
        "test",
        target_files=[FIXTURES / "aligned.fr", FIXTURES / "aligned.2.fr"],
    )
    assert [ex.references for ex in result["en-fr"]] == [
        ("Bonjour, mon ami.", "Bon matin, mon ami."),
        ("Merci beaucoup.", "Merci bien."),
        ("À demain.", "A demain."),
    ]


def test_glob_reads_every_matching_file(tmp_path):
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text('{"source": "Hi.", "target": "Salut."}\n', encoding="utf-8")
    examples = load_examples(str(tmp_path / "*.jsonl"), "en-fr", "test")["en-fr"]
    assert [ex.id for ex in examples] == ["a.jsonl:1", "b.jsonl:1"]


def test_a_direction_missing_from_the_file_is_an_error():
    with pytest.raises(ValueError, match=r"has no fr-en examples \(it has: de-en, en-fr\)"):
        load_examples(str(FIXTURES / "mixed.jsonl"), "fr-en", "test")


def test_an_unknown_source_is_neither_built_in_nor_a_file():
    with pytest.raises(FileNotFoundError, match="'flores' is neither a built-in source"):
        load_examples("flores", "en-fr", "test")


def test_file_options_only_apply_to_files():
    with pytest.raises(ValueError, match="target_files only apply to local files .* not to the bible source"):
        load_examples("bible", "en-fr", "test", target_files=["x.fr"])


BAD_FILES = [
    # (file name, content, line of the error, words of the error)
    ("empty_field.tsv", b"source\ttarget\nHello.\tBonjour.\nYes.\t \n", 3, "empty 'target'"),
    ("fields.tsv", b"Hello.\tBonjour.\nYes.\tOui.\tSi.\n", 2, "3 tab-separated fields, expected 2"),
    ("blank.tsv", b"Hello.\tBonjour.\n\nYes.\tOui.\n", 2, "empty line"),
    ("header.tsv", b"source\ttraget\nHello.\tBonjour.\n", 1, "unknown column(s) ['traget']"),
    ("no_target.tsv", b"id\tsource\n1\tHello.\n", 1, "no 'target' column"),
    ("latin1.tsv", "Hello.\tBonjour.\nYes.\tDéjà.\n".encode("latin-1"), 2, "not valid UTF-8"),
    ("json.jsonl", b'{"source": "Hi.", "target": "Salut."}\n{"source": "Hi."\n', 2, "invalid JSON"),
    ("both.jsonl", b'{"source": "Hi.", "target": "Salut.", "references": ["Salut."]}\n', 1, "exactly one of"),
    ("no_refs.jsonl", b'{"source": "Hi.", "references": []}\n', 1, "non-empty list"),
    ("empty_source.jsonl", b'{"source": "", "target": "Salut."}\n', 1, "empty 'source'"),
    ("lang.jsonl", b'{"source": "Hi.", "target": "Salut.", "src_lang": "xx"}\n', 1, "Unknown language code 'xx'"),
    ("same.jsonl", b'{"source": "Hi.", "target": "Salut.", "tgt_lang": "en"}\n', 1, "both English"),
    (
        "dup.jsonl",
        b'{"id": 7, "source": "Hi.", "target": "Salut."}\n{"id": "7", "source": "A.", "target": "B."}\n',
        2,
        "id '7' is already used on line 1",
    ),
]


@pytest.mark.parametrize(("name", "content", "line", "words"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_name_the_file_and_line(tmp_path, name, content, line, words):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        read_parallel_file(path, (EN, FR))
    assert f"{path}, line {line}:" in str(error.value)
    assert words in str(error.value)


def test_records_without_languages_need_a_single_direction(tmp_path):
    path = tmp_path / "nolang.jsonl"
    path.write_text('{"source": "Hi.", "target": "Salut."}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"nolang.jsonl, line 1: no src_lang.*single direction"):
        load_examples(str(path), "en-fr,en-de", "test")


def test_aligned_files_of_different_lengths(tmp_path):
    source, target = tmp_path / "src.txt", tmp_path / "ref.txt"
    source.write_text("One.\nTwo.\nThree.\n", encoding="utf-8")
    target.write_text("Un.\nDeux.\n", encoding="utf-8")
    message = f"{target}, line 3: {target} has 2 lines but {source} has 3"
    with pytest.raises(ValueError, match=re.escape(message)):
        read_parallel_file(source, (EN, FR), target_files=target)


def test_aligned_files_with_an_empty_line(tmp_path):
    source, target = tmp_path / "src.txt", tmp_path / "ref.txt"
    source.write_text("One.\nTwo.\n", encoding="utf-8")
    target.write_text("Un.\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{target}, line 2: empty line")):
        read_parallel_file(source, (EN, FR), target_files=[target])


def test_unknown_file_format(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("Hello.\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"Cannot tell the format of .*corpus.txt: name it \*.tsv or \*.jsonl"
    ) as error:
        read_parallel_file(path, (EN, FR))
    for knob in ("calibration_target_files", "dataset_target_files", "eval_target_files"):
        assert knob in str(error.value)


# --- Overlap and access checks ---------------------------------------------------------------------------------------


def test_selections_overlap_on_resolved_splits_and_shared_files(tmp_path):
    assert selections_overlap(DataSelection("bible", "validation"), DataSelection("bible", "dev"))
    assert selections_overlap(DataSelection("flores_plus", "test"), DataSelection("flores_plus", "devtest"))
    assert not selections_overlap(DataSelection("bible", "train"), DataSelection("bible", "test"))
    assert not selections_overlap(DataSelection("flores_plus", "dev"), DataSelection("bible", "dev"))
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("Hello.\tBonjour.\n", encoding="utf-8")
    (tmp_path / "link.tsv").symlink_to(corpus)
    local = DataSelection(str(corpus), "train")
    assert selections_overlap(local, DataSelection(str(tmp_path / "link.tsv"), "test"))  # a file is its own split
    assert selections_overlap(local, DataSelection(str(tmp_path / "*.tsv"), "dev"))
    assert selections_overlap(DataSelection("x.en", "dev", ["x.fr"]), DataSelection("x.fr", "dev", ["x.en"]))
    assert not selections_overlap(local, DataSelection(str(tmp_path / "other.tsv"), "train"))
    assert not selections_overlap(local, DataSelection("bible", "train"))
    assert str(DataSelection("x.en", "dev", ["x.fr", "x.2.fr"])) == "x.en + x.fr + x.2.fr"


def test_local_data_access_checks_files_without_parsing_them(tmp_path):
    check_data_access(str(FIXTURES / "parallel.tsv"), "en-fr", "any split")
    check_data_access(str(FIXTURES / "*.jsonl"), "en-fr,de-en", "test")
    check_data_access(str(FIXTURES / "aligned.en"), "en-fr", "test", [str(FIXTURES / "aligned.fr")])
    (tmp_path / "broken.tsv").write_bytes(b"source\ttraget\n")  # a bad header fails only when read
    check_data_access(str(tmp_path / "broken.tsv"), "en-fr", "test")


@pytest.mark.parametrize(
    ("source", "directions", "split", "target_files", "error", "message"),
    [
        ("nowhere/*.tsv", "en-fr", "test", None, MissingInputError, r"'nowhere/\*.tsv' is neither a built-in"),
        ("aligned.en", "en-fr", "test", ["refs.fr"], MissingInputError, "Data file refs.fr does not exist"),
        ("aligned.en", "en-fr", "test", None, ConfigurationError, "format of aligned.en.*calibration_target_files"),
        ("aligned*", "en-fr", "test", ["aligned.fr"], ConfigurationError, "matches 3 files, but target_files"),
        ("parallel.tsv", "en-xx", "test", None, ConfigurationError, "Cannot parse direction 'en-xx'"),
        ("bible", "en-fr", "devtest", None, ConfigurationError, "bible has no split 'devtest'"),
        ("bible", "en-nl", "test", None, ConfigurationError, "The Bible corpus has no translation in nld_Latn"),
        ("bible", "en-fr", "test", ["refs.fr"], ConfigurationError, "target_files only apply to local files"),
        ("wmt24pp", "de-en", "test", None, ConfigurationError, r"WMT24\+\+ is English->xx only"),
    ],
)
def test_data_access_errors(monkeypatch, source, directions, split, target_files, error, message):
    monkeypatch.chdir(FIXTURES)
    with pytest.raises(error, match=message):
        check_data_access(source, directions, split, target_files)


def test_unreadable_files_are_refused(monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(ConfigurationError, match=r"Cannot read .*parallel.tsv \(Permission denied\)"):
        check_data_access(str(FIXTURES / "parallel.tsv"), "en-fr", "test")


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    return tmp_path


def test_hub_data_access_offline_needs_every_config_cached(datasets_cache, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingInputError, match=r"flores_plus config\(s\) eng_Latn, fra_Latn are not in the datasets"):
        check_data_access("flores_plus", "en-fr", "dev")
    for config in ("eng_Latn", "fra_Latn"):
        (datasets_cache / "openlanguagedata___flores_plus" / config).mkdir(parents=True)
    check_data_access("flores_plus", "fr-en", "devtest")
    with pytest.raises(MissingInputError, match=r"config\(s\) cmn_Hans are not in"):
        check_data_access("flores_plus", "en-zh", "dev")


def test_hub_data_access_online_asks_the_hub_for_uncached_data(datasets_cache, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    asked = []

    def gated(self, repo_id, repo_type=None, **kwargs):
        asked.append((repo_id, repo_type))
        raise GatedRepoError.__new__(GatedRepoError)  # its constructor wants a real HTTP response

    monkeypatch.setattr(HfApi, "auth_check", gated)
    with pytest.raises(ConfigurationError, match="is gated .*accept its terms at https://huggingface.co/datasets/"):
        check_data_access("flores_plus", "en-fr", "dev")
    assert asked == [("openlanguagedata/flores_plus", "dataset")]

    def unreachable(self, repo_id, repo_type=None, **kwargs):
        raise HTTPError("connection refused")

    monkeypatch.setattr(HfApi, "auth_check", unreachable)
    with pytest.raises(MissingInputError, match=r"Cannot reach the Hub .*\(connection refused\).*en-fr_FR"):
        check_data_access("wmt24pp", "en-fr", "test")
    (datasets_cache / "google___wmt24pp" / "en-fr_FR").mkdir(parents=True)
    check_data_access("wmt24pp", "en-fr", "test")  # cached: no request


# --- Prompts ---------------------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
EXAMPLE = ParallelExample("x", "eng_Latn", "fra_Latn", " Good morning. ", ("Bonjour.", "Bon matin."))


def tiny_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory: enough for prompt formatting, no Hub download."""
    model = models.WordLevel({"[UNK]": 0, "<eos>": 1, "Good": 2, "morning.": 3}, unk_token="[UNK]")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<eos>", unk_token="[UNK]", chat_template=chat_template
    )


def test_prompt_with_a_chat_template():
    tokenizer = tiny_tokenizer(CHAT_TEMPLATE)
    assert format_prompt(tokenizer, EXAMPLE) == (
        "<|user|>Translate from English to French:\nGood morning.<|end|><|assistant|>"
    )
    assert sft_record(tokenizer, EXAMPLE, reference_index=1) == {
        "prompt": [{"role": "user", "content": "Translate from English to French:\nGood morning."}],
        "completion": [{"role": "assistant", "content": "Bon matin."}],
    }


def test_prompt_without_a_chat_template():
    tokenizer = tiny_tokenizer(None)
    prompt = "Translate from English to French:\nGood morning.\nFrench:"
    assert format_prompt(tokenizer, EXAMPLE) == prompt
    assert sft_record(tokenizer, EXAMPLE) == {"prompt": prompt, "completion": " Bonjour.<eos>"}


def test_harmony_replies_keep_the_final_channel(demo_tokenizer):
    """GPT-OSS writes an analysis channel before the final one; only the final text is the translation."""
    from moe_specialist.generation import decode_reply

    class Harmony:
        def decode(self, tokens, skip_special_tokens=False):
            text = "<|channel|>analysis<|message|>The user wants French.<|end|><|start|>assistant"
            return text + "<|channel|>final<|message|>Bonjour le monde.<|return|>"

    assert decode_reply(Harmony(), [1]) == "Bonjour le monde."
    plain = demo_tokenizer("Bonjour le monde.<|end|>", add_special_tokens=False)["input_ids"]
    assert decode_reply(demo_tokenizer, plain) == "Bonjour le monde."
