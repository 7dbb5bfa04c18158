"""Methods vLLM mixes into each of its GPU workers (`worker_extension_cls`), called through
`LLM.collective_rpc`. Imported by vLLM inside its worker processes only; `self.model_runner` and
`self.device` are the worker's own."""
from __future__ import annotations

from datetime import timedelta


class WeightSyncExtension:
    def load_cpu_state_dict(self, state_dict: dict) -> int:
        """Weights handed over as CPU tensors; vLLM's loader maps HF names to its fused layout."""
        loaded = self.model_runner.model.load_weights(weights=list(state_dict.items()))
        return len(loaded) if loaded is not None else len(state_dict)

    def init_weight_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                 timeout_s: float) -> None:
        """Join the trainer's weight-broadcast group: the trainer is rank 0, workers follow."""
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.parallel_state import get_world_group
        from vllm.distributed.utils import StatelessProcessGroup

        rank = get_world_group().rank + rank_offset
        group = StatelessProcessGroup.create(host=master_address, port=master_port, rank=rank, world_size=world_size,
                                             store_timeout=int(timeout_s))
        self._weight_group = PyNcclCommunicator(group, device=self.device)
        self._weight_timeout = timedelta(seconds=timeout_s)

    def receive_weights(self, metadata: list) -> int:
        """Receive every tensor rank 0 broadcasts, in the order of `metadata`, and load it."""
        import torch

        if not hasattr(self, "_weight_group"):
            raise RuntimeError("receive_weights before init_weight_update_group")
        for name, dtype, shape in metadata:
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            self._weight_group.broadcast(tensor, src=0, stream=torch.cuda.current_stream())
            self.model_runner.model.load_weights(weights=[(name, tensor)])
        torch.cuda.synchronize()
        return len(metadata)
