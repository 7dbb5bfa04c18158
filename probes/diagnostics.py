"""Squeezing diagnostics at a response's positions (Ren & Sutherland, "Learning Dynamics of LLM Finetuning").

A category's log-prob can fall for two different reasons: the model spreads its mass (entropy
rises), or it concentrates the mass on some other token (the argmax's log-prob rises towards 0
while the response token's falls: the "squeezing effect" of DPO). These three numbers per
response tell the two apart:
* `argmax_logp`: mean over positions of max_v log p(v | prefix)  (0 = the model is certain);
* `entropy`: mean over positions of the entropy of the next-token distribution (nats);
* `peak_gap`: mean over positions of log p(response token) - max_v log p(v)  (<= 0; 0 = the
  response is the greedy continuation at every position).
The per-token log-probs come along, for the per-token Δ views.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from trainers.model.logprobs import IGNORE_INDEX


@dataclass
class ResponseDiagnostics:
    """Per row c of C responses; rows without a scored token have 0 everywhere (like the log-prob means)."""
    argmax_logp: Tensor   # [C] float64
    entropy: Tensor       # [C] float64
    peak_gap: Tensor      # [C] float64
    token_logps: Tensor   # [C, R] float32, log p of each response token; 0 where targets are IGNORE_INDEX
    counts: Tensor        # [C] int64


def response_diagnostics(logits: Tensor, targets: Tensor) -> ResponseDiagnostics:
    """From logits [C, R, V] where `logits[:, t]` predicts `targets[:, t]` (IGNORE_INDEX = not scored).

    One row at a time, in at least float32, so only one [R, V] log-softmax exists at once (a
    49k-token vocabulary times 32 rows would otherwise hold hundreds of MB).
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not align with targets {tuple(targets.shape)}")
    compute = torch.promote_types(logits.dtype, torch.float32)
    rows, width = targets.shape
    stats = torch.zeros((3, rows), dtype=torch.float64)
    token_logps = torch.zeros((rows, width), dtype=torch.float32)
    counts = (targets != IGNORE_INDEX).sum(-1).cpu().to(torch.int64)
    with torch.no_grad():
        for c in range(rows):
            scored = targets[c] != IGNORE_INDEX
            if not bool(scored.any()):
                continue
            logp = torch.log_softmax(logits[c][scored].to(compute), dim=-1)        # [n, V]
            top = logp.max(dim=-1).values                                           # [n]
            own = logp.gather(-1, targets[c][scored].unsqueeze(-1)).squeeze(-1)     # [n]
            entropy = -(logp.exp() * logp).nansum(dim=-1)                          # 0 * -inf terms count 0
            stats[:, c] = torch.stack([top.mean(), entropy.mean(), (own - top).mean()]).to("cpu", torch.float64)
            token_logps[c, scored.cpu()] = own.to("cpu", torch.float32)
    return ResponseDiagnostics(stats[0], stats[1], stats[2], token_logps, counts)


def peak_of(curve: Sequence[tuple[int, float]]) -> tuple[int, float]:
    """(step, value) of a curve's highest point; the earliest step on ties (when did it stop rising)."""
    if not curve:
        raise ValueError("an empty curve has no peak")
    best_step, best = curve[0]
    for step, value in curve[1:]:
        if value > best:
            best_step, best = step, value
    return int(best_step), float(best)


def fall_from_peak(curve: Sequence[tuple[int, float]]) -> float:
    """How far the last point lies below the highest so far (>= 0): the squeezing of a category."""
    return peak_of(curve)[1] - float(curve[-1][1])
