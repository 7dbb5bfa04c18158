"""The per-worker loop that Ray Train runs: a thin shell around `PolicyTrainer`.

It adds what only Ray knows: rank, DDP wrapping (`prepare_model`), resuming from the newest readable
checkpoint the trial kept, and `ray.train.report` calls (every worker reports; only rank 0
carries metrics, per-example probe records and the DDP checkpoint; under DeepSpeed every rank
reports its own shard, and Ray Train puts them all in one checkpoint folder). A report costs a
round trip to the Train controller, so per-step metrics are buffered and shipped together every
`report_every` steps (and at every evaluation and checkpoint); MLflow still gets one point per step.

A run that cannot go on as its trial recorded it (a probe set replaced since the sweep started, no
readable checkpoint to resume from) is refused, not raised: every retry would meet the same files, so
the ranks agree on the reason, rank 0 reports it (`WorkerReport.refused`) and the workers return. The
trial then fails its run once, as it does a diverged one, and neither Train nor Tune retries it.
"""
from __future__ import annotations

import json

import time

_IMPORTS_STARTED_AT = time.time()  # noqa: E402  (the imports below are timed for the trial breakdown)

import functools
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from infra import storage
from infra.cpu_threads import use_cpu_share
from trainers.config import TrainConfig
from trainers.runs.checkpoint_fallback import restore_newest_readable
from trainers.runs.evaluation import ProbeSetMismatch, check_probe_set
from trainers.runs.policy_trainer import STATE_FILE, CheckpointError, PolicyTrainer  # noqa: F401  (STATE_FILE: the DDP checkpoint's file)
from trainers.runs.worker_report import WorkerReport, WorkerTimings, non_finite_metrics, process_started_at

_IMPORTS_DONE_AT = time.time()

FAULT_STEP_ENV, FAULT_MARKER_ENV = "PROBESWEEP_FAULT_AT_STEP", "PROBESWEEP_FAULT_MARKER_DIR"


def _inject_fault_once(step: int, run_name: str, checkpoint_every: int) -> None:
    """Fault injection for recovery tests: with PROBESWEEP_FAULT_AT_STEP=n and a marker folder set,
    rank 0 of each run dies (as a killed process would) the first time it reaches step n."""
    fault_step, marker_dir = os.environ.get(FAULT_STEP_ENV), os.environ.get(FAULT_MARKER_ENV)
    if not fault_step or not marker_dir or int(fault_step) != step:
        return
    marker = Path(marker_dir) / run_name
    if not marker.exists():
        _wait_for_registered_checkpoint(step - 1 - (step - 1) % checkpoint_every)
        marker.write_text(f"killed at step {step}")
        os._exit(1)


def _wait_for_registered_checkpoint(checkpoint_step: int, timeout_s: float = 120.0) -> None:
    """Ray Train registers a reported checkpoint only when its controller polls the report; a worker that
    dies within a poll or so of reporting can lose it (seen: the restarted group began from scratch). The
    injected crash is meant to come after the checkpoint is registered, so it waits until Train's own
    checkpoint_manager_snapshot.json lists that step."""
    if checkpoint_step <= 0:
        return
    storage = ray.train.get_context().get_storage()
    path = f"{storage.experiment_fs_path}/checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with storage.storage_filesystem.open_input_stream(path) as stream:
                results = json.loads(stream.read()).get("checkpoint_results", [])
            if any(r.get("metrics", {}).get("step", -1) >= checkpoint_step for r in results):
                return
        except (OSError, ValueError):  # FileNotFoundError is an OSError
            pass  # not written yet, or caught mid-write
        time.sleep(0.2)
    raise RuntimeError(f"fault injection: the step-{checkpoint_step} checkpoint was not registered in {timeout_s:.0f} s")


def worker_nodes() -> list[str]:
    """The Ray node of every rank, so a trial's MLflow run says where it trained (and restarted)."""
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [node]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, node)
    return gathered


