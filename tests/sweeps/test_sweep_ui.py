"""The MLflow UI parts of a finished sweep, read back from a real SQLite store: experiment kind, the parent's
markdown description, the saved view that unfolds the parent, and the printed links."""
from __future__ import annotations

import json
from urllib.parse import unquote

import pytest

from infra.tracking import (DESCRIPTION_TAG, EXPERIMENT_KIND, SHARED_VIEW_PREFIX, Tracker, compare_runs_url,
                            default_tracking_uri, markdown_table, runs_view_url, ui_base_url)
from sweeps.summary import summarize_sweep
from sweeps.sweep_ui import format_sweep_links, share_key


def test_urls_and_table():
    assert ui_base_url("sqlite:///x/mlflow.db") == "http://127.0.0.1:5000"
    assert ui_base_url("http://10.0.0.5:5000/") == "http://10.0.0.5:5000"
    assert runs_view_url("http://h", "7", "k") == \
        "http://h/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=k&compareRunsMode=CHART"
    url = compare_runs_url("http://h", "7", ["a", "b"])
    assert unquote(url) == 'http://h/#/compare-runs?runs=["a","b"]&experiments=["7"]'
    assert markdown_table([{"delta_x": -1.234, "y": "a|b", "z": 0.1}, {"delta_x": float("nan")}], ["delta_x", "y", "z"]).splitlines() == [
        "| delta_x | y | z |", "|---|---|---|", "| -1.23 | a\\|b | 0.1 |", "|  |  |  |"]


@pytest.fixture()
def finished_sweep(tmp_path):
    uri = default_tracking_uri(tmp_path)
    tracker = Tracker(uri)
    experiment = tracker.experiment_id("ui")
    parent = tracker.start_run(experiment, "sweep:ui")
    trials = []
    for beta, chosen in {0.1: [-20.0, -19.0, -22.0], 0.5: [-20.0, -30.0, -35.0]}.items():
        child = tracker.start_run(experiment, f"beta={beta}", parent_run_id=parent, tags={"stage": "sweep"},
                                  params={"beta": beta, "lr": 1e-4, "loss": "dpo", "seed": 0})
        tracker.log_metrics_by_step(child, [(s * 10, {"logp/chosen": v}) for s, v in enumerate(chosen)])
        tracker.end_run(child)
        trials.append(child)
    return uri, tracker, experiment, parent, trials


def test_finished_sweep_describes_itself_and_saves_an_unfolded_view(finished_sweep):
    uri, tracker, experiment, parent, trials = finished_sweep
    summarize_sweep(tracker, "ui", parent, experiment, ["beta"])
    assert tracker.client.get_experiment(experiment).tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]
    description = tracker.run(parent).data.tags[DESCRIPTION_TAG]
    assert "| run_name | beta | status | delta/chosen | peak_step/chosen |" in description
    assert "| beta=0.1 | 0.1 | FINISHED | -2.00 | 10 |" in description  # peaked at step 10, ended 2 nats lower
    assert "| beta=0.5 | 0.5 | FINISHED | -15.00 | 0 |" in description
    assert "`figures/category_curves.png`" in description and "`figures/final_delta_vs_beta.png`" in description
    view = json.loads(tracker.client.get_experiment(experiment).tags[SHARED_VIEW_PREFIX + share_key(parent)])
    assert view["searchFilter"] == f"tags.mlflow.parentRunId = '{parent}' and tags.stage = 'sweep'"
    assert view["runsHiddenMode"] == "SHOW_ALL"
    assert view["chartsSearchFilter"] == "^logp/"  # the UI reads it as a regular expression: only logp/<category>
    assert {r.info.run_id for r in tracker.client.search_runs([experiment], view["searchFilter"])} == set(trials)
    lines = format_sweep_links(uri, parent, trials).splitlines()
    assert [line.split(":")[0].strip() for line in lines] == ["runs", "parent run", "compare trials"]
    assert f"#/experiments/{experiment}/runs?workflowType=machine_learning&viewStateShareKey={share_key(parent)}" in lines[0]
    assert lines[1].endswith(f"#/experiments/{experiment}/runs/{parent}?workflowType=machine_learning")
    assert all(t in unquote(lines[2]) for t in trials)


def test_an_older_experiment_gets_its_kind(tmp_path):
    tracker = Tracker(default_tracking_uri(tmp_path))
    old = tracker.client.create_experiment("made-before")
    assert tracker.experiment_id("made-before") == old
    assert tracker.client.get_experiment(old).tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]


def test_two_seeds_give_a_mean_and_interval_per_point(tmp_path):
    import pandas as pd
    from scipy import stats

    tracker = Tracker(default_tracking_uri(tmp_path))
    experiment = tracker.experiment_id("seeds")
    parent = tracker.start_run(experiment, "sweep:seeds")
    for beta, seed, end in [(0.1, 0, -2.0), (0.1, 1, -4.0), (0.5, 0, -9.0), (0.5, 1, -11.0)]:
        child = tracker.start_run(experiment, f"beta={beta} seed={seed}", parent_run_id=parent, tags={"stage": "sweep"},
                                  params={"beta": beta, "seed": seed, "lr": 1e-4, "loss": "dpo"})
        tracker.log_metrics_by_step(child, [(0, {"logp/chosen": -20.0}), (10, {"logp/chosen": -20.0 + end})])
        tracker.end_run(child)
    summarize_sweep(tracker, "seeds", parent, experiment, ["beta", "seed"])
    frame = pd.read_csv(tracker.download_artifact(parent, "summary/sweep_summary_over_seeds.csv", tmp_path / "dl"))
    frame = frame.sort_values("beta")
    assert frame["beta"].tolist() == [0.1, 0.5] and frame["n_seeds"].tolist() == [2, 2]
    assert frame["delta/chosen"].tolist() == pytest.approx([-3.0, -10.0])
    half = stats.t.ppf(0.975, 1) * 2 ** 0.5 / 2 ** 0.5  # s = sqrt(2), n = 2
    assert frame["delta/chosen_ci_low"].tolist() == pytest.approx([-3.0 - half, -10.0 - half])
