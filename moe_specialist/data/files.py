"""Local parallel files, for corpora that are not built in.

Accepted formats (UTF-8, a byte-order mark is ignored; one segment per line; no empty line or field):

* ``*.tsv``: tab-separated, without quoting. A first line naming the columns is a header: ``source``, ``target``
  and further references ``target_2``, ``target_3``... (at least one target column), optionally ``src_lang``,
  ``tgt_lang``, ``id``, in any order. Without a header, the first column is the source and every further column
  a reference.
* ``*.jsonl``: one JSON object per line, ``{"source": ..., "references": [...]}`` or ``{"source": ..., "target":
  ...}``, optionally with ``"src_lang"``, ``"tgt_lang"``, ``"id"``; other keys are ignored.
* aligned plain text (any other extension, with ``target_files``): line *i* of every target file is a reference
  translation of line *i* of the source file; all files have the same number of lines.

Languages come from a record's ``src_lang`` / ``tgt_lang`` (any code :func:`get_language` knows) and otherwise from
the direction the caller passes. Example ids default to ``<file name>:<line number>``. Every error names the file
and the line, so that a corpus can be fixed where it breaks.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_specialist.data.example import ParallelExample
from moe_specialist.data.languages import Language, get_language
from moe_specialist.errors import ConfigurationError, MissingInputError

_OPTIONAL_COLUMNS = ("src_lang", "tgt_lang", "id")
_TARGET_COLUMN = re.compile(r"target(_\d+)?")


class DataFileError(ConfigurationError):
    """A problem at one line of a data file."""

    def __init__(self, path: Path, line: int, message: str) -> None:
        super().__init__(f"{path}, line {line}: {message}")


@dataclass(frozen=True)
class _Record:
    line: int
    source: str
    references: tuple[str, ...]
    src_lang: str | None = None
    tgt_lang: str | None = None
    id: str | None = None


def _read_lines(path: Path) -> list[str]:
    """The file's lines without line ends; fails at the first line that is not UTF-8."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataFileError(
            path, line, "not valid UTF-8: convert the file, e.g. `iconv -f latin1 -t utf-8`."
        ) from None
    lines = text.split("\n")  # not splitlines(): it also splits on U+2028 and other separators inside segments
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _text(path: Path, line: int, name: str, value: Any) -> str:
    """A non-empty string field, or an error naming it."""
    if not isinstance(value, str):
        raise DataFileError(path, line, f"{name!r} must be a string, got {type(value).__name__}.")
    if not value.strip():
        raise DataFileError(path, line, f"empty {name!r}: give the text or remove the line.")
    return value


def _tsv_columns(path: Path, first_line: str) -> tuple[list[str], bool]:
    """Column names and whether the first line is a header (it is when it names any known column)."""
    fields = first_line.split("\t")
    known = {"source", *_OPTIONAL_COLUMNS}
    if not any(f in known or _TARGET_COLUMN.fullmatch(f) for f in fields):
        if len(fields) < 2:
            raise DataFileError(path, 1, "expected tab-separated columns source<TAB>target[<TAB>target_2...].")
        return ["source", "target", *(f"target_{k}" for k in range(2, len(fields)))], False
    unknown = [f for f in fields if f not in known and not _TARGET_COLUMN.fullmatch(f)]
    duplicates = sorted({f for f in fields if fields.count(f) > 1})
    problems = []
    if unknown:
        problems.append(f"unknown column(s) {unknown}")
    if duplicates:
        problems.append(f"duplicate column(s) {duplicates}")
    if "source" not in fields:
        problems.append("no 'source' column")
    if not any(_TARGET_COLUMN.fullmatch(f) for f in fields):
        problems.append("no 'target' column")
    if problems:
        raise DataFileError(
            path,
            1,
            f"bad header: {'; '.join(problems)}. Columns are source, target, target_2..., and optionally "
            f"{', '.join(_OPTIONAL_COLUMNS)}.",
        )
    return fields, True


def _read_tsv(path: Path) -> list[_Record]:
    lines = _read_lines(path)
    if not lines:
        raise DataFileError(path, 1, "the file is empty.")
    columns, has_header = _tsv_columns(path, lines[0])
    targets = [c for c in columns if _TARGET_COLUMN.fullmatch(c)]
    records = []
    for number, line in enumerate(lines[1:] if has_header else lines, start=2 if has_header else 1):
        if not line.strip():
            raise DataFileError(path, number, "empty line: remove it.")
        fields = line.split("\t")
        if len(fields) != len(columns):
            raise DataFileError(
                path, number, f"{len(fields)} tab-separated fields, expected {len(columns)} ({', '.join(columns)})."
            )
        row = {name: _text(path, number, name, value) for name, value in zip(columns, fields, strict=True)}
        records.append(
            _Record(
                number,
                row["source"],
                tuple(row[c] for c in targets),
                row.get("src_lang"),
                row.get("tgt_lang"),
                row.get("id"),
            )
        )
    return records


