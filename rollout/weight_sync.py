"""Which way the trainer's weights reach the rollout engines (`--weight-sync`), chosen once by trainer
rank 0 when it first syncs: the in-process pool copies; Ray actors load one object-store copy, or,
when every actor runs vLLM, take part in a broadcast group (rollout.pool_broadcast)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from rollout.interface import RolloutError  # not rollout.actors: an in-process pool must not import Ray

Sync = Callable[[Mapping[str, Any], int], float]   # (state_dict, version) -> seconds


def weight_sync_for(pool, mode: str, device: torch.device | str = "cpu") -> tuple[Sync, str]:
    """(the sync call, the way chosen: 'in-process', 'object-store' or 'broadcast') for `pool`."""
    if mode not in ("auto", "broadcast", "object-store"):
        raise ValueError(f"weight sync must be auto, broadcast or object-store; got {mode!r}")
    if not hasattr(pool, "actors"):  # rollout.local_pool: engines in this process
        if mode == "broadcast":
            raise RolloutError("--weight-sync broadcast needs Ray rollout actors running vLLM; this pool's engines "
                               "run in the trainer's process")
        return pool.sync_weights, "in-process"
    pool.wait_ready()  # the first sync is also the first wait on the engines' start
    engines = pool.engine_names()
    if mode == "auto":
        mode = "broadcast" if set(engines) == {"vllm"} else "object-store"
    if mode == "object-store":
        return pool.sync_weights, mode
    if set(engines) != {"vllm"}:
        raise RolloutError(f"--weight-sync broadcast needs vLLM rollout actors; the actors run {engines} "
                           "(use --rollout-engine vllm, or --weight-sync object-store)")
    import ray

    from rollout.pool_broadcast import PoolBroadcastSync

    # rank 0's address as the other nodes see it (127.0.0.1 on a one-machine cluster)
    host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    broadcast = PoolBroadcastSync(pool, device=device, host=host)
    return broadcast.sync, mode
