"""A plain training run of one policy: set-up, optimizer steps, probe evaluation, state.

No Ray in here. With torch.distributed initialised (as Ray Train does) it shards data and probe
prompts by rank and averages metrics across ranks; without it, it runs in one process, which is
how the tests check reproducibility and how a notebook would use it. With `strategy='deepspeed'`
a DeepSpeed ZeRO engine (trainers.runs.deepspeed_strategy) takes DDP's place.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import pickle
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from infra import storage
from probes.probe_set import ProbeSet
from trainers.data.batches import ShardedBatches
from trainers.data.collate import load_training_pairs
from trainers.data.seeds import derive_seed
from trainers.config import TrainConfig
from trainers.runs.evaluation import evaluate_probes, summarize_records, tokenize_probe_set
from trainers.runs.grad_alignment import probe_category_cosines
from trainers.model.factory import load_model_and_tokenizer
from trainers.model import lora
from trainers.model.objectives import compute_loss
from trainers.runs.reference_logps import ReferenceLogps, reference_key, reference_logps_path

STATE_FILE = "train_state.pt"   # the DDP checkpoint: rank 0's full state in one file
MODEL_COMPLETE_FILE = ".model-complete"  # written last into a final model folder: the folder is whole

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable (cut short, corrupt) or holding more than tensors and
    plain values (it is not unpickled). The message names the file."""


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
        self.strategy = None  # DeepSpeed ZeRO in place of DDP (`wrap_model` is then unused)
        if config.strategy == "deepspeed":
            from trainers.runs.deepspeed_strategy import ZeroStrategy

            self.strategy = ZeroStrategy(config)
        self.pool = pool             # a rollout pool (Ray actors or in-process engines), or None: decode here
        # rank 0: the metric rows reported with the latest checkpoint, saved in it; a resumed run reports them
        # again (the trial logs only steps it has not logged), so a driver killed between Train keeping the
        # checkpoint and the trial logging its rows loses no step
        self.reported_history: list[dict] = []
        self.policy_version = -1     # the step whose weights the actors hold
        self.last_sync_s = 0.0
        self._weight_sync = None     # rank 0: the sync call --weight-sync chose (rollout.weight_sync), made at first use
        self.weight_sync_way = ""
        self._mismatch: dict[str, float] = {}  # rank 0: rollout/probe_mismatch_* of the last sync, until reported
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.manual_seed(config.seed)
        model, self.tokenizer = load_model_and_tokenizer(config.init_checkpoint or config.model, seed=config.seed)
        self.data, self.pairs, self.skipped_tokenized = load_training_pairs(config, self.tokenizer)
        # the frozen start point of a preference objective: shared precomputed log-probs, or a model copy
        self.reference_model, self.reference_logps = None, None
        if config.loss != "sft" and config.reference_logps_dir:
            key = reference_key(model, self.pairs)
            self.reference_logps = ReferenceLogps.load(reference_logps_path(config.reference_logps_dir, key), key, len(self.pairs))
        # LoRA after the key: the shared log-probs and the adapter-free reference are of the same base
        model = lora.apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_target_modules, config.seed)
        if config.loss != "sft" and not config.reference_logps_dir:
            self.reference_model = lora.frozen_reference(model)  # LoRA: the base with adapters off, no copy
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
        self._wrapped = False
        # ZeRO-3 partitions the engine's weights: a plain full copy serves decoding, scoring and saving
        self._full_model, self._full_step = None, -1

    def trainable_model(self, model):
        """What the optimizer and DDP see; PPO adds a value head around the language model."""
        return model

    def language_model(self):
        """The causal LM alone (what generates, what is scored and saved)."""
        if self._full_model is not None:
            if self._full_step != self.step:
                raise RuntimeError("under ZeRO-3 call gather_weights() on every rank before using the full model")
            return self._full_model
        return unwrap(self.model)

    def gather_weights(self) -> None:
        """Refresh the full copy of ZeRO-3's partitioned weights: a collective, so every rank calls it
        (at the same step); a no-op for DDP and ZeRO-1/2, whose modules hold the full weights."""
        if self._full_model is not None and self._full_step != self.step:
            self.strategy.copy_full_weights(self.model, self._full_model)
            self._full_step = self.step

    @property
    def skipped_rows(self) -> int:
        return len(self.data.skipped) + len(self.skipped_tokenized)

    def _distribute(self) -> None:
        if self._wrapped:
            return
        self._wrapped = True
        if self.strategy is None:
            if self._wrap_model is not None:
                self.model = self._wrap_model(self._raw_model)
            return
        if self.strategy.partitions_parameters:  # copied before the engine partitions the module in place
            self._full_model = copy.deepcopy(self._raw_model).eval().requires_grad_(False)
        self.model = self.strategy.initialize(self._raw_model, self.optimizer, self.scheduler)
        if self._full_model is not None:
            self._full_model.to(self.model.device)

    def prepare(self) -> None:
        """Wrap for distribution (after any state was loaded) and move the reference alongside."""
        self._distribute()
        if self.reference_model is not None:
            self.reference_model.to(next(self.model.parameters()).device)
        if self.pool is not None:
            self.sync_weights()  # the actors start from exactly this policy (fresh or restored)

    def sync_weights(self) -> None:
        """Rank 0 pushes the LM's weights to the rollout actors as version = step (the way --weight-sync
        chose), checks what they loaded, and measures the engine-trainer mismatch on the probe set; every
        rank waits."""
        if self.pool is None or self.policy_version == self.step:
            return
        self.gather_weights()
        if self.rank == 0:
            if self._weight_sync is None:
                from rollout.weight_sync import weight_sync_for

                device = next(self.language_model().parameters()).device
                self._weight_sync, self.weight_sync_way = weight_sync_for(self.pool, self.config.rollout.weight_sync, device)
            self.last_sync_s = self._weight_sync(lora.merged_state_dict(self.language_model()), self.step)
            self._mismatch = self.probe_mismatch()
        if _distributed():
            dist.barrier()
        self.policy_version = self.step

    def probe_mismatch(self) -> dict[str, float]:
        """`rollout/probe_mismatch_*`: every engine and this trainer score the same fixed probe responses
        (chosen and rejected of the first `rollout.mismatch_prompts` prompts) right after a sync."""
        count = min(self.config.rollout.mismatch_prompts, len(self.probes.prompt_ids))
        if not count or not getattr(self.pool, "num_engines", 0):
            return {}
        from rollout.mismatch import probe_mismatch
        from trainers.model.logprobs import score_responses

        prompts, responses = [], []
        for category in [c for c in ("chosen", "rejected") if c in self.probes.response_ids]:
            for index in range(count):
                if self.probes.response_ids[category][index]:
                    prompts.append(self.probes.prompt_ids[index])
                    responses.append(self.probes.response_ids[category][index])
        model = self.language_model()
        was_training = model.training
        model.eval()  # no dropout (LoRA's included): the engines score deterministically
        try:
            ours = score_responses(model, prompts, responses, self.tokenizer.pad_token_id)
        finally:
            model.train(was_training)
        if not responses:
            return {}
        engines = [row for actor in range(self.pool.num_engines) for row in self.pool.score(prompts, responses, actor=actor)]
        return probe_mismatch(engines, ours * self.pool.num_engines)

    def rollout_in_use(self) -> dict[str, str] | None:
        """What `auto` resolved to, for the run's tags: the engine of each actor and the weight-sync way."""
        if self.pool is None or not self.weight_sync_way:
            return None
        return {"engines": ",".join(self.pool.engine_names()), "weight_sync": self.weight_sync_way}

    def take_mismatch(self) -> dict[str, float]:
        """The last sync's mismatch metrics, once (rank 0; empty elsewhere and when already reported)."""
        found, self._mismatch = self._mismatch, {}
        return found

    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum_steps micro-batches; metrics averaged over ranks."""
        config, started = self.config, time.perf_counter()
        self.model.train()
        if self.strategy is not None:
            return self._engine_step(started)
        summed: dict[str, float] = {}
        for micro in range(config.grad_accum_steps):
            last_micro = micro == config.grad_accum_steps - 1
            # skip DDP's gradient all-reduce until the last micro-batch of the step
            sync = contextlib.nullcontext() if last_micro or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                loss, metrics = self._micro_batch_loss(micro)
                (loss / config.grad_accum_steps).backward()
            for key, value in metrics.items():
                summed[key] = summed.get(key, 0.0) + value / config.grad_accum_steps
        if config.max_grad_norm > 0:
            summed["train/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.max_grad_norm))
        summed["train/lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._finish_step(summed, started)

    def _micro_batch_loss(self, micro: int):
        """Loss and metrics of micro-batch `micro` of the current step (both strategies)."""
        indices = self.batches.batch(self.step * self.config.grad_accum_steps + micro)
        return compute_loss(self.config, self.model, [self.pairs[i] for i in indices], self.tokenizer.pad_token_id,
                            self.reference_model, self._reference_for(indices))

    def _finish_step(self, summed: dict[str, float], started: float) -> dict[str, float]:
        """Count the step; its metrics averaged over ranks, with epoch and wall time."""
        self.step += 1
        metrics = mean_across_ranks(summed)
        metrics["train/epoch"] = self.batches.epoch_of(self.step * self.config.grad_accum_steps)
        metrics["train/step_time_s"] = time.perf_counter() - started
        return metrics

    def _engine_step(self, started: float) -> dict[str, float]:
        """train_step under DeepSpeed: the same losses and metrics; the engine accumulates and clips."""
        config = self.config
        summed: dict[str, float] = {"train/lr": self.scheduler.get_last_lr()[0]}
        for micro in range(config.grad_accum_steps):
            loss, metrics = self._micro_batch_loss(micro)
            self.strategy.backward_and_step(self.model, loss)
            for key, value in metrics.items():
                summed[key] = summed.get(key, 0.0) + value / config.grad_accum_steps
        norm = self.strategy.grad_norm(self.model)
        if config.max_grad_norm > 0 and norm is not None:
            summed["train/grad_norm"] = norm
        return self._finish_step(summed, started)

    def _reference_for(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.reference_logps is None:
            return None
        chosen, rejected = self.reference_logps.pick(indices)  # a pair outside the shared file fails loudly
        return torch.from_numpy(chosen), torch.from_numpy(rejected)

    def evaluate(self) -> tuple[dict[str, float], list[dict]]:
        """Score this rank's probe prompts, gather all ranks, summarise per category."""
        self.gather_weights()  # ZeRO-3: ranks decode different prompts, so no collectives may run inside
        records = evaluate_probes(self.language_model(), self.tokenizer, self.probes, self.probe_prompts,
                                  greedy_max_tokens=self.config.greedy_max_tokens,
                                  sample_seed=derive_seed(self.config.seed, self.step),
                                  prompts_per_batch=self.config.probe_batch_prompts, decodes=self.policy_decodes())
        records = gather_records(records)
        summary = summarize_records(records)
        summary.update(self.take_mismatch())  # rank 0, after the decodes' sync
        # ZeRO partitions the parameters; PPO's loss needs rollouts
        if self.config.grad_cos_prompts and self.strategy is None and self.config.loss != "ppo":
            summary.update(self.grad_alignment(self.config.grad_cos_prompts))
        return summary, records

    def grad_alignment(self, num_prompts: int = 4) -> dict[str, float]:
        """`grad_cos/<category>`: does the update of this rank's next micro-batch raise (> 0) or lower (< 0)
        each static category, summed over the first probe prompts (trainers.runs.grad_alignment)."""
        indices = self.batches.batch(self.step * self.config.grad_accum_steps)
        model = self.language_model()  # unwrapped: autograd.grad through DDP would leave its reducer waiting
        loss = lambda: compute_loss(self.config, model, [self.pairs[i] for i in indices], self.tokenizer.pad_token_id,  # noqa: E731
                                    self.reference_model, self._reference_for(indices))[0]
        responses = {c: self.probes.response_ids[c][:num_prompts] for c in self.probes.categories}
        return probe_category_cosines(model, loss, self.probes.prompt_ids[:num_prompts], responses,
                                      self.tokenizer.pad_token_id)

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
                                                            seed=derive_seed(self.config.seed, self.step)))
        for decoded in (greedy, sample):  # an actor restarted since the last sync holds its start weights (as PPO checks)
            if decoded.policy_version != self.policy_version:
                raise RuntimeError(f"probe decodes came from policy version {decoded.policy_version}, expected "
                                   f"{self.policy_version} (a rollout actor restarted since the last weight sync)")
        return {"greedy": (greedy.token_ids, greedy.texts), "sample": (sample.token_ids, sample.texts)}

    def state_dict(self) -> dict:
        if self.strategy is not None:
            raise RuntimeError("under DeepSpeed every rank holds a shard of the state: use save_checkpoint(directory)")
        return {"model": lora.checkpoint_state(unwrap(self.model)), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "reported_history": self.reported_history}

    def load_state_dict(self, state: dict) -> None:
        lora.load_checkpoint_state(unwrap(self.model), state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.reported_history = list(state.get("reported_history", []))

    @property
    def checkpoint_on_every_rank(self) -> bool:
        """DeepSpeed: every rank writes its own shard; DDP: rank 0 writes everything."""
        return self.strategy is not None

    def save_checkpoint(self, directory: str | Path) -> None:
        """Write resumable state into `directory`; a collective under DeepSpeed (see checkpoint_on_every_rank)."""
        if self.strategy is None:
            with storage.atomic_path(Path(directory) / STATE_FILE) as staging:
                torch.save(self.state_dict(), staging)
        else:
            self.strategy.save_checkpoint(self.model, directory, {"step": self.step, "reported_history": self.reported_history})

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore what save_checkpoint wrote (every rank reads the merged folder). DeepSpeed needs its
        engine for this, so it is built here rather than in prepare(). Raises CheckpointError naming the
        file when it cannot be read."""
        if self.strategy is None:
            self.load_state_dict(read_state(Path(directory) / STATE_FILE))
            return
        self._distribute()
        client_state = self.strategy.load_checkpoint(self.model, directory)
        self.step = client_state["step"]
        self.reported_history = list(client_state.get("reported_history", []))

    def load_latest_readable_checkpoint(self, directories: Sequence[str | Path]) -> str | Path:
        """Restore the newest of `directories` (newest first) that reads; each one skipped is named in a
        warning. When none reads: one CheckpointError naming every file. Returns the folder used."""
        problems = []
        for directory in directories:
            try:
                self.load_checkpoint(directory)
                return directory
            except CheckpointError as error:
                log.warning("%s; trying the previous checkpoint", error)
                problems.append(str(error))
        raise CheckpointError("no readable checkpoint: " + "; ".join(problems) if problems else "no checkpoint given")

    def save_pretrained(self, directory: str) -> None:
        """Hugging Face format, so anyone can re-score the last evaluation with plain transformers. The
        folder is written in place; MODEL_COMPLETE_FILE, written last, says it is whole."""
        marker = Path(directory) / MODEL_COMPLETE_FILE
        marker.unlink(missing_ok=True)  # a folder being rewritten is not complete
        lora.save_pretrained(self.language_model(), directory)  # LoRA: merged weights, adapters beside
        self.tokenizer.save_pretrained(directory)
        storage.write_text(marker, json.dumps({"step": self.step}) + "\n")


def read_state(path: Path) -> dict:
    """A DDP checkpoint file as tensors and plain values (`weights_only=True`: nothing else is unpickled,
    so a file planted on shared storage cannot run code here)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused, it holds objects other than tensors and plain values "
                              f"({str(error).splitlines()[0]})") from error
    except FileNotFoundError as error:
        raise CheckpointError(f"{path}: missing from the checkpoint") from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable checkpoint, corrupt or cut short "
                              f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from error


def model_is_complete(directory: str | Path) -> bool:
    """Whether save_pretrained finished writing `directory` (local folder)."""
    return (Path(directory) / MODEL_COMPLETE_FILE).is_file()
