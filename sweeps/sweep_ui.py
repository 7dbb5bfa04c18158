"""What a researcher sees first in the MLflow UI after a sweep: the parent run's description holds the
summary table and names its figures, a saved view shows every trial unfolded with its curves, and
the end-of-sweep message links to that view, the parent run and the compare page of the trials.

MLflow (3.17) folds child runs under their parent in the runs table and draws charts only for
visible rows. It nests children only while no search filter is set, and a shared view state
(experiment tag `mlflow.sharedViewState.<key>`, opened by the URL parameter `viewStateShareKey`)
carries a search filter and order, but not `runsExpanded` (the UI drops that key from shared views). So the
saved view filters on the sweep's parent run id and sorts by run name: its trials are listed flat, each drawn in the
charts; `runsHiddenMode: SHOW_ALL` keeps the charts from stopping at the first 10 runs. The view's
charts search (`chartsSearchFilter`, a regular expression in the UI) opens on the probe curves, `^logp/`
(otherwise the first section is alphabetical: `argmax_logp`); clearing the search box shows every chart.
"""
from __future__ import annotations

from typing import Sequence

from infra.tracking import Tracker, compare_runs_url, markdown_table, run_url, runs_view_url, ui_base_url

TABLE_CATEGORIES = ("chosen", "rejected", "greedy", "nonresponse")
CURVES_FIRST = "^logp/"  # the charts a researcher came for: the per-category log-prob curves


def share_key(parent_run_id: str) -> str:
    return f"sweep-{parent_run_id[:12]}"


def sweep_view(parent_run_id: str) -> dict:
    """The saved view: the sweep's trials (not its warm-ups), flat, by name, every one drawn in the charts.
    (Sorting by start time would nest them again: the UI nests under a filter when the order is by date.)"""
    return {"orderByKey": "tags.`mlflow.runName`", "orderByAsc": True,  # the UI's own key of its "Run Name" sort
            "searchFilter": f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.stage = 'sweep'",
            "runsHiddenMode": "SHOW_ALL", "chartsSearchFilter": CURVES_FIRST}


def sweep_description(name: str, table: Sequence[dict], searched: Sequence[str], figures: Sequence[str],
                      categories: Sequence[str] = TABLE_CATEGORIES) -> str:
    """Markdown for the parent run: what was swept, Δ log p per trial, where the figures are."""
    columns = ["run_name", *[k for k in searched if k != "run_name"], "status",
               *[f"delta/{c}" for c in categories], *[f"peak_step/{c}" for c in categories[:1]]]
    present = [c for c in columns if any(c in row for row in table)]
    lines = [f"## sweep `{name}`: {len(table)} trial(s)", "",
             "Δ log p = last minus first evaluation of the mean summed log-prob per category (nats); "
             "`peak_step/chosen` = the step where chosen's log-prob was highest.", "",
             markdown_table(table, present), "", "**Figures** (artifacts of this run):"]
    lines += [f"- `{path}`" for path in figures]
    lines += ["", "Per trial: `figures/category_curves.png`, `logps/step_*.csv`, `token_logps/step_*.npz`, "
              "`manifest.json`; metrics `logp/`, `argmax_logp/`, `entropy/`, `peak_gap/`, `grad_cos/<category>`. "
              "Per-token views of a trial: `python -m probes.token_views --run-id <trial run id>`."]
    return "\n".join(lines)


def publish_sweep_ui(tracker: Tracker, name: str, experiment_id: str, parent_run_id: str, table: Sequence[dict],
                     searched: Sequence[str], figures: Sequence[str]) -> None:
    tracker.set_description(parent_run_id, sweep_description(name, table, searched, figures))
    tracker.share_view(experiment_id, share_key(parent_run_id), sweep_view(parent_run_id))


def sweep_links(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_run_ids: Sequence[str]) -> dict[str, str]:
    base = ui_base_url(tracking_uri)
    links = {"runs": runs_view_url(base, experiment_id, share_key(parent_run_id)),
             "parent run": run_url(base, experiment_id, parent_run_id)}
    if trial_run_ids:
        links["compare trials"] = compare_runs_url(base, experiment_id, trial_run_ids)
    return links


def format_sweep_links(tracking_uri: str, parent_run_id: str, trial_run_ids: Sequence[str]) -> str:
    """The lines the end-of-sweep message prints (the experiment id is read from the parent run)."""
    experiment_id = Tracker(tracking_uri).run(parent_run_id).info.experiment_id
    links = sweep_links(tracking_uri, experiment_id, parent_run_id, trial_run_ids)
    return "\n".join(f"  {label + ':':<16}{url}" for label, url in links.items())
