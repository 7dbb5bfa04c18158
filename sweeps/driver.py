"""The small sweep driver every entry point shares.

A sweep is two Tune stages under one MLflow parent run: a shared SFT warm-up (trained once, cached
by its config, reused by every trial and by later sweeps) and the searched trials that start from
it. The driver prepares everything a trial needs exactly once (tokenizer, data check, probe set),
then only orchestrates; training happens in Ray Train workers.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from probes.builtin_generators import RuleBasedGenerator
from probes.plots import plot_category_curves, plot_final_delta_vs_parameter
from probes.probe_set import DYNAMIC_CATEGORIES, STATIC_CATEGORIES, ProbeSet, cached_probe_set_dir
from sweeps.config import SweepConfig
from sweeps.tracking import Tracker, configure_quiet_logging, default_tracking_uri, mlflow_ui_command
from trainers.config import TrainConfig
from trainers.data import load_preference_data
from trainers.models import load_tokenizer

CATEGORIES = list(STATIC_CATEGORIES) + list(DYNAMIC_CATEGORIES)
SFT_KEY_FIELDS = ("model", "dataset", "train_split", "max_train_pairs", "skip_bad_rows", "max_prompt_tokens",
                  "max_response_tokens", "truncation", "micro_batch_size", "grad_accum_steps", "warmup_steps",
                  "weight_decay", "max_grad_norm", "seed", "num_workers")


@dataclass
class SweepOutcome:
    tracking_uri: str
    experiment_name: str
    parent_run_id: str
    trial_run_ids: list[str]
    failed_trials: list[str]
    summary: list[dict]


def start_ray(address: str | None, num_cpus: int | None, poll_interval_s: float = 0.2) -> None:
    """Join a cluster, or start a fresh local Ray on loopback (never a stale local cluster).

    Ray Train's controller collects worker reports at its health-check interval (2 s by default),
    and every `ray.train.report` waits for that; a short interval keeps reports cheap.
    """
    import ray

    if ray.is_initialized():
        return
    options = {"log_to_driver": False, "logging_level": "ERROR",
               "runtime_env": {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(poll_interval_s),
                                            "TOKENIZERS_PARALLELISM": "false"}}}
    if address:  # an existing cluster owns its resources
        ray.init(address=address, **options)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray service on 127.0.0.1
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **options)


def prepare_probe_set(train: TrainConfig, storage: Path) -> tuple[ProbeSet, str]:
    """The probe set every trial scores: a given folder, or built once from the eval split and cached."""
    if train.probe_set_dir:
        return ProbeSet.load(train.probe_set_dir), train.probe_set_dir
    data = load_preference_data(train.dataset, train.eval_split, skip_bad_rows=train.skip_bad_rows)
    directory = cached_probe_set_dir(storage / "probe_sets", data.pairs, RuleBasedGenerator(),
                                     train.num_probe_prompts, train.seed, f"{train.dataset}:{train.eval_split}")
    return ProbeSet.load(directory), str(directory)


def check_training_data(train: TrainConfig) -> int:
    """Parse the training data once in the driver, so a bad row stops the sweep before any worker starts."""
    data = load_preference_data(train.dataset, train.train_split, skip_bad_rows=train.skip_bad_rows,
                                max_rows=train.max_train_pairs)
    if data.skipped:
        print(f"skipped {len(data.skipped)} bad rows of {train.dataset} (first: {data.skipped[0]})")
    return len(data.pairs)


def sft_warmup_key(config: SweepConfig) -> str:
    fields = {k: getattr(config.train, k) for k in SFT_KEY_FIELDS}
    fields.update(sft_steps=config.sft_steps, sft_lr=config.sft_lr, recipe="sft-on-chosen")
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def run_stage(stage: str, param_space: dict, config: SweepConfig, context: dict, total_steps: int):
    from ray import tune

    from sweeps.progress import TrialProgress
    from sweeps.trial import run_trial

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's new console output ignores verbose=0
    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"cpu": 0.01}),  # the trial process only orchestrates
        param_space={**param_space, "context": {**context, "stage": stage}},
        tune_config=tune.TuneConfig(max_concurrent_trials=config.max_concurrent_trials),
        run_config=tune.RunConfig(name=f"{config.name}-{stage}", storage_path=context["storage_path"],
                                  verbose=0, callbacks=[TrialProgress(stage, total_steps)]),
    )
    return tuner.fit()


def shared_sft_warmup(config: SweepConfig, context: dict) -> str | None:
    """Train the SFT warm-up once per distinct recipe; every trial (and later sweep) starts from it."""
    if config.sft_steps <= 0:
        return None
    directory = Path(context["storage_path"]) / "shared" / f"sft-warmup-{sft_warmup_key(config)}"
    if (directory / ".complete").exists():
        print(f"reusing the SFT warm-up in {directory}")
        return str(directory)
    train = replace(config.train, loss="sft", lr=config.sft_lr, max_steps=config.sft_steps, init_checkpoint=None)
    print(f"stage 1/2: SFT warm-up on chosen responses, {config.sft_steps} steps x {train.num_workers} workers", flush=True)
    results = run_stage("sft-warmup", {"train": train.to_dict()}, config,
                        {**context, "final_model_dir": str(directory)}, config.sft_steps)
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"the SFT warm-up failed: {errors[0]}")
    (directory / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    return str(directory)


def _reference_logps_task(train: dict, directory: str) -> tuple[str, bool, float]:
    """Runs as a Ray task (with a worker's resources) so a GPU cluster computes it on a GPU."""
    import torch

    from trainers.collate import load_training_pairs
    from trainers.models import load_model_and_tokenizer
    from trainers.reference_logps import load_or_compute_reference_logps

    started = time.perf_counter()
    config = TrainConfig.from_dict(train)
    model, tokenizer = load_model_and_tokenizer(config.init_checkpoint or config.model, seed=config.seed)
    if config.use_gpu:
        model.to("cuda")
    else:
        torch.set_num_threads(max(1, int(config.cpus_per_worker * config.num_workers)))
    _, pairs, _ = load_training_pairs(config, tokenizer)
    _, path, computed = load_or_compute_reference_logps(model, pairs, tokenizer.pad_token_id, directory,
                                                        batch_size=2 * config.micro_batch_size)
    return str(path), computed, time.perf_counter() - started


def shared_reference_logps(config: SweepConfig, train: TrainConfig, context: dict, searched: set[str]) -> str | None:
    """Reference log-probs of the training pairs, computed once (or found) for every trial of the sweep.

    Only when every trial has the same reference: a sweep over models (or over seeds of a randomly
    initialised one) falls back to per-trial reference forwards."""
    if not config.share_reference_logps or train.loss == "sft" or searched & {"model", "seed"}:
        return None
    import ray

    directory = str(Path(context["storage_path"]) / "shared" / "reference_logps")
    resources = {"num_gpus": 1} if train.use_gpu else {"num_cpus": train.cpus_per_worker}
    task = ray.remote(**resources)(_reference_logps_task)
    path, computed, seconds = ray.get(task.remote(train.to_dict(), directory))
    print(f"reference log-probs {'computed' if computed else 'reused'} in {seconds:.1f}s: {path}", flush=True)
    return directory


def final_deltas(tracker: Tracker, run_id: str) -> dict[str, float]:
    """Δ log p per category between the first and the last evaluation of a run."""
    deltas = {}
    for category in CATEGORIES:
        for prefix in ("logp", "logp_tok"):
            history = tracker.metric_history(run_id, f"{prefix}/{category}")
            if history:
                deltas[f"{'delta' if prefix == 'logp' else 'delta_tok'}/{category}"] = history[-1][1] - history[0][1]
    return deltas


def summarize_sweep(tracker: Tracker, config: SweepConfig, parent_run_id: str, experiment_id: str) -> tuple[list[dict], list[str]]:
    """Sweep table (CSV) and figures on the parent run, read back from the child runs."""
    import pandas as pd

    children = [r for r in tracker.child_runs(experiment_id, parent_run_id) if r.data.tags.get("stage") == "sweep"]
    table, curves = [], {}
    for child in sorted(children, key=lambda r: (float(r.data.params.get("beta", 0)), float(r.data.params.get("lr", 0)))):
        row = {"run_id": child.info.run_id, "run_name": child.info.run_name, "status": child.info.status,
               "beta": float(child.data.params["beta"]), "lr": float(child.data.params["lr"]),
               "model": child.data.params.get("model"),
               "reward_accuracy": child.data.metrics.get("dpo/reward_accuracy")}
        row.update(final_deltas(tracker, child.info.run_id))
        table.append(row)
        curves[child.info.run_name] = {c: tracker.metric_history(child.info.run_id, f"logp/{c}") for c in CATEGORIES}
    if table:
        tracker.log_dataframe(parent_run_id, pd.DataFrame(table), "summary/final_delta_logp.csv")
        tracker.log_figure(parent_run_id, plot_category_curves(curves, title=f"sweep {config.name}: Δ log p per category"),
                           "figures/category_curves.png")
        tracker.log_figure(parent_run_id, plot_final_delta_vs_parameter(table, "beta", CATEGORIES,
                                                                        title=f"sweep {config.name}: final Δ log p vs beta"),
                           "figures/final_delta_vs_beta.png")
    failed = [r.info.run_name for r in children if r.info.status != "FINISHED"]
    return table, failed


def run_sweep(config: SweepConfig, param_space: dict) -> SweepOutcome:
    """Run the warm-up and the searched trials; return where everything landed."""
    configure_quiet_logging()
    tracking_uri = config.tracking_uri or default_tracking_uri(Path.cwd())
    tracker = Tracker(tracking_uri)
    tracker.check_reachable()
    storage = Path(config.resolved_storage_path())
    storage.mkdir(parents=True, exist_ok=True)

    print(f"preparing tokenizer, data and probe set ({config.train.dataset}) ...", flush=True)
    load_tokenizer(config.train.model)  # builds and caches the built-in tokenizer once, before workers race for it
    num_pairs = check_training_data(config.train)
    probe_set, probe_dir = prepare_probe_set(config.train, storage)
    train = replace(config.train, probe_set_dir=probe_dir)
    config = replace(config, train=train)

    experiment_id = tracker.experiment_id(config.experiment_name)
    parent_run_id = tracker.start_run(
        experiment_id, f"sweep:{config.name}",
        params={**config.to_dict(), "probe_set_hash": probe_set.content_hash(), "train_pairs": num_pairs},
        tags={"sweep": config.name, "entry_point": Path(sys.argv[0]).name},
    )
    tracker.log_text(parent_run_id, yaml.safe_dump(config.to_dict(), sort_keys=True), "config/resolved_config.yaml")
    tracker.log_artifact(parent_run_id, Path(probe_dir) / "probes.jsonl", "probe_set")
    tracker.log_artifact(parent_run_id, Path(probe_dir) / "manifest.json", "probe_set")
    print(f"MLflow parent run {parent_run_id} (experiment {config.experiment_name!r}); "
          f"probe set {probe_set.content_hash()}: {len(probe_set.prompts)} prompts x {len(CATEGORIES)} categories")

    context = {"tracking_uri": tracking_uri, "experiment_id": experiment_id, "parent_run_id": parent_run_id,
               "storage_path": str(storage), "sweep_name": config.name, "max_failures": config.max_failures,
               "probe_set_hash": probe_set.content_hash(), "categories": CATEGORIES}
    failed = True
    try:
        start_ray(config.address, config.num_cpus, config.train_poll_interval_s)
        sft_dir = shared_sft_warmup(config, context)
        if sft_dir:
            tracker.set_tags(parent_run_id, {"sft_warmup_dir": sft_dir})
        trial_train = replace(config.train, init_checkpoint=sft_dir)
        trial_train = replace(trial_train, reference_logps_dir=shared_reference_logps(config, trial_train, context, set(param_space))).to_dict()
        print(f"stage 2/2: {config.train.loss} trials over {sorted(param_space)}, {config.train.max_steps} steps x "
              f"{config.train.num_workers} workers each, probe evaluation every {config.train.eval_every} steps", flush=True)
        results = run_stage("sweep", {**param_space, "train": trial_train}, config, context, config.train.max_steps)
        table, failed_trials = summarize_sweep(tracker, config, parent_run_id, experiment_id)
        for result in results:
            if result.error:
                print(f"trial failed: {result.error}", file=sys.stderr)
        failed = bool(failed_trials) or any(r.error for r in results)
    finally:
        tracker.end_run(parent_run_id, failed=failed)
    trial_ids = [row["run_id"] for row in table]
    return SweepOutcome(tracking_uri, config.experiment_name, parent_run_id, trial_ids, failed_trials, table)


def print_outcome(outcome: SweepOutcome) -> None:
    print("\nfinal Δ log p (nats, last minus first evaluation) per trial:")
    for row in outcome.summary:
        deltas = "  ".join(f"{c}={row.get(f'delta/{c}', float('nan')):+.2f}" for c in CATEGORIES)
        print(f"  {row['run_name']:<28} {deltas}")
    if outcome.failed_trials:
        print(f"\nFAILED trials: {outcome.failed_trials}")
    print(f"\nresults: MLflow {outcome.tracking_uri}\n  experiment: {outcome.experiment_name}\n"
          f"  parent run: {outcome.parent_run_id}\n  open with:  {mlflow_ui_command(outcome.tracking_uri)}")
