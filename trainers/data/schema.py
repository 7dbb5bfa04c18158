"""The one shape every data source is parsed into, and the error that locates a bad row."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PreferencePair:
    prompt: str     # the whole conversation through the last "\n\nAssistant:" (inclusive)
    chosen: str     # response text after that marker (e.g. " Sure, ..."), non-empty after strip
    rejected: str
    source: str = ""   # file name or data set name the row came from
    row: int = -1      # 0-based row index in that source (blank lines of a jsonl file not counted)
    line: int | None = None  # 1-based line of a .jsonl/.json file where the row starts (what an editor shows)


class DataError(ValueError):
    """A bad input row, located precisely enough to fix it: source, field, and the 1-based `line` of a
    text file (what an editor shows) when there is one, else the 0-based `row`, said so in the message."""

    def __init__(self, source: str, row: int, field: str, reason: str, line: int | None = None):
        self.source, self.row, self.field, self.reason, self.line = source, row, field, reason, line
        if line is not None:
            where = f"{source}, line {line}"
        elif row >= 0:
            where = f"{source}, row {row} (0-based)"
        else:
            where = source
        super().__init__(f"{where}, field '{field}': {reason}")

    def __reduce__(self):  # picklable across processes (Ray) despite the custom signature
        return type(self), (self.source, self.row, self.field, self.reason, self.line)


@dataclass
class LoadedData:
    pairs: list[PreferencePair]
    skipped: list[DataError] = field(default_factory=list)   # empty unless skip_bad_rows=True
