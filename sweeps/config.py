"""The sweep's typed configuration and its command line, generated from the dataclasses.

Precedence: the entry point's defaults < `--config file.yaml` < flags. Unknown YAML keys are an
error, not ignored; every value is checked when the config is made, so a bad one stops the sweep
before anything starts, in one line naming the flag. The resolved config is printed, saved with the
sweep and logged to MLflow. `EntryPoint` is what each runnable script declares: its defaults (which
its `--help` shows), the trial fields it sweeps, and the flags it fixes (refused, with the reason).
"""
from __future__ import annotations

import argparse
import urllib.parse
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping

from infra.cli import (AT_LEAST_1, NON_NEGATIVE, POSITIVE, Parser, add_settings, check_ranges, remote_trials_tracking_problem,
                       setting as _f, with_values)
from infra.uri_credentials import refuse_credentials
from probes.probe_set import DYNAMIC_CATEGORIES, STATIC_CATEGORIES
from trainers.config import OBJECTIVES, SFT_RECIPES, TrainConfig

# trial field -> the sweep option that lists its values
SWEPT_BY = {"beta": "betas", "ppo_kl_coef": "kl_coefs", "lr": "lrs", "loss": "losses", "seed": "seeds",
            "model": "models", "sft_recipe": "sft_recipes"}

# the per-category curves a fall-from-peak stop may watch (summed and per-token mean log-probs)
STOP_METRICS = tuple(f"{kind}/{c}" for kind in ("logp", "logp_tok") for c in STATIC_CATEGORIES + DYNAMIC_CATEGORIES)


