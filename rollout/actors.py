"""Rollout actors: a pool of Ray actors, separate from the Ray Train worker group, each holding a
generation engine. Requests are split over the actors; weights are pushed to all of them after
policy updates and every rollout records the policy version that produced it.

CPU path of the weight sync: the trainer puts its state dict in the object store once and every
actor loads that same object. Every call waits with a timeout, so a dead actor is an error, not a
hang.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Sequence

import ray

from rollout.interface import (RolloutBatch, RolloutError, SamplingParams, checksums_match, gather_shares,  # noqa: F401  (RolloutError: its old home)
                               generate_share, split_request, state_checksum)
from infra import storage
from trainers.config import RolloutSettings


@dataclass
class RolloutConfig(RolloutSettings):
    """The settings section of TrainConfig plus what the trial derives from the training run."""
    model: str = "tiny-pythia-1m"            # name or folder the actors load before the first sync
    batch_size: int = 16
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_engine(kind: str, model: str | None = None) -> str:
    """`auto`: vLLM where it is installed and can run the model (any model on CUDA; on CPU, a head size
    its CPU attention takes), else Hugging Face generate."""
    if kind not in ("auto", "hf", "vllm"):
        raise ValueError(f"rollout engine must be auto, hf or vllm; got {kind!r}")
    if kind != "auto":
        return kind
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None:
        return "hf"
    if torch.cuda.is_available():
        return "vllm"
    if model is None:
        return "hf"
    from rollout.vllm_engine import runs_on_cpu

    try:
        return "vllm" if runs_on_cpu(model) else "hf"
    except ImportError:  # installed but not importable (e.g. mismatched torch builds): the HF engine works
        return "hf"


def build_engine(config: RolloutConfig, seed: int):
    kind = resolve_engine(config.engine, config.model)
    if kind == "vllm":
        from rollout.vllm_engine import VLLMEngine  # the only import of vllm

        return VLLMEngine(config.model, seed=seed, gpu_memory_utilization=config.vllm_gpu_memory_utilization)
    import torch

    from infra.cpu_threads import use_cpu_share
    from rollout.hf_engine import HFEngine

    use_cpu_share(config.cpus_per_actor)  # floor of the actor's CPU share, at least one thread
    device = "cuda" if config.gpus_per_actor > 0 and torch.cuda.is_available() else None
    return HFEngine.from_pretrained(config.model, seed=seed, device=device, batch_size=config.batch_size)


@ray.remote
class RolloutActor:
    def __init__(self, config: dict, index: int):
        self.config, self.index = RolloutConfig(**config), index
        # a model folder on remote storage (s3://...): load this node's copy
        self.config = replace(self.config, model=storage.local_copy(self.config.model))
        self.engine = build_engine(self.config, seed=self.config.seed)  # same start weights on every actor

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        return generate_share(self.engine, self.index, prompt_ids, params)

    def load_weights(self, state_dict: Mapping[str, Any], version: int) -> int:
        self.engine.load_weights(state_dict, version)
        return self.engine.version

    def score(self, prompt_ids, response_ids) -> list[list[float]]:
        return self.engine.score(prompt_ids, response_ids)

    def engine_name(self) -> str:
        return self.engine.name

    def received(self) -> tuple[int, int, float] | None:
        """(version, tensors, float64 sum) of the last weights the engine loaded; None before any."""
        got = self.engine.received()
        return None if got is None else (self.engine.version, *got)

    # the broadcast path (rollout.pool_broadcast), vLLM engines only
    def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, timeout_s: float) -> None:
        self.engine.init_weight_group(host, port, rank_offset, world_size, timeout_s)

    def receive_broadcast(self, metadata: list, version: int) -> int:
        self.engine.receive_broadcast(metadata, version)
        return self.engine.version

    def version(self) -> int:
        return self.engine.version


class RolloutPool:
    """The actors and the calls the trainer makes on them. Picklable: Ray Train workers get it in
    their loop config and call it like the driver would."""

    def __init__(self, config: RolloutConfig, actors: list | None = None):
        self.config = config
        if actors is None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            # outside any placement group of the caller (a Tune trial reserves only its own small share)
            resources = {"num_cpus": config.cpus_per_actor, "num_gpus": config.gpus_per_actor, "max_restarts": config.max_restarts,
                         "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None)}
            actors = [RolloutActor.options(**resources).remote(config.to_dict(), i) for i in range(config.num_actors)]
        self.actors = actors

    def _get(self, refs, what: str):
        try:
            return ray.get(refs, timeout=self.config.timeout_s)
        except ray.exceptions.GetTimeoutError as error:
            raise RolloutError(f"rollout actors did not finish {what} within {self.config.timeout_s:.0f}s") from error
        except ray.exceptions.RayActorError as error:
            raise RolloutError(f"a rollout actor died during {what}: {error}") from error
        except ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None) or error
            raise RolloutError(f"{what} failed on a rollout actor: {type(cause).__name__}: {cause}") from error

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """Contiguous chunks, one per actor, reassembled in the prompts' order."""
        refs = [self.actors[i].generate.remote(list(prompt_ids[a:b]), params)
                for i, a, b in split_request(len(prompt_ids), len(self.actors))]
        started = time.perf_counter()
        return gather_shares(self._get(refs, "generation"), started)

    def wait_ready(self) -> None:
        """Wait for every actor's engine to start (vLLM on CPU takes a minute or more: `start_timeout_s`)."""
        refs = [actor.version.remote() for actor in self.actors]
        try:
            ray.get(refs, timeout=self.config.start_timeout_s)
        except ray.exceptions.GetTimeoutError as error:
            raise RolloutError(f"rollout actors did not start within {self.config.start_timeout_s:.0f}s "
                               "(--rollout-start-timeout-s)") from error
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
            raise RolloutError(f"a rollout actor failed to start: {error}") from error

    def sync_weights(self, state_dict: Mapping[str, Any], version: int) -> float:
        """Push weights to every actor (one object-store copy) and check what each loaded; returns the
        seconds it took."""
        started = time.perf_counter()
        shared = ray.put({k: v.detach().cpu() if hasattr(v, "detach") else v for k, v in state_dict.items()})
        versions = self._get([actor.load_weights.remote(shared, version) for actor in self.actors], "weight sync")
        if set(versions) != {version}:
            raise RolloutError(f"actors report versions {versions} after syncing version {version}")
        self.verify_received(state_dict, version)
        return time.perf_counter() - started

    def verify_received(self, state_dict: Mapping[str, Any], version: int) -> None:
        """Every actor's engine reports the version, tensor count and float64 sum of what it loaded; a
        sync that did not reach an engine (or reached it in part) is an error naming the actor."""
        sent_count, sent_sum = len(state_dict), state_checksum(state_dict)
        reports = self._get([actor.received.remote() for actor in self.actors], "weight check")
        for index, got in enumerate(reports):
            if got is None or got[0] != version or got[1] != sent_count or not checksums_match(got[2], sent_sum):
                raise RolloutError(f"rollout actor {index} did not load version {version}: it reports "
                                   f"(version, tensors, sum) {got}, the trainer sent ({version}, {sent_count}, {sent_sum})")

    def engine_names(self) -> list[str]:
        return self._get([actor.engine_name.remote() for actor in self.actors], "engine query")

    def score(self, prompt_ids, response_ids, actor: int = 0) -> list[list[float]]:
        return self._get(self.actors[actor].score.remote(prompt_ids, response_ids), "scoring")

    def versions(self) -> list[int]:
        return self._get([actor.version.remote() for actor in self.actors], "version query")

    @property
    def num_engines(self) -> int:
        return len(self.actors)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
