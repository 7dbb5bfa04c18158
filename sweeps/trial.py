"""The Tune trial: a thin shell that builds one Ray Train `TorchTrainer` and its MLflow child run.

Ray Train V2 cannot be nested in a Tuner directly, so each trial is a function trainable that
fits a TorchTrainer; worker reports reach Tune through `TuneReportCallback` and MLflow through
`MlflowReportCallback`, both running on the trial's Train controller.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace

import yaml
from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.callback import UserCallback
from ray.tune.integration.ray_train import TuneReportCallback

from probes.plots import plot_category_curves
from probes.token_records import log_probe_records
from sweeps.run_manifest import trial_manifest
from sweeps.context import TrialContext
from sweeps.search import SEARCHABLE, warmup_key
from infra.tracking import REPLAY_KEYS, Tracker
from infra import storage as store
from trainers.config import TrainConfig
from trainers.runs.worker_entry import train_loop_per_worker  # light: the trial process never imports the trainers
from trainers.runs.worker_report import process_started_at, public_metrics, report_of

FAILURE_TAG = "failure"    # why a trial's run failed, in one line (the driver prints it)
DIVERGED_TAG = "diverged"  # the non-finite metrics a diverged run stopped at
REFUSED_TAG = "refused"    # why a run could not go on as recorded (a replaced probe set, no readable checkpoint)
# where a trial's time went (JSON of timestamps and seconds, for benchmarks/dpo_sweep.py's breakdown)
WORKER_TIMINGS_TAG, TRIAL_TIMINGS_TAG = "timing.worker", "timing.trial"


class TuneForwardCallback(TuneReportCallback):
    """Forward rank 0's scalar metrics to Tune; per-example records stay out of Tune's results."""

    def after_report(self, run_context, metrics, checkpoint):
        super().after_report(run_context, [public_metrics(m) for m in metrics], checkpoint)


class MlflowReportCallback(UserCallback):
    """Writes rank 0's reports to the trial's MLflow child run: every buffered step in one `log_batch`.

    Steps already in the run (a trial restarted from an older checkpoint repeats them) are not
    logged again, so every curve has exactly one point per step. A report of a diverged run
    (non-finite metrics) marks the run with the reason; the trial then fails it.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._tracker: Tracker | None = None
        self._last_logged_step: int | None = None
        self._mlflow_s = 0.0   # this callback's MLflow writes so far (each report's final set_tags excluded)

    def _last_step(self, tracker: Tracker) -> int:
        # log_metrics_by_step writes whole steps per call, so every step up to this one is complete
        steps = [s for key in REPLAY_KEYS for s, _ in tracker.metric_history(self.run_id, key)]
        return max(steps, default=-1)

    def after_report(self, run_context, metrics, checkpoint):
        report = report_of(metrics[0])
        if report is None:
            return
        started = time.time()
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri)
            self._last_logged_step = self._last_step(self._tracker)
        tracker = self._tracker
        rows = [row for row in report.history if row["step"] > self._last_logged_step]
        tracker.log_metrics_by_step(self.run_id, [(row["step"], {k: v for k, v in row.items() if k != "step"}) for row in rows])
        if report.probe_records and report.step > self._last_logged_step:
            log_probe_records(tracker, self.run_id, report.probe_records, report.step)  # CSV + per-token npz
        tags = {}
        if report.train_pairs is not None:
            tags.update({"data.train_pairs": report.train_pairs, "data.skipped_rows": report.skipped_rows})
        if report.nodes:  # the worker group (re)started: where its ranks run
            tags["ray_nodes"] = ",".join(report.nodes)
        if report.rollout:  # what --rollout-engine / --weight-sync auto resolved to
            tags.update({f"rollout.{key}_in_use": value for key, value in report.rollout.items()})
        if report.resumed_from_step is not None:
            tags["resumed_from_step"] = report.resumed_from_step
        if report.final_model_dir:
            tags["checkpoint_dir"] = report.final_model_dir
        if report.non_finite:
            tags[DIVERGED_TAG] = f"non-finite {report.non_finite}"
        if report.refused:
            tags[REFUSED_TAG] = report.refused[:5000]  # MLflow's tag value limit
        self._mlflow_s += time.time() - started
        if tags and report.timings is not None:  # rides on a write that happens anyway (step 0 and the last)
            tags[WORKER_TIMINGS_TAG] = json.dumps({**asdict(report.timings), "mlflow_writes_s": self._mlflow_s})
        if tags:
            tracker.set_tags(self.run_id, tags)
        self._last_logged_step = max(self._last_logged_step, report.step)


