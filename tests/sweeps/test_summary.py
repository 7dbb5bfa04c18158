"""The sweep summary on the parent run, from child runs in a real MLflow SQLite store."""
from __future__ import annotations

import matplotlib
import pandas as pd
import pytest

from probes.plots import plot_sweep_comparison
from sweeps.summary import CATEGORIES, comparison_axes, delta_summary, summarize_sweep
from infra.tracking import Tracker, default_tracking_uri

matplotlib.use("Agg")


def test_delta_summary_final_and_peak_of_largest_magnitude():
    assert delta_summary([(0, -10.0), (5, -4.0), (10, -12.5)]) == (-2.5, 6.0)
    assert delta_summary([(0, -3.0)]) == (0.0, 0.0)
    assert delta_summary([(0, 1.0), (1, -5.0), (2, 0.0)]) == (-1.0, -6.0)


def _row(**values):
    return {"beta": 0.1, "lr": 1e-4, "loss": "dpo", "seed": 0, "model": "tiny-pythia-1m", "sft_recipe": "chosen", **values}


def test_comparison_axes_prefer_beta_and_group_by_the_other_varied_keys():
    table = [_row(beta=b, model=m) for b in (0.1, 0.5) for m in ("tiny-pythia-1m", "tiny-pythia-4m")]
    assert comparison_axes(table, ["beta", "model"]) == ("beta", ["model"])
    sizes = [_row(model=m) for m in ("tiny-pythia-1m", "tiny-pythia-4m")]
    assert comparison_axes(sizes, ["model", "beta"]) == ("model", [])
    assert comparison_axes([_row()], ["lr"]) == ("lr", [])


def test_comparison_figure_has_a_panel_per_category_and_one_line_per_group():
    table = [{**_row(beta=b, lr=lr), "reward_accuracy": 0.5 + b / 2,
              **{f"delta/{c}": -b * (i + 1) for i, c in enumerate(CATEGORIES)},
              **{f"peak_delta/{c}": -b * (i + 2) for i, c in enumerate(CATEGORIES)}}
             for b in (0.05, 0.2, 0.8) for lr in (1e-4, 5e-4)]
    figure = plot_sweep_comparison(table, "beta", ["lr"], CATEGORIES, title="t")
    panels = [a for a in figure.axes if a.get_visible() and a.axison]
    assert [a.get_title() for a in panels] == list(CATEGORIES) + ["final reward accuracy"]
    chosen = panels[0]
    assert len(chosen.get_lines()) == 2 * 2 + 1  # (final + peak) per lr, and the zero line
    final_lines = [line for line in chosen.get_lines() if line.get_label().startswith("lr=")]
    assert sorted(line.get_label() for line in final_lines) == ["lr=0.0001", "lr=0.0005"]
    assert list(final_lines[0].get_ydata()) == [-0.05, -0.2, -0.8]
    assert chosen.get_xscale() == "log"  # betas span more than a decade


@pytest.fixture()
def sweep_store(tmp_path):
    tracker = Tracker(default_tracking_uri(tmp_path))
    experiment = tracker.experiment_id("summary")
    parent = tracker.start_run(experiment, "sweep:unit")
    histories = {0.1: [-20.0, -21.0, -25.0], 0.5: [-20.0, -35.0, -30.0]}
    for beta, chosen in histories.items():
        child = tracker.start_run(experiment, f"beta={beta}", parent_run_id=parent, tags={"stage": "sweep"},
                                  params={"beta": beta, "lr": 1e-4, "loss": "dpo", "seed": 0, "model": "tiny-pythia-1m",
                                          "sft_recipe": "chosen"})
        tracker.log_metrics_by_step(child, [(s * 10, {"logp/chosen": v, "logp/rejected": v - 5 * beta * s,
                                                      "dpo/reward_accuracy": 0.5 + beta * s / 4})
                                            for s, v in enumerate(chosen)])
        tracker.end_run(child)
    warmup = tracker.start_run(experiment, "sft", parent_run_id=parent, tags={"stage": "sft-warmup"}, params={"lr": 3e-3})
    tracker.log_metrics(warmup, {"logp/chosen": 1.0}, step=0)
    return tracker, experiment, parent


def test_summary_table_csv_and_figures_on_the_parent(sweep_store):
    tracker, experiment, parent = sweep_store
    table, failed = summarize_sweep(tracker, "unit", parent, experiment, ["beta"])
    assert failed == [] and [r["beta"] for r in table] == [0.1, 0.5]  # the warm-up run is not a trial
    low, high = table
    assert (low["delta/chosen"], low["peak_delta/chosen"]) == (-5.0, -5.0)
    assert (high["delta/chosen"], high["peak_delta/chosen"]) == (-10.0, -15.0)
    assert high["delta/rejected"] == pytest.approx(-15.0) and high["reward_accuracy"] == pytest.approx(0.75)
    assert "delta/greedy" not in low  # a category never logged stays absent, not zero
    assert (low["peak_step/chosen"], high["peak_step/chosen"]) == (0, 0)  # both fall from the first evaluation
    artifacts = {a.path for d in ("summary", "figures") for a in tracker.client.list_artifacts(parent, d)}
    assert artifacts == {"summary/sweep_summary.csv", "figures/category_curves.png", "figures/final_delta_vs_beta.png"}
    frame = pd.read_csv(tracker.client.download_artifacts(parent, "summary/sweep_summary.csv"))
    assert list(frame["beta"]) == [0.1, 0.5] and list(frame["peak_delta/chosen"]) == [-5.0, -15.0]


def test_a_failed_trial_is_reported(sweep_store):
    tracker, experiment, parent = sweep_store
    broken = tracker.start_run(experiment, "beta=0.9", parent_run_id=parent, tags={"stage": "sweep"},
                               params={"beta": 0.9, "lr": 1e-4})
    tracker.log_metrics(broken, {"logp/chosen": -3.0}, step=0)
    tracker.end_run(broken, failed=True)
    _, failed = summarize_sweep(tracker, "unit", parent, experiment, ["beta"])
    assert failed == ["beta=0.9"]
