"""Squeezing diagnostics against a slow, obvious re-implementation (python floats, one position at a time)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probes.diagnostics import response_diagnostics
from trainers.model.logprobs import IGNORE_INDEX


def slow_diagnostics(logits: list[list[list[float]]], targets: list[list[int]]):
    """Per row: (mean max log p, mean entropy, mean log p(target) - max log p, [log p(target)]) over scored positions."""
    out = []
    for row_logits, row_targets in zip(logits, targets):
        tops, entropies, gaps, owns = [], [], [], []
        for z, target in zip(row_logits, row_targets):
            if target == IGNORE_INDEX:
                continue
            norm = math.log(sum(math.exp(v) for v in z))
            logp = [v - norm for v in z]
            tops.append(max(logp))
            entropies.append(-sum(math.exp(lp) * lp for lp in logp))
            owns.append(logp[target])
            gaps.append(logp[target] - max(logp))
        mean = (lambda xs: sum(xs) / len(xs)) if owns else (lambda xs: 0.0)
        out.append((mean(tops), mean(entropies), mean(gaps), owns))
    return out


def test_hand_made_cases_have_the_known_values():
    # row 0: uniform over 4 tokens -> argmax log p = -log 4, entropy = log 4, gap 0 for any target
    # row 1: a peaked position whose target IS the argmax (gap 0), then a padded position
    # row 2: nothing scored -> zeros
    big = 50.0
    logits = torch.tensor([
        [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]],
        [[big, 0.0, 0.0, 0.0], [3.0, 2.0, 1.0, 0.0]],
        [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]],
    ])
    targets = torch.tensor([[2, 3], [0, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX]])
    result = response_diagnostics(logits, targets)
    assert result.argmax_logp.tolist() == pytest.approx([-math.log(4), 0.0, 0.0], abs=1e-6)
    assert result.entropy.tolist() == pytest.approx([math.log(4), 0.0, 0.0], abs=1e-6)
    assert result.peak_gap.tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    assert result.counts.tolist() == [2, 1, 0]
    assert result.token_logps[0].tolist() == pytest.approx([-math.log(4)] * 2, abs=1e-6)
    assert result.token_logps[2].tolist() == [0.0, 0.0]


def test_squeezed_response_has_a_negative_gap():
    """The mass sits on token 0; the response says token 3: gap = log p(3) - log p(0) = -(z0 - z3)."""
    logits = torch.tensor([[[5.0, 1.0, 0.0, -2.0]]])
    result = response_diagnostics(logits, torch.tensor([[3]]))
    assert result.peak_gap.item() == pytest.approx(-7.0, abs=1e-6)
    assert result.argmax_logp.item() < 0 and result.entropy.item() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_random_logits_match_the_slow_version(dtype):
    generator = torch.Generator().manual_seed(0)
    rows, width, vocab = 5, 7, 11
    logits = (torch.randn(rows, width, vocab, generator=generator) * 3).to(dtype)
    targets = torch.randint(0, vocab, (rows, width), generator=generator)
    lengths = [7, 3, 0, 1, 5]
    for c, n in enumerate(lengths):
        targets[c, n:] = IGNORE_INDEX
    result = response_diagnostics(logits, targets)
    expected = slow_diagnostics(logits.double().tolist(), targets.tolist())
    atol = 1e-5 if dtype != torch.bfloat16 else 1e-4  # bf16 logits are exact values once upcast
    for c, (top, entropy, gap, owns) in enumerate(expected):
        assert result.argmax_logp[c].item() == pytest.approx(top, abs=atol)
        assert result.entropy[c].item() == pytest.approx(entropy, abs=atol)
        assert result.peak_gap[c].item() == pytest.approx(gap, abs=atol)
        np.testing.assert_allclose(result.token_logps[c, : lengths[c]].numpy(), owns, atol=atol)
        assert not result.token_logps[c, lengths[c]:].any()
    assert result.counts.tolist() == lengths


def test_misaligned_shapes_are_refused():
    with pytest.raises(ValueError, match="do not align"):
        response_diagnostics(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
