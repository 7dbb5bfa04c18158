"""Kill a running sweep's driver (the whole process group: driver, local Ray, workers) while its second
trial is mid-way, then `--resume` it: the finished trial is not rerun, the interrupted one continues
from its checkpoint in the same MLflow run, and every curve has exactly one point per step."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.tracking import Tracker, default_tracking_uri

pytestmark = pytest.mark.ray
ENTRY = Path(__file__).resolve().parents[2] / "sweeps" / "dpo_beta.py"
MAX_STEPS, EVAL_EVERY, CHECKPOINT_EVERY, KILL_AFTER_STEP = 24, 8, 4, 6


def _command(root: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ENTRY), "--name", "rtest", "--experiment-name", "rtest", "--betas", "0.1", "0.5",
            "--lr", "1e-3", "--sft-steps", "2", "--tracking-uri", default_tracking_uri(root),
            "--storage-path", str(root / "runs"), "--num-cpus", "2", "--max-concurrent-trials", "1",
            "--max-steps", str(MAX_STEPS), "--eval-every", str(EVAL_EVERY), "--checkpoint-every", str(CHECKPOINT_EVERY),
            "--report-every", "1", "--num-probe-prompts", "4", "--max-train-pairs", "200", "--greedy-max-tokens", "8",
            "--micro-batch-size", "4", "--num-workers", "2", *extra]


def _trials(tracker: Tracker, experiment_id: str, parent_id: str) -> list:
    runs = tracker.child_runs(experiment_id, parent_id)
    return sorted((r for r in runs if r.data.tags.get("stage") == "sweep"), key=lambda r: r.info.start_time)


def _last_step(tracker: Tracker, run_id: str) -> int:
    return max((s for s, _ in tracker.metric_history(run_id, "train/loss")), default=0)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    log = (root / "first.log").open("w")
    driver = subprocess.Popen(_command(root), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    tracker = Tracker(default_tracking_uri(root))
    deadline = time.monotonic() + 420
    second_step = 0
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.5)
            experiment = tracker.client.get_experiment_by_name("rtest")
            parents = tracker.client.search_runs([experiment.experiment_id], "attributes.run_name = 'sweep:rtest'") if experiment else []
            trials = _trials(tracker, experiment.experiment_id, parents[0].info.run_id) if parents else []
            if len(trials) == 2 and (second_step := _last_step(tracker, trials[1].info.run_id)) >= KILL_AFTER_STEP:
                break
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # driver, its local Ray and every worker
        driver.wait()
        log.close()
    assert KILL_AFTER_STEP <= second_step < MAX_STEPS, (second_step, (root / "first.log").read_text()[-3000:])
    parent_id = parents[0].info.run_id
    before = {r.info.run_id: r for r in trials}
    assert tracker.run(trials[0].info.run_id).info.status == "FINISHED"
    assert tracker.run(parent_id).info.status == "RUNNING"  # nobody ended it: the driver died

    resumed = subprocess.run(_command(root, "--resume"), capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return tracker, experiment.experiment_id, parent_id, before, second_step, resumed.stdout


def test_resume_reopens_the_same_parent_and_child_runs(killed_and_resumed):
    tracker, experiment_id, parent_id, before, _, stdout = killed_and_resumed
    assert f"resuming sweep 'rtest': MLflow parent run {parent_id}" in stdout
    parents = tracker.client.search_runs([experiment_id], "attributes.run_name = 'sweep:rtest'")
    assert [p.info.run_id for p in parents] == [parent_id]
    assert tracker.run(parent_id).info.status == "FINISHED"
    trials = _trials(tracker, experiment_id, parent_id)
    assert {r.info.run_id for r in trials} == set(before)  # no duplicated child run
    assert all(r.info.status == "FINISHED" for r in trials)
    warmups = [r for r in tracker.child_runs(experiment_id, parent_id) if r.data.tags.get("stage") == "sft-warmup"]
    assert len(warmups) == 1  # the cached warm-up was not trained again


def test_the_finished_trial_was_not_rerun(killed_and_resumed):
    tracker, _, _, before, _, _ = killed_and_resumed
    first = min(before.values(), key=lambda r: r.info.start_time)
    assert tracker.run(first.info.run_id).info.end_time == first.info.end_time
    assert "resumed_from_step" not in tracker.run(first.info.run_id).data.tags


def test_interrupted_trial_continued_from_its_checkpoint(killed_and_resumed):
    tracker, _, _, before, second_step, _ = killed_and_resumed
    second = max(before.values(), key=lambda r: r.info.start_time)
    resumed_from = int(tracker.run(second.info.run_id).data.tags["resumed_from_step"])
    # training runs a little ahead of what reached MLflow when the kill landed, so the checkpoint may be
    # later than the last step seen; it is never step 0 (a restart from scratch) nor the end
    assert resumed_from % CHECKPOINT_EVERY == 0 and CHECKPOINT_EVERY <= resumed_from < MAX_STEPS, (resumed_from, second_step)


def test_every_curve_has_one_point_per_step(killed_and_resumed):
    tracker, _, _, before, _, _ = killed_and_resumed
    for run_id in before:
        assert [s for s, _ in tracker.metric_history(run_id, "train/loss")] == list(range(1, MAX_STEPS + 1))
        for key in ("logp/chosen", "logp/rejected", "logp/greedy", "logp_tok/nonresponse"):
            assert [s for s, _ in tracker.metric_history(run_id, key)] == list(range(0, MAX_STEPS + 1, EVAL_EVERY)), key
