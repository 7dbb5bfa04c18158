"""The one module that talks to MLflow.

Runs are addressed by id through `MlflowClient` (no global "active run"), because the parent run
lives in the sweep driver while each trial's child run is written from the Ray Train controller
of that trial — different processes, possibly different machines.
"""
from __future__ import annotations

import json
import math
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from urllib.parse import quote

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

_KEY_UNSAFE = re.compile(r"[^0-9A-Za-z_\-. /:]")
_MAX_PARAM_CHARS = 6000
# MLflow 3 sorts experiments into GenAI and model-training kinds; this kind lands on the runs, not on traces
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
DESCRIPTION_TAG = "mlflow.note.content"      # a run's description, rendered as markdown in the UI
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."  # experiment tag read by the UI's `?viewStateShareKey=<key>`
DEFAULT_UI_URL = "http://127.0.0.1:5000"     # where `mlflow ui` listens by default
# names of values that must never reach MLflow (an option holding a key or a token)
SECRET_NAME = re.compile(r"(api[_-]?key|secret|password|passwd|credential|(^|[_.-])(auth|access|bearer|hf|hub)?[_-]?token)$", re.I)


def default_tracking_uri(directory: str | Path = ".") -> str:
    """An absolute SQLite URI: Ray workers change directory, so a relative one would scatter stores."""
    return f"sqlite:///{Path(directory).resolve() / 'mlflow.db'}"


def clean_key(key: str) -> str:
    return _KEY_UNSAFE.sub("_", key)


def flatten_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into string params; drop anything that looks like a secret."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if SECRET_NAME.search(name):
            continue
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            flat[clean_key(name)] = text[:_MAX_PARAM_CHARS]
    return flat


def is_locked_error(error: BaseException) -> bool:
    """SQLite's "database is locked" (another writer held it past the driver's busy timeout), however wrapped."""
    while error is not None:
        if "database is locked" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


class RetryingClient:
    """An MlflowClient whose calls are retried with backoff while a SQLite store reports "database is
    locked": many trials write one store at once, and a locked write was rolled back, so repeating it is
    safe. Any other error, or a lock that outlasts `patience_s`, is raised as it came."""

    def __init__(self, client: MlflowClient, patience_s: float = 120.0, first_wait_s: float = 0.05):
        self._client, self._patience_s, self._first_wait_s = client, patience_s, first_wait_s

    def __getattr__(self, name: str):
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            deadline = time.monotonic() + self._patience_s
            wait = self._first_wait_s
            while True:
                try:
                    return attribute(*args, **kwargs)
                except Exception as error:  # noqa: BLE001 - only the lock is retried; the rest re-raised
                    if not is_locked_error(error) or time.monotonic() + wait > deadline:
                        raise
                time.sleep(wait * random.uniform(0.5, 1.5))  # jitter: writers that collided do not collide again
                wait = min(2 * wait, 5.0)

        return call


def step_chunks(batch: list[Metric], limit: int = 1000) -> list[list[Metric]]:
    """`batch` (ordered by step) cut into log_batch calls of at most `limit` metrics that never split a
    step, so a crash between two calls leaves whole steps only, and a replay that resumes after the last
    logged step leaves no gap. A step of more than `limit` metrics is cut with its `train/loss` last,
    the key the replay reads, so a step that shows it was logged whole."""
    steps: dict[int, list[Metric]] = {}
    for metric in batch:
        steps.setdefault(metric.step, []).append(metric)
    chunks: list[list[Metric]] = []
    current: list[Metric] = []
    for step in sorted(steps):
        metrics = sorted(steps[step], key=lambda m: m.key in REPLAY_KEYS)  # the replay's keys last
        if current and len(current) + len(metrics) > limit:
            chunks.append(current)
            current = []
        while len(metrics) > limit:
            chunks.append(metrics[:limit])
            metrics = metrics[limit:]
        current.extend(metrics)
    if current:
        chunks.append(current)
    return chunks


# the keys a restarted trial reads to find the last step its run holds (sweeps.trial.MlflowReportCallback)
REPLAY_KEYS = ("train/loss", "logp/chosen")


