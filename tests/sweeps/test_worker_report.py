"""The typed worker report on the trial's side: what MlflowReportCallback writes for it (a real
SQLite store), and a diverged report marking the run instead of vanishing."""
from __future__ import annotations

import math

from infra.tracking import Tracker, default_tracking_uri
from trainers.runs.worker_report import REPORT_KEY, WorkerReport, non_finite_metrics, public_metrics, report_of


def test_non_finite_metrics_are_named():
    assert non_finite_metrics({"step": 3, "train/loss": math.nan, "train/lr": 1e-3, "x": -math.inf, "flag": True}) == \
        ["train/loss", "x"]
    assert non_finite_metrics({"train/loss": 0.5}) == []


def test_a_report_carries_the_last_steps_scalars_and_itself():
    report = WorkerReport(step=2, history=[{"step": 1, "train/loss": 0.7}, {"step": 2, "train/loss": 0.6}])
    payload = report.metrics_payload()
    assert public_metrics(payload) == {"step": 2, "train/loss": 0.6}
    assert report_of(payload) is report and REPORT_KEY not in public_metrics(payload)


def test_the_callback_logs_every_step_tags_and_a_divergence(tmp_path):
    from sweeps.trial import DIVERGED_TAG, MlflowReportCallback

    tracker = Tracker(default_tracking_uri(tmp_path))
    run_id = tracker.start_run(tracker.experiment_id("unit"), "beta=0.1")
    callback = MlflowReportCallback(tracker.tracking_uri, run_id)
    first = WorkerReport(step=1, history=[{"step": 0, "logp/chosen": -20.0}, {"step": 1, "train/loss": 0.7}],
                         nodes=["n1", "n2"], train_pairs=64, skipped_rows=0)
    callback.after_report(None, [first.metrics_payload(), {"step": 1}], None)
    diverged = WorkerReport(step=2, history=[{"step": 2, "train/loss": math.nan}], non_finite="train/loss=nan at step 2")
    callback.after_report(None, [diverged.metrics_payload(), {"step": 2}], None)
    tags = tracker.run(run_id).data.tags
    assert tags["ray_nodes"] == "n1,n2" and tags["data.train_pairs"] == "64"
    assert tags[DIVERGED_TAG] == "non-finite train/loss=nan at step 2"
    loss = tracker.metric_history(run_id, "train/loss")
    assert loss[0] == (1, 0.7) and loss[1][0] == 2 and math.isnan(loss[1][1])  # the break is visible in the curve
