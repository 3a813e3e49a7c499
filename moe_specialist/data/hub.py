"""FLORES+ and WMT24++ from the Hugging Face Hub, mapped to :class:`ParallelExample`.

Both are test sets: they compare specialists and must never train them (:data:`EVALUATION_ONLY_SOURCES`). Loading
(``datasets.load_dataset``: network or cache) is kept apart from mapping rows to examples, which is pure so that it
is tested on small in-memory datasets with the Hub schemas.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import datasets
from datasets.exceptions import DatasetNotFoundError

from moe_specialist.data.example import ParallelExample
from moe_specialist.data.languages import Language, direction_name
from moe_specialist.errors import ConfigurationError

EVALUATION_ONLY_SOURCES = frozenset({"flores_plus", "wmt24pp"})

FLORES_PLUS_REPO = "openlanguagedata/flores_plus"
WMT24PP_REPO = "google/wmt24pp"

# FLORES+ names Mandarin by its ISO 639-3 code where FLORES-200 used the macrolanguage.
_FLORES_PLUS_RENAMED = {"zho_Hans": "cmn_Hans", "zho_Hant": "cmn_Hant"}

# WMT24++ translates English into one regional variant per config, named ``en-<lang>_<REGION>``.
WMT24PP_CONFIGS: dict[str, str] = {
    "fra_Latn": "en-fr_FR",
    "deu_Latn": "en-de_DE",
    "spa_Latn": "en-es_MX",
    "ita_Latn": "en-it_IT",
    "por_Latn": "en-pt_BR",
    "nld_Latn": "en-nl_NL",
    "ron_Latn": "en-ro_RO",
    "pol_Latn": "en-pl_PL",
    "tur_Latn": "en-tr_TR",
    "ind_Latn": "en-id_ID",
    "vie_Latn": "en-vi_VN",
    "tgl_Latn": "en-fil_PH",
    "swh_Latn": "en-sw_KE",
    "ces_Latn": "en-cs_CZ",
    "rus_Cyrl": "en-ru_RU",
    "ukr_Cyrl": "en-uk_UA",
    "arb_Arab": "en-ar_EG",
    "pes_Arab": "en-fa_IR",
    "hin_Deva": "en-hi_IN",
    "ben_Beng": "en-bn_IN",
    "zho_Hans": "en-zh_CN",
    "zho_Hant": "en-zh_TW",
    "jpn_Jpan": "en-ja_JP",
    "kor_Hang": "en-ko_KR",
}
# Not test data: a marker segment that reveals training on the test set.
_WMT24PP_CANARY_DOMAIN = "canary"

Row = Mapping[str, Any]


def flores_plus_config(language: Language) -> str:
    """The FLORES+ config (one per language) holding ``language``."""
    return _FLORES_PLUS_RENAMED.get(language.code, language.code)


def _flores_texts_by_id(rows: Iterable[Row], config: str) -> dict[int, str]:
    texts: dict[int, str] = {}
    for row in rows:
        row_config = f"{row['iso_639_3']}_{row['iso_15924']}"
        if row_config != config:
            raise ConfigurationError(
                f"FLORES+ row {row['id']} is in {row_config}, expected {config}: pass the {config} rows."
            )
        if row["id"] in texts:
            raise ConfigurationError(
                f"FLORES+ {config} has id {row['id']} twice: clear its `datasets` cache and reload."
            )
        texts[row["id"]] = row["text"]
    return texts


def flores_plus_examples(
    source_rows: Iterable[Row], target_rows: Iterable[Row], src: Language, tgt: Language, split: str
) -> list[ParallelExample]:
    """Pair the source- and target-language configs on ``id``: the same sentence in both languages."""
    src_config, tgt_config = flores_plus_config(src), flores_plus_config(tgt)
    sources = _flores_texts_by_id(source_rows, src_config)
    targets = _flores_texts_by_id(target_rows, tgt_config)
    if sources.keys() != targets.keys():
        only_src = sorted(sources.keys() - targets.keys())[:5]
        only_tgt = sorted(targets.keys() - sources.keys())[:5]
        raise ConfigurationError(
            f"FLORES+ {split} configs {src_config} and {tgt_config} do not align on id (only in {src_config}: "
            f"{only_src}, only in {tgt_config}: {only_tgt}): both must come from the same FLORES+ revision; clear "
            f"their `datasets` cache and reload."
        )
    return [
        ParallelExample(
            id=f"flores_plus/{split}/{i}",
            src_lang=src.code,
            tgt_lang=tgt.code,
            source=text,
            references=(targets[i],),
        )
        for i, text in sources.items()
    ]


def wmt24pp_config(src: Language, tgt: Language) -> str:
    """The WMT24++ config of a direction, which must translate from English."""
    if src.code != "eng_Latn":
        raise ConfigurationError(
            f"WMT24++ is English->xx only, so it has no {direction_name(src, tgt)} test set: evaluate this direction "
            f"on flores_plus (or bible) instead."
        )
    try:
        return WMT24PP_CONFIGS[tgt.code]
    except KeyError:
        raise ConfigurationError(
            f"No WMT24++ config known for {tgt.name} ({tgt.code}): add it to WMT24PP_CONFIGS (configs are named "
            f"en-<lang>_<REGION>, see https://huggingface.co/datasets/{WMT24PP_REPO})."
        ) from None


def wmt24pp_examples(rows: Iterable[Row], src: Language, tgt: Language) -> list[ParallelExample]:
    """Test segments of one direction without bad sources or the canary; the domain is kept in the id."""
    config = wmt24pp_config(src, tgt)
    examples = []
    for row in rows:
        if row["lp"] != config:
            raise ConfigurationError(f"WMT24++ segment {row['segment_id']} is from {row['lp']}, expected {config}.")
        if row["is_bad_source"] or row["domain"] == _WMT24PP_CANARY_DOMAIN:
            continue
        examples.append(
            ParallelExample(
                id=f"wmt24pp/{row['lp']}/{row['domain']}/{row['segment_id']}",
                src_lang=src.code,
                tgt_lang=tgt.code,
                source=row["source"],
                references=(row["target"],),
            )
        )
    return examples


def _load_split(repo: str, config: str, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(repo, config, split=split)
    except DatasetNotFoundError as e:
        raise DatasetNotFoundError(
            f"{e} If the dataset is gated, accept its terms at https://huggingface.co/datasets/{repo} and log in "
            f"with `hf auth login` (or set HF_TOKEN)."
        ) from e


def load_flores_plus(src: Language, tgt: Language, split: str) -> list[ParallelExample]:
    """FLORES+ ``dev`` (997 sentences) or ``devtest`` (1012) of one direction."""
    source_rows = _load_split(FLORES_PLUS_REPO, flores_plus_config(src), split)
    target_rows = _load_split(FLORES_PLUS_REPO, flores_plus_config(tgt), split)
    return flores_plus_examples(source_rows, target_rows, src, tgt, split)


def load_wmt24pp(src: Language, tgt: Language) -> list[ParallelExample]:
    """WMT24++ test segments of an English->xx direction (the Hub calls this single split ``train``)."""
    return wmt24pp_examples(_load_split(WMT24PP_REPO, wmt24pp_config(src, tgt), "train"), src, tgt)
