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


def test_shared_prompt_scoring_fills_the_same_diagnostics_as_one_full_forward_per_row():
    """score_shared_prompt(diagnostics=True) against an unpadded forward over [prompt + response] per row;
    the log-prob sums are identical with and without the diagnostics."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from probes.scoring import score_shared_prompt

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)).eval()
    generator = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(1, 64, (n,), generator=generator).tolist()  # noqa: E731
    prompts = [rand(3), rand(6), rand(1)]
    responses = [[rand(4), rand(0), rand(2)], [rand(5), rand(1), rand(3)], [rand(2), rand(6), rand(1)]]
    plain = score_shared_prompt(model, prompts, responses, pad_id=0, rows_per_forward=4)
    result = score_shared_prompt(model, prompts, responses, pad_id=0, rows_per_forward=4, diagnostics=True)
    np.testing.assert_array_equal(plain.sums, result.sums)
    assert plain.token_logps is None
    with torch.no_grad():
        for n, prompt in enumerate(prompts):
            for k, response in enumerate(responses[n]):
                if not response:
                    assert result.counts[n, k] == 0 and result.token_logps[n][k].size == 0
                    continue
                logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1: -1]
                [(top, entropy, gap, owns)] = slow_diagnostics([logits.double().tolist()], [response])
                assert result.argmax_logp[n, k] == pytest.approx(top, abs=1e-4)
                assert result.entropy[n, k] == pytest.approx(entropy, abs=1e-4)
                assert result.peak_gap[n, k] == pytest.approx(gap, abs=1e-4)
                np.testing.assert_allclose(result.token_logps[n][k], owns, atol=1e-4)
                assert result.token_logps[n][k].sum() == pytest.approx(result.sums[n, k], abs=1e-4)


def test_peak_of_a_curve_and_the_fall_from_it():
    from probes.diagnostics import fall_from_peak, peak_of

    curve = [(0, -40.0), (10, -35.5), (20, -33.0), (30, -33.0), (40, -38.0)]
    assert peak_of(curve) == (20, -33.0)  # the earliest of equal highs
    assert fall_from_peak(curve) == pytest.approx(5.0)
    assert peak_of([(5, 1.0)]) == (5, 1.0) and fall_from_peak([(5, 1.0)]) == 0.0
    assert peak_of([(0, -1.0), (1, -2.0), (2, -3.0)]) == (0, -1.0)  # falling from the start: peak at step 0
    with pytest.raises(ValueError):
        peak_of([])
