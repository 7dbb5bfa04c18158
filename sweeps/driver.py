"""The small sweep driver every entry point shares.

A sweep is two Tune stages under one MLflow parent run: a shared SFT warm-up per model (trained
once, cached by its recipe, reused by every trial and by later sweeps) and the searched trials that
start from it. The driver prepares everything a trial needs exactly once (tokenizer, data check,
probe set, reference log-probs), then only orchestrates; training happens in Ray Train workers.
`--resume` reopens the sweep's parent run and restores its Tune stages; an existing sweep name is
refused without it (or --overwrite). torch, transformers, MLflow and Ray are imported inside the
functions that use them, so an entry point's `--help` and its flag checks stay fast.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from typing import TYPE_CHECKING

import yaml

from probes.builtin_generators import RuleBasedGenerator
from probes.probe_set import ProbeSet, cached_probe_set_dir
from sweeps.config import EntryPoint, SweepConfig, parse_config
from sweeps.context import CATEGORIES, TrialContext
from sweeps.run_manifest import training_data_sha256
from sweeps.retries import crash_retries
from sweeps.search import search_space, searched_values, warmup_key
from sweeps.stages import run_stage, shared_reference_logps, shared_sft_warmups, unsatisfiable_resources
from infra import storage as store
from trainers.config import TrainConfig
from trainers.data.pairs import LOCAL_SUFFIXES, load_preference_data
from trainers.data.schema import DataError

if TYPE_CHECKING:
    from infra.tracking import Tracker

STATE_FILE = "sweep_state.json"
# set on the driver, needed by every node to reach the same object store (no secrets: credentials stay with each node)
STORE_ENV_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", store.CACHE_LIMIT_ENV)


@dataclass
class SweepOutcome:
    tracking_uri: str
    experiment_name: str
    parent_run_id: str
    trial_run_ids: list[str]
    failed_trials: list[str]     # one line per failed trial: which one, and why
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
                                            "TOKENIZERS_PARALLELISM": "false",
                                            **{k: os.environ[k] for k in STORE_ENV_VARS if os.environ.get(k)}}}}
    address = address or os.environ.get("RAY_ADDRESS")  # `ray job submit` sets it for the job's driver
    if address:  # an existing cluster owns its resources
        ray.init(address=address, **options)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray service on 127.0.0.1
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **options)


def warn_if_store_is_node_local(tracking_uri: str, address: str | None) -> bool:
    """On a cluster, a file store (SQLite) lives on one node's disk — a job's working folder is even
    deleted afterwards — so say so before the sweep starts; a server is what a cluster wants."""
    on_disk = tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri
    if not address or not on_disk:
        return False
    print(f"warning: joining the Ray cluster at {address!r} with MLflow store {tracking_uri!r} on this node's disk; "
          "pass --tracking-uri http://<head-ip>:5000 (the server cluster.yaml starts) so runs outlive this job",
          file=sys.stderr, flush=True)
    return True


def training_overlap(probe_set: ProbeSet, num_prompts: int, training_prompts: set[str]) -> int:
    """How many of the prompts trials score are also training prompts."""
    return sum(prompt in training_prompts for prompt in probe_set.prompts[:num_prompts])


def prepare_probe_set(train: TrainConfig, storage: str, training_prompts: set[str]) -> tuple[ProbeSet, str]:
    """The probe set every trial scores: a given folder (or URI), or built once from the eval split and
    cached under the storage; with remote storage it is built here and published there. A built set
    never holds a training prompt (eval pairs that repeat one are left out first); a given set that
    does is used, with a warning, since its author chose it."""
    if train.probe_set_dir:
        # absolute: Ray workers run in other directories; a URI stays one (workers fetch their own copy)
        directory = train.probe_set_dir if store.is_uri(train.probe_set_dir) else str(Path(train.probe_set_dir).resolve())
        probe_set = ProbeSet.load(store.local_copy(directory))
        if len(probe_set.prompts) > train.num_probe_prompts:
            print(f"note: the probe set has {len(probe_set.prompts)} prompts; trials score the first "
                  f"{train.num_probe_prompts} (--num-probe-prompts)", flush=True)
        overlap = training_overlap(probe_set, train.num_probe_prompts, training_prompts)
        if overlap:
            print(f"warning: --probe-set {train.probe_set_dir}: {overlap} of its scored prompts are also training "
                  f"prompts of {train.dataset} [{train.train_split}], so their curves mix memorisation with "
                  "generalisation; build the probe set from held-out data (sweeps/build_probes.py --split)",
                  file=sys.stderr, flush=True)
        return probe_set, directory
    data = load_preference_data(train.dataset, train.eval_split, skip_bad_rows=train.skip_bad_rows,
                                holdout_fraction=train.holdout_fraction)
    held_out = [pair for pair in data.pairs if pair.prompt not in training_prompts]
    if len(held_out) < len(data.pairs):
        print(f"note: {len(data.pairs) - len(held_out)} of {len(data.pairs)} {train.eval_split} pairs repeat a training "
              "prompt and are left out of the probe set", flush=True)
    if not held_out:
        raise SystemExit(f"error: --dataset {train.dataset}: its {train.eval_split} split has no pair whose prompt is not "
                         "a training prompt, so no probe set can be built; raise --holdout-fraction (a local file) "
                         "or pass --eval-split / --probe-set")
    build_root = store.cache_root() / "probe_sets" if store.is_remote(storage) else Path(storage) / "probe_sets"
    directory = cached_probe_set_dir(build_root, held_out, RuleBasedGenerator(),
                                     train.num_probe_prompts, train.seed, f"{train.dataset}:{train.eval_split}")
    probe_set = ProbeSet.load(directory)
    if training_overlap(probe_set, len(probe_set.prompts), training_prompts):  # the filter above makes this a bug
        raise RuntimeError(f"probe set {directory} holds a training prompt")
    if not store.is_remote(storage):
        return probe_set, str(directory)
    published = store.join(storage, "probe_sets", directory.name)  # content-keyed: publish once, reuse after
    if not store.exists(store.join(published, ".complete")):
        store.upload_dir(directory, published)
        store.write_text(store.join(published, ".complete"), "")
    return probe_set, published


def check_training_data(train: TrainConfig) -> tuple[int, set[str]]:
    """Parse the training data once in the driver, so a bad row stops the sweep before any worker
    starts; (pairs, their prompts), the prompts for keeping the probe set held out."""
    data = load_preference_data(train.dataset, train.train_split, skip_bad_rows=train.skip_bad_rows,
                                max_rows=train.max_train_pairs, holdout_fraction=train.holdout_fraction)
    if data.skipped:
        print(f"skipped {len(data.skipped)} bad rows of {train.dataset} (first: {data.skipped[0]})")
    return len(data.pairs), {pair.prompt for pair in data.pairs}


CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length(model: str) -> int | None:
    """The longest sequence `model` takes (its config's position limit); None when it does not say."""
    from trainers.model.factory import TINY_PYTHIA_SIZES, tiny_pythia_config
    from trainers.model.pretrained import resolve_model_path

    path = resolve_model_path(model)
    if path in TINY_PYTHIA_SIZES:
        model_config = tiny_pythia_config(path)
    else:
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(path)
    return next((int(getattr(model_config, name)) for name in CONTEXT_FIELDS
                 if isinstance(getattr(model_config, name, None), int)), None)


def context_length_problem(train: TrainConfig, models: list[str]) -> str | None:
    """One line when a prompt and a response at their limits would not fit a model's context."""
    needed = train.max_prompt_tokens + train.max_response_tokens
    for model in models:
        limit = context_length(model)
        if limit is not None and needed > limit:
            return (f"--max-prompt-tokens ({train.max_prompt_tokens}) + --max-response-tokens ({train.max_response_tokens})"
                    f" = {needed} tokens exceed the context length of {model} ({limit}); lower them to {limit} in all")
    return None


def data_file_problem(dataset: str) -> str | None:
    """One line when --dataset names a local data file (.jsonl/.json/.parquet) that is missing or cannot
    be opened; None for a readable file, the built-in set, a hub name or a folder of splits."""
    if not dataset.lower().endswith(LOCAL_SUFFIXES):
        return None
    path = Path(dataset).expanduser()
    if not path.exists():  # the loader reads data files from this machine's disk only (no URIs)
        where = "a data file must be on this machine's disk" if "://" in dataset else f"relative to {Path.cwd()}"
        return f"--dataset {dataset}: no such file ({where}); check the path"
    try:  # open for real: permission bits, a folder named like a file, a broken mount all show here
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as error:
        return f"--dataset {dataset}: cannot be read ({error.strerror or type(error).__name__}); check the path and its permissions"
    return None


def check_before_start(config: SweepConfig, storage: str, searched: dict[str, list]) -> None:
    """Refusals that need the storage or the machine, before anything is prepared or started: a data
    file that is missing or unreadable, an existing sweep name without --resume/--overwrite, resources
    a local Ray can never provide."""
    missing_data = data_file_problem(config.train.dataset)
    if missing_data:
        raise SystemExit(f"error: {missing_data}")
    state_path = store.join(storage, config.name, STATE_FILE)
    if not config.resume and not config.overwrite and store.exists(state_path):
        raise SystemExit(f"error: --name {config.name!r}: a sweep of that name already exists under {storage} "
                         f"({STATE_FILE}); pass --resume to continue it, --overwrite to start it afresh, or another --name")
    if not (config.address or os.environ.get("RAY_ADDRESS")):
        capacity = config.num_cpus or os.cpu_count() or 1
        problem = unsatisfiable_resources(config, searched.get("model", [config.train.model]),
                                          searched.get("loss", [config.train.loss]), capacity)
        if problem:
            raise SystemExit(f"error: {problem}")


def open_parent_run(tracker: "Tracker", config: SweepConfig, storage: str, probe_set: ProbeSet, probe_dir: str,
                    num_pairs: int, probe_overlap: int = 0, probe_split: str = "") -> tuple[str, str]:
    """(experiment id, parent run id): a new parent run, or with --resume the interrupted one."""
    state_path = store.join(storage, config.name, STATE_FILE)
    if config.resume:
        if not store.exists(state_path):
            raise SystemExit(f"--resume: no interrupted sweep {config.name!r} under {storage} ({state_path} is missing)")
        state = json.loads(store.read_text(state_path))
        try:
            tracker.client.update_run(state["parent_run_id"], status="RUNNING")
        except Exception as error:  # noqa: BLE001 - e.g. a cluster's SQLite store went with its head node
            raise SystemExit(f"--resume: {state_path} names MLflow parent run {state['parent_run_id']} (store "
                             f"{state.get('tracking_uri')}), which {tracker.tracking_uri} does not have: {error}") from None
        print(f"resuming sweep {config.name!r}: MLflow parent run {state['parent_run_id']}", flush=True)
        return state["experiment_id"], state["parent_run_id"]
    experiment_id = tracker.experiment_id(config.experiment_name)
    parent_run_id = tracker.start_run(
        experiment_id, f"sweep:{config.name}",
        params={**config.to_dict(), "probe_set_hash": probe_set.content_hash(), "train_pairs": num_pairs,
                "probe_split": probe_split, "probe_prompts_in_training": probe_overlap},
        tags={"sweep": config.name, "entry_point": Path(sys.argv[0]).name},
    )
    tracker.log_text(parent_run_id, yaml.safe_dump(config.to_dict(), sort_keys=True), "config/resolved_config.yaml")
    local_probe_dir = Path(store.local_copy(probe_dir))
    tracker.log_artifact(parent_run_id, local_probe_dir / "probes.jsonl", "probe_set")
    tracker.log_artifact(parent_run_id, local_probe_dir / "manifest.json", "probe_set")
    store.write_text(state_path, json.dumps({"parent_run_id": parent_run_id, "experiment_id": experiment_id,
                                             "tracking_uri": tracker.tracking_uri}))
    return experiment_id, parent_run_id


def split_description(train: TrainConfig) -> str:
    """Where the probe prompts come from, as the run records it (before the sweep sets probe_set_dir)."""
    if train.probe_set_dir:
        return f"given probe set {train.probe_set_dir}"
    if train.dataset.lower().endswith(LOCAL_SUFFIXES):
        return (f"local file: prompts with sha256 below {train.holdout_fraction:g} of the range held out "
                f"(--holdout-fraction), split {train.train_split!r} trains, {train.eval_split!r} probes")
    return f"{train.dataset} splits: {train.train_split!r} trains, {train.eval_split!r} probes"


def close_unfinished_runs(tracker: "Tracker", config: SweepConfig, experiment_id: str, parent_run_id: str) -> None:
    """A trial a scheduler stopped never ends its own MLflow run: mark it KILLED and say why."""
    for run in tracker.child_runs(experiment_id, parent_run_id):
        if run.info.status == "RUNNING" and run.data.tags.get("stage") == "sweep":
            stoppers = [name for name, on in (("scheduler", config.scheduler != "fifo"),
                                              ("fall-from-peak stopper", config.stop_fall_from_peak is not None)) if on]
            tracker.set_tags(run.info.run_id, {"ended_by": " or ".join(stoppers) or "unknown"})
            tracker.client.set_terminated(run.info.run_id, status="KILLED")


def trial_context(config: SweepConfig, tracking_uri: str, experiment_id: str, parent_run_id: str, storage: str,
                  probe_set_hash: str, **extra) -> TrialContext:
    """What every trial of the sweep gets; its max_failures is Ray Train's share of --max-failures
    (all of it with trials on the head, else 0: sweeps/retries.py)."""
    return TrialContext(tracking_uri=tracking_uri, experiment_id=experiment_id, parent_run_id=parent_run_id,
                        storage_path=storage, sweep_name=config.name,
                        max_failures=crash_retries(config.max_failures, config.trials_on_head).train,
                        probe_set_hash=probe_set_hash, categories=tuple(CATEGORIES),
                        worker_shares=config.worker_share_by_model(), worker_resources=config.worker_resource_requests(),
                        checkpoints_to_keep=config.checkpoints_to_keep, **extra)


def run_sweep(config: SweepConfig, param_space: dict) -> SweepOutcome:
    """Run the warm-ups and the searched trials; return where everything landed."""
    from infra.tracking import Tracker, configure_quiet_logging, default_tracking_uri
    from sweeps.summary import failure_lines, summarize_sweep
    from trainers.model.factory import load_tokenizer
    from trainers.model.lora import require_peft
    from trainers.model.pretrained import MissingPackageError

    storage = config.resolved_storage_path()  # a local folder or a URI (remote storage)
    searched = searched_values(param_space)
    check_before_start(config, storage, searched)
    configure_quiet_logging()
    tracking_uri = config.tracking_uri or default_tracking_uri(Path.cwd())
    warn_if_store_is_node_local(tracking_uri, config.address or os.environ.get("RAY_ADDRESS"))
    tracker = Tracker(tracking_uri)
    try:
        tracker.check_reachable()
    except RuntimeError as error:  # before any training: say what is wrong, not a traceback
        raise SystemExit(f"error: {error}") from None
    if not store.is_remote(storage):
        Path(storage).mkdir(parents=True, exist_ok=True)

    print(f"preparing tokenizer, data and probe set ({config.train.dataset}) ...", flush=True)
    try:  # a missing optional package (smollm2-135m, LoRA) stops the sweep here, in one line
        for model in searched.get("model", [config.train.model]):
            load_tokenizer(model)  # builds and caches the built-in tokenizer (or smollm2-135m's folder) once, before workers race for it
        if config.train.lora_rank:
            require_peft()
        too_long = context_length_problem(config.train, searched.get("model", [config.train.model]))
        if too_long:
            raise SystemExit(f"error: {too_long}")
    except MissingPackageError as error:
        raise SystemExit(f"error: {error}") from None
    num_pairs, training_prompts = check_training_data(config.train)
    data_hash, data_source = training_data_sha256(config.train)  # the manifest's content hash of the training data
    split = split_description(config.train)
    probe_set, probe_dir = prepare_probe_set(config.train, storage, training_prompts)
    probe_overlap = training_overlap(probe_set, config.train.num_probe_prompts, training_prompts)
    config = replace(config, train=replace(config.train, probe_set_dir=probe_dir))
    experiment_id, parent_run_id = open_parent_run(tracker, config, storage, probe_set, probe_dir, num_pairs,
                                                   probe_overlap, split)
    print(f"MLflow parent run {parent_run_id} (experiment {config.experiment_name!r}); "
          f"probe set {probe_set.content_hash()}: {len(probe_set.prompts)} prompts x {len(CATEGORIES)} categories")

    context = trial_context(config, tracking_uri, experiment_id, parent_run_id, storage, probe_set.content_hash(),
                            data_hash=data_hash, data_source=data_source)
    if not config.resume:  # a resumed sweep keeps its first session's params (MLflow refuses to change one)
        tracker.log_params(parent_run_id, {"data_hash": data_hash, "data_source": data_source})
    if config.storage_cache_gb is not None:  # every node's copy of remote files (start_ray passes it on)
        os.environ[store.CACHE_LIMIT_ENV] = f"{config.storage_cache_gb:g}"
    failed = True
    table: list[dict] = []
    failures: list[str] = []
    try:
        start_ray(config.address, config.num_cpus, config.train_poll_interval_s)
        warmups = shared_sft_warmups(config, searched.get("model", [config.train.model]),
                                     searched.get("sft_recipe", [config.train.sft_recipe]), context)
        if warmups:
            # MLflow tag names allow no "|": one tag per model and recipe as sft_warmup_dir.<model>.<recipe>
            tracker.set_tags(parent_run_id, {"sft_warmup_dir." + k.replace("|", ".") if len(warmups) > 1 else "sft_warmup_dir": d
                                             for k, d in warmups.items()})
        trial_train = replace(config.train, init_checkpoint=warmups.get(warmup_key(config.train.model, config.train.sft_recipe)))
        trial_train = replace(trial_train, reference_logps_dir=shared_reference_logps(config, trial_train, context, set(searched)))
        print(f"stage 2/2: {config.train.loss} trials over {sorted(searched)} ({config.search} search"
              f"{', ASHA on ' + config.metric if config.scheduler == 'asha' else ''}), {config.train.max_steps} steps x "
              f"{config.train.num_workers} workers each, probe evaluation every {config.train.eval_every} steps", flush=True)
        results = run_stage("sweep", {**param_space, "train": trial_train},
                            config, replace(context, init_checkpoints=warmups), config.train.max_steps)
        close_unfinished_runs(tracker, config, experiment_id, parent_run_id)
        table, _ = summarize_sweep(tracker, config.name, parent_run_id, experiment_id, sorted(searched))
        failures = failure_lines(table, results)
        failed = bool(failures)
    finally:
        tracker.end_run(parent_run_id, failed=failed)
    return SweepOutcome(tracking_uri, config.experiment_name, parent_run_id, [row["run_id"] for row in table],
                        failures, table)


def run_entry_point(config: SweepConfig, searched: dict) -> int:
    """What every entry point does once it has its config: search space, sweep, summary, exit code
    (1 when any trial failed; each failure is printed in one line)."""
    from sweeps.summary import print_outcome

    try:
        outcome = run_sweep(config, search_space(config, searched))
    except DataError as error:  # a bad row the driver's data check found, before any trial: one line, no traceback
        raise SystemExit(f"error: {error}") from None
    print_outcome(outcome)
    return 1 if outcome.failed_trials else 0


def run(entry: EntryPoint, argv: list[str] | None = None) -> int:
    """What every sweep script does: parse (fast: nothing heavy is imported yet), then sweep."""
    config = parse_config(argv, entry)
    return run_entry_point(config, entry.searched_values(config))