def checkpoint_config(ctx: TrialContext) -> CheckpointConfig:
    """The trial's newest checkpoints are kept, older ones deleted; two or more leave a fallback when
    the last one is unreadable (PolicyTrainer.load_latest_readable_checkpoint)."""
    return CheckpointConfig(num_to_keep=getattr(ctx, "checkpoints_to_keep", 2))  # a context pickled before the field: 2


def train_failure_config(ctx: TrialContext) -> FailureConfig:
    """Ray Train's restarts of a crashed worker group: the context's max_failures, which the driver sets
    to --max-failures when trials run on the head and to 0 otherwise (Tune retries then; sweeps/retries.py)."""
    return FailureConfig(max_failures=ctx.max_failures)


def trial_run_name(train: TrainConfig, searched: dict) -> str:
    parts = [f"{k}={searched[k]}" for k in SEARCHABLE if k in searched]
    return " ".join(parts) or train.loss


def rollout_pool(config: TrainConfig):
    """The trial's rollout actors (PPO): separate from the Train workers, they start from the same
    weights and are synced by rank 0 after updates."""
    from rollout.actors import RolloutConfig, RolloutPool

    return RolloutPool(RolloutConfig(**asdict(config.rollout), model=config.init_checkpoint or config.model,
                                     batch_size=config.micro_batch_size, seed=config.seed))


def trial_settings(train: TrainConfig, searched: dict, ctx: TrialContext) -> TrainConfig:
    """The trial's TrainConfig: the sweep's, its searched values, its warm-up and its model's resources."""
    train = replace(train, **{k: v for k, v in searched.items() if k in SEARCHABLE})
    changes = {}
    init = ctx.init_checkpoints.get(warmup_key(train.model, train.sft_recipe))
    if init:  # each (model, recipe) starts from its own shared warm-up
        changes["init_checkpoint"] = init
    share = ctx.worker_shares.get(train.model)
    if share:  # small models take a small share, so their trials pack together
        changes["gpus_per_worker" if train.use_gpu else "cpus_per_worker"] = share
    return replace(train, **changes) if changes else train


def worker_resources(config: TrainConfig, ctx: TrialContext) -> dict[str, float]:
    """A training worker's Ray resources: its CPU (or GPU) share plus any --worker-resources."""
    own = {"GPU": config.gpus_per_worker} if config.use_gpu else {"CPU": config.cpus_per_worker}
    return {**own, **ctx.worker_resources}


def category_curves(tracker: Tracker, run_id: str, categories) -> dict[str, list[tuple[int, float]]]:
    return {c: tracker.metric_history(run_id, f"logp/{c}") for c in categories}


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:500]


def stop_reason(tags: dict) -> str | None:
    """Why the workers stopped a run without raising (the trial fails it once): diverged or refused."""
    if tags.get(DIVERGED_TAG):
        return f"diverged: {tags[DIVERGED_TAG]}"
    if tags.get(REFUSED_TAG):
        return f"refused: {tags[REFUSED_TAG]}"
    return None


def tune_session():
    """This trial's Tune session (None outside Tune), kept so that its end can be told later."""
    from ray.train._internal.session import get_session

    return get_session()


def tune_stopped(session) -> bool:
    """Whether Tune has stopped the trial of `session` (a stopper, ASHA): Tune then removes the trial's
    placement group, and the fit still running in this process dies with an ActorDiedError that is not
    the trial's failure (test_seed_sweep in CI: a stopped trial's run marked FAILED when this thread won
    the race against the process's end). Tune's stop sets the session's stop event and shuts the session
    down, so `session` must be the one taken when the trial began; Ray has no public call for this (Ray
    2.60 pinned; tests/sweeps/test_stoppers.py checks it on a real Tune run)."""
    from ray.train._internal.session import get_session

    return session is not None and (get_session() is not session or session.stop_event.is_set())


_previous_trial_returned_at = 0.0  # time.time() when run_trial last returned or raised in this process


def run_trial(trial_config: dict) -> None:
    """Tune function trainable: one MLflow child run, one TorchTrainer fit."""
    global _previous_trial_returned_at
    try:
        _run_trial(trial_config)
    finally:
        _previous_trial_returned_at = time.time()


