"""Generation with Hugging Face `generate`: the CPU engine (and the reference for a vLLM one).

Inputs and outputs are token ids, so what a caller scores is exactly what the model produced (no
decode/re-encode round trip). Prompts are left-padded, as batched decoder-only generation needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rollout.interface import RolloutBatch, SamplingParams, tensors_checksum
from trainers.data.collate import pad_rows


@dataclass
class Generation:
    token_ids: list[list[int]]   # generated tokens per prompt, through EOS when it was produced
    texts: list[str]
    logprobs: list[list[float]] | None = None  # with_logprobs: log p of each token from the raw logits (temperature 1)


def generate(model, tokenizer, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 16,
             seed: int | None = None, seed_every_batch: bool = False, with_logprobs: bool = False) -> Generation:
    """Greedy (default) or sampled continuations of each prompt, in left-padded batches: the one
    generate loop (probe decodes, the local probe writer and HFEngine all come through here).

    `seed` seeds torch before the first batch, or with `seed_every_batch` before each batch as
    seed + the batch's first prompt index (what HFEngine does, so a request's numbers do not depend on
    what ran before it in the same process)."""
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = []
    logprobs: list[list[float]] = []
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {"temperature": None, "top_p": None}
    extra = {"output_logits": True, "return_dict_in_generate": True} if with_logprobs else {}
    try:
        for start in range(0, len(prompt_ids), batch_size):
            input_ids, attention_mask = pad_rows(prompt_ids[start:start + batch_size], pad_id, left=True)
            width = input_ids.shape[1]
            if seed is not None and (seed_every_batch or start == 0):
                torch.manual_seed(seed + start)
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens, do_sample=do_sample, top_k=None,
                    pad_token_id=pad_id, eos_token_id=eos_id, **sampling, **extra,
                )
            new = (out.sequences if with_logprobs else out)[:, width:]
            lengths = [row.index(eos_id) + 1 if eos_id in row else len(row) for row in new.tolist()]
            outputs.extend(row[:length] for row, length in zip(new.tolist(), lengths))
            if with_logprobs:
                step_logps = torch.stack([torch.log_softmax(step.float(), -1) for step in out.logits], dim=1)
                picked = step_logps.gather(-1, new[:, : step_logps.shape[1], None]).squeeze(-1)
                logprobs.extend(row[:length] for row, length in zip(picked.tolist(), lengths))
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
    return Generation(token_ids=outputs, texts=texts, logprobs=logprobs if with_logprobs else None)


class HFEngine:
    """The `GenerationEngine` on transformers: batched, left-padded `generate` on CPU or GPU.

    Sampling log-probs come from the raw logits (`output_logits`), log-softmaxed at temperature 1,
    which is what the trainer recomputes; temperature and top-p only shape what is sampled."""

    name = "hf"

    def __init__(self, model, tokenizer, *, batch_size: int = 16, device: str | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        if device:
            self.model.to(device)
        self.model.eval()
        self.version = 0

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, seed: int = 0, device: str | None = None, **kwargs) -> "HFEngine":
        from trainers.model.factory import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(name_or_path, seed=seed)
        return cls(model, tokenizer, device=device, **kwargs)

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        out = generate(self.model, self.tokenizer, prompt_ids, max_new_tokens=params.max_new_tokens,
                       do_sample=not params.greedy, temperature=params.temperature, top_p=params.top_p,
                       batch_size=self.batch_size, seed=params.seed, seed_every_batch=True, with_logprobs=True)
        return RolloutBatch(prompt_ids=[list(p) for p in prompt_ids], token_ids=out.token_ids, texts=out.texts,
                            logprobs=out.logprobs, policy_version=self.version, engine=self.name)

    def load_weights(self, state_dict, version: int) -> None:
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.endswith("masked_bias")]
        if missing or unexpected:
            raise ValueError(f"weights do not fit the rollout model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self._received = (len(state_dict), tensors_checksum(state_dict.values()))
        self.version = version

    def received(self) -> tuple[int, float] | None:
        """(tensors, float64 sum) of the last state dict loaded; None before any."""
        return getattr(self, "_received", None)

    def score(self, prompt_ids, response_ids) -> list[list[float]]:
        from trainers.model.logprobs import score_responses

        return score_responses(self.model, prompt_ids, response_ids, self.tokenizer.pad_token_id)