def _optional(path: Path, line: int, obj: dict, key: str) -> str | None:
    """An optional text field (an integer id is read as text)."""
    value = obj.get(key)
    if key == "id" and isinstance(value, int):
        value = str(value)
    return None if value is None else _text(path, line, key, value)


def _read_jsonl(path: Path) -> list[_Record]:
    records = []
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            raise DataFileError(path, number, "empty line: remove it.")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFileError(path, number, f"invalid JSON ({e.msg} at column {e.colno}).") from None
        if not isinstance(obj, dict):
            raise DataFileError(path, number, f"expected a JSON object, got {type(obj).__name__}.")
        if ("references" in obj) == ("target" in obj):
            raise DataFileError(path, number, "give exactly one of 'references' (a list) or 'target' (a string).")
        if "target" in obj:
            references = (_text(path, number, "target", obj["target"]),)
        elif isinstance(obj["references"], list) and obj["references"]:
            references = tuple(_text(path, number, "references", r) for r in obj["references"])
        else:
            raise DataFileError(path, number, "'references' must be a non-empty list of strings.")
        records.append(
            _Record(
                number,
                _text(path, number, "source", obj.get("source")),
                references,
                _optional(path, number, obj, "src_lang"),
                _optional(path, number, obj, "tgt_lang"),
                _optional(path, number, obj, "id"),
            )
        )
    return records


def _read_aligned(source_file: Path, target_files: Sequence[Path]) -> list[_Record]:
    sources = _read_lines(source_file)
    targets = [_read_lines(path) for path in target_files]
    for path, lines in zip(target_files, targets, strict=True):
        if len(lines) != len(sources):
            shorter = path if len(lines) < len(sources) else source_file
            raise DataFileError(
                shorter,
                min(len(lines), len(sources)) + 1,
                f"{path} has {len(lines)} lines but {source_file} has {len(sources)}: aligned files need one "
                f"segment per line, the same number of lines in each.",
            )
    records = []
    for number, segments in enumerate(zip(sources, *targets, strict=True), start=1):
        for path, segment in zip([source_file, *target_files], segments, strict=True):
            if not segment.strip():
                raise DataFileError(path, number, "empty line: remove it from every aligned file.")
        records.append(_Record(number, segments[0], tuple(segments[1:])))
    return records


def _language(path: Path, record: _Record, code: str | None, default: Language | None, column: str) -> Language:
    if code is None:
        if default is None:
            raise DataFileError(
                path,
                record.line,
                f"no {column}: add src_lang/tgt_lang to the file, or load it for a single direction (e.g. en-fr).",
            )
        return default
    try:
        return get_language(code)
    except ValueError as e:
        raise DataFileError(path, record.line, str(e)) from None


def _examples(
    path: Path, records: list[_Record], direction: tuple[Language, Language] | None
) -> list[ParallelExample]:
    default_src, default_tgt = direction or (None, None)
    first_line: dict[str, int] = {}
    examples = []
    for record in records:
        src = _language(path, record, record.src_lang, default_src, "src_lang")
        tgt = _language(path, record, record.tgt_lang, default_tgt, "tgt_lang")
        if src == tgt:
            raise DataFileError(path, record.line, f"source and target are both {src.name}.")
        example_id = record.id or f"{path.name}:{record.line}"
        if example_id in first_line:
            raise DataFileError(
                path, record.line, f"id {example_id!r} is already used on line {first_line[example_id]}."
            )
        first_line[example_id] = record.line
        examples.append(ParallelExample(example_id, src.code, tgt.code, record.source, record.references))
    return examples


def check_file_format(path: Path, aligned: bool) -> None:
    """A file's name must tell its format, unless it is a plain-text source read with its reference files."""
    if not aligned and path.suffix not in (".tsv", ".jsonl"):
        raise ConfigurationError(
            f"Cannot tell the format of {path}: name it *.tsv or *.jsonl, or, for a plain-text source file, give "
            "the reference file(s) aligned with it: calibration_target_files, dataset_target_files or "
            "eval_target_files (recipe keys and command-line flags alike)."
        )


def reference_paths(target_files: str | Path | Sequence[str | Path] | None) -> list[Path]:
    """The reference files of an aligned plain-text source: one path, several, or none."""
    return [Path(target_files)] if isinstance(target_files, (str, Path)) else [Path(p) for p in target_files or []]


def read_parallel_file(
    path: str | Path,
    direction: tuple[Language, Language] | None = None,
    target_files: str | Path | Sequence[str | Path] | None = None,
) -> list[ParallelExample]:
    """Examples of a ``.tsv`` or ``.jsonl`` file, or of a plain-text source file aligned with ``target_files``.

    ``direction`` gives the languages of records that do not name their own.
    """
    path = Path(path)
    targets = reference_paths(target_files)
    for file in (path, *targets):
        if not file.is_file():
            raise MissingInputError(f"Data file {file} does not exist.")
    check_file_format(path, aligned=bool(targets))
    if targets:
        records = _read_aligned(path, targets)
    else:
        records = _read_tsv(path) if path.suffix == ".tsv" else _read_jsonl(path)
    return _examples(path, records, direction)
