"""Seeds as error bars: mean and a 95% interval per swept point over repeated seeds, and bands for curves.

The interval is Student's t on the seeds' values (mean ± t_{0.975, n-1} · s / √n): with the 2-5
seeds a sweep can afford, the normal 1.96 would be far too narrow. One seed gives no interval (NaN).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n) over the finite values; low = high = NaN with fewer than 2."""
    from scipy import stats  # here, not at import: probes.plots (imported by every trial process) uses this module

    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = int(finite.size)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(finite.mean())
    if n < 2:
        return mean, math.nan, math.nan, n
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * finite.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half, n


def aggregate_over_seeds(table: Sequence[Mapping], value_columns: Sequence[str], seed_key: str = "seed",
                         ignore: Sequence[str] = ("run_id", "run_name", "status", "failure")) -> list[dict]:
    """One row per point of the sweep (all keys but the seed, the values and `ignore` equal): each value
    column becomes its mean, with `<col>_ci_low`, `<col>_ci_high`; `n_seeds` counts the trials."""
    skip = set(value_columns) | {seed_key} | set(ignore)
    groups: dict[tuple, list[Mapping]] = {}
    for row in table:
        point = tuple(sorted((k, v) for k, v in row.items() if k not in skip and not _is_value_like(k)))
        groups.setdefault(point, []).append(row)
    out = []
    for point, rows in groups.items():
        merged = dict(point)
        merged["n_seeds"] = len(rows)
        for column in value_columns:
            mean, low, high, _ = mean_interval([_float(r.get(column)) for r in rows])
            merged[column], merged[f"{column}_ci_low"], merged[f"{column}_ci_high"] = mean, low, high
        out.append(merged)
    return out


def curve_band(curves: Sequence[Sequence[tuple[int, float]]], confidence: float = 0.95
               ) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per step logged by every curve: (steps, mean, low, high) over the curves (e.g. one per seed)."""
    by_step = [dict(curve) for curve in curves]
    steps = sorted(set.intersection(*(set(c) for c in by_step))) if by_step else []
    rows = [mean_interval([c[s] for c in by_step], confidence) for s in steps]
    return steps, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def _is_value_like(key: str) -> bool:
    """Per-trial outcomes (Δ, peaks, scores) never define a sweep point."""
    return "/" in key or key in ("reward_accuracy", "ppo_reward")


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
