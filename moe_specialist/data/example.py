"""The one record every data source yields: a source sentence and its references in a target language."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moe_specialist.data.languages import Language, direction_name, get_language
from moe_specialist.errors import ConfigurationError


@dataclass(frozen=True)
class ParallelExample:
    id: str
    src_lang: str  # FLORES-200 code
    tgt_lang: str  # FLORES-200 code
    source: str
    references: tuple[str, ...]  # one or more reference translations, best first

    def __post_init__(self) -> None:
        if not self.references:
            raise ConfigurationError(f"Example {self.id!r} has no reference translation.")

    @property
    def src(self) -> Language:
        return get_language(self.src_lang)

    @property
    def tgt(self) -> Language:
        return get_language(self.tgt_lang)

    @property
    def direction(self) -> str:
        """Group key of the example's direction, e.g. ``en-fr``."""
        return direction_name(self.src, self.tgt)

    def to_dict(self) -> dict:
        record = asdict(self)
        record["references"] = list(self.references)
        return record
