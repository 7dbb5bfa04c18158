"""Reward models for PPO: a Bradley-Terry scalar head on a causal-LM body, swept over lr x model.

Each trial trains one reward model (trainers/reward_model.py) in its Tune trial process, logs loss
and held-out accuracy per step to its MLflow child run and saves the model; the folder is the
child run's tag `reward_model_dir`, which `python sweeps/ppo.py --reward <folder>` takes.

    python sweeps/reward_model.py                         # built-in data, tiny-pythia-1m, two lrs
    python sweeps/reward_model.py --models tiny-pythia-1m tiny-pythia-4m --lrs 3e-4 1e-3 --max-steps 200
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sweeps.config import _add_fields, resolve_storage_path  # noqa: E402
from infra.tracking import Tracker, configure_quiet_logging, default_tracking_uri, mlflow_ui_command  # noqa: E402
from infra import storage as store  # noqa: E402
from trainers.runs.reward_training import RewardModelConfig  # noqa: E402


@dataclass
class RewardSweep:
    name: str = "reward-model"
    lrs: list[float] | None = field(default_factory=lambda: [3e-4, 1e-3], metadata={"help": "learning rates to sweep"})
    models: list[str] | None = field(default=None, metadata={"help": "backbones to sweep (default: just --model)"})
    tracking_uri: str | None = None
    experiment_name: str = "probesweep"
    storage_path: str | None = None
    address: str | None = None
    num_cpus: int | None = None
    max_concurrent_trials: int = 2


def reward_trial(trial_config: dict) -> None:
    """Tune function trainable: one reward model, one MLflow child run."""
    import torch
    from ray import tune

    from trainers.runs.reward_training import train_reward_model

    torch.set_num_threads(1)
    ctx = trial_config["context"]
    config = RewardModelConfig(**{**trial_config["reward"], **{k: trial_config[k] for k in ("lr", "model") if k in trial_config}})
    tracker = Tracker(ctx["tracking_uri"])
    name = f"lr={config.lr} model={config.model}"
    run_id = tracker.start_run(ctx["experiment_id"], name, params=config.to_dict(), parent_run_id=ctx["parent_run_id"],
                               tags={"stage": "reward-model", "sweep": ctx["sweep_name"]})
    # a local folder or a URI (the model is saved locally and uploaded); PPO's --reward takes either
    output = store.join(ctx["storage_path"], "reward-models", f"{ctx['sweep_name']}-{tune.get_context().get_trial_id()}")

    def log(step: int, metrics: dict) -> None:
        tracker.log_metrics(run_id, metrics, step=step)
        if "eval/accuracy" in metrics:
            tune.report({"step": step, **metrics})

    try:
        with store.output_dir(output) as directory:
            result = train_reward_model(config, output_dir=directory, log=log)
    except Exception:
        tracker.end_run(run_id, failed=True)
        raise
    tracker.set_tags(run_id, {"reward_model_dir": output})
    tracker.end_run(run_id)
    print(f"{name}: held-out accuracy {result.evaluations[-1]['eval/accuracy']:.3f} -> {output}", flush=True)


def main(argv: list[str] | None = None) -> int:
    import ray
    from ray import tune

    from sweeps.driver import start_ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_fields(parser, RewardSweep, "sweep")
    _add_fields(parser, RewardModelConfig, "reward model (every trial)")
    args = vars(parser.parse_args(argv))
    sweep = RewardSweep(**{f.name: args[f.name] for f in fields(RewardSweep) if f.name in args})
    reward = RewardModelConfig(**{f.name: args[f.name] for f in fields(RewardModelConfig) if f.name in args})
    configure_quiet_logging()
    tracking_uri = sweep.tracking_uri or default_tracking_uri(Path.cwd())
    storage = resolve_storage_path(sweep.storage_path)  # a local folder or a URI
    tracker = Tracker(tracking_uri)
    tracker.check_reachable()
    experiment_id = tracker.experiment_id(sweep.experiment_name)
    parent = tracker.start_run(experiment_id, f"sweep:{sweep.name}", params={**asdict(sweep), **reward.to_dict()},
                               tags={"sweep": sweep.name, "entry_point": "reward_model.py"})
    space = {"reward": reward.to_dict(), "context": {"tracking_uri": tracking_uri, "experiment_id": experiment_id,
                                                      "parent_run_id": parent, "storage_path": storage,
                                                      "sweep_name": sweep.name}}
    for key, values in (("lr", sweep.lrs), ("model", sweep.models)):
        if values:
            space[key] = tune.grid_search(list(values))
    failed = True
    try:
        start_ray(sweep.address, sweep.num_cpus)
        tuner = tune.Tuner(tune.with_resources(reward_trial, {"cpu": 0.5}), param_space=space,
                           tune_config=tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent_trials),
                           run_config=tune.RunConfig(name=sweep.name, storage_path=storage, verbose=0))
        results = tuner.fit()
        failed = any(r.error for r in results)
    finally:
        tracker.end_run(parent, failed=failed)
        ray.shutdown()
    children = tracker.child_runs(experiment_id, parent)
    print("\nreward models (held-out accuracy at the last evaluation):")
    for run in children:
        print(f"  {run.info.run_name:<40} {run.data.metrics.get('eval/accuracy', float('nan')):.3f}  "
              f"{run.data.tags.get('reward_model_dir', '(failed)')}")
    print(f"\nresults: MLflow {tracking_uri}, parent run {parent}\n  open with:  {mlflow_ui_command(tracking_uri)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
