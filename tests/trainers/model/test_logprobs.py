"""trainers.model.logprobs against an obviously correct per-row, per-position loop."""
from __future__ import annotations

import pytest
import torch

from trainers.model.logprobs import IGNORE_INDEX, aligned_sequence_logps, sequence_logps, token_logps


def slow_sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[int]]:
    """Per row: sum over t of log_softmax(logits[t])[labels[t + 1]] where labels[t + 1] is not ignored."""
    sums, counts = [], []
    for row in range(labels.shape[0]):
        total, count = 0.0, 0
        for t in range(labels.shape[1] - 1):
            target = int(labels[row, t + 1])
            if target != IGNORE_INDEX:
                total += torch.log_softmax(logits[row, t].double(), dim=-1)[target].item()
                count += 1
        sums.append(total)
        counts.append(count)
    return sums, counts


def test_token_logps_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 4
    ids = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits, dim=-1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(token_logps(logits, ids), expected)


def test_token_logps_upcasts_low_precision_and_keeps_float64():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 50) * 10
    ids = torch.randint(0, 50, (2, 4))
    half = token_logps(logits.bfloat16(), ids)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, token_logps(logits.bfloat16().float(), ids))
    assert token_logps(logits.double(), ids).dtype == torch.float64


def test_sequence_logps_masks_prompt_and_padding():
    torch.manual_seed(1)
    batch, length, vocab = 4, 9, 13
    logits = torch.randn(batch, length, vocab) * 3
    labels = torch.randint(0, vocab, (batch, length))
    labels[0, :3] = IGNORE_INDEX                  # prompt of 3
    labels[1, :5] = IGNORE_INDEX                  # prompt of 5 ...
    labels[1, 7:] = IGNORE_INDEX                  # ... and right padding
    labels[2, :1] = IGNORE_INDEX                  # everything after the first token is scored
    labels[3, :] = IGNORE_INDEX                   # nothing scored
    sums, means, counts = sequence_logps(logits, labels)
    expected_sums, expected_counts = slow_sequence_logps(logits, labels)
    torch.testing.assert_close(sums.double(), torch.tensor(expected_sums, dtype=torch.float64), rtol=0, atol=1e-5)
    assert counts.tolist() == expected_counts == [6, 2, 8, 0]
    assert means[3].item() == 0.0 and not torch.isnan(means).any()
    torch.testing.assert_close(means[:3], sums[:3] / counts[:3])


def test_first_label_is_never_scored():
    """With the causal shift, labels[:, 0] has no logits predicting it."""
    logits = torch.randn(1, 3, 7)
    labels = torch.tensor([[5, IGNORE_INDEX, IGNORE_INDEX]])
    sums, means, counts = sequence_logps(logits, labels)
    assert counts.item() == 0 and sums.item() == 0.0 and means.item() == 0.0


def test_all_rows_empty_and_minus_inf_logits_stay_finite():
    logits = torch.full((2, 4, 5), float("-inf"))
    logits[..., 0] = 0.0                          # a masked-vocabulary model: -inf on other ids
    labels = torch.full((2, 4), IGNORE_INDEX)
    labels[0, 2] = 0
    sums, means, counts = sequence_logps(logits, labels)
    assert counts.tolist() == [1, 0]
    assert torch.isfinite(sums).all() and torch.isfinite(means).all()


def test_aligned_version_is_the_unshifted_core():
    torch.manual_seed(2)
    logits = torch.randn(2, 6, 9)
    labels = torch.randint(0, 9, (2, 6))
    labels[:, :2] = IGNORE_INDEX
    shifted = sequence_logps(logits, labels)
    aligned = aligned_sequence_logps(logits[:, :-1], labels[:, 1:])
    for a, b in zip(shifted, aligned):
        torch.testing.assert_close(a, b)


def test_gradients_flow_only_through_scored_positions():
    logits = torch.randn(1, 4, 6, requires_grad=True)
    labels = torch.tensor([[1, IGNORE_INDEX, 2, 3]])
    sums, _, _ = sequence_logps(logits, labels)
    sums.sum().backward()
    assert logits.grad[0, 0].abs().sum() == 0     # predicts an ignored label
    assert logits.grad[0, 3].abs().sum() == 0     # last position predicts nothing
    assert logits.grad[0, 1].abs().sum() > 0 and logits.grad[0, 2].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_follows_logits(dtype):
    logits = torch.randn(2, 3, 4, dtype=dtype)
    labels = torch.tensor([[0, 1, 2], [0, IGNORE_INDEX, 3]])
    sums, means, counts = sequence_logps(logits, labels)
    assert sums.dtype == means.dtype == dtype and counts.dtype == torch.long
