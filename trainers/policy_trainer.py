"""A plain training run of one policy: set-up, optimizer steps, probe evaluation, state.

No Ray in here. With torch.distributed initialised (as Ray Train does) it shards data and probe
prompts by rank and averages metrics across ranks; without it, it runs in one process, which is
how the tests check reproducibility and how a notebook would use it.
"""
from __future__ import annotations

import contextlib
import copy
import os
import time

import torch
import torch.distributed as dist

from probes.probe_set import ProbeSet
from trainers.batches import ShardedBatches
from trainers.collate import load_training_pairs
from trainers.config import TrainConfig
from trainers.evaluation import evaluate_probes, summarize_records, tokenize_probe_set
from trainers.models import load_model_and_tokenizer
from trainers.objectives import compute_loss
from trainers.reference_logps import ReferenceLogps, reference_key, reference_logps_path


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    if not _distributed():
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist()))


def gather_records(records: list[dict]) -> list[dict]:
    """Every rank's probe records, on every rank (all categories of all shards)."""
    if _distributed():
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    return sorted(records, key=lambda r: (r["prompt_id"], r["category"]))


def unwrap(model):
    return model.module if hasattr(model, "module") else model


class PolicyTrainer:
    """Holds model, reference, optimizer and data of one run; `wrap_model` lets Ray add DDP."""

    def __init__(self, config: TrainConfig, rank: int = 0, world_size: int = 1, wrap_model=None, pool=None):
        self.config, self.rank, self.world_size = config, rank, world_size
        self.pool = pool             # rollout actors (rollout.actors.RolloutPool), or None: decode in-process
        self.policy_version = -1     # the step whose weights the actors hold
        self.last_sync_s = 0.0
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.manual_seed(config.seed)
        model, self.tokenizer = load_model_and_tokenizer(config.init_checkpoint or config.model, seed=config.seed)
        self.data, self.pairs, self.skipped_tokenized = load_training_pairs(config, self.tokenizer)
        # the frozen start point of a preference objective: shared precomputed log-probs, or a model copy
        self.reference_model, self.reference_logps = None, None
        if config.loss != "sft" and config.reference_logps_dir:
            key = reference_key(model, self.pairs)
            self.reference_logps = ReferenceLogps.load(reference_logps_path(config.reference_logps_dir, key), key, len(self.pairs))
        elif config.loss != "sft":
            self.reference_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.batches = ShardedBatches(range(len(self.pairs)), config.micro_batch_size, rank, world_size, config.seed)
        probe_set = ProbeSet.load(config.probe_set_dir)
        self.probes = tokenize_probe_set(probe_set, self.tokenizer, config.max_prompt_tokens, config.max_response_tokens)
        self.probe_prompts = [i for i in probe_set.shard(rank, world_size) if i < config.num_probe_prompts]

        model = self.trainable_model(model)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        warmup = max(1, config.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.step = 0
        self._raw_model = model
        self.model = model
        self._wrap_model = wrap_model

    def trainable_model(self, model):
        """What the optimizer and DDP see; PPO adds a value head around the language model."""
        return model

    def language_model(self):
        """The causal LM alone (what generates, what is scored and saved)."""
        return unwrap(self.model)

    @property
    def skipped_rows(self) -> int:
        return len(self.data.skipped) + len(self.skipped_tokenized)

    def prepare(self) -> None:
        """Wrap for distribution (after any state was loaded) and move the reference alongside."""
        if self._wrap_model is not None:
            self.model = self._wrap_model(self._raw_model)
        if self.reference_model is not None:
            self.reference_model.to(next(self.model.parameters()).device)
        if self.pool is not None:
            self.sync_weights()  # the actors start from exactly this policy (fresh or restored)

    def sync_weights(self) -> None:
        """Rank 0 pushes the LM's weights to the rollout actors as version = step; every rank waits."""
        if self.pool is None or self.policy_version == self.step:
            return
        if self.rank == 0:
            self.last_sync_s = self.pool.sync_weights(self.language_model().state_dict(), self.step)
        if _distributed():
            dist.barrier()
        self.policy_version = self.step

    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum_steps micro-batches; metrics averaged over ranks."""
        config, started = self.config, time.perf_counter()
        self.model.train()
        summed: dict[str, float] = {}
        for micro in range(config.grad_accum_steps):
            last_micro = micro == config.grad_accum_steps - 1
            # skip DDP's gradient all-reduce until the last micro-batch of the step
            sync = contextlib.nullcontext() if last_micro or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                indices = self.batches.batch(self.step * config.grad_accum_steps + micro)
                loss, metrics = compute_loss(config, self.model, [self.pairs[i] for i in indices], self.tokenizer.pad_token_id,
                                             self.reference_model, self._reference_for(indices))
                (loss / config.grad_accum_steps).backward()
            for key, value in metrics.items():
                summed[key] = summed.get(key, 0.0) + value / config.grad_accum_steps
        if config.max_grad_norm > 0:
            summed["train/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.max_grad_norm))
        summed["train/lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics = mean_across_ranks(summed)
        metrics["train/epoch"] = self.batches.epoch_of(self.step * config.grad_accum_steps)
        metrics["train/step_time_s"] = time.perf_counter() - started
        return metrics

    def _reference_for(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.reference_logps is None:
            return None
        return torch.from_numpy(self.reference_logps.chosen[indices]), torch.from_numpy(self.reference_logps.rejected[indices])

    def evaluate(self) -> tuple[dict[str, float], list[dict]]:
        """Score this rank's probe prompts, gather all ranks, summarise per category."""
        records = evaluate_probes(self.language_model(), self.tokenizer, self.probes, self.probe_prompts,
                                  greedy_max_tokens=self.config.greedy_max_tokens,
                                  sample_seed=self.config.seed * 1_000_003 + self.step,
                                  prompts_per_batch=self.config.probe_batch_prompts, decodes=self.policy_decodes())
        records = gather_records(records)
        return summarize_records(records), records

    def policy_decodes(self):
        """greedy and sample of this rank's probe prompts from the rollout actors (synced to this step
        first); None without actors: the evaluation decodes them in-process."""
        if self.pool is None:
            return None
        self.sync_weights()
        if not self.probe_prompts:
            return {}
        from rollout.interface import SamplingParams

        prompts = [self.probes.prompt_ids[i] for i in self.probe_prompts]
        limit = self.config.greedy_max_tokens
        greedy = self.pool.generate(prompts, SamplingParams(max_new_tokens=limit, temperature=0))
        sample = self.pool.generate(prompts, SamplingParams(max_new_tokens=limit, temperature=1.0,
                                                            seed=self.config.seed * 1_000_003 + self.step))
        return {"greedy": (greedy.token_ids, greedy.texts), "sample": (sample.token_ids, sample.texts)}

    def state_dict(self) -> dict:
        return {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]

    def save_pretrained(self, directory: str) -> None:
        """Hugging Face format, so anyone can re-score the last evaluation with plain transformers."""
        self.language_model().save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
