"""The Tune stages of a sweep and the work shared between their trials.

* `run_stage`: one Tuner over the trial trainable — or, with `--resume`, the restored Tuner of an
  interrupted run (finished trials are not rerun; unfinished ones continue from their checkpoints).
* `shared_sft_warmups`: the SFT warm-up of each (model, recipe), trained once, cached by its settings.
* `shared_reference_logps`: the reference log-probs of the training pairs, computed once.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from sweeps.config import SweepConfig
from sweeps.context import TrialContext
from sweeps.retries import crash_retries
from sweeps.search import trial_stopper, tune_settings, warmup_key
from infra import storage as store
from trainers.config import TrainConfig, is_preference

HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray gives the head node this resource (amount 1)
SFT_KEY_FIELDS = ("model", "dataset", "train_split", "holdout_fraction", "max_train_pairs", "skip_bad_rows", "max_prompt_tokens",
                  "max_response_tokens", "truncation", "micro_batch_size", "grad_accum_steps", "warmup_steps",
                  "weight_decay", "max_grad_norm", "seed", "num_workers")


def run_stage(stage: str, param_space: dict, config: SweepConfig, context: TrialContext, total_steps: int):
    from ray import tune

    from sweeps.progress import TrialProgress
    from sweeps.trial import run_trial

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's new console output ignores verbose=0
    trainable = tune.with_resources(run_trial, trial_resources(config))
    name = f"{config.name}-{stage}"
    path = store.join(context.storage_path, name)  # a local folder or a URI
    progress = TrialProgress(stage, total_steps)
    if config.resume and tune.Tuner.can_restore(path):
        print(f"resuming {name} from {path}", flush=True)
        # the restored run keeps its config, search state, context and callbacks
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={**param_space, "context": replace(context, stage=stage)},
            tune_config=tune.TuneConfig(**tune_settings(config)),
            # a rerun trial process (--trials-on-head false) finds its MLflow run and Train checkpoint
            run_config=tune.RunConfig(name=name, storage_path=context.storage_path, verbose=0, callbacks=[progress],
                                      failure_config=tune_failure_config(config),
                                      stop=trial_stopper(config) if stage == "sweep" else None),  # --stop-fall-from-peak
        )
    return tuner.fit()


def tune_failure_config(config: SweepConfig):
    """Tune's reruns of a crashed trial: --max-failures when trials may run off the head, else 0 (Ray
    Train retries then; sweeps/retries.py says why only one level does)."""
    from ray import tune

    return tune.FailureConfig(max_failures=crash_retries(config.max_failures, config.trials_on_head).tune)


def trial_resources(config: SweepConfig) -> dict[str, float]:
    """The trial process only orchestrates: a sliver of a CPU, on the head node unless told otherwise
    (Ray Train starts the trial's controller beside it, so a lost worker node never takes them down)."""
    resources = {"cpu": 0.01}
    if config.trials_on_head:
        resources[HEAD_NODE_RESOURCE] = 0.001
    return resources


def training_data_hash(train: TrainConfig) -> str:
    """Fingerprint of the pairs a warm-up trains on (the train split as loaded: holdout, skipped rows and
    --max-train-pairs applied), so an edited data file, or a changed built-in set, gives a new key."""
    from infra.manifest import content_hash
    from trainers.data.pairs import load_preference_data

    data = load_preference_data(train.dataset, train.train_split, skip_bad_rows=train.skip_bad_rows,
                                max_rows=train.max_train_pairs, holdout_fraction=train.holdout_fraction)
    return content_hash(text for pair in data.pairs for text in (pair.prompt, pair.chosen, pair.rejected))


def model_files_fingerprint(model: str) -> str | None:
    """A local model folder's file names, sizes and modification times (a changed folder gives a new key
    without reading its weights); None for a built-in or hub name, which the name itself fixes."""
    folder = Path(model)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


def sft_warmup_key(config: SweepConfig, model: str, recipe: str, data_hash: str | None = None) -> str:
    """The warm-up's cache key: its settings, the content of its training pairs and of a local model folder."""
    fields = {k: getattr(config.train, k) for k in SFT_KEY_FIELDS}
    fields.update(model=model, sft_steps=config.sft_steps, sft_lr=config.sft_lr, recipe=recipe,
                  data=data_hash or training_data_hash(config.train), model_files=model_files_fingerprint(model))
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def shared_sft_warmups(config: SweepConfig, models: list[str], recipes: list[str], context: TrialContext) -> dict[str, str]:
    """warmup_key(model, recipe) -> its SFT warm-up folder, for every combination; trains (in one
    stage) only those not cached yet."""
    if config.sft_steps <= 0:
        return {}
    shared = store.join(context.storage_path, "shared")  # a local folder or a URI: the warm-up's rank 0 uploads
    data_hash = training_data_hash(config.train)  # read once for every (model, recipe)
    folders = {warmup_key(m, r): store.join(shared, f"sft-warmup-{sft_warmup_key(config, m, r, data_hash)}")
               for m in models for r in recipes}
    missing = [key for key, folder in folders.items() if not store.exists(store.join(folder, ".complete"))]
    for key in sorted(set(folders) - set(missing)):
        print(f"reusing the SFT warm-up {key} in {folders[key]}", flush=True)
    if missing:
        # label smoothing is a preference loss's setting, not SFT's
        train = replace(config.train, loss="sft", lr=config.sft_lr, max_steps=config.sft_steps, init_checkpoint=None,
                        label_smoothing=0.0)
        print(f"stage 1/2: SFT warm-up of {', '.join(missing)} (model|recipe: 'chosen' trains on chosen responses, "
              f"'both' on chosen and rejected), {config.sft_steps} steps x {train.num_workers} workers", flush=True)
        space = {"train": train}
        missing_models = sorted({key.split("|")[0] for key in missing}, key=models.index)
        missing_recipes = sorted({key.split("|")[1] for key in missing}, key=recipes.index)
        if missing_models != [config.train.model]:
            space["model"] = tune_grid(missing_models)
        if missing_recipes != [config.train.sft_recipe]:
            space["sft_recipe"] = tune_grid(missing_recipes)
        warmup_config = replace(config, search="grid", scheduler="fifo", num_samples=1)
        results = run_stage("sft-warmup", space, warmup_config,
                            replace(context, final_model_dirs={k: folders[k] for k in missing}), config.sft_steps)
        errors = [r.error for r in results if r.error]
        if errors:
            raise RuntimeError(f"the SFT warm-up failed: {errors[0]}")
        for key in missing:  # a grid over missing models x recipes may also retrain a cached one: harmless
            store.write_text(store.join(folders[key], ".complete"), time.strftime("%Y-%m-%dT%H:%M:%S"))
    return folders


def tune_grid(values: list):
    from ray import tune

    return tune.grid_search(values)


def _reference_logps_task(train: TrainConfig, directory: str) -> tuple[str, bool, float]:
    """Runs as a Ray task (with a worker's resources) so a GPU cluster computes it on a GPU."""
    import torch

    from trainers.data.collate import load_training_pairs
    from trainers.model.factory import load_model_and_tokenizer
    from trainers.runs.reference_logps import load_or_compute_reference_logps, visited_pair_indices

    started = time.perf_counter()
    config = store.local_inputs(train, ["init_checkpoint"])  # a remote warm-up: this node's copy
    model, tokenizer = load_model_and_tokenizer(config.init_checkpoint or config.model, seed=config.seed)
    if config.use_gpu:
        model.to("cuda")
    else:
        # runs once, before any trial of the sweep starts: the node's cores are otherwise idle
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    _, pairs, _ = load_training_pairs(config, tokenizer)
    # only the pairs the trials' schedule visits: every trial shares seed, batch shape and step count
    visited = visited_pair_indices(len(pairs), config.micro_batch_size, config.num_workers, config.grad_accum_steps,
                                   config.seed, config.max_steps)
    _, path, computed = load_or_compute_reference_logps(model, pairs, tokenizer.pad_token_id, directory,
                                                        batch_size=2 * config.micro_batch_size, indices=visited)
    return str(path), computed, time.perf_counter() - started


def shared_reference_logps(config: SweepConfig, train: TrainConfig, context: TrialContext, searched: set[str]) -> str | None:
    """Reference log-probs of the training pairs, computed once (or found) for every trial of the sweep.

    Only when every trial has the same reference: a sweep over models, warm-up recipes (or seeds of
    a randomly initialised model) falls back to per-trial reference forwards."""
    preference = is_preference(train.loss)  # SFT has no reference; PPO scores its own rollouts
    if not config.share_reference_logps or not preference or searched & {"model", "seed", "sft_recipe"}:
        return None
    import ray

    directory = store.join(context.storage_path, "shared", "reference_logps")  # the task uploads to a URI
    resources = {"num_gpus": 1} if train.use_gpu else {"num_cpus": train.cpus_per_worker}
    if context.worker_resources:  # where the training workers may run, so may this
        resources["resources"] = dict(context.worker_resources)
    task = ray.remote(**resources)(_reference_logps_task)
    path, computed, seconds = ray.get(task.remote(train, directory))
    print(f"reference log-probs {'computed' if computed else 'reused'} in {seconds:.1f}s: {path}", flush=True)
    return directory


def unsatisfiable_resources(config: SweepConfig, models: list[str], losses: list[str], capacity_cpus: float) -> str | None:
    """Why a trial could never start on a local Ray of `capacity_cpus` CPUs (one node), or None.

    A trial needs its own sliver, its training workers and (PPO, or probe decodes on actors) its
    rollout actors on that node at once; Ray would otherwise wait for them forever."""
    train = config.train
    if train.use_gpu:
        return None  # GPUs are Ray's to detect; a missing one shows as a pending trial
    sliver = trial_resources(config)["cpu"]
    shares = config.worker_share_by_model()
    for model in models:
        share = shares.get(model, train.cpus_per_worker)
        source = f"--worker-shares {model}={share:g}" if model in shares else f"--cpus-per-worker {share:g}"
        needs_actors = any(loss == "ppo" for loss in losses) or train.probe_decodes == "actors"
        actors = train.rollout.num_actors * train.rollout.cpus_per_actor if needs_actors else 0.0
        need = sliver + train.num_workers * share + actors
        if need > capacity_cpus + 1e-9:
            parts = f"--num-workers {train.num_workers} x {source}"
            if actors:
                parts += (f" + --rollout-actors {train.rollout.num_actors} x --rollout-cpus-per-actor "
                          f"{train.rollout.cpus_per_actor:g}")
            return (f"{parts} + {sliver:g} for the trial process needs {need:g} CPUs, but the local Ray has "
                    f"{capacity_cpus:g} (--num-cpus; default: this machine's cores), so the trial could never start; "
                    "lower those flags, or raise --num-cpus to oversubscribe on purpose")
    return None
