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
class WorkerReport:
    step: int
    history: list[dict] = field(default_factory=list)       # every step's metrics since the last report ({"step": n, ...})
    probe_records: list[dict] | None = None                 # per-example log-probs of an evaluation at `step`
    nodes: list[str] | None = None                          # Ray node of every rank, once per (re)started worker group
    resumed_from_step: int | None = None                    # the checkpoint step this worker group started from
    train_pairs: int | None = None                          # data counts, at step 0 and the last step
    skipped_rows: int | None = None
    final_model_dir: str | None = None                      # where the final model was saved
    non_finite: str | None = None                           # "train/loss=nan at step 7": the run diverged and stopped

    def metrics_payload(self) -> dict[str, Any]:
        """What `ray.train.report` gets: the last step's scalars, plus this report."""
        return {"step": self.step, **(self.history[-1] if self.history else {}), REPORT_KEY: self}


def report_of(metrics: Mapping[str, Any]) -> WorkerReport | None:
    return metrics.get(REPORT_KEY)


def public_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The scalars of a report (what Tune may see)."""
    return {k: v for k, v in metrics.items() if k != REPORT_KEY}


def non_finite_metrics(metrics: Mapping[str, Any]) -> list[str]:
    """Names of the numeric metrics that are nan or infinite."""
    return [k for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(float(v))]
