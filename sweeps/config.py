"""The sweep's typed configuration and its command line, generated from the dataclasses.

Precedence: defaults < `--config file.yaml` < flags. Unknown YAML keys are an error, not ignored;
the resolved config is printed, saved with the sweep and logged to MLflow.
"""
from __future__ import annotations

import argparse
import types
import typing
import urllib.parse
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import yaml

from trainers.config import TrainConfig


def _f(default, help: str, **kwargs):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class SweepConfig:
    name: str = _f("dpo-beta", "sweep name: the MLflow parent run is 'sweep:<name>'")
    betas: list[float] = _f([0.05, 0.2, 0.8], "beta values to sweep (one trial per beta x lr)")
    lrs: list[float] | None = _f(None, "learning rates to sweep (default: just --lr)")
    kl_coefs: list[float] | None = _f(None, "PPO KL coefficients to sweep (sweeps/ppo.py); default: just --ppo-kl-coef")
    losses: list[str] | None = _f(None, "preference losses to sweep (dpo, cdpo, ipo); default: just --loss")
    seeds: list[int] | None = _f(None, "seeds to sweep; default: just --seed")
    models: list[str] | None = _f(None, "models to sweep (sweeps/model_size.py); default: just --model")
    search: str = _f("grid", "grid (every combination), random or optuna (sample --num-samples trials; optuna needs the extra)", choices=("grid", "random", "optuna"))
    num_samples: int = _f(1, "grid: repeats of every combination; random/optuna: number of trials")
    scheduler: str = _f("fifo", "fifo (run every trial to the end) or asha (stop weak trials early on --metric)", choices=("fifo", "asha"))
    metric: str = _f("train/loss", "metric ASHA and Optuna optimise")
    mode: str = _f("min", "min or max of --metric", choices=("min", "max"))
    resume: bool = _f(False, "continue an interrupted sweep of the same --name and --storage-path")
    sft_recipe: str = _f("chosen", "SFT warm-up data: 'chosen' responses, or 'both' chosen and rejected (softens DPO's squeezing effect)", choices=("chosen", "both"))
    sft_recipes: list[str] | None = _f(None, "SFT warm-up recipes to sweep (chosen, both): one shared warm-up per recipe and model; default: just --sft-recipe")
    worker_shares: list[str] | None = _f(None, "per-model resources of each training worker as MODEL=SHARE: CPUs per worker (GPU fraction with --use-gpu), so small models pack together; unlisted models use --cpus-per-worker")
    sft_steps: int = _f(150, "steps of the shared SFT warm-up on chosen responses (0: start DPO from `model`)")
    sft_lr: float = _f(3e-3, "learning rate of the SFT warm-up")
    share_reference_logps: bool = _f(True, "compute the reference model's log-probs of the training pairs once and share them with every trial (false: each trial runs the reference every step)")
    tracking_uri: str | None = _f(None, "MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db; http://host:5000 for a server)")
    experiment_name: str = _f("probesweep", "MLflow experiment")
    storage_path: str | None = _f(None, "where Ray's checkpoints, probe sets, SFT warm-ups, reference log-probs, final models and sweep_state.json (--resume) go: a local folder (on a cluster, one every node shares) or a URI every node reaches, e.g. s3://bucket/prefix, which nodes read through a local cache (default: ./probesweep_runs)")
    address: str | None = _f(None, "Ray cluster to join ('auto' or host:port); default: a fresh local Ray")
    num_cpus: int | None = _f(None, "CPUs of the local Ray instance (default: all cores)")
    max_concurrent_trials: int = _f(3, "trials running at once")
    train_poll_interval_s: float = _f(0.2, "how often Ray Train's controller collects worker reports (Ray's default 2 s makes every report wait)")
    max_failures: int = _f(1, "retries of a failed trial (from its last checkpoint) before giving up")
    trials_on_head: bool = _f(True, "run each trial's orchestrating process (and its Ray Train controller) on the head node, so losing a worker node costs only its training workers, which restart from the last checkpoint")
    worker_resources: list[str] | None = _f(None, "extra Ray resources per training worker as NAME=AMOUNT (e.g. a custom resource that only one node type of the cluster declares), so workers land only on such nodes")
    train: TrainConfig = field(default_factory=TrainConfig)

    def sweep_lrs(self) -> list[float]:
        return list(self.lrs) if self.lrs else [self.train.lr]

    def worker_share_by_model(self) -> dict[str, float]:
        """`--worker-shares tiny-pythia-1m=0.2 ...` as {model: share}; a malformed entry is an error."""
        return parse_assignments(self.worker_shares, "worker_shares", "MODEL=SHARE")

    def worker_resource_requests(self) -> dict[str, float]:
        """`--worker-resources trainer=1 ...` as {resource: amount}."""
        return parse_assignments(self.worker_resources, "worker_resources", "RESOURCE=AMOUNT")

    def resolved_storage_path(self) -> str:
        return resolve_storage_path(self.storage_path)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_assignments(entries: list[str] | None, option: str, form: str) -> dict[str, float]:
    """['a=0.5', ...] as {'a': 0.5}; an entry without a name or with a value <= 0 is an error."""
    parsed = {}
    for entry in entries or []:
        name, _, value = entry.rpartition("=")
        try:
            amount = float(value)
        except ValueError:
            amount = -1.0
        if not name or amount <= 0:
            raise ValueError(f"{option}: expected {form} with a value > 0, got {entry!r}")
        parsed[name] = amount
    return parsed