@dataclass
class SweepConfig:
    name: str = _f("dpo-beta", "sweep name (a folder name under --storage-path): the MLflow parent run is 'sweep:<name>'")
    betas: list[float] = _f([0.05, 0.2, 0.8], "beta values to sweep (one trial per beta x lr)", range=POSITIVE)
    lrs: list[float] | None = _f(None, "learning rates to sweep (default: just --lr)", range=POSITIVE)
    kl_coefs: list[float] | None = _f(None, "PPO KL coefficients to sweep; default: just --ppo-kl-coef", range=NON_NEGATIVE)
    losses: list[str] | None = _f(None, f"preference losses to sweep ({', '.join(n for n, o in OBJECTIVES.items() if o.kind == 'preference')}); default: just --loss", choices=tuple(OBJECTIVES))
    seeds: list[int] | None = _f(None, "seeds to sweep; default: just --seed", range=NON_NEGATIVE)
    models: list[str] | None = _f(None, "models to sweep; default: just --model")
    search: str = _f("grid", "grid (every combination), random or optuna (sample --num-samples trials; optuna needs the extra)", choices=("grid", "random", "optuna"))
    num_samples: int = _f(1, "grid: repeats of every combination; random/optuna: number of trials", range=AT_LEAST_1)
    scheduler: str = _f("fifo", "fifo (run every trial to the end) or asha (stop weak trials early on --metric)", choices=("fifo", "asha"))
    metric: str = _f("train/loss", "metric ASHA and Optuna optimise")
    mode: str = _f("min", "min or max of --metric", choices=("min", "max"))
    stop_fall_from_peak: float | None = _f(None, "stop a trial once --stop-metric lies this many nats below its own peak so far (under DPO chosen's log-prob often peaks early, then falls); default: no such stop", range=POSITIVE)
    stop_metric: str = _f("logp/chosen", "the category curve --stop-fall-from-peak watches", choices=STOP_METRICS)
    resume: bool = _f(False, "continue an interrupted sweep of the same --name and --storage-path")
    overwrite: bool = _f(False, "start a sweep whose --name already exists under --storage-path afresh (its earlier state can no longer be resumed)")
    sft_recipes: list[str] | None = _f(None, "SFT recipes to sweep (chosen, both): one shared warm-up per recipe and model; default: just --sft-recipe", choices=SFT_RECIPES)
    worker_shares: list[str] | None = _f(None, "per-model resources of each training worker as MODEL=SHARE: CPUs per worker (GPU fraction with --use-gpu), so small models pack together; unlisted models use --cpus-per-worker")
    sft_steps: int = _f(150, "steps of the shared SFT warm-up (0: start from `model`)", range=NON_NEGATIVE)
    sft_lr: float = _f(3e-3, "learning rate of the SFT warm-up", range=POSITIVE)
    share_reference_logps: bool = _f(True, "compute the reference model's log-probs of the training pairs once and share them with every trial (false: each trial runs the reference every step)")
    tracking_uri: str | None = _f(None, "MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db; http://host:5000 for a server)")
    experiment_name: str = _f("probesweep", "MLflow experiment")
    storage_path: str | None = _f(None, "where Ray's checkpoints, probe sets, SFT warm-ups, reference log-probs, final models and sweep_state.json (--resume) go: a local folder (on a cluster, one every node shares) or a URI every node reaches, e.g. s3://bucket/prefix, which nodes read through a local cache (default: ./probesweep_runs)")
    address: str | None = _f(None, "Ray cluster to join ('auto' or host:port); default: a fresh local Ray")
    num_cpus: int | None = _f(None, "CPUs of the local Ray instance (default: all cores)", range=AT_LEAST_1)
    max_concurrent_trials: int = _f(3, "trials running at once", range=AT_LEAST_1)
    train_poll_interval_s: float = _f(0.2, "how often Ray Train's controller collects worker reports (Ray's default 2 s makes every report wait)", range=POSITIVE)
    max_failures: int = _f(1, "retries of a failed trial (from its last checkpoint) before giving up", range=NON_NEGATIVE)
    checkpoints_to_keep: int = _f(2, "Ray Train checkpoints kept per trial, the oldest deleted (2 or more lets a corrupt last checkpoint fall back to the one before)", range=AT_LEAST_1)
    storage_cache_gb: float | None = _f(None, "size limit of each node's cache of files fetched from a remote --storage-path (least recently used copies are removed past it; default: no limit)", range=POSITIVE)
    trials_on_head: bool = _f(True, "run each trial's orchestrating process (and its Ray Train controller) on the head node, so losing a worker node costs only its training workers, which restart from the last checkpoint")
    worker_resources: list[str] | None = _f(None, "extra Ray resources per training worker as NAME=AMOUNT (e.g. a custom resource that only one node type of the cluster declares), so workers land only on such nodes")
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if isinstance(self.train, dict):  # from a recorded config
            self.train = TrainConfig.from_dict(self.train)
        check_ranges(self)
        check_name(self.name)
        refuse_credentials(self)  # also the train section's URIs (init checkpoint, probe set, reward model)
        self.worker_share_by_model()
        self.worker_resource_requests()
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: continue the sweep, or start it afresh")
        for loss in self.losses or []:  # each swept loss must accept the shared settings (e.g. --label-smoothing)
            replace(self.train, loss=loss)
        loopback = remote_trials_tracking_problem(self.tracking_uri, self.trials_on_head)
        if loopback:
            raise ValueError(loopback)

    def sweep_lrs(self) -> list[float]:
        return list(self.lrs) if self.lrs else [self.train.lr]

    def values_of(self, key: str) -> list | None:
        """The values a sweep tries for trial field `key` (lr: --lrs, else just --lr)."""
        if key == "lr":
            return self.sweep_lrs()
        values = getattr(self, SWEPT_BY[key])
        return list(values) if values else None

    def worker_share_by_model(self) -> dict[str, float]:
        """`--worker-shares tiny-pythia-1m=0.2 ...` as {model: share}; a malformed entry is an error."""
        return parse_assignments(self.worker_shares, "--worker-shares", "MODEL=SHARE")

    def worker_resource_requests(self) -> dict[str, float]:
        """`--worker-resources trainer=1 ...` as {resource: amount}."""
        return parse_assignments(self.worker_resources, "--worker-resources", "RESOURCE=AMOUNT")

    def resolved_storage_path(self) -> str:
        return resolve_storage_path(self.storage_path)

    def to_dict(self) -> dict:
        return asdict(self)


def check_name(name: str) -> None:
    """A sweep name is one folder under the storage path: nothing that leaves it or hides in it."""
    if not name or name.startswith(".") or "/" in name or "\\" in name or name != name.strip():
        raise ValueError(f"--name must be a plain folder name (no '/', '\\', leading '.' or surrounding spaces), got {name!r}")


def parse_assignments(entries: list[str] | None, option: str, form: str) -> dict[str, float]:
    """['a=0.5', ...] as {'a': 0.5}; an entry without a name or with a value <= 0 is an error."""
    parsed = {}
    for entry in entries or []:
        name, _, value = entry.rpartition("=")
        try:
            amount = float(value)
        except ValueError:
            amount = -1.0
        if not name or not amount > 0 or amount == float("inf"):
            raise ValueError(f"{option}: expected {form} with a finite value > 0, got {entry!r}")
        parsed[name] = amount
    return parsed


def resolve_storage_path(path: str | None) -> str:
    """A URI as given (s3://, gs://, ...), else an absolute local folder (a file:// URI becomes one)."""
    if path and "://" in path:
        if not path.startswith("file://"):
            return path
        return str(Path(urllib.parse.unquote(urllib.parse.urlsplit(path).path)).resolve())
    return str(Path(path or "probesweep_runs").resolve())


