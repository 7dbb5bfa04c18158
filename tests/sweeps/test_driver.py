"""The driver's checks that run before any Ray start: clear errors, nothing started."""
from __future__ import annotations

import json

import pytest

from sweeps.config import SweepConfig
from sweeps.driver import STATE_FILE, open_parent_run
from infra.tracking import Tracker, default_tracking_uri


def test_resume_against_a_store_without_the_parent_run_says_so(tmp_path):
    # e.g. a cluster's SQLite store was lost with its head node while sweep_state.json stayed in the bucket
    state = tmp_path / "runs" / "lost" / STATE_FILE
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"parent_run_id": "0123456789abcdef0123456789abcdef", "experiment_id": "1",
                                 "tracking_uri": "http://10.0.0.1:5000"}))
    tracker = Tracker(default_tracking_uri(tmp_path))
    with pytest.raises(SystemExit, match="names MLflow parent run 0123456789abcdef0123456789abcdef .* does not have"):
        open_parent_run(tracker, SweepConfig(name="lost", resume=True), str(tmp_path / "runs"), None, "", 0)


def test_resume_without_a_state_file_names_the_missing_file(tmp_path):
    tracker = Tracker(default_tracking_uri(tmp_path))
    with pytest.raises(SystemExit, match=f"no interrupted sweep 'gone'.*{STATE_FILE} is missing"):
        open_parent_run(tracker, SweepConfig(name="gone", resume=True), str(tmp_path / "runs"), None, "", 0)
