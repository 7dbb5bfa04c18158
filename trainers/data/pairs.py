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


def _string_field(row: Mapping, name: str, source: str, row_index: int) -> str:
    if name not in row:
        raise DataError(source, row_index, name, "missing")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(source, row_index, name, f"expected a string, got {type(value).__name__}")
    return value


def parse_hh_row(row: Mapping, source: str, row_index: int) -> PreferencePair:
    """One row, HH transcripts or explicit {"prompt", "chosen", "rejected"}; DataError if bad."""
    if not isinstance(row, Mapping):
        raise DataError(source, row_index, "<row>", f"expected an object, got {type(row).__name__}")
    chosen_text = _string_field(row, "chosen", source, row_index)
    rejected_text = _string_field(row, "rejected", source, row_index)
    if "prompt" in row:  # explicit format: the responses are given without the prompt
        prompt = _string_field(row, "prompt", source, row_index)
        if not prompt.strip():
            raise DataError(source, row_index, "prompt", "empty prompt")
        chosen, rejected = chosen_text, rejected_text
    else:
        transcripts = {}
        for name, text in (("chosen", chosen_text), ("rejected", rejected_text)):
            try:
                transcripts[name] = split_transcript(text)
            except ValueError as error:
                raise DataError(source, row_index, name, str(error)) from None
        prompt, chosen = transcripts["chosen"]
        rejected_prompt, rejected = transcripts["rejected"]
        if rejected_prompt != prompt:
            raise DataError(source, row_index, "rejected", "prompt differs from the chosen transcript's prompt")
        if not prompt[: -len(ASSISTANT_MARKER)].strip():
            raise DataError(source, row_index, "chosen", "empty prompt (nothing before the Assistant turn)")
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if not response.strip():
            raise DataError(source, row_index, name, "empty response")
    return PreferencePair(prompt, chosen, rejected, source=source, row=row_index)


def parse_dataset_spec(spec: str) -> tuple[str, str | None]:
    """'Anthropic/hh-rlhf:helpful-base' -> ('Anthropic/hh-rlhf', 'helpful-base'); no colon -> None."""
    name, _, data_dir = spec.partition(":")
    if not name.strip():
        raise ValueError(f"data set spec {spec!r} has no data set name")
    return name, (data_dir or None)


def _json_rows(path: Path) -> Iterator[Any]:
    """Rows of a JSON list file or a JSON-lines file; an unparsable line becomes a DataError row."""
    source = path.name
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):  # one JSON document: a list of rows
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:  # the whole file is unusable, not one row
            raise DataError(source, -1, "<json>",
                            f"not valid JSON (line {error.lineno}, column {error.colno}): {error.msg}") from None
        yield from rows
        return
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    for row_index, (number, line) in enumerate(lines):
        try:
            yield json.loads(line)
        except json.JSONDecodeError as error:
            yield DataError(source, row_index, "<json>", f"line {number} is not valid JSON: {error.msg}")


def _parquet_rows(path: Path) -> Iterator[Mapping]:
    import pyarrow.parquet as pq

    yield from pq.read_table(path).to_pylist()


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


def _rows(spec: str, split: str) -> tuple[str, Iterable[Any]]:
    """(source name for errors, rows) for a spec; the rows may contain DataErrors to report."""
    if spec == "builtin":
        from trainers.data.builtin import builtin_pairs

        return "builtin", builtin_pairs(split)
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
    return f"{name} [{split}]", _hub_rows(spec, split)


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
    for row_index, row in enumerate(rows):
        if max_rows is not None and len(loaded.pairs) >= max_rows:
            break
        try:
            if isinstance(row, DataError):
                raise row
            pair = row if isinstance(row, PreferencePair) else parse_hh_row(row, source, row_index)
            if local and is_held_out(pair.prompt, holdout_fraction) != want_held_out:
                continue  # the other split's row (a bad row is reported in either split)
            loaded.pairs.append(pair)
        except DataError as error:
            if not skip_bad_rows:
                raise
            loaded.skipped.append(error)
    return loaded
