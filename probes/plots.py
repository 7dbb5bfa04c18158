"""Figures researchers look at instead of tables: category curves and sweep comparisons.

Curves are plotted as the change from the first evaluation (Δ log p), one panel per category,
like the seed study's figure, so categories with very different absolute log-probs share a scale
of "how much did training move this".
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Curve = Sequence[tuple[int, float]]


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
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.9 * rows), squeeze=False, sharex=True)
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


def plot_final_delta_vs_parameter(table: Sequence[Mapping], parameter: str, categories: Sequence[str], title: str = ""):
    """table rows: {parameter: value, 'delta/<category>': Δ log p at the last evaluation, ...}."""
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    rows = sorted(table, key=lambda r: r[parameter])
    xs = [r[parameter] for r in rows]
    for category in categories:
        axis.plot(xs, [r.get(f"delta/{category}", float("nan")) for r in rows], marker="o", label=category)
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
        axis.set_xscale("log")
    axis.axhline(0.0, color="grey", linewidth=0.6)
    axis.set_xlabel(parameter)
    axis.set_ylabel("final Δ log p(y|x) (nats)")
    axis.set_title(title)
    axis.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    return figure
