"""Score many responses per prompt: log p(response_k | prompt_n) for every prompt n and category k.

Three ways to the same numbers, on token ids:
* `score_shared_prompt` (the one to use): encode each prompt once, keep its key/value cache, and
  score all K responses of the prompt in forwards that continue from that cache. Cost per prompt
  ~ P + K*R tokens instead of K*(P + R): with prompts 3x as long as responses and K = 7, about
  3x fewer tokens.
* `score_per_category`: one forward over [prompt + response_k] per category (the seed study's way).
* `score_concatenated`: all B*K [prompt + response_k] rows in one padded forward (TRL / reference DPO).
The latter two are baselines for tests and `benchmarks/probe_scoring.py`. All gather through
`trainers.model.logprobs`, so the numbers agree to rounding.
"""
from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from probes.diagnostics import ResponseDiagnostics, response_diagnostics
from trainers.data.collate import collate_sequences, pad_rows
from trainers.model.logprobs import IGNORE_INDEX, aligned_sequence_logps, sequence_logps

TokenRows = Sequence[Sequence[int]]


@dataclass
class ScoreResult:
    """Per (prompt n, category k): summed and per-token mean log p(response | prompt), and token count."""
    sums: np.ndarray    # [N, K] float64
    means: np.ndarray   # [N, K] float64; 0 where count is 0
    counts: np.ndarray  # [N, K] int64
    # with diagnostics=True (score_shared_prompt): [N, K] squeezing diagnostics and per-token log-probs
    argmax_logp: np.ndarray | None = None
    entropy: np.ndarray | None = None
    peak_gap: np.ndarray | None = None
    token_logps: list[list[np.ndarray]] | None = None


def _num_categories(prompt_ids: TokenRows, response_ids: Sequence[TokenRows]) -> int:
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but responses for {len(response_ids)}")
    sizes = {len(responses) for responses in response_ids}
    if len(sizes) > 1:
        raise ValueError(f"every prompt needs the same number of responses, got {sorted(sizes)}")
    for n, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:  # nothing would predict the first response token
            raise ValueError(f"prompt {n} is empty: give it at least one token (e.g. BOS)")
    return sizes.pop() if sizes else 0


def _batches(n: int, size: int) -> Iterator[range]:
    if size < 1:
        raise ValueError(f"prompts_per_batch must be >= 1, got {size}")
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


