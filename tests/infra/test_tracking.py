"""The tracking module against a real MLflow SQLite store."""
import math

import pytest

from infra.tracking import Tracker, default_tracking_uri, flatten_params


def test_flatten_params_keeps_config_and_drops_secrets():
    flat = flatten_params({"train": {"max_prompt_tokens": 64, "lr": 1e-3}, "betas": [0.1, 0.2],
                           "gemini_api_key": "sk-123", "hf_token": "hf_abc", "password": "p"})
    assert flat == {"train.max_prompt_tokens": "64", "train.lr": "0.001", "betas": "[0.1, 0.2]"}


def test_runs_nest_and_metrics_batch_by_step(tmp_path):
    tracker = Tracker(default_tracking_uri(tmp_path))
    tracker.check_reachable()
    experiment = tracker.experiment_id("unit")
    assert tracker.experiment_id("unit") == experiment
    parent = tracker.start_run(experiment, "sweep:unit", params={"betas": [0.1]})
    child = tracker.start_run(experiment, "beta=0.1", params={"beta": 0.1}, parent_run_id=parent)
    tracker.log_metrics_by_step(child, [(1, {"train/loss": 0.7, "skip": float("nan")}), (2, {"train/loss": 0.6})])
    tracker.log_metrics(child, {"logp/chosen": -12.5}, step=2)
    assert tracker.metric_history(child, "train/loss") == [(1, 0.7), (2, 0.6)]
    (step, value), = tracker.metric_history(child, "skip")  # a non-finite value is kept (as NaN), not dropped
    assert step == 1 and math.isnan(value)
    assert [r.info.run_id for r in tracker.child_runs(experiment, parent)] == [child]
    tracker.end_run(child)
    assert tracker.run(child).info.status == "FINISHED"
    # artifacts land beside the database, not in the working directory
    tracker.log_text(child, "hello", "notes/a.txt")
    assert (tmp_path / "mlartifacts").is_dir()


def test_unreachable_server_fails_fast(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tracker = Tracker("http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(RuntimeError, match="not reachable"):
        tracker.check_reachable()
