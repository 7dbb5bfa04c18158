"""Per-token log-probs of an evaluation, stored next to its per-example CSV as a compact npz.

Evaluation records carry `token_ids`, `token_texts` and `token_logps` lists; a CSV cell is the wrong
place for them, so `log_probe_records` writes the scalar columns to `logps/step_<step>.csv` (as
before) and the token lists, flattened with offsets, to `token_logps/step_<step>.npz`. The npz holds
only numeric and unicode arrays and is read with `allow_pickle=False`.
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

TOKEN_FIELDS = ("token_ids", "token_texts", "token_logps")
ARTIFACT_DIR = "token_logps"
_STEP_FILE = re.compile(r"step_(\d+)\.npz$")


@dataclass(frozen=True)
class TokenScores:
    """One response at one evaluation: its tokens, their text pieces and log p of each."""
    token_ids: np.ndarray    # [n] int64
    token_texts: list[str]
    token_logps: np.ndarray  # [n] float32


def split_token_fields(records: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(records without the token lists, records that have them)."""
    scalars = [{k: v for k, v in r.items() if k not in TOKEN_FIELDS} for r in records]
    with_tokens = [r for r in records if all(k in r for k in TOKEN_FIELDS)]
    return scalars, with_tokens


def write_token_npz(records: Sequence[dict], path: str | Path) -> Path:
    """Flatten each record's token lists (row i = tokens offsets[i]:offsets[i+1]) into one npz."""
    lengths = [len(r["token_ids"]) for r in records]
    for r, n in zip(records, lengths):
        if len(r["token_logps"]) != n or len(r["token_texts"]) != n:
            raise ValueError(f"prompt {r['prompt_id']} {r['category']}: token lists of different lengths")
    path = Path(path)
    np.savez_compressed(
        path,
        prompt_id=np.asarray([int(r["prompt_id"]) for r in records], dtype=np.int64),
        category=np.asarray([str(r["category"]) for r in records], dtype=np.str_),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        token_ids=np.asarray([t for r in records for t in r["token_ids"]], dtype=np.int64),
        token_texts=np.asarray([t for r in records for t in r["token_texts"]], dtype=np.str_),
        token_logps=np.asarray([v for r in records for v in r["token_logps"]], dtype=np.float32),
    )
    return path


def read_token_npz(path: str | Path) -> dict[tuple[int, str], TokenScores]:
    """(prompt_id, category) -> TokenScores, from a file written by `write_token_npz`."""
    with np.load(path, allow_pickle=False) as data:
        offsets, ids, texts, logps = data["offsets"], data["token_ids"], data["token_texts"], data["token_logps"]
        out = {}
        for i, (prompt_id, category) in enumerate(zip(data["prompt_id"].tolist(), data["category"].tolist())):
            span = slice(int(offsets[i]), int(offsets[i + 1]))
            out[(int(prompt_id), str(category))] = TokenScores(ids[span].copy(), [str(t) for t in texts[span]],
                                                               logps[span].copy())
    return out


def step_of_artifact(name: str) -> int | None:
    match = _STEP_FILE.search(name)
    return int(match.group(1)) if match else None


def log_probe_records(tracker, run_id: str, records: Sequence[dict], step: int) -> None:
    """`logps/step_<step>.csv` (scalar columns) and, where records carry tokens, `token_logps/step_<step>.npz`."""
    import pandas as pd

    scalars, with_tokens = split_token_fields(records)
    tracker.log_dataframe(run_id, pd.DataFrame(scalars), f"logps/step_{step:06d}.csv")
    if with_tokens:
        with tempfile.TemporaryDirectory() as tmp:
            path = write_token_npz(with_tokens, Path(tmp) / f"step_{step:06d}.npz")
            tracker.log_artifact(run_id, path, ARTIFACT_DIR)
