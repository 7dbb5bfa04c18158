"""A sweep with several seeds per point, summarised from child runs in a real MLflow SQLite store: the CSV
over seeds holds mean and t interval, the figures on the parent are drawn with bars and bands, and the
seed is neither an axis nor a line of its own."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from infra.tracking import Tracker, default_tracking_uri
from sweeps.summary import has_repeats, summarize_sweep, unique_labels

# beta -> per seed, the chosen log-prob at steps 0, 10, 20
HISTORIES = {0.1: [[-20.0, -21.0, -25.0], [-22.0, -22.5, -24.0], [-19.0, -21.5, -26.0]],
             0.5: [[-20.0, -35.0, -30.0], [-21.0, -28.0, -33.0], [-20.5, -30.0, -29.0]]}


@pytest.fixture()
def seeded_sweep(tmp_path):
    tracker = Tracker(default_tracking_uri(tmp_path))
    experiment = tracker.experiment_id("seeds")
    parent = tracker.start_run(experiment, "sweep:seeds")
    for beta, seeds in HISTORIES.items():
        for seed, chosen in enumerate(seeds):
            child = tracker.start_run(experiment, f"beta={beta} seed={seed}", parent_run_id=parent, tags={"stage": "sweep"},
                                      params={"beta": beta, "lr": 1e-4, "loss": "dpo", "seed": seed,
                                              "model": "tiny-pythia-1m", "sft_recipe": "chosen"})
            tracker.log_metrics_by_step(child, [(s * 10, {"logp/chosen": v, "dpo/reward_accuracy": 0.5 + beta * s / 4})
                                                for s, v in enumerate(chosen)])
            tracker.end_run(child)
    figures = {}
    real_log_figure = tracker.log_figure

    def keep_figure(run_id, figure, path):  # the real logging, plus the figure kept for its artists
        figures[path] = figure
        return real_log_figure(run_id, figure, path)

    tracker.log_figure = keep_figure
    return tracker, experiment, parent, figures


def test_csv_over_seeds_and_banded_figures(seeded_sweep):
    tracker, experiment, parent, figures = seeded_sweep
    table, failed = summarize_sweep(tracker, "seeds", parent, experiment, ["beta", "seed"])
    assert failed == [] and len(table) == 6
    frame = pd.read_csv(tracker.client.download_artifacts(parent, "summary/sweep_summary_over_seeds.csv"))
    frame = frame.sort_values("beta")
    for (beta, seeds), (_, row) in zip(HISTORIES.items(), frame.iterrows()):
        finals = np.array([h[-1] - h[0] for h in seeds])
        half = stats.t.ppf(0.975, 2) * finals.std(ddof=1) / math.sqrt(3)
        assert row["n_seeds"] == 3 and row["delta/chosen"] == pytest.approx(finals.mean())
        assert (row["delta/chosen_ci_low"], row["delta/chosen_ci_high"]) == pytest.approx((finals.mean() - half, finals.mean() + half))
    assert set(figures) == {"figures/category_curves.png", "figures/final_delta_vs_beta.png"}  # beta, not seed, on x
    chosen = next(a for a in figures["figures/final_delta_vs_beta.png"].axes if a.get_title() == "chosen")
    final = chosen.containers[0]
    assert final.get_label() == "all trials" and list(final.lines[0].get_xdata()) == [0.1, 0.5]
    curves = next(a for a in figures["figures/category_curves.png"].axes if a.get_title() == "chosen")
    assert sorted(line.get_label() for line in curves.get_lines() if "n=" in line.get_label()) == ["beta=0.1 (n=3)", "beta=0.5 (n=3)"]
    assert len(curves.collections) == 2  # one band per beta


def test_grid_repeats_count_as_seeds_and_keep_every_curve():
    row = {"beta": 0.1, "lr": 1e-4, "loss": "dpo", "seed": 0, "model": "m", "sft_recipe": "chosen"}
    assert has_repeats([row, dict(row)])               # --num-samples 2 of a grid: same point, same seed
    assert has_repeats([row, {**row, "seed": 1}])      # --seeds 0 1
    assert not has_repeats([row, {**row, "beta": 0.5}])
    assert unique_labels(["beta=0.1", "beta=0.1", "beta=0.5", "beta=0.1"]) == ["beta=0.1", "beta=0.1 #2", "beta=0.5", "beta=0.1 #3"]
