"""A worker's refusal reaches the trial's MLflow run as a tag that fails the run once (no Ray here: the
callback the Train controller runs, called with a worker's report as Ray would)."""
from __future__ import annotations

from infra.tracking import Tracker
from sweeps.trial import FAILURE_TAG, REFUSED_TAG, MlflowReportCallback
from trainers.runs.worker_report import WorkerReport


def test_a_refused_report_marks_the_run_with_the_reason(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracker.start_run(tracker.experiment_id("refusals"), "beta=0.1")
    reason = "probe set /x has content hash aaa, but this run recorded bbb: it was replaced after the sweep started"
    callback = MlflowReportCallback(tracker.tracking_uri, run_id)
    callback.after_report(None, [WorkerReport(step=0, refused=reason).metrics_payload(), {"step": 0}], None)
    tags = tracker.client.get_run(run_id).data.tags
    assert tags[REFUSED_TAG] == reason and FAILURE_TAG not in tags  # the trial turns it into the failure after fit
    assert tracker.metric_history(run_id, "train/loss") == []


def test_the_trial_fails_a_refused_or_diverged_run_with_its_reason():
    from sweeps.trial import DIVERGED_TAG, stop_reason

    assert stop_reason({REFUSED_TAG: "no readable checkpoint: x"}) == "refused: no readable checkpoint: x"
    assert stop_reason({DIVERGED_TAG: "non-finite train/loss=nan at step 3"}).startswith("diverged: non-finite")
    assert stop_reason({"ray_nodes": "a,b"}) is None
