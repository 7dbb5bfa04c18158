"""End to end on a real local Ray and a real MLflow SQLite store: a 2-seed DPO sweep of one beta with
--stop-fall-from-peak on the rejected curve (which DPO pushes down), read back from MLflow: the trials
stop before max_steps and are marked so, the seeds are averaged in the CSV, and every run records the
SHA-256 of its training data."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from infra.tracking import Tracker, default_tracking_uri
from sweeps.config import parse_config
from sweeps.driver import run_sweep
from sweeps.run_manifest import training_data_sha256
from sweeps.search import search_space

pytestmark = pytest.mark.ray
MAX_STEPS = 12


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("seeds")
    config = parse_config(["--name", "seeds", "--betas", "0.5", "--seeds", "0", "1", "--sft-steps", "0",
                           "--lr", "3e-3", "--stop-fall-from-peak", "0.001", "--stop-metric", "logp/rejected",
                           "--tracking-uri", default_tracking_uri(root), "--storage-path", str(root / "runs"),
                           "--num-cpus", "2", "--max-concurrent-trials", "2", "--experiment-name", "seeds",
                           "--max-steps", str(MAX_STEPS), "--eval-every", "2", "--num-probe-prompts", "4",
                           "--max-train-pairs", "64", "--greedy-max-tokens", "4", "--micro-batch-size", "4",
                           "--num-workers", "1", "--grad-cos-prompts", "0"])
    outcome = run_sweep(config, search_space(config, {"beta": config.betas, "seed": config.seeds}))
    yield config, outcome, Tracker(outcome.tracking_uri)
    ray.shutdown()


def test_trials_stop_below_their_peak_and_seeds_are_averaged(sweep):
    config, outcome, tracker = sweep
    assert outcome.failed_trials == []
    parent = tracker.run(outcome.parent_run_id)
    children = [r for r in tracker.child_runs(parent.info.experiment_id, outcome.parent_run_id)
                if r.data.tags.get("stage") == "sweep"]
    assert sorted(r.data.params["seed"] for r in children) == ["0", "1"]
    for run in children:
        rejected = tracker.metric_history(run.info.run_id, "logp/rejected")
        falls = [max(v for _, v in rejected[:i + 1]) - value for i, (_, value) in enumerate(rejected)]
        assert rejected[-1][0] < MAX_STEPS, "the stopper should end the trial before max_steps"
        assert max(falls) >= 0.001  # an evaluation that far below the running peak came before the stop
        assert run.info.status == "KILLED" and run.data.tags["ended_by"] == "fall-from-peak stopper"
    frame = pd.read_csv(tracker.client.download_artifacts(outcome.parent_run_id, "summary/sweep_summary_over_seeds.csv"))
    assert list(frame["n_seeds"]) == [2] and "delta/rejected_ci_low" in frame
    names = {a.path for a in tracker.client.list_artifacts(outcome.parent_run_id, "figures")}
    assert names == {"figures/category_curves.png", "figures/final_delta_vs_beta.png"}


def test_every_run_records_the_training_data_hash(sweep, tmp_path):
    config, outcome, tracker = sweep
    expected, source = training_data_sha256(config.train)
    assert tracker.run(outcome.parent_run_id).data.params["data_hash"] == expected
    parent = tracker.run(outcome.parent_run_id)
    for run in tracker.child_runs(parent.info.experiment_id, outcome.parent_run_id):
        assert run.data.params["data_hash"] == run.data.params["manifest.data_hash"] == expected
        manifest = json.loads(tracker.download_artifact(run.info.run_id, "manifest.json", tmp_path / run.info.run_id).read_text())
        assert (manifest["data_hash"], manifest["data_source"]) == (expected, source)
