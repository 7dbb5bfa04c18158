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
from trainers.data.collate import encode_prompt, encode_response


@dataclass(frozen=True)
class TokenizedProbes:
    """The static probe categories as token ids, encoded once per run with the training policy."""
    categories: tuple[str, ...]
    prompt_ids: list[list[int]]                 # per prompt_id
    response_ids: dict[str, list[list[int]]]    # category -> per prompt_id


class ProbeSetMismatch(RuntimeError):
    """The probe set a worker found is not the one its run recorded."""


def check_probe_set(directory, expected_hash: str | None) -> None:
    """Fail loudly when the probe set at `directory` is not the one the run recorded (`expected_hash`,
    the sweep's probe_set_hash): a set replaced after the sweep started (another sweep's --overwrite, a
    stale node cache) would make this trial's curves incomparable with its siblings'."""
    if not directory or not expected_hash:
        return
    found = ProbeSet.load(directory).content_hash()
    if found != expected_hash:
        raise ProbeSetMismatch(f"probe set {directory} has content hash {found}, but this run recorded {expected_hash}: "
                               "it was replaced after the sweep started; rerun the sweep (or --resume it with the "
                               "original probe set back in place)")


def tokenize_probe_set(probe_set: ProbeSet, tokenizer, max_prompt_tokens: int, max_response_tokens: int) -> TokenizedProbes:
    prompts = [encode_prompt(tokenizer, text, max_prompt_tokens)[0] for text in probe_set.prompts]
    responses = {
        category: [encode_response(tokenizer, text, max_response_tokens)[0] for text in probe_set.responses[category]]
        for category in probe_set.categories
    }
    return TokenizedProbes(tuple(probe_set.categories), prompts, responses)


def policy_decodes(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   sample_seed: int) -> dict[str, tuple[list[list[int]], list[str]]]:
    """The dynamic categories made in-process: `greedy`, and `sample` (temperature 1, seeded so a
    resumed or repeated run draws the same samples). Trainers with rollout actors pass theirs instead."""
    greedy = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    sample = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=True, seed=sample_seed)
    return {"greedy": (greedy.token_ids, greedy.texts), "sample": (sample.token_ids, sample.texts)}


def evaluate_probes(model, tokenizer, probes: TokenizedProbes, prompt_ids: Sequence[int], *,
                    greedy_max_tokens: int, prompts_per_batch: int = 8, sample_seed: int = 0,
                    decodes: dict[str, tuple[list[list[int]], list[str]]] | None = None) -> list[dict]:
    """One record per (prompt, category), the dynamic ones included (`decodes`: category -> the
    policy's token ids and texts per prompt, made now; default: greedy and sample in-process)."""
    if not prompt_ids:
        return []
    prompts = [probes.prompt_ids[i] for i in prompt_ids]
    if decodes is None:
        decodes = policy_decodes(model, tokenizer, prompts, max_new_tokens=greedy_max_tokens, sample_seed=sample_seed)
    dynamic = tuple(decodes)
    categories = probes.categories + dynamic
    responses = [
        [probes.response_ids[c][i] for c in probes.categories] + [decodes[c][0][j] for c in dynamic]
        for j, i in enumerate(prompt_ids)
    ]
    scores = score_shared_prompt(model, prompts, responses, pad_id=tokenizer.pad_token_id,
                                 prompts_per_batch=prompts_per_batch, diagnostics=True)
    records = []
    for j, prompt_id in enumerate(prompt_ids):
        for k, category in enumerate(categories):
            records.append({
                "prompt_id": int(prompt_id), "category": category,
                "logp_sum": float(scores.sums[j, k]), "logp_mean": float(scores.means[j, k]),
                "num_tokens": int(scores.counts[j, k]),
                "response": decodes[category][1][j] if category in decodes else "",
                "argmax_logp": float(scores.argmax_logp[j, k]), "entropy": float(scores.entropy[j, k]),
                "peak_gap": float(scores.peak_gap[j, k]),
                # per-token values for probes.token_views; split off into an npz artifact before the CSV
                "token_ids": [int(t) for t in responses[j][k]],
                "token_texts": tokenizer.batch_decode([[t] for t in responses[j][k]]),
                "token_logps": [float(v) for v in scores.token_logps[j][k]],
            })
    return records


def summarize_records(records: Sequence[dict]) -> dict[str, float]:
    """`logp/<category>`: mean over prompts of the summed log-prob; `logp_tok/<category>`: of the per-token mean;
    `argmax_logp/`, `entropy/`, `peak_gap/<category>`: means of the squeezing diagnostics, where records have them."""
    summary: dict[str, float] = {}
    for category in sorted({r["category"] for r in records}):
        rows = [r for r in records if r["category"] == category]
        summary[f"logp/{category}"] = float(np.mean([r["logp_sum"] for r in rows]))
        summary[f"logp_tok/{category}"] = float(np.mean([r["logp_mean"] for r in rows]))
        for name in ("argmax_logp", "entropy", "peak_gap"):
            if all(name in r for r in rows):
                summary[f"{name}/{category}"] = float(np.mean([r[name] for r in rows]))
    return summary
