"""The rollout pool in the caller's process: HF engines behind the interface of the Ray actor pool.

A trainer (PPO, or probe decodes from rollout engines) takes either pool. This one needs no cluster,
so PPOTrainer runs in a notebook or a unit test; requests are split over the engines and seeded as
the actors do (`rollout.interface.split_request`, `generate_share`), so with as many engines as
actors it makes the rollouts the Ray pool makes. The engines run one after another; weights are
copied into them on sync, never shared with the trainer's live tensors.
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch

from infra import storage
from rollout.hf_engine import HFEngine
from rollout.interface import (GenerationEngine, RolloutBatch, SamplingParams, gather_shares, generate_share,
                               split_request)


class LocalRolloutPool:
    def __init__(self, engines: Sequence[GenerationEngine]):
        if not engines:
            raise ValueError("a rollout pool needs at least one engine")
        self.engines = list(engines)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, num_engines: int = 1, seed: int = 0,
                        batch_size: int = 16) -> "LocalRolloutPool":
        """`num_engines` HF engines with the same start weights (as every actor of a pool starts)."""
        path = storage.local_copy(name_or_path)
        return cls([HFEngine.from_pretrained(path, seed=seed, batch_size=batch_size) for _ in range(num_engines)])

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """Contiguous chunks, one per engine, in the prompts' order. A seeded request leaves the caller's
        torch random stream as it was (the engines reseed it, as separate actor processes would not)."""
        shares = split_request(len(prompt_ids), len(self.engines))
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[], enabled=params.seed is not None):
            parts = [generate_share(self.engines[i], i, list(prompt_ids[a:b]), params) for i, a, b in shares]
        return gather_shares(parts, started)

    def sync_weights(self, state_dict: Mapping[str, Any], version: int) -> float:
        started = time.perf_counter()
        for engine in self.engines:
            engine.load_weights(state_dict, version)
        return time.perf_counter() - started

    def score(self, prompt_ids, response_ids, actor: int = 0) -> list[list[float]]:
        return self.engines[actor].score(prompt_ids, response_ids)

    def versions(self) -> list[int]:
        return [engine.version for engine in self.engines]

    @property
    def num_engines(self) -> int:
        return len(self.engines)

    def engine_names(self) -> list[str]:
        return [engine.name for engine in self.engines]

    def shutdown(self) -> None:
        self.engines = []
