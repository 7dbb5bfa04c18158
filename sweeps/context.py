"""What every trial of a sweep receives beside its TrainConfig: where to log and store, and what the
driver prepared once (warm-ups, probe set). It crosses into the Tune trial process with the trial's
config (Ray pickles it), so it holds plain values only."""
from __future__ import annotations

from dataclasses import dataclass, field

from probes.probe_set import DYNAMIC_CATEGORIES, STATIC_CATEGORIES

CATEGORIES = list(STATIC_CATEGORIES) + list(DYNAMIC_CATEGORIES)  # what every trial scores


@dataclass(frozen=True)
class TrialContext:
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    storage_path: str                                   # a local folder or a URI
    sweep_name: str
    max_failures: int                                   # Ray Train retries of a trial's worker group
    probe_set_hash: str
    categories: tuple[str, ...]
    worker_shares: dict[str, float] = field(default_factory=dict)      # model -> CPU (or GPU) share per worker
    worker_resources: dict[str, float] = field(default_factory=dict)   # extra Ray resources per worker
    stage: str = "sweep"                                # "sft-warmup" or "sweep"
    init_checkpoints: dict[str, str] = field(default_factory=dict)     # warmup_key(model, recipe) -> warm-up folder
    final_model_dirs: dict[str, str] = field(default_factory=dict)     # warmup_key -> where a warm-up trial saves
    checkpoints_to_keep: int = 2                        # Ray Train checkpoints kept per trial (CheckpointConfig)
    data_hash: str | None = None                        # SHA-256 of the training data (sweeps.run_manifest)
    data_source: str | None = None                      # what data_hash covers: a file's bytes or the loaded rows
