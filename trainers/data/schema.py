"""The one shape every data source is parsed into, and the error that locates a bad row."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PreferencePair:
    prompt: str     # the whole conversation through the last "\n\nAssistant:" (inclusive)
    chosen: str     # response text after that marker (e.g. " Sure, ..."), non-empty after strip
    rejected: str
    source: str = ""   # file name or data set name the row came from
    row: int = -1      # 0-based row index in that source


class DataError(ValueError):
    """A bad input row, located precisely enough to fix it (source, 0-based row, field)."""

    def __init__(self, source: str, row: int, field: str, reason: str):
        self.source, self.row, self.field, self.reason = source, row, field, reason
        where = f"{source}, row {row}" if row >= 0 else source
        super().__init__(f"{where}, field '{field}': {reason}")

    def __reduce__(self):  # picklable across processes (Ray) despite the custom signature
        return type(self), (self.source, self.row, self.field, self.reason)


@dataclass
class LoadedData:
    pairs: list[PreferencePair]
    skipped: list[DataError] = field(default_factory=list)   # empty unless skip_bad_rows=True
