"""Search spaces, search algorithms and schedulers: what a sweep varies and how Tune explores it.

Entry points name the values to try per trial field (beta, lr, loss, seed, model, and the SFT
warm-up recipe); the config's `search` decides whether they form a grid (every combination,
`num_samples` repeats) or a set that random search or Optuna samples `num_samples` trials from. Optuna cannot take grid spaces,
so values become `tune.choice` for it.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

from infra.cpu_threads import threads_for_cpus

from sweeps.config import SWEPT_BY, SweepConfig

SEARCHABLE = tuple(SWEPT_BY)  # the TrainConfig fields a sweep may vary (in the order run names list them)


def warmup_key(model: str, recipe: str) -> str:
    """Which shared SFT warm-up a trial starts from: one per (model, recipe)."""
    return f"{model}|{recipe}"


def search_space(config: SweepConfig, searched: dict[str, Sequence[Any] | None]) -> dict:
    from ray import tune

    unknown = sorted(set(searched) - set(SEARCHABLE))
    if unknown:
        raise ValueError(f"cannot search over {unknown}; searchable trial fields are {list(SEARCHABLE)}")
    space = {}
    for key, values in searched.items():
        if not values:
            continue
        values = list(values)
        space[key] = tune.grid_search(values) if config.search == "grid" else tune.choice(values)
    return space


def searched_values(param_space: dict) -> dict[str, list]:
    """The candidate values of every searched key, whatever kind of domain holds them."""
    values = {}
    for key, domain in param_space.items():
        if isinstance(domain, dict) and "grid_search" in domain:
            values[key] = list(domain["grid_search"])
        elif hasattr(domain, "categories"):
            values[key] = list(domain.categories)
    return values


def search_algorithm(config: SweepConfig):
    if config.search != "optuna":
        return None
    try:
        import optuna  # noqa: F401  (OptunaSearch imports it lazily and fails late otherwise)
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as error:
        raise SystemExit("--search optuna needs the optional extra: pip install 'probesweep[optuna]'") from error
    return OptunaSearch(metric=config.metric, mode=config.mode)


def scheduler(config: SweepConfig):
    if config.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # steps are the time axis (reports are batched, so Tune's iteration count is not)
    return ASHAScheduler(time_attr="step", metric=config.metric, mode=config.mode, max_t=config.train.max_steps,
                         grace_period=max(1, min(config.train.eval_every, config.train.max_steps)), reduction_factor=2)


def trial_stopper(config: SweepConfig):
    """The searched trials' Tune stopper: a trial ends once --stop-metric lies --stop-fall-from-peak nats
    below its own peak (None without the flag)."""
    if config.stop_fall_from_peak is None:
        return None
    from sweeps.stoppers import FallFromPeakStopper

    return FallFromPeakStopper(config.stop_fall_from_peak, config.stop_metric)


def threads_per_trial(config: SweepConfig) -> int:
    """Busy threads of one CPU trial: each worker (and rollout actor, where the trial has them) runs at
    least one, however small its fractional Ray share (infra.cpu_threads)."""
    train = config.train
    share = max([train.cpus_per_worker, *config.worker_share_by_model().values()])
    threads = train.num_workers * threads_for_cpus(share)
    if train.loss == "ppo" or "ppo" in (config.losses or []) or train.probe_decodes == "actors":
        threads += train.rollout.num_actors * threads_for_cpus(train.rollout.cpus_per_actor)
    return threads


def concurrent_trials(config: SweepConfig, cores: float) -> int:
    """--max-concurrent-trials, lowered so the trials' threads fit the cores (Ray packs fractional shares,
    but each worker still keeps a core busy). A GPU trial is bound by its GPU: left as asked. To
    oversubscribe on purpose, raise --num-cpus."""
    if config.train.use_gpu:
        return config.max_concurrent_trials
    return max(1, min(config.max_concurrent_trials, math.floor((cores + 1e-9) / threads_per_trial(config))))


def ray_cpus(config: SweepConfig) -> float:
    """The CPUs of the running Ray (its --num-cpus on a local one), or this machine's cores."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("CPU", 1.0))
    return float(config.num_cpus or os.cpu_count() or 1)


def tune_settings(config: SweepConfig) -> dict:
    """Keyword arguments of `tune.TuneConfig` for this sweep."""
    if config.search != "grid" or config.scheduler != "fifo":
        # the step-0 evaluation report carries no training metric; ASHA and Optuna skip such reports
        os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    cores = ray_cpus(config)
    concurrent = concurrent_trials(config, cores)
    if concurrent < config.max_concurrent_trials:
        print(f"running {concurrent} trial(s) at once, not --max-concurrent-trials {config.max_concurrent_trials}: "
              f"each needs {threads_per_trial(config)} busy thread(s) and Ray has {cores:g} CPUs "
              "(raise --num-cpus to oversubscribe on purpose)", flush=True)
    return {"search_alg": search_algorithm(config), "scheduler": scheduler(config),
            "num_samples": config.num_samples, "max_concurrent_trials": concurrent,
            "reuse_actors": reuses_trial_processes(config)}


def reuses_trial_processes(config: SweepConfig) -> bool:
    """Tune hands the next trial a finished trial's process (a process start and the trial imports saved per
    trial; run_trial keeps no state between trials) — only where every trial runs to its end: by Tune's code,
    it would cache a stopped trial's process while that trial's fit still runs there (its stop does not
    end the Train run), so the stopped run would train on until the process is handed on or dropped."""
    return config.scheduler == "fifo" and config.stop_fall_from_peak is None
