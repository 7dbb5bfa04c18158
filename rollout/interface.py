"""The one generation interface every engine implements (Hugging Face `generate`, vLLM).

Inputs and outputs are token ids, so what the trainer scores is exactly what the engine sampled.
Each rollout carries the log-probs the engine assigned to its own tokens (from the raw logits, at
temperature 1, as vLLM reports them by default) and the policy version that produced it: the
trainer recomputes log-probs for the PPO ratio and logs the gap as `ppo/logprob_mismatch`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Protocol, Sequence

from trainers.data.seeds import derive_seed


class RolloutError(RuntimeError):
    """A rollout engine or actor failed, timed out, or does not hold the weights it should."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 1.0     # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class RolloutBatch:
    prompt_ids: list[list[int]]
    token_ids: list[list[int]]            # generated tokens per prompt, through EOS when produced
    texts: list[str]
    logprobs: list[list[float]]           # the engine's log p of each generated token
    policy_version: int = 0
    engine: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @staticmethod
    def concat(batches: Sequence["RolloutBatch"]) -> "RolloutBatch":
        """Parts from several actors, in order; they must come from one policy version."""
        versions = {b.policy_version for b in batches}
        if len(versions) > 1:
            raise ValueError(f"rollouts from different policy versions {sorted(versions)} cannot be mixed")
        return RolloutBatch(
            prompt_ids=[p for b in batches for p in b.prompt_ids], token_ids=[t for b in batches for t in b.token_ids],
            texts=[t for b in batches for t in b.texts], logprobs=[lp for b in batches for lp in b.logprobs],
            policy_version=versions.pop() if versions else 0, engine=",".join(sorted({b.engine for b in batches})),
        )


class GenerationEngine(Protocol):
    name: str
    version: int

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch: ...

    def load_weights(self, state_dict: Mapping[str, Any], version: int) -> None: ...

    def score(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p of each given response token under the engine's current weights (checks a sync)."""
        ...

    def received(self) -> tuple[int, float] | None:
        """(tensors, float64 sum) of the last weights loaded (compare with `state_checksum`); None before any."""
        ...


class RolloutPoolLike(Protocol):
    """What a trainer calls on its rollouts: the Ray actors (rollout.actors.RolloutPool) or engines in
    this process (rollout.local_pool.LocalRolloutPool)."""

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch: ...

    def sync_weights(self, state_dict: Mapping[str, Any], version: int) -> float: ...

    def score(self, prompt_ids, response_ids, actor: int = 0) -> list[list[float]]: ...

    def versions(self) -> list[int]: ...

    @property
    def num_engines(self) -> int: ...

    def engine_names(self) -> list[str]: ...

    def shutdown(self) -> None: ...


def tensors_checksum(tensors) -> float:
    """float64 sum of every tensor: what the sender computes and each engine computes on what it loaded."""
    return float(sum(t.detach().double().sum().item() for t in tensors))


def state_checksum(state_dict: Mapping[str, Any]) -> float:
    return tensors_checksum(state_dict.values())


def checksums_match(received: float, sent: float) -> bool:
    """Equal up to float64 summation order (the engine may add the tensors in another order)."""
    return abs(received - sent) <= 1e-8 * max(1.0, abs(sent))


def split_request(n_prompts: int, n_engines: int) -> list[tuple[int, int, int]]:
    """(engine, start, stop) of each engine's contiguous share of a request, of near-equal size; an
    engine with nothing to do is left out. Both pools split the same way, so they give the same rollouts."""
    if not n_prompts:
        raise ValueError("no prompts to generate for")
    bounds = [round(i * n_prompts / n_engines) for i in range(n_engines + 1)]
    return [(i, a, b) for i, (a, b) in enumerate(zip(bounds, bounds[1:])) if b > a]


def generate_share(engine: GenerationEngine, index: int, prompt_ids: Sequence[Sequence[int]],
                   params: SamplingParams) -> RolloutBatch:
    """Engine `index`'s share of a request: its own random stream of the request's seed, and its time."""
    started = time.perf_counter()
    if params.seed is not None:  # engines draw different streams from one request seed
        params = replace(params, seed=derive_seed(index, params.seed))
    batch = engine.generate(prompt_ids, params)
    batch.info = {"actor": index, "seconds": time.perf_counter() - started}
    return batch


def gather_shares(parts: Sequence[RolloutBatch], started: float) -> RolloutBatch:
    """The shares of one request, in order, as one batch timed from `started`."""
    batch = RolloutBatch.concat(parts)
    batch.info = {"seconds": time.perf_counter() - started, "actors": len(parts)}
    return batch
