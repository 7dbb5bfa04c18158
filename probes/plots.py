"""Figures researchers look at instead of tables: category curves and sweep comparisons.

Curves are plotted as the change from the first evaluation (Δ log p), one panel per category,
like the seed study's figure, so categories with very different absolute log-probs share a scale
of "how much did training move this".

With several trials per point of a sweep (`--seeds`, or `--num-samples` repeats), the comparison
shows the mean per point with its 95% Student-t interval as error bars and the curves a mean line
with a shaded band (probes.seed_bands computes both); a point with one trial is drawn as before.

Figures are made with `matplotlib.figure.Figure` directly: no pyplot state and no backend chosen
or forced (importing this module changes nothing for a caller's own plots), and matplotlib is
imported only when a figure is drawn.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from probes.seed_bands import curve_band, mean_interval

Curve = Sequence[tuple[int, float]]


def _figure_and_axes(rows: int, columns: int, figsize: tuple[float, float], **kwargs):
    """A Figure with a grid of axes, like pyplot.subplots but without pyplot (renders with Agg when saved)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    return figure, figure.subplots(rows, columns, squeeze=False, **kwargs)


def delta(curve: Curve) -> list[tuple[int, float]]:
    if not curve:
        return []
    start = curve[0][1]
    return [(step, value - start) for step, value in curve]


def plot_category_curves(runs: Mapping[str, Mapping[str, Curve]], title: str = "", relative: bool = True,
                         group_of: Mapping[str, str] | None = None):
    """runs: label -> category -> [(step, mean summed log-prob)]; one panel per category, one line per run.

    `group_of` (run label -> point label) draws the runs of one point of the sweep (its seeds) as one
    mean line with a shaded 95% band, over the steps every one of them logged; Δ is taken per run
    first, so the band is of the change and not of the seeds' different starting log-probs."""
    categories = sorted({c for curves in runs.values() for c, points in curves.items() if points})
    columns = min(4, max(1, len(categories)))
    rows = max(1, math.ceil(len(categories) / columns))
    figure, axes = _figure_and_axes(rows, columns, (3.6 * columns, 2.9 * rows), sharex=True)
    members: dict[str, list[str]] = {}
    for label in runs:
        members.setdefault(group_of.get(label, label) if group_of else label, []).append(label)
    banded = any(len(labels) > 1 for labels in members.values())
    for index, category in enumerate(categories):
        axis = axes[index // columns][index % columns]
        for color, (group, labels) in zip(_colors() * 8, members.items()):
            curves = [delta(runs[l].get(category, [])) if relative else list(runs[l].get(category, [])) for l in labels]
            curves = [c for c in curves if c]
            if not curves:
                continue
            if len(curves) == 1:
                axis.plot([s for s, _ in curves[0]], [v for _, v in curves[0]], marker=".", color=color, label=group)
                continue
            steps, mean, low, high = curve_band(curves)
            axis.plot(steps, mean, marker=".", color=color, label=f"{group} (n={len(curves)})")
            axis.fill_between(steps, low, high, color=color, alpha=0.25, linewidth=0)
        axis.axhline(0.0, color="grey", linewidth=0.6)
        axis.set_title(category)
        axis.set_xlabel("step")
        axis.set_ylabel("Δ log p(y|x)" if relative else "log p(y|x)")
    for index in range(len(categories), rows * columns):
        axes[index // columns][index % columns].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize="small")
    figure.suptitle(f"{title}\nmean over seeds, 95% t band" if banded else title)
    figure.tight_layout(rect=(0, 0.06 if handles else 0, 1, 0.93 if banded else 0.95))
    return figure


def _colors() -> list[str]:
    from matplotlib import rcParams

    return rcParams["axes.prop_cycle"].by_key()["color"]


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def _points(members: Sequence[Mapping], x: str, column: str) -> tuple[list, list[float], list[float], list[float], int]:
    """Per value of `x`: (xs, means, lower error, upper error, most trials at one x) over the members' `column`."""
    by_x: dict = {}
    for row in members:
        by_x.setdefault(row[x], []).append(_number(row.get(column)))
    xs, means, below, above = [], [], [], []
    for value in sorted(by_x):
        mean, low, high, _ = mean_interval(by_x[value])
        xs.append(value)
        means.append(mean)
        below.append(mean - low)   # NaN (no bar) where fewer than 2 finite values
        above.append(high - mean)
    return xs, means, below, above, max((len(v) for v in by_x.values()), default=0)


def plot_sweep_comparison(table: Sequence[Mapping], x: str, group_by: Sequence[str], categories: Sequence[str],
                          title: str = ""):
    """One panel per category: final (solid) and peak (dashed) Δ log p vs `x`, one line per group
    (e.g. per model size or lr); a last panel with the final reward accuracy. Several trials at one
    point (seeds, repeats) are drawn as their mean with a 95% t interval as error bars."""
    groups: dict[str, list[Mapping]] = {}
    for row in table:
        label = " ".join(f"{k}={row[k]}" for k in group_by) or "all trials"
        groups.setdefault(label, []).append(row)
    # the last panel: DPO's reward accuracy, or PPO's reward
    score, score_title = (("reward_accuracy", "final reward accuracy") if any(r.get("reward_accuracy") is not None for r in table)
                          else ("ppo_reward", "final PPO reward"))
    panels = list(categories) + [score]
    columns = 3
    rows = math.ceil(len(panels) / columns)
    figure, axes = _figure_and_axes(rows, columns, (4.2 * columns, 3.0 * rows))
    xs_all = [r[x] for r in table if isinstance(r[x], (int, float))]
    log_x = bool(xs_all) and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10
    repeats = 1
    for index, panel in enumerate(panels):
        axis = axes[index // columns][index % columns]
        for color, (label, members) in zip(_colors() * 8, groups.items()):
            lines = ([(score, "-", "o", 1.0, label)] if panel == score else
                     [(f"delta/{panel}", "-", "o", 1.0, label), (f"peak_delta/{panel}", "--", ".", 0.6, None)])
            for column, style, marker, alpha, line_label in lines:
                xs, means, below, above, most = _points(members, x, column)
                repeats = max(repeats, most)
                if most > 1:
                    axis.errorbar(xs, means, yerr=[below, above], marker=marker, linestyle=style, color=color,
                                  alpha=alpha, capsize=3, label=line_label)
                else:
                    axis.plot(xs, means, marker=marker, linestyle=style, color=color, alpha=alpha, label=line_label)
        if panel != score:
            axis.axhline(0.0, color="grey", linewidth=0.6)
        if log_x:
            axis.set_xscale("log")
            axis.set_xlim(min(xs_all) / 1.5, max(xs_all) * 1.5)  # also when a panel has no finite point
        axis.set_title(panel if panel != score else score_title)
        axis.set_xlabel(x)
        axis.set_ylabel("Δ log p (nats)" if panel != score else score.replace("_", " "))
    for index in range(len(panels), rows * columns):
        axes[index // columns][index % columns].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize="small")
    bars = f"; points: mean over up to {repeats} trials, bars: 95% t interval" if repeats > 1 else ""
    figure.suptitle(f"{title}\nsolid: final Δ, dashed: peak Δ (largest |Δ| over evaluations){bars}")
    figure.tight_layout(rect=(0, 0.05, 1, 0.93))
    return figure