@functools.cache
def _cpu_group():
    """A gloo group over every rank, for small Python objects: NCCL's would need each rank's device set."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo")


def gather_from_ranks(value) -> list:
    """`value` of every rank, in rank order (a collective: every rank calls it); one process: [value]."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    group = None if dist.get_backend() == "gloo" else _cpu_group()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def agreed_refusal(reason: str | None, restored_from: str | None = None) -> str | None:
    """The first rank's reason to refuse the run, if any rank has one; also when the ranks restored
    different checkpoints (they would train from different steps). Every rank gets the same answer."""
    answers = gather_from_ranks((reason, restored_from))
    refused = next((r for r, _ in answers if r), None)
    if refused is None and len({used for _, used in answers}) > 1:
        refused = "the ranks resumed from different checkpoints: " + ", ".join(
            f"rank {rank} from {used}" for rank, (_, used) in enumerate(answers))
    return refused


def refuse(rank: int, reason: str, timings: WorkerTimings) -> None:
    """End this worker's run without an exception (see the module docstring): rank 0 reports why."""
    print(f"refusing the run: {reason}", file=sys.stderr, flush=True)
    if rank == 0:
        timings.sent_at = time.time()
        ray.train.report(WorkerReport(step=0, refused=reason, timings=replace(timings)).metrics_payload())
    else:
        ray.train.report({"step": 0})


def resume(trainer, checkpoint, fall_back: bool) -> tuple[str | None, str | None]:
    """(the checkpoint used, None) or (None, why none could be): the newest readable of the trial's
    kept checkpoints (DDP), or only Train's latest where each rank reads a shard of its own (DeepSpeed:
    ranks falling back one by one could land on different steps)."""
    if checkpoint is None:
        return None, None
    try:
        if fall_back:
            return restore_newest_readable(trainer, checkpoint), None
        with checkpoint.as_directory() as directory:
            trainer.load_checkpoint(directory)
        return checkpoint.path, None
    except CheckpointError as error:
        return None, str(error)


def configure_worker(config: TrainConfig) -> None:
    """Threads follow the worker's CPU share (floor, at least one); a DeepSpeed GPU worker takes its device."""
    if not config.use_gpu:
        use_cpu_share(config.cpus_per_worker)
    elif config.strategy == "deepspeed":  # no prepare_model: DeepSpeed takes the current device
        torch.cuda.set_device(ray.train.torch.get_device())


