"""The broadcast group of rollout.weight_broadcast over gloo (the CPU backend), without vLLM: rank 0
in this process, receivers in real separate processes running the same receive code the vLLM
worker extension runs. The vLLM end is tested in test_vllm_engine.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rollout.weight_broadcast import Bucket, WeightBroadcaster, plan_buckets

ROOT = Path(__file__).resolve().parents[2]
RECEIVER = """
import json, os, sys
import torch
from safetensors.torch import save_file
from rollout.weight_broadcast import Bucket, join_group, receive_buckets

port, rank, world, mode, plan_file, out = sys.argv[1:]
plan = [Bucket(d, tuple((n, tuple(s)) for n, s in e)) for d, e in json.load(open(plan_file))]
group = join_group("127.0.0.1", int(port), int(rank), int(world), 60.0, torch.device("cpu"))
if mode == "die":
    os._exit(3)
got = {n: t.clone() for bucket in receive_buckets(group, plan, torch.device("cpu"), 60.0) for n, t in bucket}
save_file(got, out)
del group  # as the vLLM worker's leave_weight_group: a gloo group alive at exit aborted 1 run in 4
"""


def state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"embed.weight": torch.randn(300, 64, generator=generator),
            "layer.0.weight": torch.randn(64, 64, generator=generator),
            "layer.0.bias": torch.randn(64, generator=generator),
            "steps": torch.arange(5, dtype=torch.int64),
            "layer.1.weight": torch.randn(64, 64, dtype=torch.float64, generator=generator)}


def start_receivers(tmp_path, port: int, world: int, plan: list[Bucket], modes: list[str]):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps([(b.dtype, [(n, list(s)) for n, s in b.entries]) for b in plan]))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return [subprocess.Popen([sys.executable, "-c", RECEIVER, str(port), str(rank), str(world), mode, str(plan_file),
                              str(tmp_path / f"got{rank}.safetensors")], env=env)
            for rank, mode in enumerate(modes, start=1)]


def test_buckets_group_by_dtype_keep_order_and_respect_the_size():
    tensors = state_dict()
    plan = plan_buckets(tensors, bucket_bytes=20_000)
    names = [n for b in plan for n, _ in b.entries]
    assert sorted(names) == sorted(tensors)
    for bucket in plan:
        dtypes = {str(tensors[n].dtype).removeprefix("torch.") for n, _ in bucket.entries}
        assert dtypes == {bucket.dtype}
        size = sum(tensors[n].numel() * tensors[n].element_size() for n, _ in bucket.entries)
        assert size <= 20_000 or len(bucket.entries) == 1  # only an oversized tensor stands alone
        assert [names.index(n) for n, _ in bucket.entries] == sorted(names.index(n) for n, _ in bucket.entries)
    assert plan_buckets(tensors)[0].entries[0][0] == "embed.weight"
    assert len(plan_buckets(tensors)) == 3  # one bucket per dtype when they fit


def test_every_receiver_gets_every_tensor_exactly(tmp_path):
    from safetensors.torch import load_file

    tensors = state_dict()
    plan = plan_buckets(tensors, bucket_bytes=20_000)
    sender = WeightBroadcaster(world_size=3, timeout_s=120)  # the receivers import torch first: ~25 s here under load
    assert sender.backend == "gloo"
    receivers = start_receivers(tmp_path, sender.port, 3, plan, ["receive", "receive"])
    try:
        sender.connect()
        started = time.perf_counter()
        sender.send(tensors, plan)
        print(f"gloo broadcast of {len(plan)} buckets to 2 processes: {time.perf_counter() - started:.3f}s")
        assert [p.wait(60) for p in receivers] == [0, 0]
    finally:
        for p in receivers:
            p.kill()
    for rank in (1, 2):
        got = load_file(tmp_path / f"got{rank}.safetensors")
        assert got.keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)


def test_a_receiver_that_dies_fails_the_send_within_the_timeout(tmp_path):
    tensors = state_dict()
    plan = plan_buckets(tensors)
    sender = WeightBroadcaster(world_size=3, timeout_s=60)
    receivers = start_receivers(tmp_path, sender.port, 3, plan, ["receive", "die"])
    try:
        sender.connect()
        assert receivers[1].wait(60) == 3  # gone before the weights are sent
        started = time.perf_counter()
        with pytest.raises(RuntimeError):
            sender.send(tensors, plan)
        elapsed = time.perf_counter() - started
        print(f"dead receiver detected after {elapsed:.2f}s (timeout 60s)")
        assert elapsed < 60 + 5
    finally:
        for p in receivers:
            p.kill()


def test_a_receiver_that_never_joins_fails_connect_within_the_timeout(tmp_path):
    sender = WeightBroadcaster(world_size=2, timeout_s=3)
    started = time.perf_counter()
    with pytest.raises(RuntimeError):
        sender.connect()
    assert time.perf_counter() - started < 3 + 5


def test_close_leaves_other_files_alone():
    """The TCP store owns the listening descriptor and closes it with itself; close() must not close that
    number a second time (it raised EBADF, and the number may belong to another file by then)."""
    import os

    from rollout.weight_broadcast import WeightBroadcaster

    other = os.open(os.devnull, os.O_RDONLY)
    try:
        for _ in range(3):
            WeightBroadcaster(world_size=2, timeout_s=5).close()  # raised OSError (EBADF) before the fix
        os.fstat(other)  # still open
    finally:
        os.close(other)
