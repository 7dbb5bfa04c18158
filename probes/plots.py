"""Figures researchers look at instead of tables: category curves and sweep comparisons.

Curves are plotted as the change from the first evaluation (Δ log p), one panel per category,
like the seed study's figure, so categories with very different absolute log-probs share a scale
of "how much did training move this".

Figures are made with `matplotlib.figure.Figure` directly: no pyplot state and no backend chosen
or forced (importing this module changes nothing for a caller's own plots), and matplotlib is
imported only when a figure is drawn.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

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


def plot_category_curves(runs: Mapping[str, Mapping[str, Curve]], title: str = "", relative: bool = True):
    """runs: label -> category -> [(step, mean summed log-prob)]; one panel per category, one line per run."""
    categories = sorted({c for curves in runs.values() for c, points in curves.items() if points})
    columns = min(4, max(1, len(categories)))
    rows = max(1, math.ceil(len(categories) / columns))
    figure, axes = _figure_and_axes(rows, columns, (3.6 * columns, 2.9 * rows), sharex=True)
    for index, category in enumerate(categories):
        axis = axes[index // columns][index % columns]
        for label, curves in runs.items():
            points = delta(curves.get(category, [])) if relative else list(curves.get(category, []))
            if points:
                axis.plot([s for s, _ in points], [v for _, v in points], marker=".", label=label)
        axis.axhline(0.0, color="grey", linewidth=0.6)
        axis.set_title(category)
        axis.set_xlabel("step")
        axis.set_ylabel("Δ log p(y|x)" if relative else "log p(y|x)")
    for index in range(len(categories), rows * columns):
        axes[index // columns][index % columns].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize="small")
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.06 if handles else 0, 1, 0.95))
    return figure


def _colors() -> list[str]:
    from matplotlib import rcParams

    return rcParams["axes.prop_cycle"].by_key()["color"]


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def plot_sweep_comparison(table: Sequence[Mapping], x: str, group_by: Sequence[str], categories: Sequence[str],
                          title: str = ""):
    """One panel per category: final (solid) and peak (dashed) Δ log p vs `x`, one line per group
    (e.g. per model size or lr); a last panel with the final reward accuracy."""
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
    for index, panel in enumerate(panels):
        axis = axes[index // columns][index % columns]
        for color, (label, members) in zip(_colors() * 8, groups.items()):
            members = sorted(members, key=lambda r: r[x])
            xs = [r[x] for r in members]
            if panel == score:
                axis.plot(xs, [_number(r.get(score)) for r in members], marker="o", color=color, label=label)
                continue
            axis.plot(xs, [r.get(f"delta/{panel}", float("nan")) for r in members], marker="o", color=color, label=label)
            axis.plot(xs, [r.get(f"peak_delta/{panel}", float("nan")) for r in members], marker=".", linestyle="--",
                      color=color, alpha=0.6)
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
    figure.suptitle(f"{title}\nsolid: final Δ, dashed: peak Δ (largest |Δ| over evaluations)")
    figure.tight_layout(rect=(0, 0.05, 1, 0.93))
    return figure
