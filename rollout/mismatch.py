"""Engine-trainer mismatch on a fixed set of responses: after a weight sync, the rollout engine and
the trainer score the same tokens; the gap shows how far the engine's sampling distribution is
from the policy being trained (kernels, precision, or a sync that did not land)."""
from __future__ import annotations

from typing import Sequence

import torch

RATIO_BAND = (0.9, 1.1)


def probe_mismatch(engine_logps: Sequence[Sequence[float]], trainer_logps: Sequence[Sequence[float]],
                   prefix: str = "rollout/probe_mismatch") -> dict[str, float]:
    """Per-token |Δ log p| over all responses: mean, p95 and max, and the fraction of tokens whose
    probability ratio exp(Δ) falls outside RATIO_BAND. Responses must have matching lengths."""
    if len(engine_logps) != len(trainer_logps):
        raise ValueError(f"{len(engine_logps)} engine responses vs {len(trainer_logps)} trainer responses")
    for index, (a, b) in enumerate(zip(engine_logps, trainer_logps)):
        if len(a) != len(b):
            raise ValueError(f"response {index}: {len(a)} engine tokens vs {len(b)} trainer tokens")
    delta = torch.tensor([x - y for a, b in zip(engine_logps, trainer_logps) for x, y in zip(a, b)],
                         dtype=torch.float64)
    if delta.numel() == 0:
        raise ValueError("no tokens to compare")
    gap = delta.abs()
    ratio = delta.exp()
    low, high = RATIO_BAND
    return {f"{prefix}_mean": float(gap.mean()), f"{prefix}_p95": float(torch.quantile(gap, 0.95)),
            f"{prefix}_max": float(gap.max()),
            f"{prefix}_outside_ratio_band": float(((ratio < low) | (ratio > high)).double().mean())}
