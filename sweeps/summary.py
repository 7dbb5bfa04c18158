"""What a finished sweep shows on its parent run: a table, a CSV and comparison figures.

Everything is read back from the child runs in MLflow (not from memory), so the summary of a
resumed sweep covers the trials of every session.
"""
from __future__ import annotations

import sys

from probes.diagnostics import peak_of
from probes.plots import plot_category_curves, plot_sweep_comparison
from probes.seed_bands import aggregate_over_seeds
from sweeps.context import CATEGORIES
from sweeps.search import SEARCHABLE
from sweeps.sweep_ui import format_sweep_links, publish_sweep_ui
from infra.tracking import Tracker, mlflow_ui_command

FAILURE_TAG = "failure"  # set by the trial: why its run failed, in one line


def delta_summary(history: list[tuple[int, float]]) -> tuple[float, float]:
    """(final Δ, peak Δ) relative to the first evaluation; peak = the Δ of largest magnitude."""
    start = history[0][1]
    deltas = [value - start for _, value in history]
    return deltas[-1], max(deltas, key=abs)


def _param(text: str | None):
    """MLflow keeps params as text; numbers come back as numbers so the axes sort and scale."""
    if text is None:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def run_row(tracker: Tracker, run) -> dict:
    params = run.data.params
    row = {"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
           "failure": run.data.tags.get(FAILURE_TAG),
           **{key: _param(params.get(key)) for key in SEARCHABLE},
           "reward_accuracy": run.data.metrics.get("dpo/reward_accuracy"), "ppo_reward": run.data.metrics.get("ppo/reward")}
    for category in CATEGORIES:
        for prefix, name in (("logp", "delta"), ("logp_tok", "delta_tok")):
            history = tracker.metric_history(run.info.run_id, f"{prefix}/{category}")
            if history:
                row[f"{name}/{category}"], row[f"peak_{name}/{category}"] = delta_summary(history)
                if prefix == "logp":  # when the category's log-prob stopped rising (squeezing starts after it)
                    row[f"peak_step/{category}"] = peak_of(history)[0]
    return row


def comparison_axes(table: list[dict], searched: list[str]) -> tuple[str, list[str]]:
    """x axis: beta when it varies, else the first searched key that varies; lines: the other varied keys."""
    varied = [k for k in SEARCHABLE if len({r.get(k) for r in table}) > 1 and (k in searched or k == "beta")]
    x = "beta" if "beta" in varied else (varied[0] if varied else (searched[0] if searched else "beta"))
    return x, [k for k in varied if k != x]


def point_label(row: dict, keys: list[str]) -> str:
    """The sweep point a trial belongs to, its seed left out: the trials of one point are its seeds or repeats."""
    return " ".join(f"{k}={row.get(k)}" for k in keys if k != "seed") or "all trials"


def has_repeats(table: list[dict]) -> bool:
    """Whether any point of the sweep has more than one trial (`--seeds`, or `--num-samples` repeats of a grid)."""
    points = [point_label(r, list(SEARCHABLE)) for r in table]
    return len(set(points)) < len(points)


def unique_labels(names: list[str]) -> list[str]:
    """Run names made distinct (grid repeats share one name), so no curve overwrites another."""
    seen: dict[str, int] = {}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return labels


def summarize_sweep(tracker: Tracker, name: str, parent_run_id: str, experiment_id: str,
                    searched: list[str]) -> tuple[list[dict], list[str]]:
    import pandas as pd

    children = [r for r in tracker.child_runs(experiment_id, parent_run_id) if r.data.tags.get("stage") == "sweep"]
    table = sorted((run_row(tracker, r) for r in children), key=lambda r: tuple(str(r[k]) for k in SEARCHABLE))
    if table:
        repeats = has_repeats(table)  # then seeds are averaged: neither an axis nor a line of their own
        x, group_by = comparison_axes(table, [k for k in searched if k != "seed"] if repeats else searched)
        tracker.log_dataframe(parent_run_id, pd.DataFrame(table), "summary/sweep_summary.csv")
        if repeats:  # mean and 95% interval per swept point
            values = sorted({k for r in table for k in r if k.startswith(("delta/", "delta_tok/", "peak_delta/"))})
            tracker.log_dataframe(parent_run_id, pd.DataFrame(aggregate_over_seeds(table, values + ["reward_accuracy", "ppo_reward"])),
                                  "summary/sweep_summary_over_seeds.csv")
        labels = unique_labels([r["run_name"] for r in table])
        curves = {label: {c: tracker.metric_history(r["run_id"], f"logp/{c}") for c in CATEGORIES}
                  for label, r in zip(labels, table)}
        group_of = {label: point_label(r, [x, *group_by]) for label, r in zip(labels, table)} if repeats else None
        tracker.log_figure(parent_run_id, plot_category_curves(curves, title=f"sweep {name}: Δ log p per category",
                                                               group_of=group_of),
                           "figures/category_curves.png")
        tracker.log_figure(parent_run_id, plot_sweep_comparison(table, x, group_by, CATEGORIES, title=f"sweep {name}"),
                           f"figures/final_delta_vs_{x}.png")
        publish_sweep_ui(tracker, name, experiment_id, parent_run_id, table, searched,  # description + saved view
                         ["figures/category_curves.png", f"figures/final_delta_vs_{x}.png", "summary/sweep_summary.csv"])
    failed = [r["run_name"] for r in table if r["status"] not in ("FINISHED", "KILLED")]
    return table, failed


def failure_lines(table: list[dict], results=()) -> list[str]:
    """One line per failed trial, which and why: failed MLflow runs, and Tune trials that failed
    before their run existed."""
    lines = [f"{r['run_name']}: {r.get('failure') or 'run status ' + r['status']}"
             for r in table if r["status"] not in ("FINISHED", "KILLED")]
    named = {r["run_name"] for r in table}
    for result in results:
        if result.error is None:
            continue
        config = result.config or {}
        name = " ".join(f"{k}={config[k]}" for k in SEARCHABLE if k in config) or "a trial"
        if name not in named:
            text = str(result.error).strip().splitlines()
            lines.append(f"{name}: {type(result.error).__name__}: {text[-1] if text else ''}"[:500])
    return lines


def print_outcome(outcome) -> None:
    print("\nfinal Δ log p (nats, last minus first evaluation) per trial:")
    for row in outcome.summary:
        deltas = "  ".join(f"{c}={row.get(f'delta/{c}', float('nan')):+.2f}" for c in CATEGORIES)
        print(f"  {row['run_name']:<28} {deltas}")
    if outcome.failed_trials:
        print(f"\n{len(outcome.failed_trials)} trial(s) FAILED:", file=sys.stderr)
        for line in outcome.failed_trials:
            print(f"  failed trial {line}", file=sys.stderr)
    print(f"\nresults: MLflow {outcome.tracking_uri}\n  experiment: {outcome.experiment_name}\n"
          f"  parent run: {outcome.parent_run_id}\n  open with:  {mlflow_ui_command(outcome.tracking_uri)}")
    print(format_sweep_links(outcome.tracking_uri, outcome.parent_run_id, outcome.trial_run_ids))
