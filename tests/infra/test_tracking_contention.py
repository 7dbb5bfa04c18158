"""MLflow on SQLite under many writers: a write that meets "database is locked" is retried with backoff
instead of failing the trial, and a batch of more than 1,000 points cut short between its log_batch calls
leaves whole steps only, so the trial's replay (resume after the last logged step) leaves no gap."""
from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from mlflow.entities import Metric

from infra.tracking import REPLAY_KEYS, Tracker, step_chunks


HELD_S = 23.0  # without the retry, the write fails after MLflow's busy_timeout of 20 s


@pytest.fixture()
def tracker(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tracker


def test_a_write_waits_out_a_lock_held_past_sqlites_busy_timeout(tracker, tmp_path):
    experiment = tracker.experiment_id("contention")
    run_id = tracker.start_run(experiment, "writer")
    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # another writer holds the store past MLflow's 20 s SQLite busy timeout
    released = threading.Event()

    def release_later():
        time.sleep(HELD_S)
        holder.execute("COMMIT")
        released.set()

    threading.Thread(target=release_later, daemon=True).start()
    started = time.monotonic()
    tracker.log_metrics(run_id, {"train/loss": 0.5}, step=3)
    assert released.is_set() and time.monotonic() - started >= HELD_S
    assert tracker.metric_history(run_id, "train/loss") == [(3, 0.5)]
    holder.close()


def test_any_other_error_is_not_retried(tracker):
    started = time.monotonic()
    with pytest.raises(Exception, match="(?i)run"):
        tracker.log_metrics("no-such-run", {"train/loss": 1.0}, step=0)
    assert time.monotonic() - started < 5.0


def rows(steps: int, keys: int):
    return [(step, {**{f"m/{k}": float(k) for k in range(keys - 1)}, "train/loss": 1.0 / (step + 1)})
            for step in range(steps)]


def test_chunks_never_split_a_step_and_put_the_replay_key_last():
    batch = [Metric(k, v, 0, s) for s, metrics in rows(10, 300) for k, v in metrics.items()]
    chunks = step_chunks(batch)
    assert all(len(c) <= 1000 for c in chunks) and sum(map(len, chunks)) == len(batch)
    for chunk in chunks:
        steps = {m.step for m in chunk}
        assert all(sum(m.step == s for m in chunk) == 300 for s in steps)  # whole steps only
    huge = step_chunks([Metric(f"m/{k}", 0.0, 0, 5) for k in range(1500)] + [Metric("train/loss", 1.0, 0, 5)])
    assert [len(c) for c in huge] == [1000, 501] and huge[-1][-1].key in REPLAY_KEYS


def test_a_batch_cut_short_between_calls_leaves_whole_steps_for_the_replay(tracker, monkeypatch):
    experiment = tracker.experiment_id("cut-short")
    run_id = tracker.start_run(experiment, "writer")
    real = tracker.client._client.log_batch
    calls = []

    def crash_on_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("the process died between two log_batch calls")
        return real(*args, **kwargs)

    monkeypatch.setattr(tracker.client._client, "log_batch", crash_on_second_call)
    with pytest.raises(KeyboardInterrupt):
        tracker.log_metrics_by_step(run_id, rows(10, 300))  # 3,000 points: more than one call
    monkeypatch.undo()
    # what the replay reads: the last step with its train/loss logged; every key of every step up to it is there
    last = max(step for step, _ in tracker.metric_history(run_id, "train/loss"))
    for key in ("m/0", "m/150", "m/298"):
        assert [step for step, _ in tracker.metric_history(run_id, key)] == list(range(last + 1)), key
    # the replay logs the rest: one point per step for every key, no gap, no duplicate
    tracker.log_metrics_by_step(run_id, [row for row in rows(10, 300) if row[0] > last])
    for key in ("m/0", "m/298", "train/loss"):
        assert [step for step, _ in tracker.metric_history(run_id, key)] == list(range(10)), key
