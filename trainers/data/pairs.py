"""Preference data: loading and validating (prompt, chosen, rejected) rows from any source.

Every source (the built-in synthetic set, a local jsonl/json/parquet file, a local or hub data set)
ends up as the same `PreferencePair`s, and every malformed row is a `DataError` that names the
source, the row and the field, so a bad row in a 160k-row file can be found and fixed. The seed
study read Anthropic HH, whose rows are whole transcripts; the prompt is everything through the last
"\\n\\nAssistant:" and the chosen and rejected transcripts must share it exactly.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from trainers.data.schema import DataError, LoadedData, PreferencePair

ASSISTANT_MARKER = "\n\nAssistant:"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
DEFAULT_HOLDOUT_FRACTION = 0.1
TRAIN_SPLIT = "train"  # a local file's training part; any other split name is its held-out part


def is_held_out(prompt: str, fraction: float) -> bool:
    """Whether a local file's row with this prompt belongs to the held-out split. Decided by the prompt's
    hash, so the split is deterministic, needs no pass over the file, and every row that repeats a
    prompt falls on the same side: no held-out (probe) prompt can be a training prompt."""
    digest = hashlib.sha256(prompt.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def split_transcript(text: str) -> tuple[str, str]:
    """(prompt through the last "\\n\\nAssistant:", response after it); ValueError without one."""
    index = text.rfind(ASSISTANT_MARKER)
    if index < 0:
        raise ValueError("no '\\n\\nAssistant:' turn in the transcript")
    cut = index + len(ASSISTANT_MARKER)
    return text[:cut], text[cut:]


def _lone_surrogate(text: str) -> str | None:
    """The first lone surrogate in `text` (a JSON escape such as "\\ud800" decodes to one), else None."""
    return next((ch for ch in text if "\ud800" <= ch <= "\udfff"), None)


def _string_field(row: Mapping, name: str, source: str, row_index: int, line: int | None = None) -> str:
    if name not in row:
        raise DataError(source, row_index, name, "missing", line)
    value = row[name]
    if not isinstance(value, str):
        raise DataError(source, row_index, name, f"expected a string, got {type(value).__name__}", line)
    surrogate = _lone_surrogate(value)
    if surrogate is not None:  # not text: it cannot be encoded, tokenized or written back
        raise DataError(source, row_index, name, f"a lone surrogate \\u{ord(surrogate):04x} (a broken JSON \\u escape), "
                        "not text", line)
    return value


def parse_hh_row(row: Mapping, source: str, row_index: int, line: int | None = None) -> PreferencePair:
    """One row, HH transcripts or explicit {"prompt", "chosen", "rejected"}; DataError if bad.
    `row_index` is 0-based; `line` is the 1-based line of a text file the row starts on, if any."""
    if not isinstance(row, Mapping):
        raise DataError(source, row_index, "<row>", f"expected an object, got {type(row).__name__}", line)
    chosen_text = _string_field(row, "chosen", source, row_index, line)
    rejected_text = _string_field(row, "rejected", source, row_index, line)
    if "prompt" in row:  # explicit format: the responses are given without the prompt
        prompt = _string_field(row, "prompt", source, row_index, line)
        if not prompt.strip():
            raise DataError(source, row_index, "prompt", "empty prompt", line)
        chosen, rejected = chosen_text, rejected_text
    else:
        transcripts = {}
        for name, text in (("chosen", chosen_text), ("rejected", rejected_text)):
            try:
                transcripts[name] = split_transcript(text)
            except ValueError as error:
                raise DataError(source, row_index, name, str(error), line) from None
        prompt, chosen = transcripts["chosen"]
        rejected_prompt, rejected = transcripts["rejected"]
        if rejected_prompt != prompt:
            raise DataError(source, row_index, "rejected", "prompt differs from the chosen transcript's prompt", line)
        if not prompt[: -len(ASSISTANT_MARKER)].strip():
            raise DataError(source, row_index, "chosen", "empty prompt (nothing before the Assistant turn)", line)
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if not response.strip():
            raise DataError(source, row_index, name, "empty response", line)
    return PreferencePair(prompt, chosen, rejected, source=source, row=row_index, line=line)


def parse_dataset_spec(spec: str) -> tuple[str, str | None]:
    """'Anthropic/hh-rlhf:helpful-base' -> ('Anthropic/hh-rlhf', 'helpful-base'); no colon -> None."""
    name, _, data_dir = spec.partition(":")
    if not name.strip():
        raise ValueError(f"data set spec {spec!r} has no data set name")
    return name, (data_dir or None)


def _undecodable(raw: str, value: Any) -> tuple[str, str] | None:
    """(field, reason) when the row's text `raw` (decoded with surrogateescape) holds bytes that are not
    UTF-8; the field is the key whose value holds them ('<row>' when it cannot be told)."""
    bad = next((i for i, ch in enumerate(raw) if "\udc80" <= ch <= "\udcff"), None)
    if bad is None:
        return None
    line_start = raw.rfind("\n", 0, bad) + 1
    reason = f"not UTF-8 text: byte 0x{ord(raw[bad]) - 0xDC00:02x} at column {bad - line_start + 1}"

    def holds(item) -> bool:
        if isinstance(item, str):
            return _lone_surrogate(item) is not None
        if isinstance(item, Mapping):
            return any(holds(k) or holds(v) for k, v in item.items())
        return isinstance(item, list) and any(holds(v) for v in item)

    if isinstance(value, Mapping):
        for key, item in value.items():
            if holds(item) and not holds(key):
                return str(key), reason
    return "<row>", reason


def _json_list(text: str, source: str) -> Iterator[tuple[int, Any, str]]:
    """(1-based line, value, its raw text) of each element of a JSON list document."""
    decoder = json.JSONDecoder()
    whitespace = " \t\n\r"

    def fail(message: str, at: int):
        line = text.count("\n", 0, at) + 1
        column = at - text.rfind("\n", 0, at)
        raise DataError(source, -1, "<json>", f"not valid JSON (line {line}, column {column}): {message}") from None

    index, line, counted = text.index("[") + 1, 1, 0
    while True:
        while index < len(text) and text[index] in whitespace:
            index += 1
        if index < len(text) and text[index] == "]" and counted == 0:
            break
        start = index
        try:
            value, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as error:
            fail(error.msg, error.pos)
        line += text.count("\n", counted, start)
        counted = start
        yield line, value, text[start:index]
        while index < len(text) and text[index] in whitespace:
            index += 1
        if index < len(text) and text[index] == ",":
            index += 1
        elif index < len(text) and text[index] == "]":
            break
        else:
            fail("expected ',' or ']' after a list element", index)
    if text[index + 1:].strip(whitespace):
        fail("extra data after the list", index + 1)


def _json_rows(path: Path) -> Iterator[tuple[int | None, Any]]:
    """(1-based line, row) of a JSON list file or a JSON-lines file; a line that is not JSON, or not
    UTF-8, becomes a DataError row (so --skip-bad-rows can skip it)."""
    source = path.name
    # bytes that are not UTF-8 survive as lone surrogates, so the rest of the file still parses
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    if text.lstrip().startswith("["):  # one JSON document: a list of rows
        for row_index, (line, value, raw) in enumerate(_json_list(text, source)):
            bad = _undecodable(raw, value)
            yield line, (DataError(source, row_index, *bad, line) if bad else value)
        return
    # lines end at "\n" only: str.splitlines would also cut at U+2028 and other characters JSON strings may hold
    lines = [(number, line) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    for row_index, (number, line) in enumerate(lines):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            bad = _undecodable(line, None)
            reason = bad[1] if bad else f"not valid JSON (column {error.colno}): {error.msg}"
            yield number, DataError(source, row_index, "<json>", reason, number)
            continue
        bad = _undecodable(line, value)
        yield number, (DataError(source, row_index, *bad, number) if bad else value)


def _parquet_rows(path: Path) -> Iterator[tuple[None, Mapping]]:
    import pyarrow.parquet as pq

    for row in pq.read_table(path).to_pylist():
        yield None, row


def _hub_rows(spec: str, split: str) -> Iterable[Mapping]:
    """A Hugging Face data set: a hub name (optionally ':data_dir'), or a local data set folder."""
    import datasets

    if os.path.isdir(spec):
        folder = Path(spec)
        if (folder / "dataset_dict.json").exists():     # written by DatasetDict.save_to_disk
            return datasets.load_from_disk(spec)[split]
        if (folder / "state.json").exists():            # one split written by Dataset.save_to_disk
            return datasets.load_from_disk(spec)
        return datasets.load_dataset(spec, split=split)  # a folder of train/test data files
    name, data_dir = parse_dataset_spec(spec)
    return datasets.load_dataset(name, data_dir=data_dir, split=split)


def _rows(spec: str, split: str) -> tuple[str, Iterable[tuple[int | None, Any]]]:
    """(source name for errors, (1-based line or None, row) pairs) for a spec; a row may be a DataError to report."""
    if spec == "builtin":
        from trainers.data.builtin import builtin_pairs

        return "builtin", ((None, pair) for pair in builtin_pairs(split))
    if spec.lower().endswith(LOCAL_SUFFIXES):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        # a local file has no splits: load_preference_data cuts it by prompt hash (is_held_out)
        rows = _parquet_rows(path) if path.suffix.lower() == ".parquet" else _json_rows(path)
        return path.name, rows
    if os.path.isfile(spec):
        raise ValueError(f"unsupported data file {spec!r}: use .jsonl, .json or .parquet")
    name = Path(spec).name if os.path.isdir(spec) else spec
    return f"{name} [{split}]", ((None, row) for row in _hub_rows(spec, split))


def load_preference_data(spec: str, split: str = "train", *, skip_bad_rows: bool = False,
                         max_rows: int | None = None,
                         holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION) -> LoadedData:
    """Validated pairs from `spec`: 'builtin', a .jsonl/.json/.parquet file, or a data set name.

    A local file has no splits of its own: split 'train' is its rows whose prompt is not held out
    (`is_held_out` with `holdout_fraction`), any other split name the held-out rows.
    The first bad row raises its DataError, unless `skip_bad_rows` collects them in `skipped`;
    `max_rows` keeps the first N valid rows of the split (reading stops there).
    """
    source, rows = _rows(spec, split)
    local = spec.lower().endswith(LOCAL_SUFFIXES)
    want_held_out = split != TRAIN_SPLIT
    loaded = LoadedData(pairs=[], skipped=[])
    for row_index, (line, row) in enumerate(rows):
        if max_rows is not None and len(loaded.pairs) >= max_rows:
            break
        try:
            if isinstance(row, DataError):
                raise row
            pair = row if isinstance(row, PreferencePair) else parse_hh_row(row, source, row_index, line)
            if local and is_held_out(pair.prompt, holdout_fraction) != want_held_out:
                continue  # the other split's row (a bad row is reported in either split)
            loaded.pairs.append(pair)
        except DataError as error:
            if not skip_bad_rows:
                raise
            loaded.skipped.append(error)
    return loaded
