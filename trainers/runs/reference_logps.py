"""Reference-model log-probs of every training pair, computed once and shared by all trials.

In DPO the reference model is frozen, so log π_ref(y|x) of each training pair is a constant of the
sweep: every trial that starts from the same reference on the same tokenized data needs the same
numbers. Computing them once (instead of one extra forward per step per trial) and storing them
under a content key — a hash of the reference weights and of the token ids — lets every trial, and
any later sweep with the same key, load them; a worker recomputes the key and refuses a file that
does not match.

A sweep's trials visit only the pairs of their schedule (same seed -> same batches, a pure function of
the step), so only those are scored: the file marks which pairs it holds, a later sweep that needs
more adds the missing ones, and a trial asking for a pair outside it fails with the pair named.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from infra import storage
from trainers.data.batches import ShardedBatches
from trainers.data.collate import TokenizedPair, collate_preference_batch
from trainers.model.logprobs import sequence_logps

log = logging.getLogger(__name__)


def weights_fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def pairs_fingerprint(pairs: Sequence[TokenizedPair]) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(np.asarray(ids, dtype=np.int64).tobytes())
            digest.update(b"|")
    return digest.hexdigest()


def reference_key(model: torch.nn.Module, pairs: Sequence[TokenizedPair]) -> str:
    return hashlib.sha256(f"{weights_fingerprint(model)}:{pairs_fingerprint(pairs)}".encode()).hexdigest()[:20]


class UnreadableReferenceLogps(ValueError):
    """A reference log-prob file that exists but cannot be read (truncated, not an .npz, fields missing)."""


class MissingReferenceLogps(KeyError):
    """A trial asked for a pair the shared file does not hold: its schedule differs from the sweep's."""


def visited_pair_indices(num_pairs: int, micro_batch_size: int, world_size: int, grad_accum_steps: int,
                         seed: int, max_steps: int) -> np.ndarray:
    """Sorted indices of the pairs a run of `max_steps` steps draws on any rank, plus the batch after
    the last step (the final evaluation's gradient alignment looks at the next micro-batch)."""
    batches = [ShardedBatches(range(num_pairs), micro_batch_size, rank, world_size, seed) for rank in range(world_size)]
    visited = {i for index in range(max_steps * grad_accum_steps + 1) for b in batches for i in b.batch(index)}
    return np.asarray(sorted(visited), dtype=np.int64)


