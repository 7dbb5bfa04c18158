"""Scoring the probe set with the current policy: every category of a prompt in one shared pass.

Plain functions over a model and token ids; the Ray Train loop only decides which prompts a rank
scores and gathers the records.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from probes.probe_set import ProbeSet
from probes.scoring import score_shared_prompt
from rollout.hf_engine import generate
from trainers.collate import encode_prompt, encode_response


@dataclass(frozen=True)
class TokenizedProbes:
    """The static probe categories as token ids, encoded once per run with the training policy."""
    categories: tuple[str, ...]
    prompt_ids: list[list[int]]                 # per prompt_id
    response_ids: dict[str, list[list[int]]]    # category -> per prompt_id


def tokenize_probe_set(probe_set: ProbeSet, tokenizer, max_prompt_tokens: int, max_response_tokens: int) -> TokenizedProbes:
    prompts = [encode_prompt(tokenizer, text, max_prompt_tokens)[0] for text in probe_set.prompts]
    responses = {
        category: [encode_response(tokenizer, text, max_response_tokens)[0] for text in probe_set.responses[category]]
        for category in probe_set.categories
    }
    return TokenizedProbes(tuple(probe_set.categories), prompts, responses)


def evaluate_probes(model, tokenizer, probes: TokenizedProbes, prompt_ids: Sequence[int], *,
                    greedy_max_tokens: int, prompts_per_batch: int = 8) -> list[dict]:
    """One record per (prompt, category), `greedy` included: the policy's own decode, made now."""
    if not prompt_ids:
        return []
    prompts = [probes.prompt_ids[i] for i in prompt_ids]
    greedy = generate(model, tokenizer, prompts, max_new_tokens=greedy_max_tokens)
    categories = probes.categories + ("greedy",)
    responses = [
        [probes.response_ids[c][i] for c in probes.categories] + [greedy.token_ids[j]]
        for j, i in enumerate(prompt_ids)
    ]
    scores = score_shared_prompt(model, prompts, responses, pad_id=tokenizer.pad_token_id,
                                 prompts_per_batch=prompts_per_batch)
    records = []
    for j, prompt_id in enumerate(prompt_ids):
        for k, category in enumerate(categories):
            records.append({
                "prompt_id": int(prompt_id), "category": category,
                "logp_sum": float(scores.sums[j, k]), "logp_mean": float(scores.means[j, k]),
                "num_tokens": int(scores.counts[j, k]),
                "response": greedy.texts[j] if category == "greedy" else "",
            })
    return records


def summarize_records(records: Sequence[dict]) -> dict[str, float]:
    """`logp/<category>`: mean over prompts of the summed log-prob; `logp_tok/<category>`: of the per-token mean."""
    summary: dict[str, float] = {}
    for category in sorted({r["category"] for r in records}):
        rows = [r for r in records if r["category"] == category]
        summary[f"logp/{category}"] = float(np.mean([r["logp_sum"] for r in rows]))
        summary[f"logp_tok/{category}"] = float(np.mean([r["logp_mean"] for r in rows]))
    return summary
