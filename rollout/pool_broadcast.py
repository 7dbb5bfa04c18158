"""Broadcast weight sync for a `RolloutPool` of vLLM actors (the `--weight-sync broadcast` way):
trainer rank 0 and every vLLM worker of every actor form one group (rollout.weight_broadcast; gloo
on CPU, NCCL on CUDA) and each sync is a few bucket broadcasts instead of an object-store copy.

Every wait is bounded by the pool's `timeout_s`; an actor that dies makes `sync` raise a
`RolloutError` that names it.
"""
from __future__ import annotations

import time
from typing import Mapping

import ray
import torch

from rollout.actors import RolloutError, RolloutPool
from rollout.weight_broadcast import DEFAULT_BUCKET_BYTES, WeightBroadcaster, plan_buckets


class PoolBroadcastSync:
    """Made once by trainer rank 0 after the pool exists; then `sync(state_dict, version)` per update."""

    def __init__(self, pool: RolloutPool, *, device: torch.device | str = "cpu", workers_per_actor: int = 1,
                 host: str = "127.0.0.1", timeout_s: float | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.pool, self.bucket_bytes = pool, bucket_bytes
        self.timeout_s = timeout_s or pool.config.timeout_s
        world_size = 1 + workers_per_actor * len(pool.actors)
        self.broadcaster = WeightBroadcaster(world_size, timeout_s=self.timeout_s, device=device, host=host)
        joins = [actor.init_weight_group.remote(host, self.broadcaster.port, 1 + i * workers_per_actor, world_size,
                                                self.timeout_s)
                 for i, actor in enumerate(pool.actors)]
        try:
            self.broadcaster.connect()
        except RuntimeError as error:
            raise RolloutError(f"rollout actors did not join the weight-broadcast group within "
                               f"{self.timeout_s:.0f}s: {self._who_failed(joins)}") from error
        pool._get(joins, "joining the weight-broadcast group")

    def _who_failed(self, refs) -> str:
        """Which actors' calls failed or are still pending, each named by its index."""
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=min(self.timeout_s, 30.0))
        problems = []
        for index, ref in enumerate(refs):
            if ref not in done:
                problems.append(f"actor {index}: no answer")
                continue
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                problems.append(f"actor {index}: died")
            except ray.exceptions.RayTaskError as error:
                problems.append(f"actor {index}: {type(getattr(error, 'cause', error)).__name__}")
        return "; ".join(problems) or "every actor answered"

    def sync(self, state_dict: Mapping[str, torch.Tensor], version: int) -> float:
        """Broadcast `state_dict` to every actor; returns the seconds it took."""
        started = time.perf_counter()
        buckets = plan_buckets(state_dict, self.bucket_bytes)
        receiving = [actor.receive_broadcast.remote(buckets, version) for actor in self.pool.actors]
        try:
            self.broadcaster.send(state_dict, buckets)
        except RuntimeError as error:
            raise RolloutError(f"weight broadcast of version {version} failed ({error}): "
                               f"{self._who_failed(receiving)}") from error
        versions = self.pool._get(receiving, "receiving the weight broadcast")
        if set(versions) != {version}:
            raise RolloutError(f"actors report versions {versions} after broadcasting version {version}")
        self.pool.verify_received(state_dict, version)
        return time.perf_counter() - started

    def close(self) -> None:
        self.broadcaster.close()