def _run_trial(trial_config: dict) -> None:
    # in a process Tune reuses, this trial's start-up begins when the previous trial returned
    timings = {"process_started_at": max(process_started_at() or 0.0, _previous_trial_returned_at) or None,
               "started_at": time.time(), "pid": os.getpid()}
    session = tune_session()
    ctx: TrialContext = trial_config["context"]
    searched = {k: trial_config[k] for k in SEARCHABLE if k in trial_config}
    config = trial_settings(trial_config["train"], searched, ctx)
    tracker = Tracker(ctx.tracking_uri)
    trial_id = tune.get_context().get_trial_id()
    run_name = trial_run_name(config, searched)

    existing = [r for r in tracker.child_runs(ctx.experiment_id, ctx.parent_run_id)
                if r.data.tags.get("tune_trial_id") == trial_id]
    if existing:  # a retried or resumed trial continues its own run
        run_id = existing[0].info.run_id
        if FAILURE_TAG in existing[0].data.tags:  # the crash a retry recovers from is no longer the run's outcome
            tracker.client.delete_tag(run_id, FAILURE_TAG)
        if existing[0].info.status != "RUNNING":
            tracker.client.update_run(run_id, status="RUNNING")
    else:
        run_id = tracker.start_run(
            ctx.experiment_id, run_name,
            params={**config.to_dict(), "probe_set_hash": ctx.probe_set_hash, "data_hash": ctx.data_hash or "unknown"},
            tags={"tune_trial_id": trial_id, "stage": ctx.stage, "sweep": ctx.sweep_name},
            parent_run_id=ctx.parent_run_id,
        )
        tracker.log_text(run_id, yaml.safe_dump(config.to_dict(), sort_keys=True), "config/resolved_config.yaml")
        tracker.log_manifest(run_id, trial_manifest(config.to_dict(), ctx.probe_set_hash, ctx.data_hash,  # manifest.json
                                                    ctx.data_source))                               # + manifest.* params

    trial_dir_name = f"{ctx.stage}-{trial_id}"
    final_model_dir = (ctx.final_model_dirs.get(warmup_key(config.model, config.sft_recipe))
                       or store.join(ctx.storage_path, ctx.sweep_name, "models", trial_dir_name))  # local or a URI
    loop_config = {"train": config, "final_model_dir": final_model_dir, "probe_set_hash": ctx.probe_set_hash}
    pool = rollout_pool(config) if config.loss == "ppo" or config.probe_decodes == "actors" else None
    if pool is not None:
        loop_config["rollout_pool"] = pool
    timings["fit_started_at"] = time.time()  # MLflow run set up; the TorchTrainer is built and fit next
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker=worker_resources(config, ctx)),
        run_config=RunConfig(
            name=trial_dir_name,
            storage_path=store.join(ctx.storage_path, ctx.sweep_name, "train"),
            callbacks=[TuneForwardCallback(), MlflowReportCallback(ctx.tracking_uri, run_id)],
            failure_config=train_failure_config(ctx),
            checkpoint_config=checkpoint_config(ctx),
        ),
    )
    try:
        trainer.fit()
    except Exception as error:
        if tune_stopped(session):  # its run stays RUNNING: the driver marks it KILLED and says by what
            print(f"{run_name}: stopped by Tune; its fit ended with {type(error).__name__}", flush=True)
        else:
            tracker.set_tags(run_id, {FAILURE_TAG: one_line(error)})
            tracker.end_run(run_id, failed=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown()
    timings["fit_ended_at"] = time.time()
    stopped = stop_reason(tracker.client.get_run(run_id).data.tags)
    if stopped:  # a result, not a crash: failed in MLflow once, not retried by Tune
        tracker.set_tags(run_id, {FAILURE_TAG: stopped[:5000]})
        tracker.end_run(run_id, failed=True)
        return
    curves = category_curves(tracker, run_id, ctx.categories)
    figure = plot_category_curves({run_name: curves}, title=f"{ctx.sweep_name} — {run_name}")
    tracker.log_figure(run_id, figure, "figures/category_curves.png")
    timings["ended_at"] = time.time()  # figure logged; what follows is one tag write and end_run
    tracker.set_tags(run_id, {TRIAL_TIMINGS_TAG: json.dumps(timings)})
    tracker.end_run(run_id)
