"""What a training worker reports to its trial, beside the scalar metrics Tune sees.

`ray.train.report` takes a dict: the last step's scalars go in as they are (Tune's metrics), and
everything else travels as one `WorkerReport` under `REPORT_KEY`, which the trial's callbacks
read as a typed value instead of decoding prefixed keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

REPORT_KEY = "_report"   # the one non-metric key of a report: Tune never sees it


@dataclass
class WorkerTimings:
    """Rank 0's clock (time.time()), so a benchmark can say where a trial's time went.

    `*_at` are wall timestamps; `*_s` are seconds summed over the run so far. A report's own round
    trip is not in the report it carries (the final one shows up as the trial's shutdown span)."""
    process_started_at: float | None = None   # the worker process (Ray may have started it for an earlier task)
    imports_started_at: float | None = None   # train_loop's module imports (torch, ray.train, the trainers) ...
    imports_done_at: float | None = None      # ... done; long before the loop when the process was reused
    loop_started_at: float | None = None      # train_loop_per_worker entered
    trainer_built_at: float | None = None     # PolicyTrainer built: model + tokenizer, data, reference log-probs, probes
    prepared_at: float | None = None          # checkpoint restored (if any), DDP wrapped, nodes gathered
    first_eval_done_at: float | None = None   # the step-0 evaluation
    steps_s: float = 0.0                      # train_step calls
    evals_s: float = 0.0                      # evaluations after step 0
    reports_s: float = 0.0                    # ray.train.report round trips without a checkpoint
    checkpoints_s: float = 0.0                # save_checkpoint + the report that hands it to Train
    final_save_s: float = 0.0                 # save_pretrained of the final model
    sent_at: float | None = None              # when the report carrying these was sent


@dataclass
class WorkerReport:
    step: int
    history: list[dict] = field(default_factory=list)       # every step's metrics since the last report ({"step": n, ...})
    probe_records: list[dict] | None = None                 # per-example log-probs of an evaluation at `step`
    nodes: list[str] | None = None                          # Ray node of every rank, once per (re)started worker group
    rollout: dict[str, str] | None = None                   # with `nodes`: the rollout engines and the weight-sync way in use
    resumed_from_step: int | None = None                    # the checkpoint step this worker group started from
    train_pairs: int | None = None                          # data counts, at step 0 and the last step
    skipped_rows: int | None = None
    final_model_dir: str | None = None                      # where the final model was saved
    non_finite: str | None = None                           # "train/loss=nan at step 7": the run diverged and stopped
    refused: str | None = None                              # why the run cannot go on as recorded (a replaced probe set, no readable checkpoint): fails once, not retried
    timings: WorkerTimings | None = None                    # rank 0's time spent so far (for benchmarks)

    def metrics_payload(self) -> dict[str, Any]:
        """What `ray.train.report` gets: the last step's scalars, plus this report."""
        return {"step": self.step, **(self.history[-1] if self.history else {}), REPORT_KEY: self}


def process_started_at() -> float | None:
    """When this process was created (time.time() clock), for the breakdown's process-start spans."""
    try:
        import psutil  # a Ray dependency
    except ImportError:
        return None
    return psutil.Process().create_time()


def report_of(metrics: Mapping[str, Any]) -> WorkerReport | None:
    return metrics.get(REPORT_KEY)


def public_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The scalars of a report (what Tune may see)."""
    return {k: v for k, v in metrics.items() if k != REPORT_KEY}


def non_finite_metrics(metrics: Mapping[str, Any]) -> list[str]:
    """Names of the numeric metrics that are nan or infinite."""
    return [k for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(float(v))]