@dataclass(frozen=True)
class EntryPoint:
    """What a runnable sweep script declares; its parser, --help and checks come from this."""
    prog: str
    description: str
    defaults: SweepConfig
    searched: tuple[str, ...]                               # trial fields it sweeps (their list flags are live)
    fixed: Mapping[str, str] = field(default_factory=dict)  # option -> why the script fixes it (refused if given)
    losses: tuple[str, ...] | None = None                   # the losses it accepts (None: any)

    def check(self, config: SweepConfig) -> None:
        if self.losses is None:
            return
        for option, loss in [("--loss", config.train.loss)] + [("--losses", name) for name in config.losses or []]:
            if loss not in self.losses:
                raise ValueError(f"{option}: {self.prog} trains {', '.join(self.losses)}, not {loss!r}")

    def refused(self) -> dict[str, str]:
        """Fixed options, plus the list flags of fields this script does not sweep."""
        unswept = {option: f"{self.prog} does not sweep {key}; it sweeps {', '.join(self.searched)}"
                   for key, option in SWEPT_BY.items() if key not in self.searched}
        return {**unswept, **self.fixed}

    def searched_values(self, config: SweepConfig) -> dict[str, list | None]:
        return {key: config.values_of(key) for key in self.searched}


DEFAULT_ENTRY = EntryPoint("sweep", "", SweepConfig(), tuple(SWEPT_BY))


def _add_all(parser: argparse.ArgumentParser, entry: EntryPoint) -> dict[str, tuple[str, ...]]:
    refused = entry.refused()
    paths = add_settings(parser, SweepConfig, "sweep", entry.defaults, refused, skip=("train",))
    paths.update({name: ("train", *path) for name, path in
                  add_settings(parser, TrainConfig, "training (every trial)", entry.defaults.train, refused).items()})
    return paths


def build_parser(entry: EntryPoint = DEFAULT_ENTRY) -> tuple[argparse.ArgumentParser, dict[str, tuple[str, ...]]]:
    """The entry point's parser (its own defaults in --help) and option name -> attribute path."""
    parser = Parser(prog=entry.prog if entry.prog != "sweep" else None, description=entry.description,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="YAML file of any of the options below (flags win)")
    return parser, _add_all(parser, entry)


def _yaml_paths(values: Mapping, paths: dict[str, tuple[str, ...]], origin: str, refused: Mapping[str, str],
                scope: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """YAML keys (option names; a nested `train:` or section mapping of field names) -> attribute paths."""
    by_path = {path: name for name, path in paths.items()}
    found: dict[tuple[str, ...], object] = {}
    unknown = []
    for key, value in values.items():
        path = (*scope, key)
        if not scope and key in paths:
            name = key
            path = paths[key]
        elif path in by_path:
            name = by_path[path]
        elif isinstance(value, Mapping) and any(p[:len(path)] == path for p in by_path):
            found.update(_yaml_paths(value, paths, origin, refused, path))
            continue
        elif scope == ("train",) and key in paths and paths[key][0] == "train":
            name, path = key, paths[key]
        else:
            unknown.append(".".join(path))
            continue
        if name in refused:
            raise ValueError(f"{origin}: {name}: {refused[name]}")
        found[path] = value
    if unknown:
        raise ValueError(f"{origin}: unknown option(s) {sorted(unknown)}; see --help for the valid names")
    return found


def parse_config(argv: list[str] | None, entry: EntryPoint | str = DEFAULT_ENTRY) -> SweepConfig:
    """The entry point's defaults, then the YAML file, then flags; a bad value ends in one line.
    `entry` may be just a description (every option, the class defaults)."""
    import yaml

    if isinstance(entry, str):
        entry = replace(DEFAULT_ENTRY, description=entry)

    parser, paths = build_parser(entry)
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config")
    config = entry.defaults
    try:
        if config_file is not None:
            try:
                loaded = yaml.safe_load(config_file.read_text()) or {}
            except (OSError, yaml.YAMLError) as error:
                raise ValueError(f"{config_file}: {str(error).splitlines()[0]}") from None
            if not isinstance(loaded, dict):
                raise ValueError(f"{config_file}: expected a mapping of option names to values")
            try:
                config = with_values(config, _yaml_paths(loaded, paths, str(config_file), entry.refused()))
            except (ValueError, TypeError) as error:
                message = str(error)
                raise ValueError(message if message.startswith(str(config_file)) else f"{config_file}: {message}") from None
        config = with_values(config, {paths[name]: value for name, value in args.items()})
        entry.check(config)
        return config
    except (ValueError, TypeError) as error:
        parser.error(str(error))