class Tracker:
    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self.client = RetryingClient(MlflowClient(tracking_uri=tracking_uri))

    def check_reachable(self) -> None:
        """Fail before any training if the store cannot be used."""
        try:
            self.client.search_experiments(max_results=1)
        except Exception as error:  # noqa: BLE001 - any failure here means the same thing to the user
            raise RuntimeError(f"MLflow tracking store {self.tracking_uri!r} is not reachable: {error}") from error

    def experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.tags.get(EXPERIMENT_KIND[0]) is None:  # made by an older version
                self.client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
            return experiment.experiment_id
        artifact_location = None
        if self.tracking_uri.startswith("sqlite:///"):
            db_path = Path(self.tracking_uri[len("sqlite:///"):])
            artifact_location = (db_path.parent / "mlartifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=artifact_location, tags=dict([EXPERIMENT_KIND]))

    def set_description(self, run_id: str, markdown: str) -> None:
        """The run's description in the UI (rendered markdown)."""
        self.set_tags(run_id, {DESCRIPTION_TAG: markdown})

    def share_view(self, experiment_id: str, key: str, view: Mapping[str, Any]) -> None:
        """A saved runs-page view (search facets and table/chart state) that `?viewStateShareKey=<key>` opens."""
        self.client.set_experiment_tag(experiment_id, SHARED_VIEW_PREFIX + key, json.dumps(view))

    def start_run(self, experiment_id: str, run_name: str, params: Mapping[str, Any] | None = None,
                  tags: Mapping[str, str] | None = None, parent_run_id: str | None = None) -> str:
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, v) for k, v in flatten_params(params).items()]
        for start in range(0, len(items), 100):  # MLflow caps params per batch at 100
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        self.log_metrics_by_step(run_id, [(step, metrics)])

    def log_metrics_by_step(self, run_id: str, rows: Iterable[tuple[int, Mapping[str, float]]]) -> None:
        """Many steps' metrics in one `log_batch` (one write under SQLite contention).

        A non-finite value is logged as NaN (MLflow would store inf as the largest float), so a
        diverged curve shows where it broke instead of silently ending early."""
        now = int(time.time() * 1000)
        batch = [Metric(clean_key(k), float(v) if math.isfinite(float(v)) else math.nan, now, int(step))
                 for step, metrics in rows for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for chunk in step_chunks(batch):  # MLflow's per-batch metric limit, whole steps per call
            self.client.log_batch(run_id, metrics=chunk)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_figure(self, run_id: str, figure, artifact_file: str) -> None:
        self.client.log_figure(run_id, figure, artifact_file)

    def log_dataframe(self, run_id: str, frame, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            frame.to_csv(path, index=False)
            parent = str(Path(artifact_file).parent)
            self.log_artifact(run_id, path, None if parent == "." else parent)

    def end_run(self, run_id: str, failed: bool = False) -> None:
        status = RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
        self.client.set_terminated(run_id, status=status)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))

    def child_runs(self, experiment_id: str, parent_run_id: str) -> list:
        return self.client.search_runs(
            [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1000
        )

    def run(self, run_id: str):
        return self.client.get_run(run_id)

    def log_manifest(self, run_id: str, manifest: Mapping[str, Any]) -> None:
        """The reproducibility manifest (infra.manifest) as `manifest.json` and as flat `manifest.*` params."""
        self.log_text(run_id, json.dumps(manifest, indent=2, sort_keys=True), "manifest.json")
        self.log_params(run_id, {"manifest": dict(manifest)})

    def list_artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        """Artifact paths (relative to the run's root) directly under `path`."""
        return [item.path for item in self.client.list_artifacts(run_id, path)]

    def download_artifact(self, run_id: str, path: str, dst_dir: str | Path) -> Path:
        return Path(self.client.download_artifacts(run_id, path, str(dst_dir)))


def mlflow_ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def ui_base_url(tracking_uri: str) -> str:
    """The browser address of the UI: the tracking server itself, or where `mlflow ui` listens by default."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else DEFAULT_UI_URL


def runs_view_url(base_url: str, experiment_id: str, share_key: str | None = None, charts: bool = True) -> str:
    """The experiment's runs in the "Model training" view (`workflowType=machine_learning`), optionally a saved
    view and the chart mode (one chart per metric, a line per visible run)."""
    query = ["workflowType=machine_learning"]
    if share_key:
        query.append(f"viewStateShareKey={quote(share_key)}")
    if charts:
        query.append("compareRunsMode=CHART")
    return f"{base_url}/#/experiments/{experiment_id}/runs?{'&'.join(query)}"


def run_url(base_url: str, experiment_id: str, run_id: str) -> str:
    """A run's page; without `workflowType` a fresh browser shows it among GenAI "Evaluation runs"."""
    return f"{base_url}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def compare_runs_url(base_url: str, experiment_id: str, run_ids: Iterable[str]) -> str:
    """MLflow's compare page of the given runs (params side by side, metric plots)."""
    runs = quote(json.dumps(list(run_ids), separators=(",", ":")))
    experiments = quote(json.dumps([str(experiment_id)], separators=(",", ":")))
    return f"{base_url}/#/compare-runs?runs={runs}&experiments={experiments}"


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: list[str], digits: int = 2) -> str:
    """A GitHub-style markdown table; missing cells blank, '|' escaped; floats in columns named like
    `delta...` signed with `digits` decimals (they are changes), other floats with 4 significant digits."""
    def cell(value, column: str) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, float):
            text = f"{value:+.{digits}f}" if "delta" in column else f"{value:.4g}"
        else:
            text = str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c), c) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def configure_quiet_logging() -> None:
    """MLflow prints a line per created run and store migration; keep progress output readable."""
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


__all__ = ["Tracker", "default_tracking_uri", "flatten_params", "mlflow_ui_command", "configure_quiet_logging",
           "ui_base_url", "runs_view_url", "run_url", "compare_runs_url", "markdown_table"]