@dataclass(frozen=True)
class ReferenceLogps:
    key: str
    chosen: np.ndarray     # [N] summed log π_ref(chosen | prompt), float64; NaN where not computed
    rejected: np.ndarray   # [N]
    computed: np.ndarray | None = None  # [N] bool: which pairs hold values (None: all of them)

    def holds(self) -> np.ndarray:
        return np.ones(len(self.chosen), dtype=bool) if self.computed is None else self.computed

    def pick(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(chosen, rejected) of `indices`; a pair the file does not hold is an error, never a NaN."""
        indices = np.asarray(indices, dtype=np.int64)
        missing = indices[~self.holds()[indices]]
        if len(missing):
            raise MissingReferenceLogps(
                f"pairs {missing[:5].tolist()} are not in the shared reference log-probs (key {self.key}, "
                f"{int(self.holds().sum())} of {len(self.chosen)} pairs, those the sweep's schedule visits): this "
                "trial's batches differ from the sweep's (seed, micro batch, workers, steps); unset reference_logps_dir")
        return self.chosen[indices], self.rejected[indices]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with storage.atomic_path(path, suffix=".npz") as staging:  # readers never see a half-written file
            np.savez(staging, key=np.asarray(self.key), chosen=self.chosen, rejected=self.rejected, computed=self.holds())
        return path

    @classmethod
    def load(cls, path: str | Path, expected_key: str, expected_pairs: int) -> "ReferenceLogps":
        """`path` may be a URI (remote storage): the file is read from this node's copy of it."""
        if not storage.exists(path):
            raise FileNotFoundError(f"{path}: no shared reference log-probs for this reference model and data "
                                    f"(key {expected_key}); the sweep driver computes them, or unset reference_logps_dir")
        try:
            with np.load(storage.local_copy(path)) as data:
                computed = data["computed"].astype(bool) if "computed" in data.files else None  # older files: all pairs
                loaded = cls(str(data["key"]), data["chosen"].astype(np.float64), data["rejected"].astype(np.float64), computed)
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise UnreadableReferenceLogps(f"{path}: unreadable reference log-prob file "
                                           f"({type(error).__name__}: {error})") from error
        if loaded.key != expected_key:
            raise ValueError(f"{path}: reference log-probs were computed for key {loaded.key}, but this model and "
                             f"data give {expected_key} (different reference weights or tokenized data)")
        if any(len(a) != expected_pairs for a in (loaded.chosen, loaded.rejected, loaded.holds())):
            raise ValueError(f"{path}: holds {len(loaded.chosen)} pairs, the training data has {expected_pairs}")
        held = loaded.holds()
        if not (np.isfinite(loaded.chosen[held]).all() and np.isfinite(loaded.rejected[held]).all()):
            raise ValueError(f"{path}: contains non-finite log-probs")
        return loaded


@torch.no_grad()
def compute_reference_logps(model, pairs: Sequence[TokenizedPair], pad_id: int, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probs of chosen and rejected for every pair, in batches like the training forward."""
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = collate_preference_batch(chunk, pad_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        sums, _, _ = sequence_logps(logits, batch["labels"].to(device))
        chosen.append(sums[: len(chunk)].double().cpu().numpy())
        rejected.append(sums[len(chunk):].double().cpu().numpy())
    return np.concatenate(chosen), np.concatenate(rejected)


def reference_logps_path(directory: str | Path, key: str) -> Path | str:
    """The file of `key` in `directory`: a Path, or a URI when the directory is one."""
    if storage.is_uri(directory):
        return storage.join(directory, f"reference-logps-{key}.npz")
    return Path(directory) / f"reference-logps-{key}.npz"


def load_or_compute_reference_logps(model, pairs: Sequence[TokenizedPair], pad_id: int, directory: str | Path,
                                    batch_size: int = 16, indices: Sequence[int] | None = None
                                    ) -> tuple[ReferenceLogps, Path, bool]:
    """(log-probs, their file, whether any were computed now) for this reference model and data.

    `indices`: the pairs needed (default: all); a file holding them all is reused, one holding some
    gets the rest added. `directory` may be a URI (remote storage): the file is then written locally and uploaded."""
    key = reference_key(model, pairs)
    path = reference_logps_path(directory, key)
    needed = np.zeros(len(pairs), dtype=bool)
    needed[np.arange(len(pairs)) if indices is None else np.asarray(indices, dtype=np.int64)] = True
    chosen, rejected = np.full(len(pairs), np.nan), np.full(len(pairs), np.nan)
    held = np.zeros(len(pairs), dtype=bool)
    if storage.exists(path):
        try:
            existing = ReferenceLogps.load(path, key, len(pairs))
        except UnreadableReferenceLogps as error:  # e.g. a copy cut short: the content is known, so rebuild it
            log.warning("%s; computing the reference log-probs again and replacing it", error)
        else:
            if not (needed & ~existing.holds()).any():
                return existing, path, False
            held = existing.holds().copy()
            chosen[held], rejected[held] = existing.chosen[held], existing.rejected[held]
    missing = np.flatnonzero(needed & ~held)
    chosen[missing], rejected[missing] = compute_reference_logps(model, [pairs[i] for i in missing], pad_id, batch_size)
    held[missing] = True
    logps = ReferenceLogps(key, chosen, rejected, held)
    if storage.is_uri(path):
        with tempfile.TemporaryDirectory() as staging:
            storage.upload_file(logps.save(Path(staging) / f"reference-logps-{key}.npz"), path)
    else:
        logps.save(path)
    return logps, path, True
