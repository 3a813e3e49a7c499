"""The one entry point to parallel data: the Bible corpus, FLORES+, WMT24++ or local files.

Downstream code sees ``{direction name: [ParallelExample]}`` and never needs to know where the data came from.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
from huggingface_hub import HfApi
from huggingface_hub.errors import GatedRepoError, HTTPError, RepositoryNotFoundError

from moe_specialist.data.bible import bible_examples, database_path, monolingual_verses, sample_order, translations_for
from moe_specialist.data.example import ParallelExample
from moe_specialist.data.files import check_file_format, read_parallel_file, reference_paths
from moe_specialist.data.hub import (
    EVALUATION_ONLY_SOURCES,
    FLORES_PLUS_REPO,
    WMT24PP_REPO,
    flores_plus_config,
    load_flores_plus,
    load_wmt24pp,
    wmt24pp_config,
)
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


def check_target_files(source: str, target_files: Sequence[str | Path] | None, name: str = "target_files") -> None:
    """Only a local plain-text source has reference files aligned with it; the knob ``name`` would be ignored."""
    if target_files and source in SPLIT_NAMES:
        raise ConfigurationError(
            f"{name} only apply to local files (a plain-text source aligned with its reference files), not to the "
            f"{source} source: remove {name} or give a local source file."
        )


def take_sample(examples: list[ParallelExample], limit: int | None, seed: int) -> list[ParallelExample]:
    """``limit`` examples chosen by a seeded hash of their ids, in their original order."""
    if limit is None or limit >= len(examples):
        return examples
    chosen = set(sample_order([ex.id for ex in examples], seed)[:limit])
    return [ex for ex in examples if ex.id in chosen]


def _matching_files(pattern: str) -> list[Path]:
    if Path(pattern).is_file():
        return [Path(pattern)]
    return sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())


def local_files(pattern: str) -> list[Path]:
    """The files a path or glob names."""
    paths = _matching_files(pattern)
    if not paths:
        raise MissingInputError(
            f"Data source {pattern!r} is neither a built-in source ({', '.join(SPLIT_NAMES)}) nor an existing file "
            f"or glob: check the name or the path."
        )
    return paths


def _source_files(source: str, target_files: Sequence[str | Path] | None) -> list[Path]:
    """The files of a local source; reference files align with exactly one of them."""
    paths = local_files(source)
    if target_files and len(paths) > 1:
        raise ConfigurationError(
            f"{source!r} matches {len(paths)} files, but target_files aligns with a single source file: name one."
        )
    return paths


@dataclass(frozen=True)
class DataSelection:
    """The data one role reads (SFT, calibration, evaluation): a source, its split, aligned reference files, and the
    directions and seeded sample size to load (see :func:`load_examples`)."""

    source: str
    split: str  # unused by local files: a local file is its own split
    target_files: Sequence[str] | None = None
    directions: Sequence[str] = ()
    limit: int | None = None
    seed: int = 0

    def load(self) -> dict[str, list[ParallelExample]]:
        return load_examples(
            self.source,
            list(self.directions),
            self.split,
            limit=self.limit,
            seed=self.seed,
            target_files=self.target_files,
        )

    def check_access(self) -> None:
        """:func:`check_data_access` for this selection: before any model loads."""
        check_data_access(self.source, list(self.directions), self.split, self.target_files)

    @property
    def local(self) -> bool:
        return self.source not in SPLIT_NAMES

    def files(self) -> set[Path]:
        """Every file it reads, resolved; a path or glob that names no file yet stands for itself."""
        names = [self.source, *(self.target_files or [])]
        return {path.resolve() for name in names for path in _matching_files(name) or [Path(name)]}

    def __str__(self) -> str:
        return " + ".join([self.source, *(self.target_files or [])]) if self.local else f"{self.source}:{self.split}"


def selections_overlap(first: DataSelection, second: DataSelection) -> bool:
    """Whether two selections share sentences: the one leak check, for SFT and calibration data against eval data.

    Built-in sources overlap on the same source and the same split of its data (``validation`` is ``dev``); local
    files overlap when they share any file (source or reference), whatever the split says.
    """
    if first.local or second.local:
        return first.local and second.local and bool(first.files() & second.files())
    return first.source == second.source and resolve_split(first.source, first.split) == resolve_split(
        second.source, second.split
    )


def _builtin_examples(
    source: str, src: Language, tgt: Language, split: str, limit: int | None, seed: int
) -> list[ParallelExample]:
    data_split = resolve_split(source, split)
    if source == "bible":
        return bible_examples(src, tgt, data_split, limit, seed)
    examples = load_flores_plus(src, tgt, data_split) if source == "flores_plus" else load_wmt24pp(src, tgt)
    return take_sample(examples, limit, seed)


def _local_examples(
    source: str,
    directions: list[tuple[Language, Language]],
    limit: int | None,
    seed: int,
    target_files: Sequence[str | Path] | None,
) -> dict[str, list[ParallelExample]]:
    paths = _source_files(source, target_files)
    # Records without languages belong to the direction asked for, which must then be unambiguous.
    default = directions[0] if len(directions) == 1 else None
    by_direction: dict[str, list[ParallelExample]] = {}
    for path in paths:
        for example in read_parallel_file(path, default, target_files):
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
    target_files: str | Sequence[str | Path] | None = None,
) -> dict[str, list[ParallelExample]]:
    """Examples per direction name (``en-fr``) from a built-in source or a local file path / glob.

    Built-in sources are ``bible`` (splits train / dev / test), ``flores_plus`` (dev / devtest) and ``wmt24pp``
    (test, English->xx only); ``validation`` and ``test`` are accepted where they mean dev and devtest. A local file
    is its own split: ``split`` is not used; ``target_files`` are the reference files of a plain-text source file
    (see :func:`~moe_specialist.data.files.read_parallel_file`). ``limit`` keeps a seeded sample per direction.
    """
    parsed = parse_directions(directions)
    if limit is not None and limit < 1:
        raise ConfigurationError(f"limit must be a positive number of examples (or None for all), got {limit}.")
    check_target_files(source, target_files)
    if source not in SPLIT_NAMES:
        return _local_examples(source, parsed, limit, seed, target_files)
    return {direction_name(src, tgt): _builtin_examples(source, src, tgt, split, limit, seed) for src, tgt in parsed}


def _check_readable(path: Path) -> None:
    if not path.is_file():
        raise MissingInputError(f"Data file {path} does not exist: check the path.")
    try:
        with path.open("rb") as file:
            file.read(1)
    except OSError as e:
        raise ConfigurationError(f"Cannot read {path} ({e.strerror or e}): fix its permissions.") from None


def _check_hub_access(repo: str, configs: list[str]) -> None:
    """Every config is in the `datasets` cache, or else the Hub lets this user load the dataset."""
    cache = datasets.config.HF_DATASETS_CACHE / repo.replace("/", "___")
    missing = [config for config in configs if not (cache / config).is_dir()]
    if not missing:
        return
    if datasets.config.HF_HUB_OFFLINE:
        raise MissingInputError(
            f"{repo} config(s) {', '.join(missing)} are not in the datasets cache ({cache}) and the Hub is offline "
            "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): load them once online, or unset the offline variable."
        )
    try:
        HfApi().auth_check(repo, repo_type="dataset")
    except GatedRepoError:
        raise ConfigurationError(
            f"{repo} is gated and this account has no access: accept its terms at https://huggingface.co/datasets/"
            f"{repo} and log in with `hf auth login` (or set HF_TOKEN)."
        ) from None
    except RepositoryNotFoundError:
        raise MissingInputError(
            f"{repo} is not on the Hub or not visible to this account: log in with `hf auth login` (or set HF_TOKEN)."
        ) from None
    except (HTTPError, OSError) as e:  # no connection, or huggingface_hub itself set offline
        raise MissingInputError(
            f"Cannot reach the Hub to check access to {repo} ({e}), and config(s) {', '.join(missing)} are not in "
            "the datasets cache: check the connection, or load them once where the Hub is reachable."
        ) from None


def check_data_access(
    source: str, directions: str | list[str], split: str, target_files: str | Sequence[str | Path] | None = None
) -> None:
    """Fail before any model loads on data that could not be read later.

    Checks the directions' languages; for built-in sources the split, and that the Bible corpus is installed and
    has the languages; for local files that every file (and reference file) exists, can be opened and has a known
    format. Files are not parsed: a bad line still fails only when they are read. For the Hub sources (flores_plus,
    wmt24pp) it checks that every config needed is in the `datasets` cache (the cached split and content are not
    checked) or else that the Hub grants access, one request that reveals a gated dataset whose terms were not
    accepted; offline, an uncached config fails.
    """
    parsed = parse_directions(directions)
    check_target_files(source, target_files)
    if source not in SPLIT_NAMES:
        for path in _source_files(source, target_files):
            check_file_format(path, aligned=bool(target_files))
            _check_readable(path)
        for path in reference_paths(target_files):
            _check_readable(path)
        return
    resolve_split(source, split)
    if source == "bible":
        database_path()
        for pair in parsed:
            for language in pair:
                translations_for(language)
    elif source == "flores_plus":
        _check_hub_access(FLORES_PLUS_REPO, sorted({flores_plus_config(lang) for pair in parsed for lang in pair}))
    else:
        _check_hub_access(WMT24PP_REPO, sorted({wmt24pp_config(src, tgt) for src, tgt in parsed}))


def general_texts(language: str | Language, split: str, limit: int | None = None, seed: int = 0) -> list[str]:
    """Monolingual text of ``language`` (Bible verses) for the "general" routing statistics."""
    return monolingual_verses(language, resolve_split("bible", split), limit, seed)
