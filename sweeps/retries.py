"""Who retries a crashed trial: Ray Train (restart its workers) or Tune (rerun the whole trial) — never both.

Both levels retrying multiplies: every Tune rerun of a trial builds a TorchTrainer that restarts its
worker group up to its own limit, so a trial that always crashes ran (max_failures + 1)² times.
`--max-failures` is the times a crashed trial is retried, so one level takes it and the other gets 0:

* Trials on the head (`--trials-on-head`, the default): **Ray Train**. The trial's process and its
  Train controller sit on the head, which is never lost alone (losing it loses the cluster), so a
  crash is a training worker's: its node lost, out of memory, a failed collective. Train restarts
  just the worker group from the last checkpoint; a Tune rerun would also start a new trial process
  (its imports and MLflow lookup take minutes on a loaded 2-core machine) to arrive at the same
  checkpoint. An error in the trial process itself (outside the workers) is not retried.
* Trials anywhere (`--trials-on-head false`): **Tune**. A trial's own process can now go with its
  node, and only Tune reruns it; the rerun's TorchTrainer resumes from the same checkpoint (Ray
  Train restores a run of the same name and storage path), so a lost worker costs the same steps.

Failures that a retry would only repeat (a diverged loss, a replaced probe set, no readable
checkpoint) are not crashes: the trial fails its run once and raises nothing. Ray Train's separate
allowance for node preemptions (spot reclaims announced by a drain, unlimited by default) is left
as Ray sets it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CrashRetries:
    train: int   # Ray Train FailureConfig(max_failures): worker-group restarts within one trial process
    tune: int    # Tune FailureConfig(max_failures): reruns of the trial process


def crash_retries(max_failures: int, trials_on_head: bool) -> CrashRetries:
    """`max_failures` retries at the one level that owns them (see the module docstring)."""
    if trials_on_head:
        return CrashRetries(train=max_failures, tune=0)
    return CrashRetries(train=0, tune=max_failures)
