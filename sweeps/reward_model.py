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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.cli import AT_LEAST_1, POSITIVE, Parser, add_settings, check_ranges, setting, with_values  # noqa: E402
from infra import storage as store  # noqa: E402
from infra.uri_credentials import refuse_credentials  # noqa: E402
from sweeps.config import check_name, resolve_storage_path  # noqa: E402
from trainers.config import RewardModelConfig  # noqa: E402


@dataclass
class RewardSweep:
    name: str = setting("reward-model", "sweep name (a folder name): the MLflow parent run is 'sweep:<name>'")
    lrs: list[float] | None = setting([3e-4, 1e-3], "learning rates to sweep", range=POSITIVE)
    models: list[str] | None = setting(None, "backbones to sweep (default: just --model)")
    tracking_uri: str | None = setting(None, "MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db)")
    experiment_name: str = setting("probesweep", "MLflow experiment")
    storage_path: str | None = setting(None, "where reward models go: a local folder or a URI (default: ./probesweep_runs)")
    address: str | None = setting(None, "Ray cluster to join ('auto' or host:port); default: a fresh local Ray")
    num_cpus: int | None = setting(None, "CPUs of the local Ray instance (default: all cores)", range=AT_LEAST_1)
    max_concurrent_trials: int = setting(2, "trials running at once", range=AT_LEAST_1)

    def __post_init__(self):
        check_ranges(self)
        check_name(self.name)


def parse_args(argv: list[str] | None) -> tuple[RewardSweep, RewardModelConfig]:
    """The shared parser builder over both dataclasses; a bad value ends in one line."""
    parser = Parser(prog="sweeps/reward_model.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep_paths = add_settings(parser, RewardSweep, "sweep")
    reward_paths = add_settings(parser, RewardModelConfig, "reward model (every trial)")
    args = vars(parser.parse_args(argv))
    try:
        sweep = with_values(RewardSweep(), {sweep_paths[k]: v for k, v in args.items() if k in sweep_paths})
        reward = with_values(RewardModelConfig(), {reward_paths[k]: v for k, v in args.items() if k in reward_paths})
        refuse_credentials(sweep)
        refuse_credentials(reward)
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    return sweep, reward


@dataclass(frozen=True)
class RewardContext:
    """What every reward-model trial receives beside its config."""
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    storage_path: str
    sweep_name: str


def reward_trial(trial_config: dict) -> None:
    """Tune function trainable: one reward model, one MLflow child run."""
    import torch
    from ray import tune

    from infra.tracking import Tracker
    from trainers.runs.reward_training import train_reward_model

    torch.set_num_threads(1)
    ctx: RewardContext = trial_config["context"]
    config = replace(trial_config["reward"], **{k: trial_config[k] for k in ("lr", "model") if k in trial_config})
    tracker = Tracker(ctx.tracking_uri)
    name = f"lr={config.lr} model={config.model}"
    run_id = tracker.start_run(ctx.experiment_id, name, params=config.to_dict(), parent_run_id=ctx.parent_run_id,
                               tags={"stage": "reward-model", "sweep": ctx.sweep_name})
    # a local folder or a URI (the model is saved locally and uploaded); PPO's --reward takes either
    output = store.join(ctx.storage_path, "reward-models", f"{ctx.sweep_name}-{tune.get_context().get_trial_id()}")

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
    sweep, reward = parse_args(argv)
    import ray
    from ray import tune

    from infra.tracking import Tracker, configure_quiet_logging, default_tracking_uri, mlflow_ui_command
    from sweeps.driver import start_ray

    configure_quiet_logging()
    tracking_uri = sweep.tracking_uri or default_tracking_uri(Path.cwd())
    storage = resolve_storage_path(sweep.storage_path)  # a local folder or a URI
    tracker = Tracker(tracking_uri)
    tracker.check_reachable()
    experiment_id = tracker.experiment_id(sweep.experiment_name)
    parent = tracker.start_run(experiment_id, f"sweep:{sweep.name}", params={**asdict(sweep), **reward.to_dict()},
                               tags={"sweep": sweep.name, "entry_point": "reward_model.py"})
    space = {"reward": reward, "context": RewardContext(tracking_uri, experiment_id, parent, storage, sweep.name)}
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
