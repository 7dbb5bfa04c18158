"""Seed bands in the figures: the drawn error bars and shaded bands equal Student-t intervals computed
here independently (numpy mean and sample std, scipy's t quantile); one seed draws no band."""
import math

import numpy as np
import pytest
from scipy import stats

from probes.plots import plot_category_curves, plot_sweep_comparison

CATEGORIES = ["chosen", "rejected"]
# beta -> per seed (final Δ chosen, peak Δ chosen, final Δ rejected, reward accuracy)
SEEDS = {0.1: [(-1.0, -1.5, -2.0, 0.60), (-3.0, -3.5, -4.5, 0.70), (-2.5, -2.6, -3.0, 0.65)],
         1.0: [(-8.0, -9.0, -12.0, 0.90), (-11.0, -11.0, -15.0, 0.95), (-9.5, -10.0, -13.0, 1.00)]}


def _table(seeds: int) -> list[dict]:
    return [{"run_id": f"{beta}-{s}", "run_name": f"beta={beta} seed={s}", "status": "FINISHED", "beta": beta, "seed": s,
             "lr": 1e-4, "delta/chosen": v[0], "peak_delta/chosen": v[1], "delta/rejected": v[2], "reward_accuracy": v[3]}
            for beta, values in SEEDS.items() for s, v in enumerate(values[:seeds])]


def _t_interval(values) -> tuple[float, float, float]:
    values = np.asarray(values, dtype=float)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return values.mean(), values.mean() - half, values.mean() + half


def _panel(figure, title):
    return next(a for a in figure.axes if a.get_title() == title)


def _bars(container) -> dict[float, tuple[float, float]]:
    """x -> (low, high) of an errorbar container's vertical bars."""
    (collection,) = container.lines[2]
    return {float(seg[0][0]): (float(min(seg[:, 1])), float(max(seg[:, 1]))) for seg in collection.get_segments()}


@pytest.mark.parametrize("seeds", [2, 3])
def test_comparison_draws_mean_and_t_interval_per_point(seeds):
    figure = plot_sweep_comparison(_table(seeds), "beta", [], CATEGORIES, title="t")
    chosen = _panel(figure, "chosen")
    final, peak = chosen.containers  # final Δ (solid) then peak Δ (dashed)
    for container, column in ((final, 0), (peak, 1)):
        line = container.lines[0]
        assert list(line.get_xdata()) == [0.1, 1.0]
        bars = _bars(container)
        for beta, y in zip(line.get_xdata(), line.get_ydata()):
            mean, low, high = _t_interval([v[column] for v in SEEDS[beta][:seeds]])
            assert y == pytest.approx(mean)
            assert bars[beta] == pytest.approx((low, high))
    assert final.lines[0].get_linestyle() == "-" and peak.lines[0].get_linestyle() == "--"
    (score,) = _panel(figure, "final reward accuracy").containers
    assert _bars(score)[1.0] == pytest.approx(_t_interval([v[3] for v in SEEDS[1.0][:seeds]])[1:])
    assert "95% t interval" in figure._suptitle.get_text()


def test_comparison_with_one_seed_has_no_error_bars():
    figure = plot_sweep_comparison(_table(1), "beta", [], CATEGORIES, title="t")
    chosen = _panel(figure, "chosen")
    assert len(chosen.containers) == 0 and len(chosen.collections) == 0
    assert [list(line.get_ydata()) for line in chosen.get_lines()[:2]] == [[-1.0, -8.0], [-1.5, -9.0]]
    assert "interval" not in figure._suptitle.get_text()


def test_comparison_lines_per_group_each_with_its_own_bars():
    table = _table(3) + [{**row, "lr": 1e-3, "delta/chosen": row["delta/chosen"] * 2} for row in _table(3)]
    chosen = _panel(plot_sweep_comparison(table, "beta", ["lr"], CATEGORIES), "chosen")
    finals = {c.get_label(): c for c in chosen.containers if c.lines[0].get_linestyle() == "-"}
    assert sorted(finals) == ["lr=0.0001", "lr=0.001"]
    doubled = _t_interval([2 * v[0] for v in SEEDS[0.1]])
    assert _bars(finals["lr=0.001"])[0.1] == pytest.approx(doubled[1:])


def _seed_curves():
    """Three seeds of beta=0.1, two of beta=1.0 (the second stopped before step 20)."""
    return {"beta=0.1 seed=0": {"chosen": [(0, -20.0), (10, -21.0), (20, -25.0)]},
            "beta=0.1 seed=1": {"chosen": [(0, -22.0), (10, -22.5), (20, -24.0)]},
            "beta=0.1 seed=2": {"chosen": [(0, -19.0), (10, -21.5), (20, -26.0)]},
            "beta=1.0 seed=0": {"chosen": [(0, -20.0), (10, -30.0), (20, -35.0)]},
            "beta=1.0 seed=1": {"chosen": [(0, -21.0), (10, -28.0)]}}


def test_curves_draw_mean_lines_and_t_bands_of_the_change():
    runs = _seed_curves()
    group_of = {label: label.split()[0] for label in runs}
    axis = _panel(plot_category_curves(runs, title="t", group_of=group_of), "chosen")
    lines = {line.get_label(): line for line in axis.get_lines()}
    assert set(lines) >= {"beta=0.1 (n=3)", "beta=1.0 (n=2)"}
    bands = axis.collections
    assert len(bands) == 2
    for (label, n), band in zip((("beta=0.1", 3), ("beta=1.0", 2)), bands):
        curves = [dict(runs[f"{label} seed={s}"]["chosen"]) for s in range(n)]
        steps = sorted(set.intersection(*(set(c) for c in curves)))   # steps every seed logged
        deltas = [[c[step] - c[0] for step in steps] for c in curves]  # Δ per seed, then the band
        line = lines[f"{label} (n={n})"]
        assert list(line.get_xdata()) == steps
        vertices = band.get_paths()[0].vertices
        for i, step in enumerate(steps):
            mean, low, high = _t_interval([d[i] for d in deltas])
            assert line.get_ydata()[i] == pytest.approx(mean)
            ys = vertices[np.isclose(vertices[:, 0], step), 1]
            assert (ys.min(), ys.max()) == pytest.approx((low, high), abs=1e-9)
        assert vertices[:, 0].max() == steps[-1]  # beta=1.0's band ends where its shorter seed does


def test_curves_without_groups_draw_one_line_per_run_and_no_band():
    axis = _panel(plot_category_curves(_seed_curves(), title="t"), "chosen")
    assert len(axis.collections) == 0
    assert len([line for line in axis.get_lines() if line.get_label().startswith("beta=")]) == 5