def train_loop_per_worker(loop_config: dict) -> None:
    """loop_config: {"train": TrainConfig, "final_model_dir": str | None, "rollout_pool": RolloutPool (PPO),
    "probe_set_hash": the hash the run recorded (the loaded probe set must match it)}."""
    timings = WorkerTimings(process_started_at=process_started_at(), imports_started_at=_IMPORTS_STARTED_AT,
                            imports_done_at=_IMPORTS_DONE_AT, loop_started_at=time.time())
    # remote storage (s3://...): the warm-up, probe set and reward model are read from this node's copies
    config: TrainConfig = storage.local_inputs(loop_config["train"])
    final_model_dir = loop_config.get("final_model_dir")
    context = ray.train.get_context()
    rank = context.get_world_rank()
    configure_worker(config)
    try:  # the set the run recorded, or stop here
        check_probe_set(config.probe_set_dir, loop_config.get("probe_set_hash"))
        mismatch = None
    except ProbeSetMismatch as error:
        mismatch = str(error)
    refused = agreed_refusal(mismatch)
    if refused:
        refuse(rank, refused, timings)
        return
    if config.loss == "ppo":  # rollouts from the trial's actor pool, handed over in the loop config
        from trainers.runs.ppo_trainer import PPOTrainer

        trainer = PPOTrainer(config, rank, context.get_world_size(), wrap_model=ray.train.torch.prepare_model,
                             pool=loop_config["rollout_pool"])
    else:
        trainer = PolicyTrainer(config, rank, context.get_world_size(), wrap_model=ray.train.torch.prepare_model,
                                pool=loop_config.get("rollout_pool"))
    timings.trainer_built_at = time.time()
    checkpoint = ray.train.get_checkpoint()  # DDP: rank 0's full state; DeepSpeed: each rank its shard
    restored_from, unreadable = resume(trainer, checkpoint, fall_back=not trainer.checkpoint_on_every_rank)
    refused = agreed_refusal(unreadable, restored_from)
    if refused:
        refuse(rank, refused, timings)
        return
    resumed_from = trainer.step if checkpoint is not None else None
    trainer.prepare()
    nodes = worker_nodes()  # every rank takes part; rank 0's first report carries them
    timings.prepared_at = time.time()

    # per-step metrics not yet reported; each report ships them all. A resumed run starts with the rows its
    # checkpoint was reported with: the trial logs only those it has not logged yet
    pending: list[dict] = list(trainer.reported_history) if resumed_from is not None and rank == 0 else []

    def report(records: list[dict] | None, save: bool, final: bool, non_finite: str | None = None) -> None:
        nonlocal nodes
        if final and final_model_dir:
            trainer.gather_weights()  # ZeRO-3: a collective, so every rank, before rank 0 saves
        payload: dict = {"step": trainer.step}
        if rank == 0:
            sent = WorkerReport(step=trainer.step, history=list(pending), probe_records=records, nodes=nodes,
                                rollout=trainer.rollout_in_use() if nodes else None,
                                resumed_from_step=resumed_from, non_finite=non_finite)
            if trainer.step == 0 or final:
                sent.train_pairs, sent.skipped_rows = len(trainer.pairs), trainer.skipped_rows
            if final and final_model_dir:
                started = time.time()
                with storage.output_dir(final_model_dir) as directory:  # a URI: saved locally, then uploaded
                    trainer.save_pretrained(directory)
                sent.final_model_dir = str(final_model_dir)
                timings.final_save_s += time.time() - started
            timings.sent_at = time.time()
            sent.timings = replace(timings)  # a copy: the report may be read after this loop moves on
            payload = sent.metrics_payload()
        nodes = None
        pending.clear()
        started = time.time()
        if save and (rank == 0 or trainer.checkpoint_on_every_rank):
            if rank == 0:
                # kept in the checkpoint (see PolicyTrainer.reported_history), as plain values: it is loaded weights_only
                trainer.reported_history = json.loads(json.dumps(sent.history, default=float))
            with tempfile.TemporaryDirectory() as directory:
                trainer.save_checkpoint(directory)
                ray.train.report(payload, checkpoint=ray.train.Checkpoint.from_directory(directory))
            timings.checkpoints_s += time.time() - started
        else:
            ray.train.report(payload)
            timings.reports_s += time.time() - started

    if trainer.step == 0:
        eval_metrics, records = trainer.evaluate()
        pending.append({"step": 0, **eval_metrics})
        timings.first_eval_done_at = time.time()
        report(records, save=False, final=False)
    while trainer.step < config.max_steps:
        if rank == 0:
            _inject_fault_once(trainer.step + 1, context.get_experiment_name(), config.checkpoint_every)
        started = time.time()
        metrics = {"step": trainer.step + 1, **trainer.train_step()}
        timings.steps_s += time.time() - started
        final = trainer.step == config.max_steps
        evaluate = trainer.step % config.eval_every == 0 or final
        save = final or trainer.step % config.checkpoint_every == 0
        records = None
        if evaluate:
            started = time.time()
            eval_metrics, records = trainer.evaluate()
            metrics.update(eval_metrics)
            timings.evals_s += time.time() - started
        pending.append(metrics)
        # metrics are averaged over ranks, so every rank sees the same values and stops at the same step
        diverged = non_finite_metrics(metrics)
        if diverged:  # a diverged run stops here, reported as such (no checkpoint of it, not retried as a crash)
            report(records, save=False, final=False,
                   non_finite=", ".join(f"{k}={metrics[k]}" for k in diverged) + f" at step {trainer.step}")
            return
        # each report waits for the Train controller's poll, so reports are batched, not per step
        if evaluate or save or trainer.step % config.report_every == 0:
            report(records, save=save, final=final)
