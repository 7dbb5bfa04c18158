"""The reproducibility manifest of one trial, from its resolved config (infra.manifest does the gathering)."""
from __future__ import annotations

from typing import Any, Mapping

from infra.manifest import build_manifest, file_sha256, rows_sha256


def _get(config: Mapping[str, Any], *names: str, default=None):
    """The first of `names` present; a dotted name reads a section (`rollout.engine`)."""
    for name in names:
        value: Any = config
        for part in name.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if value is not None:
            return value
    return default


def training_data_sha256(train) -> tuple[str, str]:
    """(SHA-256 hex, what it covers) of the training data a run of `train` (a TrainConfig) uses: a local
    file's bytes (its held-out rows included: the file is what a reader can check), else the train split's
    rows as loaded (the built-in set's generated rows, a hub data set's downloaded ones; --max-train-pairs
    and skipped bad rows applied), each as its prompt, chosen and rejected text."""
    from pathlib import Path

    from trainers.data.pairs import LOCAL_SUFFIXES, load_preference_data

    if train.dataset.lower().endswith(LOCAL_SUFFIXES):
        path = Path(train.dataset).expanduser()
        return file_sha256(path), f"bytes of the file {path.name}"
    data = load_preference_data(train.dataset, train.train_split, skip_bad_rows=train.skip_bad_rows,
                                max_rows=train.max_train_pairs, holdout_fraction=train.holdout_fraction)
    rows = ({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in data.pairs)
    return rows_sha256(rows), f"{len(data.pairs)} rows of {train.dataset} [{train.train_split}] as loaded (prompt, chosen, rejected)"


def trial_manifest(config: Mapping[str, Any], probe_set_hash: str | None, data_hash: str | None = None,
                   data_source: str | None = None) -> dict:
    """Sampling, dtypes and devices of training, scoring and rollouts as this config runs them.
    Models are built in float32 (trainers.model.factory), scoring runs on the training workers."""
    device = "cuda" if _get(config, "use_gpu", default=False) else "cpu"
    decodes = _get(config, "probe_decodes", default="local")
    engine = _get(config, "rollout.engine", "rollout_engine", default="auto")
    rollout_device = "cuda" if float(_get(config, "rollout.gpus_per_actor", "rollout_gpus_per_actor", default=0)) > 0 else "cpu"
    uses_actors = config.get("loss") == "ppo" or decodes == "actors"
    return build_manifest(
        data_hash=data_hash or f"{_get(config, 'dataset', default='?')}:{_get(config, 'train_split', default='train')}"
                                f" (first {_get(config, 'max_train_pairs', default='all')} pairs; no content hash)",
        data_source=data_source,
        probe_set_hash=probe_set_hash,
        sampling={"seed": _get(config, "seed"), "greedy_max_tokens": _get(config, "greedy_max_tokens"),
                  "greedy_temperature": 0.0, "sample_temperature": 1.0, "probe_decodes": decodes,
                  "ppo_temperature": _get(config, "ppo_temperature"), "ppo_max_new_tokens": _get(config, "ppo_max_new_tokens")},
        dtypes={"training": "float32", "scoring": "float32", "rollout": "float32"},
        devices={"training": device, "scoring": device,
                 "rollout": f"{rollout_device} ({engine} engine)" if uses_actors else f"{device} (in-process hf generate)"},
    )
