"""Generation with Hugging Face `generate`: the CPU engine (and the reference for a vLLM one).

Inputs and outputs are token ids, so what a caller scores is exactly what the model produced (no
decode/re-encode round trip). Prompts are left-padded, as batched decoder-only generation needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Generation:
    token_ids: list[list[int]]   # generated tokens per prompt, through EOS when it was produced
    texts: list[str]


def generate(model, tokenizer, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
             do_sample: bool = False, temperature: float = 1.0, batch_size: int = 16,
             seed: int | None = None) -> Generation:
    """Greedy (default) or sampled continuations of each prompt."""
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if seed is not None:
        torch.manual_seed(seed)
    outputs: list[list[int]] = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start:start + batch_size]
            width = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for i, ids in enumerate(chunk):
                input_ids[i, width - len(ids):] = torch.tensor(ids)
                attention_mask[i, width - len(ids):] = 1
            with torch.no_grad():
                generated = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens, do_sample=do_sample,
                    temperature=temperature if do_sample else None, top_k=None, top_p=None,
                    pad_token_id=pad_id, eos_token_id=eos_id,
                )
            for row in generated[:, width:].tolist():
                outputs.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
    return Generation(token_ids=outputs, texts=texts)
