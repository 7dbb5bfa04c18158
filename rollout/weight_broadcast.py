"""Weight sync by broadcast: trainer rank 0 and every vLLM worker form a process group of their own
(outside the trainer's and vLLM's groups) and rank 0 broadcasts the state dict in buckets.

One code path for both devices: the group's backend is gloo on CPU and NCCL on CUDA (the choice
OpenRLHF makes with its `vllm_sync_backend`). Tensors of one dtype are packed into flat buckets of
at most `bucket_bytes`, so a sync costs a few collectives, not one per parameter. Every collective
waits under the group's timeout: a peer that died makes the broadcast fail, never hang.

This module imports torch only; the trainer uses `WeightBroadcaster`, the vLLM worker extension
uses `join_group` and `receive_buckets`.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Mapping

import torch
import torch.distributed as dist

DEFAULT_BUCKET_BYTES = 64 << 20


@dataclass(frozen=True)
class Bucket:
    """What the receivers need to rebuild one flat buffer into named tensors."""
    dtype: str                                     # e.g. "float32"
    entries: tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape) in packing order

    @property
    def numel(self) -> int:
        return sum(_numel(shape) for _, shape in self.entries)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def plan_buckets(state_dict: Mapping[str, torch.Tensor], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[Bucket]:
    """Group tensors by dtype, in state-dict order, into buckets of at most `bucket_bytes` (a tensor
    larger than that gets a bucket of its own)."""
    open_buckets: dict[torch.dtype, tuple[list, int]] = {}
    buckets: list[Bucket] = []
    for name, tensor in state_dict.items():
        size = tensor.numel() * tensor.element_size()
        entries, used = open_buckets.get(tensor.dtype, ([], 0))
        if entries and used + size > bucket_bytes:
            buckets.append(Bucket(str(tensor.dtype).removeprefix("torch."), tuple(entries)))
            entries, used = [], 0
        entries.append((name, tuple(tensor.shape)))
        open_buckets[tensor.dtype] = (entries, used + size)
    for dtype, (entries, _) in open_buckets.items():
        if entries:
            buckets.append(Bucket(str(dtype).removeprefix("torch."), tuple(entries)))
    return buckets


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def join_group(host: str, port: int, rank: int, world_size: int, timeout_s: float, device: torch.device,
               store: dist.Store | None = None) -> dist.ProcessGroup:
    """Open this process's end of the group (blocks until all `world_size` ranks have joined). Drop the
    returned group before the process exits: a gloo group still alive at interpreter exit aborted the
    process ("terminate called without an active exception", exit -6) in about 1 run of 4 here."""
    timeout = timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    if backend_for(device) == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = dist.ProcessGroupNCCL(store, rank, world_size, options)
    else:
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        group = dist.ProcessGroupGloo(store, rank, world_size, options)
    # the first collective completes the connection on every backend: fail here, not mid-sync
    probe = torch.zeros(1, device=device)
    group.broadcast([probe], dist.BroadcastOptions()).wait(timeout)
    return group


def _broadcast(group: dist.ProcessGroup, tensor: torch.Tensor, timeout_s: float) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait(timedelta(seconds=timeout_s))


def _acknowledge(group: dist.ProcessGroup, device: torch.device, timeout_s: float) -> int:
    """Every rank adds 1 once it has everything: rank 0 learns that all receivers got all buckets
    (a broadcast alone can complete into socket buffers of a peer that has already died)."""
    count = torch.ones(1, device=device)
    group.allreduce([count]).wait(timedelta(seconds=timeout_s))
    return int(count.item())


def receive_buckets(group: dist.ProcessGroup, buckets: list[Bucket], device: torch.device,
                    timeout_s: float) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Receiver side: yields each bucket's (name, tensor) views as soon as it has arrived."""
    for bucket in buckets:
        flat = torch.empty(bucket.numel, dtype=getattr(torch, bucket.dtype), device=device)
        _broadcast(group, flat, timeout_s)
        tensors, offset = [], 0
        for name, shape in bucket.entries:
            count = _numel(shape)
            tensors.append((name, flat[offset:offset + count].view(shape)))
            offset += count
        yield tensors
    _acknowledge(group, device, timeout_s)


class WeightBroadcaster:
    """Trainer rank 0's end. Create it (it opens a TCP store on a free port: `self.port`), have every
    receiver call `join_group(host, port, rank>=1, world_size, ...)` concurrently, then `connect()`.
    `send(state_dict, buckets)` broadcasts while the receivers run `receive_buckets` with the same plan.
    """

    def __init__(self, world_size: int, *, timeout_s: float = 120.0, device: torch.device | str = "cpu",
                 host: str = "127.0.0.1"):
        if world_size < 2:
            raise ValueError(f"a broadcast group needs rank 0 and at least one receiver; world_size={world_size}")
        self.world_size, self.timeout_s, self.host = world_size, timeout_s, host
        self.device = torch.device(device)
        # the store listens on `host` only (a socket bound here and handed over; TCPStore alone binds every interface)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((host, 0))
        self._listener.listen()
        self.port = self._listener.getsockname()[1]
        self.store = dist.TCPStore(host, self.port, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                                   wait_for_workers=False, master_listen_fd=self._listener.fileno())
        # the store now owns the descriptor and closes it with itself: the socket object must not close it again
        # (a second close would hit whatever file reused that number)
        self._listen_fd = self._listener.detach()
        self.group: dist.ProcessGroup | None = None

    @property
    def backend(self) -> str:
        return backend_for(self.device)

    def connect(self) -> None:
        self.group = join_group(self.host, self.port, 0, self.world_size, self.timeout_s, self.device, store=self.store)

    def send(self, state_dict: Mapping[str, torch.Tensor], buckets: list[Bucket]) -> None:
        if self.group is None:
            raise RuntimeError("WeightBroadcaster.send before connect()")
        for bucket in buckets:
            flat = torch.cat([state_dict[name].detach().reshape(-1).to(self.device) for name, _ in bucket.entries])
            _broadcast(self.group, flat, self.timeout_s)
        acknowledged = _acknowledge(self.group, self.device, self.timeout_s)
        if acknowledged != self.world_size:
            raise RuntimeError(f"{acknowledged - 1} of {self.world_size - 1} receivers acknowledged the weights")

    def close(self) -> None:
        """Drop the group and the store (which closes the listening socket)."""
        self.group = self.store = None
