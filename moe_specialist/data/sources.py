"""The one entry point to parallel data: the Bible corpus, FLORES+, WMT24++ or local files.

Downstream code sees ``{direction name: [ParallelExample]}`` and never needs to know where the data came from.
"""

from __future__ import annotations

import glob
from pathlib import Path

from moe_specialist.data.bible import bible_examples, monolingual_verses, sample_order
from moe_specialist.data.example import ParallelExample
from moe_specialist.data.files import read_parallel_file
from moe_specialist.data.hub import EVALUATION_ONLY_SOURCES, load_flores_plus, load_wmt24pp
from moe_specialist.data.languages import Language, direction_name, parse_directions
from moe_specialist.errors import ConfigurationError, MissingInputError

# The split names each built-in source accepts, and the split of its data each name means.
SPLIT_NAMES: dict[str, dict[str, str]] = {
    "bible": {"train": "train", "dev": "dev", "validation": "dev", "test": "test"},
    "flores_plus": {"dev": "dev", "validation": "dev", "devtest": "devtest", "test": "devtest"},
    "wmt24pp": {"test": "train"},  # a test set, published on the Hub as its only split, "train"
}


def resolve_split(source: str, split: str) -> str:
    """The split of ``source``'s data that ``split`` names, or an error listing the valid names."""
    names = SPLIT_NAMES[source]
    try:
        return names[split]
    except KeyError:
        raise ConfigurationError(f"{source} has no split {split!r}; valid splits: {', '.join(names)}.") from None


def check_trainable(source: str) -> None:
    """Refuse a test set as training data, so that scores on it stay meaningful."""
    if source in EVALUATION_ONLY_SOURCES:
        raise ConfigurationError(
            f"{source} is a test set and must not be trained on: train on 'bible' or local files, and keep {source} "
            f"for evaluation."
        )


def take_sample(examples: list[ParallelExample], limit: int | None, seed: int) -> list[ParallelExample]:
    """``limit`` examples chosen by a seeded hash of their ids, in their original order."""
    if limit is None or limit >= len(examples):
        return examples
    chosen = set(sample_order([ex.id for ex in examples], seed)[:limit])
    return [ex for ex in examples if ex.id in chosen]


def local_files(pattern: str) -> list[Path]:
    """The files a path or glob names."""
    if Path(pattern).is_file():
        return [Path(pattern)]
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise MissingInputError(
            f"Data source {pattern!r} is neither a built-in source ({', '.join(SPLIT_NAMES)}) nor an existing file "
            f"or glob: check the name or the path."
        )
    return paths


def _builtin_examples(
    source: str, src: Language, tgt: Language, split: str, limit: int | None, seed: int
) -> list[ParallelExample]:
    data_split = resolve_split(source, split)
    if source == "bible":
        return bible_examples(src, tgt, data_split, limit, seed)
    examples = load_flores_plus(src, tgt, data_split) if source == "flores_plus" else load_wmt24pp(src, tgt)
    return take_sample(examples, limit, seed)


def _local_examples(
    source: str, directions: list[tuple[Language, Language]], limit: int | None, seed: int, **file_kwargs
) -> dict[str, list[ParallelExample]]:
    paths = local_files(source)
    if file_kwargs.get("target_files") and len(paths) > 1:
        raise ConfigurationError(
            f"{source!r} matches {len(paths)} files, but target_files aligns with a single source file: name one."
        )
    # Records without languages belong to the direction asked for, which must then be unambiguous.
    default = directions[0] if len(directions) == 1 else None
    by_direction: dict[str, list[ParallelExample]] = {}
    for path in paths:
        for example in read_parallel_file(path, default, **file_kwargs):
            by_direction.setdefault(example.direction, []).append(example)
    result = {}
    for src, tgt in directions:
        name = direction_name(src, tgt)
        if name not in by_direction:
            raise ConfigurationError(
                f"{source} has no {name} examples (it has: {', '.join(sorted(by_direction)) or 'none'}): check the "
                f"direction or the files' src_lang/tgt_lang."
            )
        result[name] = take_sample(by_direction[name], limit, seed)
    return result


def load_examples(
    source: str,
    directions: str | list[str],
    split: str,
    limit: int | None = None,
    seed: int = 0,
    **file_kwargs,
) -> dict[str, list[ParallelExample]]:
    """Examples per direction name (``en-fr``) from a built-in source or a local file path / glob.

    Built-in sources are ``bible`` (splits train / dev / test), ``flores_plus`` (dev / devtest) and ``wmt24pp``
    (test, English->xx only); ``validation`` and ``test`` are accepted where they mean dev and devtest. A local file
    is its own split: ``split`` is not used and ``file_kwargs`` (``target_files``) go to
    :func:`~moe_specialist.data.files.read_parallel_file`. ``limit`` keeps a seeded sample per direction.
    """
    parsed = parse_directions(directions)
    if limit is not None and limit < 1:
        raise ConfigurationError(f"limit must be a positive number of examples (or None for all), got {limit}.")
    if source not in SPLIT_NAMES:
        return _local_examples(source, parsed, limit, seed, **file_kwargs)
    if file_kwargs:
        raise TypeError(f"{', '.join(sorted(file_kwargs))} only apply to local files, not to the {source} source.")
    return {direction_name(src, tgt): _builtin_examples(source, src, tgt, split, limit, seed) for src, tgt in parsed}


def general_texts(language: str | Language, split: str, limit: int | None = None, seed: int = 0) -> list[str]:
    """Monolingual text of ``language`` (Bible verses) for the "general" routing statistics."""
    return monolingual_verses(language, resolve_split("bible", split), limit, seed)
