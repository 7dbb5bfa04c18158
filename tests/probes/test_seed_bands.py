"""Seed intervals: a hand-computed t interval, scipy's own interval function, grouping of a sweep table, curve bands."""
import math

import numpy as np
import pytest
from scipy import stats

from probes.seed_bands import aggregate_over_seeds, curve_band, mean_interval


def test_three_seeds_by_hand_and_against_scipy():
    mean, low, high, n = mean_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(n), s = 1
    assert (mean, n) == (2.0, 3) and low == pytest.approx(2 - half) and high == pytest.approx(2 + half)
    values = np.random.default_rng(0).normal(size=5)
    expected = stats.t.interval(0.95, 4, loc=values.mean(), scale=stats.sem(values))
    assert mean_interval(values.tolist())[1:3] == pytest.approx(expected)


def test_one_seed_or_none_gives_no_interval():
    assert mean_interval([4.0])[0] == 4.0 and math.isnan(mean_interval([4.0])[1])
    assert mean_interval([float("nan")])[3] == 0


def test_sweep_table_grouped_over_seeds():
    table = [{"run_id": f"r{i}", "run_name": f"b{b} s{s}", "status": "FINISHED", "beta": b, "seed": s, "lr": 1e-4,
              "delta/chosen": v, "peak_step/chosen": 0}
             for i, (b, s, v) in enumerate([(0.1, 0, -1.0), (0.1, 1, -3.0), (0.5, 0, -10.0), (0.5, 1, -12.0)])]
    rows = sorted(aggregate_over_seeds(table, ["delta/chosen"]), key=lambda r: r["beta"])
    assert [(r["beta"], r["lr"], r["n_seeds"], r["delta/chosen"]) for r in rows] == [(0.1, 1e-4, 2, -2.0), (0.5, 1e-4, 2, -11.0)]
    half = stats.t.ppf(0.975, 1) * math.sqrt(2.0) / math.sqrt(2)  # s = sqrt(2)
    assert rows[0]["delta/chosen_ci_low"] == pytest.approx(-2.0 - half)
    assert "seed" not in rows[0] and "peak_step/chosen" not in rows[0]


def test_curve_band_on_common_steps():
    steps, mean, low, high = curve_band([[(0, 0.0), (10, -2.0), (20, -4.0)], [(0, 0.0), (10, -4.0)]])
    assert steps == [0, 10] and mean == [0.0, -3.0]
    assert low[0] == pytest.approx(0.0) and high[1] > -3.0 > low[1]
