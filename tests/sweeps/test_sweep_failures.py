"""A sweep whose trial diverges, run as a user would (the script, a real local Ray, a real MLflow
SQLite store): the worker stops at the first non-finite metric, the trial's run fails with the reason,
Tune does not retry it as a crash, and the command says which trial failed and why, and exits 1."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.tracking import Tracker, default_tracking_uri

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def test_a_diverged_trial_fails_loudly_once_and_the_sweep_exits_non_zero(tmp_path):
    # an absurd learning rate: the first update blows the weights up, the next loss is not a number
    argv = ["sweeps/dpo_beta.py", "--betas", "0.1", "--lr", "1e30", "--sft-steps", "0", "--max-steps", "4",
            "--eval-every", "4", "--num-workers", "1", "--num-probe-prompts", "2", "--max-train-pairs", "16",
            "--micro-batch-size", "4", "--greedy-max-tokens", "4", "--share-reference-logps", "false",
            "--max-failures", "2", "--num-cpus", "2", "--name", "diverge",
            "--storage-path", str(tmp_path / "runs"), "--tracking-uri", default_tracking_uri(tmp_path)]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    failed = [line.strip() for line in done.stderr.splitlines() if line.strip().startswith("failed trial ")]
    assert len(failed) == 1 and failed[0].startswith("failed trial beta=0.1 lr=1e+30: diverged: non-finite "), done.stderr[-3000:]
    assert "Traceback" not in done.stderr

    tracker = Tracker(default_tracking_uri(tmp_path))
    experiment = tracker.experiment_id("probesweep")
    parent = tracker.client.search_runs([experiment], "tags.sweep = 'diverge' and attributes.run_name = 'sweep:diverge'")[0]
    assert parent.info.status == "FAILED"
    (trial,) = tracker.child_runs(experiment, parent.info.run_id)  # one run: not retried as a new attempt
    assert trial.info.status == "FAILED" and trial.data.tags["failure"].startswith("diverged: non-finite ")
    assert "resumed_from_step" not in trial.data.tags  # no Train restart from a checkpoint either
    step = int(trial.data.tags["diverged"].rsplit(" ", 1)[-1])
    loss = tracker.metric_history(trial.info.run_id, "train/loss")
    assert [s for s, _ in loss] == list(range(1, step + 1)) and step < 4  # stopped at the divergence
    assert loss[-1][1] != loss[-1][1] or abs(loss[-1][1]) > 1e300  # the break itself is in the curve (NaN)
