"""Methods vLLM mixes into each of its workers (`worker_extension_cls`), called through
`LLM.collective_rpc`. Imported by vLLM inside its worker processes only; `self.model_runner`,
`self.device` and `self.rank` are the worker's own.

`collective_rpc` serializes its arguments with msgpack, which turns tensors into nested lists: the
object-store path therefore sends each bucket as safetensors bytes and rebuilds tensors here.
"""
from __future__ import annotations


class WeightSyncExtension:
    """Weights are reloaded through vLLM's layerwise reload: on CPU it packs linear weights for its
    kernels after loading (and drops the plain tensors), so a bare `model.load_weights` after start-up
    fails; the reload restores each layer, loads it and packs it again."""

    def begin_bucket_reload(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.model)
        self._received = (0, 0.0)

    def load_safetensors_bucket(self, blob: bytes) -> int:
        """One bucket of the state dict as safetensors bytes, between begin_ and end_bucket_reload."""
        from safetensors.torch import load

        from rollout.interface import tensors_checksum

        tensors = load(blob)
        count, total = self._received
        self._received = (count + len(tensors), total + tensors_checksum(tensors.values()))
        self.model_runner.model.load_weights(weights=[(k, v.to(self.device)) for k, v in tensors.items()])
        return len(tensors)

    def end_bucket_reload(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        finalize_layerwise_reload(self.model_runner.model, self.model_runner.model_config)

    def received(self) -> tuple[int, float] | None:
        """(tensors, float64 sum) of everything the last update loaded (None before any): the trainer
        compares it with what it sent. (On CPU vLLM packs linear weights into kernel formats, so the
        model's own parameters cannot be summed the same way.)"""
        return getattr(self, "_received", None)

    def join_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, timeout_s: float) -> int:
        """Join the trainer's broadcast group (rank 0 is the trainer; this worker is rank_offset + its rank)."""
        from rollout.weight_broadcast import join_group

        rank = rank_offset + int(getattr(self, "rank", 0))
        self._weight_group = join_group(host, port, rank, world_size, timeout_s, self.device)
        self._weight_timeout_s = timeout_s
        return rank

    def receive_weight_buckets(self, buckets: list) -> int:
        """Receive every bucket rank 0 broadcasts (plan from rollout.weight_broadcast.plan_buckets) and load it."""
        from rollout.interface import tensors_checksum
        from rollout.weight_broadcast import Bucket, receive_buckets

        if getattr(self, "_weight_group", None) is None:
            raise RuntimeError("receive_weight_buckets before join_weight_group")
        plan = [b if isinstance(b, Bucket) else Bucket(b[0], tuple((n, tuple(s)) for n, s in b[1])) for b in buckets]
        self._received = (0, 0.0)

        def weights():
            for tensors in receive_buckets(self._weight_group, plan, self.device, self._weight_timeout_s):
                count, total = self._received
                self._received = (count + len(tensors), total + tensors_checksum(t for _, t in tensors))
                yield from tensors

        self.model_runner.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
        return self._received[0]

    def leave_weight_group(self) -> None:
        self._weight_group = None
