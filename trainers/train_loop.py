"""The per-worker training loop that Ray Train runs (one copy per worker, DDP between them).

Everything numeric lives in plain modules (objectives, evaluation, batches); this file wires them
to Ray Train: data sharding by rank, gradient accumulation without needless all-reduces, probe
evaluation gathered from every rank, resumable checkpoints, and one `ray.train.report` per step.
"""
from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from probes.probe_set import ProbeSet
from trainers.batches import ShardedBatches
from trainers.collate import tokenize_pairs
from trainers.config import TrainConfig
from trainers.data import load_preference_data
from trainers.evaluation import evaluate_probes, summarize_records, tokenize_probe_set
from trainers.models import load_model_and_tokenizer
from trainers.objectives import compute_loss

PRIVATE_PREFIX = "_"   # report keys that go to MLflow artifacts/tags, not to Tune as metrics
STATE_FILE = "train_state.pt"


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist()))


def _gather_records(records: list[dict]) -> list[dict]:
    """Every rank's probe records, on every rank (all categories, all shards)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return records
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    merged = [r for part in gathered for r in part]
    return sorted(merged, key=lambda r: (r["prompt_id"], r["category"]))


def _warmup_schedule(optimizer, warmup_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


def train_loop_per_worker(loop_config: dict) -> None:
    config = TrainConfig.from_dict(loop_config["train"])
    final_model_dir = loop_config.get("final_model_dir")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not config.use_gpu:
        torch.set_num_threads(1)  # several workers share a few cores; more threads only contend
    torch.manual_seed(config.seed)

    model, tokenizer = load_model_and_tokenizer(config.init_checkpoint or config.model, seed=config.seed)
    reference_model = None
    if config.loss != "sft":
        reference_model = copy.deepcopy(model).eval().requires_grad_(False)

    data = load_preference_data(config.dataset, config.train_split, skip_bad_rows=config.skip_bad_rows,
                                max_rows=config.max_train_pairs)
    pairs, skipped = tokenize_pairs(tokenizer, data.pairs, config.max_prompt_tokens, config.max_response_tokens,
                                    config.truncation, config.skip_bad_rows)
    batches = ShardedBatches(pairs, config.micro_batch_size, rank, world_size, config.seed)
    probe_set = ProbeSet.load(config.probe_set_dir)
    probes = tokenize_probe_set(probe_set, tokenizer, config.max_prompt_tokens, config.max_response_tokens)
    my_prompts = [i for i in probe_set.shard(rank, world_size) if i < config.num_probe_prompts]

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = _warmup_schedule(optimizer, config.warmup_steps)
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = state["step"]
    model = ray.train.torch.prepare_model(model)
    device = next(model.parameters()).device
    if reference_model is not None:
        reference_model.to(device)

    def evaluate() -> tuple[dict[str, float], list[dict]]:
        records = evaluate_probes(_unwrap(model), tokenizer, probes, my_prompts,
                                  greedy_max_tokens=config.greedy_max_tokens,
                                  prompts_per_batch=config.probe_batch_prompts)
        records = _gather_records(records)
        return summarize_records(records), records

    def report(step: int, metrics: dict, records: list[dict] | None, save: bool, final: bool) -> None:
        payload: dict = {"step": step}
        if rank == 0:
            payload.update(metrics)
            if records is not None:
                payload[PRIVATE_PREFIX + "probe_records"] = records
            if step == 0 or final:
                payload[PRIVATE_PREFIX + "data"] = {"train_pairs": len(pairs), "skipped_rows": len(data.skipped) + len(skipped)}
        if final and final_model_dir and rank == 0:
            _unwrap(model).save_pretrained(final_model_dir)
            tokenizer.save_pretrained(final_model_dir)
            payload[PRIVATE_PREFIX + "final_model_dir"] = str(final_model_dir)
        if save and rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                torch.save({"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "step": step}, Path(directory) / STATE_FILE)
                ray.train.report(payload, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(payload)

    if start_step == 0:
        eval_metrics, records = evaluate()
        report(0, eval_metrics, records, save=False, final=False)

    for step in range(start_step + 1, config.max_steps + 1):
        started = time.perf_counter()
        model.train()
        summed: dict[str, float] = {}
        for micro in range(config.grad_accum_steps):
            last_micro = micro == config.grad_accum_steps - 1
            sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                loss, metrics = compute_loss(config, model, batches.batch((step - 1) * config.grad_accum_steps + micro),
                                             tokenizer.pad_token_id, reference_model)
                (loss / config.grad_accum_steps).backward()
            for key, value in metrics.items():
                summed[key] = summed.get(key, 0.0) + value / config.grad_accum_steps
        if config.max_grad_norm > 0:
            summed["train/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm))
        summed["train/lr"] = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = _mean_across_ranks(summed)
        metrics["train/epoch"] = batches.epoch_of(step * config.grad_accum_steps)
        metrics["train/step_time_s"] = time.perf_counter() - started

        final = step == config.max_steps
        records = None
        if step % config.eval_every == 0 or final:
            eval_metrics, records = evaluate()
            metrics.update(eval_metrics)
        save = final or step % config.checkpoint_every == 0
        report(step, metrics, records, save=save, final=final)