@contextmanager
def _scoring_mode(model) -> Iterator[torch.device]:
    """No dropout, no autograd; the caller's train/eval state is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _empty_result(n: int, k: int) -> ScoreResult:
    return ScoreResult(np.zeros((n, k)), np.zeros((n, k)), np.zeros((n, k), dtype=np.int64))


def _store(result: ScoreResult, rows: Sequence[int], cols: Sequence[int], scores: tuple[Tensor, Tensor, Tensor]) -> None:
    """result[rows[i], cols[i]] = scores[i] for the flat per-row scores of one forward."""
    sums, means, counts = (t.to("cpu", torch.float64 if t.is_floating_point() else torch.int64).numpy()
                           for t in scores)
    result.sums[rows, cols], result.means[rows, cols], result.counts[rows, cols] = sums, means, counts


def _store_diagnostics(result: ScoreResult, rows: Sequence[int], cols: Sequence[int], found: ResponseDiagnostics) -> None:
    if result.token_logps is None:
        n, k = result.sums.shape
        result.argmax_logp, result.entropy, result.peak_gap = np.zeros((n, k)), np.zeros((n, k)), np.zeros((n, k))
        result.token_logps = [[np.zeros(0, np.float32) for _ in range(k)] for _ in range(n)]
    for i, (row, col) in enumerate(zip(rows, cols)):
        result.argmax_logp[row, col] = float(found.argmax_logp[i])
        result.entropy[row, col] = float(found.entropy[i])
        result.peak_gap[row, col] = float(found.peak_gap[i])
        result.token_logps[row][col] = found.token_logps[i, : int(found.counts[i])].numpy()


def _even_chunks(items: list, max_size: int) -> list[list]:
    """Fewest chunks of at most `max_size` items, of near-equal size (56 rows, 32 -> 28 + 28)."""
    n_chunks = max(1, -(-len(items) // max_size))
    size = -(-len(items) // n_chunks)
    return [items[start: start + size] for start in range(0, len(items), size)]


def _accepts(model, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


def _encode_prompts(model, device: torch.device, prompts: TokenRows, pad_id: int):
    """Forward over LEFT-padded prompts [B, P]: (key/value cache, logits at the last position [B, V], mask [B, P]).

    Left padding puts every prompt's last token at position P-1, so only that position's logits are
    needed (they predict the first response token); position_ids = cumsum(mask) - 1 start each
    prompt at 0, which rotary models need to give the same numbers as an unpadded prompt.
    """
    tokens, mask = pad_rows(prompts, pad_id, left=True)
    last_logits_only = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=tokens.to(device), attention_mask=mask.to(device),
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=True, **last_logits_only)
    return out.past_key_values, out.logits[:, -1], mask


def _score_continuations(model, device, cache, first_logits: Tensor, prompt_mask: Tensor, prompt_index: Sequence[int],
                         responses: TokenRows, pad_id: int, diagnostics: bool = False
                         ) -> tuple[tuple[Tensor, Tensor, Tensor], ResponseDiagnostics | None]:
    """Score C responses, row c continuing prompt `prompt_index[c]` of an encoded batch.

    The cache rows are gathered [B, ...] -> [C, ...] (`batch_select_indices`: a repeat_interleave
    that also reorders), then one forward runs over the RIGHT-padded responses minus their last
    token [C, R-1] with attention mask [prompt mask, response mask] and positions continuing at each
    prompt's length. Logits [C, 1 + (R-1), V] (prompt's last position first) align with the
    response tokens [C, R]: the last token is never an input, since nothing after it is scored.
    The cache is consumed (grown in place). With `diagnostics`, also `probes.diagnostics` of the same logits.
    """
    index = torch.as_tensor(prompt_index, dtype=torch.long)
    targets, _ = pad_rows(responses, IGNORE_INDEX)                          # [C, R]
    inputs, response_mask = pad_rows([r[:-1] for r in responses], pad_id)   # [C, R-1]
    logits = first_logits[index.to(device)].unsqueeze(1)                # [C, 1, V]
    if inputs.shape[1] > 0:
        cache.batch_select_indices(index.to(device))
        out = model(
            input_ids=inputs.to(device),
            attention_mask=torch.cat([prompt_mask[index], response_mask], dim=1).to(device),
            position_ids=(prompt_mask.sum(-1)[index, None] + torch.arange(inputs.shape[1])).to(device),
            past_key_values=cache,
            use_cache=True,
        )
        logits = torch.cat([logits, out.logits], dim=1)
    logits, targets = logits[:, : targets.shape[1]], targets.to(device)
    return aligned_sequence_logps(logits, targets), (response_diagnostics(logits, targets) if diagnostics else None)


def score_shared_prompt(model, prompt_ids: TokenRows, response_ids: Sequence[TokenRows], *, pad_id: int,
                        prompts_per_batch: int = 8, rows_per_forward: int = 32, diagnostics: bool = False) -> ScoreResult:
    """log p(response_ids[n][k] | prompt_ids[n]) with each prompt encoded once.

    Per batch of B prompts (prompts sorted by length first, so a batch pads little):
    1. one forward over the left-padded prompts [B, P] keeps their key/value cache and the logits
       at the last position [B, V];
    2. the B*K responses, sorted by length, are scored in near-equal chunks of at most
       `rows_per_forward` rows, each one forward [C, R-1] continuing from a copy of the prompt
       cache (`_score_continuations`). Sorting keeps the padding of each chunk small; the chunk
       size trades that against per-forward overhead (32 suits a 2-core CPU; raise it on a GPU).
    Cost per prompt ~ P + K*R tokens instead of K*(P + R). An empty response scores sum 0, count 0.
    Works with any HF causal LM taking `past_key_values` and `position_ids` and returning a
    transformers Cache (`batch_select_indices`, deep-copyable), such as DynamicCache.
    `diagnostics=True` also fills the squeezing diagnostics and per-token log-probs of the result.
    """
    n_prompts, n_categories = len(prompt_ids), _num_categories(prompt_ids, response_ids)
    result = _empty_result(n_prompts, n_categories)
    if n_categories == 0:
        return result
    if rows_per_forward < 1:
        raise ValueError(f"rows_per_forward must be >= 1, got {rows_per_forward}")
    by_length = sorted(range(n_prompts), key=lambda n: len(prompt_ids[n]))
    with _scoring_mode(model) as device:
        for batch in _batches(n_prompts, prompts_per_batch):
            prompts = [by_length[i] for i in batch]
            cache, first_logits, prompt_mask = _encode_prompts(model, device, [prompt_ids[n] for n in prompts], pad_id)
            rows = sorted(((b, k) for b in range(len(prompts)) for k in range(n_categories)),
                          key=lambda row: len(response_ids[prompts[row[0]]][row[1]]))
            chunks = _even_chunks(rows, rows_per_forward)
            for i, chunk in enumerate(chunks):
                chunk_cache = cache if i == len(chunks) - 1 else copy.deepcopy(cache)
                scores, found = _score_continuations(
                    model, device, chunk_cache, first_logits, prompt_mask, [b for b, _ in chunk],
                    [response_ids[prompts[b]][k] for b, k in chunk], pad_id, diagnostics)
                _store(result, [prompts[b] for b, _ in chunk], [k for _, k in chunk], scores)
                if found is not None:
                    _store_diagnostics(result, [prompts[b] for b, _ in chunk], [k for _, k in chunk], found)
    return result


def _score_full_rows(model, device, prompts: TokenRows, responses: TokenRows, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """One forward over right-padded [prompt + response] rows; labels on the response tokens only."""
    batch = collate_sequences(prompts, responses, pad_id)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   use_cache=False).logits
    return sequence_logps(logits, batch["labels"].to(device))


def score_per_category(model, prompt_ids: TokenRows, response_ids: Sequence[TokenRows], *, pad_id: int,
                       prompts_per_batch: int = 8) -> ScoreResult:
    """Baseline (the seed study's way): per batch of B prompts, K forwards over [prompt + response_k] [B, P+R]."""
    n_prompts, n_categories = len(prompt_ids), _num_categories(prompt_ids, response_ids)
    result = _empty_result(n_prompts, n_categories)
    with _scoring_mode(model) as device:
        for batch in _batches(n_prompts, prompts_per_batch):
            prompts = [prompt_ids[n] for n in batch]
            for k in range(n_categories):
                scores = _score_full_rows(model, device, prompts, [response_ids[n][k] for n in batch], pad_id)
                _store(result, list(batch), [k] * len(batch), scores)
    return result


def score_concatenated(model, prompt_ids: TokenRows, response_ids: Sequence[TokenRows], *, pad_id: int,
                       prompts_per_batch: int = 8) -> ScoreResult:
    """Baseline (TRL / reference DPO code): per batch of B prompts, one forward over all B*K [prompt + response_k] rows."""
    n_prompts, n_categories = len(prompt_ids), _num_categories(prompt_ids, response_ids)
    result = _empty_result(n_prompts, n_categories)
    if n_categories == 0:
        return result
    with _scoring_mode(model) as device:
        for batch in _batches(n_prompts, prompts_per_batch):
            rows = [(n, k) for n in batch for k in range(n_categories)]
            scores = _score_full_rows(model, device, [prompt_ids[n] for n, _ in rows],
                                      [response_ids[n][k] for n, k in rows], pad_id)
            _store(result, [n for n, _ in rows], [k for _, k in rows], scores)
    return result
