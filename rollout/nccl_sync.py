"""GPU weight sync: trainer rank 0 broadcasts its tensors over NCCL straight into the vLLM workers of
every rollout actor (no CPU copy, no object store). CUDA and vllm only.

Every collective waits under a deadline: the broadcast runs in a thread that is joined with a
timeout, and the actors' side is awaited with `ray.get(timeout=...)`, so a dead peer raises
`RolloutError` instead of hanging the trainer.
"""
from __future__ import annotations

import socket
import threading

import ray

from rollout.actors import RolloutError, RolloutPool


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class NcclWeightBroadcaster:
    """Made by trainer rank 0 once; `broadcast(model, version)` after each policy update."""

    def __init__(self, pool: RolloutPool, workers_per_actor: int = 1, timeout_s: float = 120.0):
        import torch
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        self.pool, self.timeout_s = pool, timeout_s
        host = ray.util.get_node_ip_address()
        port = _free_port(host)
        world_size = 1 + workers_per_actor * len(pool.actors)
        joins = [actor.init_weight_group.remote(host, port, 1 + i * workers_per_actor, world_size, timeout_s)
                 for i, actor in enumerate(pool.actors)]
        group = StatelessProcessGroup.create(host=host, port=port, rank=0, world_size=world_size,
                                             store_timeout=int(timeout_s))
        self.communicator = PyNcclCommunicator(group, device=torch.cuda.current_device())
        pool._get(joins, "joining the weight-broadcast group")

    def broadcast(self, model, version: int) -> None:
        import torch

        tensors = [(name, p.detach()) for name, p in model.state_dict().items()]
        metadata = [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in tensors]
        receiving = [actor.receive_broadcast.remote(metadata, version) for actor in self.pool.actors]
        failure: list[BaseException] = []

        def send():
            try:
                for _, tensor in tensors:
                    self.communicator.broadcast(tensor.contiguous(), src=0, stream=torch.cuda.current_stream())
                torch.cuda.synchronize()
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
                failure.append(error)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        sender.join(self.timeout_s)
        if sender.is_alive():
            raise RolloutError(f"NCCL weight broadcast did not finish within {self.timeout_s:.0f}s (a rollout worker died?)")
        if failure:
            raise RolloutError(f"NCCL weight broadcast failed: {failure[0]}") from failure[0]
        versions = self.pool._get(receiving, "receiving the broadcast")
        if set(versions) != {version}:
            raise RolloutError(f"actors report versions {versions} after broadcasting version {version}")
