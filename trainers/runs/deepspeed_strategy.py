"""DeepSpeed ZeRO as the workers' training strategy: the only module that imports deepspeed.

ZeRO-1 shards the optimizer state across workers, ZeRO-2 also the gradients, ZeRO-3 also the
parameters. The import happens only when a run asks for `strategy='deepspeed'`, so DDP runs never
need DeepSpeed installed. On CPU DeepSpeed must be told its accelerator before it is first imported,
and it gets a torch AdamW and our LambdaLR, so it compiles no fused or CPU-Adam kernel. It joins the
process group Ray Train (or a test) already set up: gloo on CPU, NCCL on GPUs.

Checkpoints are DeepSpeed's own: every rank writes its shard of the optimizer state (and, under
ZeRO-3, of the weights) into its own folder; Ray Train uploads every rank's folder into one
checkpoint folder, which every rank reads back on resume.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

INSTALL_HINT = "pip install -e '.[deepspeed]'"
CHECKPOINT_TAG = "zero"   # one checkpoint per folder, so DeepSpeed's tag (a sub-folder) is fixed


def import_deepspeed(use_gpu: bool):
    """deepspeed, set up for CPU unless the run uses CUDA (the accelerator is chosen once, at import)."""
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError as error:
        raise ImportError(f"--strategy deepspeed needs DeepSpeed, which could not be imported ({error}); "
                          f"install it with: {INSTALL_HINT}") from error
    # DeepSpeed calls torch collectives that torch now marks deprecated, and torch warns at every call
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r".*torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")
    device = get_accelerator().device_name()
    if not use_gpu and device != "cpu":
        raise RuntimeError(f"DeepSpeed was set up for {device!r} earlier in this process; a CPU run needs "
                           "DS_ACCELERATOR=cpu before deepspeed is first imported")
    return deepspeed


def deepspeed_config(config) -> dict:
    """The DeepSpeed config of a TrainConfig: same batch, accumulation, clipping and precision as DDP."""
    return {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum_steps,
        "gradient_clipping": config.max_grad_norm,      # 0 disables it, as in the DDP path
        "zero_optimization": {"stage": config.zero_stage},
        "fp16": {"enabled": False},                     # float32 like the DDP path, so curves compare
        "bf16": {"enabled": False},
        "steps_per_print": 2**31 - 1,                   # the run logs its own metrics
        "wall_clock_breakdown": False,
    }


def _ensure_process_group() -> None:
    """Ray Train (or a test) normally set one up; a single process (a notebook) gets a group of one."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


@contextlib.contextmanager
def _no_shm_comm_build(skip: bool):
    """On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce (C++, needs
    a compiler; minutes on 2 cores) that only its inference all-reduce uses, never ZeRO training.
    Skipping the build leaves every collective on the torch process group (gloo)."""
    backend = importlib.import_module("deepspeed.comm.torch")   # not `from deepspeed.comm import torch`: that is torch
    original = getattr(backend, "build_shm_op", None)
    if not skip or original is None:
        yield
        return
    backend.build_shm_op = lambda: None
    try:
        yield
    finally:
        backend.build_shm_op = original


class ZeroStrategy:
    """Builds the DeepSpeed engine and does what differs from DDP: step, gather, checkpoint."""

    def __init__(self, config):
        self.config = config
        self.deepspeed = import_deepspeed(config.use_gpu)

    @property
    def partitions_parameters(self) -> bool:
        return self.config.zero_stage == 3

    def initialize(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler):
        """The engine that replaces DDP; it takes over `optimizer` and steps `scheduler` itself."""
        _ensure_process_group()
        args = None
        if self.config.use_gpu:
            # the device the caller selected (Ray's choice, which need not equal LOCAL_RANK)
            args = SimpleNamespace(device_rank=torch.cuda.current_device())
        # DeepSpeed insists on LOCAL_RANK (Ray Train and torchrun set it); on CPU it selects nothing
        os.environ.setdefault("LOCAL_RANK", str(args.device_rank if args else 0))
        with _no_shm_comm_build(skip=not self.config.use_gpu):
            engine, _, _, _ = self.deepspeed.initialize(args=args, model=model, optimizer=optimizer,
                                                        lr_scheduler=scheduler, config=deepspeed_config(self.config))
        return engine

    @staticmethod
    def backward_and_step(engine, loss: torch.Tensor) -> None:
        """One micro-batch: DeepSpeed scales by 1/grad_accum_steps, and reduces, clips and steps the
        optimizer and scheduler only at the last micro-batch of a step."""
        engine.backward(loss)
        engine.step()

    @staticmethod
    def grad_norm(engine) -> float | None:
        """The global gradient norm before clipping (as clip_grad_norm_ returns it), if computed."""
        norm = engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def copy_full_weights(self, engine, target: torch.nn.Module) -> None:
        """Copy the engine's current weights into a plain module. Under ZeRO-3 a collective: every rank
        calls it, and each parameter is gathered in turn (peak memory: one extra parameter)."""
        source = dict(engine.module.named_parameters())
        with torch.no_grad():
            for name, parameter in target.named_parameters():
                with self.deepspeed.zero.GatheredParameters([source[name]], modifier_rank=None):
                    parameter.copy_(source[name].data)
            for name, buffer in engine.module.named_buffers():
                target.get_buffer(name).copy_(buffer)

    @staticmethod
    def save_checkpoint(engine, directory: str | Path, client_state: dict) -> None:
        """Every rank writes its shard under `directory` (a collective)."""
        engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state=client_state, save_latest=False)

    @staticmethod
    def load_checkpoint(engine, directory: str | Path) -> dict:
        """Restore weights, optimizer shard, scheduler and engine counters; returns the client state."""
        path, client_state = engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint (tag {CHECKPOINT_TAG!r}) in {directory}")
        return client_state
