"""Search spaces, search algorithms and schedulers: what a sweep varies and how Tune explores it.

Entry points name the values to try per trial field (beta, lr, loss, seed, model, and the SFT
warm-up recipe); the config's `search` decides whether they form a grid (every combination,
`num_samples` repeats) or a set that random search or Optuna samples `num_samples` trials from. Optuna cannot take grid spaces,
so values become `tune.choice` for it.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

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


def tune_settings(config: SweepConfig) -> dict:
    """Keyword arguments of `tune.TuneConfig` for this sweep."""
    if config.search != "grid" or config.scheduler != "fifo":
        # the step-0 evaluation report carries no training metric; ASHA and Optuna skip such reports
        os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    return {"search_alg": search_algorithm(config), "scheduler": scheduler(config),
            "num_samples": config.num_samples, "max_concurrent_trials": config.max_concurrent_trials}
