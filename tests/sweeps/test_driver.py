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


def test_an_existing_sweep_name_is_refused_without_resume_or_overwrite(tmp_path):
    from sweeps.driver import check_before_start

    storage = str(tmp_path / "runs")
    check_before_start(SweepConfig(name="taken"), storage, {})  # a new name passes
    state = tmp_path / "runs" / "taken" / STATE_FILE
    state.parent.mkdir(parents=True)
    state.write_text("{}")
    with pytest.raises(SystemExit, match="--name 'taken': a sweep of that name already exists .* --resume .* --overwrite"):
        check_before_start(SweepConfig(name="taken"), storage, {})
    check_before_start(SweepConfig(name="taken", resume=True), storage, {})
    check_before_start(SweepConfig(name="taken", overwrite=True), storage, {})


def test_resources_a_local_ray_can_never_provide_are_refused_before_start(tmp_path, monkeypatch):
    from sweeps.config import parse_config
    from sweeps.driver import check_before_start

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    storage = str(tmp_path / "runs")
    # issue 15's case: one 2-CPU worker beside the trial's own sliver on a 2-core machine
    config = parse_config(["--num-workers", "1", "--cpus-per-worker", "2", "--num-cpus", "2"], "test")
    with pytest.raises(SystemExit, match=r"--num-workers 1 x --cpus-per-worker 2 \+ 0.01 for the trial process needs "
                                         r"2.01 CPUs, but the local Ray has 2 \(--num-cpus"):
        check_before_start(config, storage, {})
    # PPO's rollout actors count too; a per-model share is named as such
    ppo = parse_config(["--loss", "ppo", "--num-cpus", "2", "--num-workers", "2", "--cpus-per-worker", "0.5",
                        "--rollout-actors", "2", "--rollout-cpus-per-actor", "0.6"], "test")
    with pytest.raises(SystemExit, match="--rollout-actors 2 x --rollout-cpus-per-actor 0.6"):
        check_before_start(ppo, storage, {})
    shares = parse_config(["--num-cpus", "2", "--worker-shares", "big=1.5"], "test")
    with pytest.raises(SystemExit, match="--worker-shares big=1.5"):
        check_before_start(shares, storage, {"model": ["tiny-pythia-1m", "big"]})
    # what fits passes, and a cluster (--address) owns its resources
    check_before_start(parse_config(["--num-cpus", "2"], "test"), storage, {})
    check_before_start(parse_config(["--num-workers", "1", "--cpus-per-worker", "2", "--num-cpus", "2",
                                     "--address", "auto"], "test"), storage, {})


def test_every_failed_trial_gets_one_line_saying_why():
    from types import SimpleNamespace

    from sweeps.summary import failure_lines

    table = [{"run_name": "beta=0.1", "status": "FINISHED", "failure": None},
             {"run_name": "beta=0.5", "status": "FAILED", "failure": "diverged: non-finite train/loss=nan at step 3"},
             {"run_name": "beta=0.9", "status": "FAILED", "failure": None}]
    crashed = SimpleNamespace(error=RuntimeError("worker died\nValueError: out of memory"), config={"beta": 2.0})
    finished = SimpleNamespace(error=None, config={"beta": 0.1})
    assert failure_lines(table, [crashed, finished]) == [
        "beta=0.5: diverged: non-finite train/loss=nan at step 3",
        "beta=0.9: run status FAILED",
        "beta=2.0: RuntimeError: ValueError: out of memory",
    ]
