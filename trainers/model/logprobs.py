"""The one place that turns logits into per-token and per-sequence log-probabilities.

Training (SFT, DPO policy and reference passes) and probe scoring all go through these functions,
so masking, shifting and precision are decided once.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from trainers.data.collate import IGNORE_INDEX  # the collator writes it; the math skips it


def token_logps(logits: Tensor, token_ids: Tensor) -> Tensor:
    """log softmax(logits)[token_id] at every position: [..., V], [...] -> [...].

    Computed as `logits[id] - logsumexp(logits)` rather than `log_softmax(logits).gather(...)`: the
    autograd graph then keeps no second [..., V] tensor. The math runs in at least float32 (float64
    stays float64); half-precision logits are upcast one leading slice at a time, so there is never
    a float32 copy of all logits. `token_ids` must be valid ids (no IGNORE_INDEX).
    Naive equivalent: `torch.log_softmax(logits.float(), -1).gather(-1, token_ids[..., None])[..., 0]`.
    """
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    picked = torch.gather(logits, -1, token_ids.unsqueeze(-1)).squeeze(-1).to(compute_dtype)
    if logits.dtype == compute_dtype or logits.dim() < 2 or logits.shape[0] == 0:
        normalizer = torch.logsumexp(logits.to(compute_dtype), dim=-1)
    else:
        normalizer = torch.stack([torch.logsumexp(part.to(compute_dtype), dim=-1) for part in logits])
    return picked - normalizer


def _accumulation_dtype(values: Tensor) -> torch.dtype:
    return values.dtype if values.device.type == "mps" else torch.float64  # MPS has no float64


def aligned_sequence_logps(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row sums, means and counts of log p(target) where `logits[:, t]` predicts `targets[:, t]`.

    logits [B, T, V], targets [B, T] with IGNORE_INDEX where nothing is scored.
    Returns sums [B] (float), means [B] = sums / counts (0 for a row with no scored token, not NaN),
    counts [B] (long).
    """
    scored = targets != IGNORE_INDEX
    per_token = token_logps(logits, targets.masked_fill(~scored, 0))
    per_token = torch.where(scored, per_token, torch.zeros_like(per_token))  # where, not *: -inf * 0 is NaN
    # accumulate in float64: a float32 running sum of ~100 tokens at -8 nats each drifts by ~1e-5
    sums = per_token.sum(dim=-1, dtype=_accumulation_dtype(per_token)).to(per_token.dtype)
    counts = scored.sum(dim=-1)
    means = sums / counts.clamp(min=1).to(sums.dtype)
    return sums, means, counts


def sequence_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Summed and mean log p(labelled tokens) per sequence, from a causal LM's logits.

    logits [B, T, V] over input ids [B, T]; labels [B, T] = the input ids with IGNORE_INDEX on prompt
    and padding. Causal shift: logits[:, t] predict labels[:, t + 1], so labels[:, 0] is never scored.
    Returns (sums [B], means [B], counts [B]) over the unmasked tokens; a row with no token has mean 0.
    """
    return aligned_sequence_logps(logits[:, :-1], labels[:, 1:])


def gather_response_positions(per_position: Tensor, labels: Tensor, response_lengths: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Left-align what each position says about the response token it predicts: ([B, R], mask [B, R]).

    `per_position` [B, T-1] is indexed like `logits[:, :-1]` (position t predicts token t + 1), e.g.
    per-token log-probs or a value head's outputs; `labels` [B, T] label exactly the response tokens
    of right-padded prompt+response rows (`trainers.data.collate.collate_sequences`). R = longest response.
    PPO works on these [B, R] tensors: ratios, KL, values and advantages per generated token."""
    scored = labels[:, 1:] != IGNORE_INDEX
    counts = scored.sum(-1)
    lengths = torch.as_tensor(list(response_lengths), device=labels.device)
    if not torch.equal(counts, lengths):
        bad = int((counts != lengths).nonzero()[0])
        raise ValueError(f"row {bad}: {int(counts[bad])} labelled tokens, expected a response of {int(lengths[bad])}")
    width = int(lengths.max()) if len(lengths) else 0
    start = scored.to(torch.int64).argmax(-1)  # the first labelled position of each row
    offsets = torch.arange(width, device=labels.device)
    mask = offsets[None, :] < lengths[:, None]
    index = (start[:, None] + offsets[None, :]).clamp(max=per_position.shape[1] - 1)
    values = torch.gather(per_position, 1, index)
    return torch.where(mask, values, torch.zeros_like(values)), mask


def response_token_logps(logits: Tensor, labels: Tensor, response_lengths: Sequence[int]) -> tuple[Tensor, Tensor]:
    """log p of each response token, left-aligned: ([B, R] values, [B, R] mask), R = longest response."""
    shifted_labels = labels[:, 1:]
    per_token = token_logps(logits[:, :-1], shifted_labels.masked_fill(shifted_labels == IGNORE_INDEX, 0))
    return gather_response_positions(per_token, labels, response_lengths)


def score_responses(model, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                    pad_id: int) -> list[list[float]]:
    """log p of each response token after its prompt, one padded forward pass, as plain lists: how an HF
    rollout engine answers `score()` and how the trainer scores what a rollout engine scored."""
    from trainers.data.collate import collate_sequences

    batch = collate_sequences(prompt_ids, response_ids, pad_id)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    values, _ = response_token_logps(logits, batch["labels"].to(device), [len(r) for r in response_ids])
    return [values[i, : len(r)].tolist() for i, r in enumerate(response_ids)]
