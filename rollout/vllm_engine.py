"""The `GenerationEngine` on vLLM (CUDA only; the `gpu` extra). This is the only module that imports
vllm, and only when an engine is built.

Weights reach the running engine two ways, both through a worker extension class that vLLM mixes
into its GPU workers (`rollout.vllm_worker.WeightSyncExtension`):
* `load_weights(state_dict, version)`: a CPU state dict (e.g. from the Ray object store) handed to
  every worker by `collective_rpc` — simple, used when the trainer has no NCCL link to the actor;
* `rollout.nccl_sync`: the trainer's rank 0 and the vLLM workers form their own NCCL group and the
  trainer broadcasts tensor by tensor (`receive_weights` on the workers), as OpenRLHF and verl do.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from rollout.interface import RolloutBatch, SamplingParams

EXTENSION = "rollout.vllm_worker.WeightSyncExtension"


class VLLMEngine:
    name = "vllm"

    def __init__(self, model: str, *, seed: int = 0, gpu_memory_utilization: float = 0.4, dtype: str = "float32",
                 max_model_len: int | None = None):
        import vllm

        from trainers.model.pretrained import resolve_model_path

        model = resolve_model_path(model)  # a built-in pretrained name (smollm2-135m): its folder in the cache
        self._vllm = vllm
        self.llm = vllm.LLM(model=model, seed=seed, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, enforce_eager=True, worker_extension_cls=EXTENSION)
        self.tokenizer = self.llm.get_tokenizer()
        self.version = 0

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        sampling = self._vllm.SamplingParams(
            max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p, seed=params.seed,
            logprobs=0,  # the sampled token's own log-prob
        )
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        outputs = self.llm.generate(prompts, sampling_params=sampling, use_tqdm=False)
        tokens, texts, logprobs = [], [], []
        for output in outputs:
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            tokens.append(ids)
            texts.append(completion.text)
            logprobs.append([float(step[token].logprob) for step, token in zip(completion.logprobs, ids)])
        return RolloutBatch(prompt_ids=[list(p) for p in prompt_ids], token_ids=tokens, texts=texts,
                            logprobs=logprobs, policy_version=self.version, engine=self.name)

    def load_weights(self, state_dict: Mapping[str, Any], version: int) -> None:
        self.llm.collective_rpc("load_cpu_state_dict", args=(dict(state_dict),))
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self.version = version

    def receive_broadcast(self, metadata: list[tuple[str, str, tuple[int, ...]]], version: int) -> None:
        """Take part in the trainer's NCCL broadcast (see rollout.nccl_sync)."""
        self.llm.collective_rpc("receive_weights", args=(metadata,))
        self.llm.reset_prefix_cache()
        self.version = version

    def init_weight_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                          timeout_s: float) -> None:
        self.llm.collective_rpc("init_weight_update_group",
                                args=(master_address, master_port, rank_offset, world_size, timeout_s))

    def score(self, prompt_ids, response_ids) -> list[list[float]]:
        sampling = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0)
        prompts = [{"prompt_token_ids": list(p) + list(r)} for p, r in zip(prompt_ids, response_ids)]
        outputs = self.llm.generate(prompts, sampling_params=sampling, use_tqdm=False)
        scores = []
        for output, prompt, response in zip(outputs, prompt_ids, response_ids):
            steps = output.prompt_logprobs[len(prompt):]
            scores.append([float(step[token].logprob) for step, token in zip(steps, response)])
        return scores