def resolve_storage_path(path: str | None) -> str:
    """A URI as given (s3://, gs://, ...), else an absolute local folder (a file:// URI becomes one)."""
    if path and "://" in path:
        if not path.startswith("file://"):
            return path
        return str(Path(urllib.parse.unquote(urllib.parse.urlsplit(path).path)).resolve())
    return str(Path(path or "probesweep_runs").resolve())


def _scalar_type(annotation):
    """int | None -> int; list[float] -> float (with nargs); bool stays bool."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0])
    return annotation


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _add_fields(parser: argparse.ArgumentParser, cls, group_title: str) -> None:
    group = parser.add_argument_group(group_title)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name == "train":
            continue
        annotation = _scalar_type(hints[f.name])
        default = f.default if f.default is not MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if typing.get_origin(annotation) is list:
            kwargs.update(nargs="+", type=typing.get_args(annotation)[0], metavar="V")
        elif annotation is bool:
            kwargs.update(type=_bool, metavar="BOOL", nargs="?", const=True)  # `--resume` alone means true
        else:
            kwargs.update(type=annotation)
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        aliases = ["--probe-set"] if f.name == "probe_set_dir" else []
        group.add_argument(flag, *aliases, **kwargs)


def build_parser(description: str, defaults: SweepConfig | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="YAML file of any of the options below (flags win)")
    _add_fields(parser, SweepConfig, "sweep")
    _add_fields(parser, TrainConfig, "training (every trial)")
    return parser


def _apply(config: SweepConfig, values: dict, origin: str) -> SweepConfig:
    sweep_keys = {f.name for f in fields(SweepConfig)} - {"train"}
    train_keys = {f.name for f in fields(TrainConfig)}
    nested = values.pop("train", None) or {}
    unknown = sorted((set(values) - sweep_keys - train_keys) | (set(nested) - train_keys))
    if unknown:
        raise ValueError(f"{origin}: unknown option(s) {unknown}; see --help for the valid names")
    sweep_values = {k: v for k, v in values.items() if k in sweep_keys}
    train_values = {**config.train.to_dict(), **nested, **{k: v for k, v in values.items() if k in train_keys}}
    merged = {**{f.name: getattr(config, f.name) for f in fields(SweepConfig) if f.name != "train"}, **sweep_values}
    return SweepConfig(**merged, train=TrainConfig(**train_values))


def parse_config(argv: list[str] | None, description: str, defaults: SweepConfig | None = None) -> SweepConfig:
    """Defaults (the entry point's own), then the YAML file, then flags."""
    parser = build_parser(description)
    args = vars(parser.parse_args(argv))
    config = defaults or SweepConfig()
    config_file = args.pop("config")
    try:
        if config_file is not None:
            loaded = yaml.safe_load(config_file.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{config_file}: expected a mapping of option names to values")
            config = _apply(config, loaded, str(config_file))
        return _apply(config, args, "command line")
    except (ValueError, TypeError) as error:
        parser.error(str(error))
