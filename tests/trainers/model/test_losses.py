"""Losses against hand-computed values (math.log / math.exp), edge cases and the registry."""
from __future__ import annotations

import math

import pytest
import torch

from trainers.model.losses import (
    PREFERENCE_LOSSES,
    PreferenceLossOutput,
    dpo_loss,
    ipo_loss,
    preference_loss,
    reward_metrics,
    sft_loss,
)


def logps(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# policy_chosen, policy_rejected, ref_chosen, ref_rejected: h = (pc - rc) - (pr - rr)
PC, PR, RC, RR = logps(-10.0, -8.0), logps(-12.0, -7.0), logps(-11.0, -8.0), logps(-11.0, -8.0)
H = [(-10.0 + 11.0) - (-12.0 + 11.0), (-8.0 + 8.0) - (-7.0 + 8.0)]  # [2.0, -1.0]


def test_sft_loss_is_token_level_mean_nll():
    sums, counts = logps(-6.0, -2.0), torch.tensor([3, 1])
    assert sft_loss(sums, counts).item() == pytest.approx(8.0 / 4.0)
    assert sft_loss(logps(0.0), torch.tensor([0])).item() == 0.0


def test_dpo_is_log2_when_policy_equals_reference():
    out = dpo_loss(PC, PR, PC, PR, beta=0.1)
    torch.testing.assert_close(out.losses, torch.full((2,), math.log(2), dtype=torch.float64))
    assert out.chosen_rewards.abs().max() == 0 and out.rejected_rewards.abs().max() == 0


def test_dpo_hand_computed():
    beta = 0.5
    out = dpo_loss(PC, PR, RC, RR, beta=beta)
    expected = [-log_sigmoid(beta * h) for h in H]          # -log sigma(1.0), -log sigma(-0.5)
    assert out.losses.tolist() == pytest.approx(expected)
    assert out.losses[0].item() == pytest.approx(math.log(1 + math.exp(-1.0)))
    assert out.chosen_rewards.tolist() == pytest.approx([beta * 1.0, 0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([beta * -1.0, beta * 1.0])


def test_cdpo_hand_computed_and_zero_smoothing_is_dpo():
    beta, eps = 0.5, 0.2
    out = dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=eps)
    expected = [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in H]
    assert out.losses.tolist() == pytest.approx(expected)
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=0.0).losses,
                               dpo_loss(PC, PR, RC, RR, beta=beta).losses)


def test_ipo_formula():
    beta = 0.25
    out = ipo_loss(PC, PR, RC, RR, beta=beta)
    assert out.losses.tolist() == pytest.approx([(h - 1 / (2 * beta)) ** 2 for h in H])  # (2-2)^2, (-1-2)^2
    assert out.losses.tolist() == pytest.approx([0.0, 9.0])


@pytest.mark.parametrize("beta", [1e-8, 1e4])
def test_extreme_beta_stays_finite(beta):
    big = logps(-1000.0, 0.0)
    for out in (dpo_loss(big, -big, -big, big, beta=beta), dpo_loss(-big, big, big, -big, beta=beta, label_smoothing=0.1),
                ipo_loss(big, -big, -big, big, beta=beta)):
        assert torch.isfinite(out.losses).all()


def test_tiny_beta_dpo_tends_to_log2():
    assert dpo_loss(PC, PR, RC, RR, beta=1e-9).losses.tolist() == pytest.approx([math.log(2)] * 2)


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_beta_must_be_positive(beta):
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PC, PR, RC, RR, beta=beta)
    with pytest.raises(ValueError, match="beta"):
        ipo_loss(PC, PR, RC, RR, beta=beta)


@pytest.mark.parametrize("eps", [-0.01, 0.5, 0.9])
def test_label_smoothing_range(eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=eps)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(PC, PR, RC, logps(-1.0), beta=0.1)


def test_reward_metrics_with_ties():
    chosen, rejected = torch.tensor([1.0, 0.5, 2.0, -1.0]), torch.tensor([0.0, 0.5, 3.0, -2.0])
    metrics = reward_metrics(chosen, rejected)
    assert metrics == pytest.approx({
        "reward_margin": (1.0 + 0.0 - 1.0 + 1.0) / 4,
        "reward_accuracy": 2 / 4,                        # the tie counts as a miss
        "reward_chosen": 2.5 / 4,
        "reward_rejected": 1.5 / 4,
    })
    assert reward_metrics(torch.zeros(3), torch.zeros(3))["reward_accuracy"] == 0.0


@pytest.mark.parametrize("name", ["dpo", "cdpo", "ipo"])
def test_gradient_raises_chosen_and_lowers_rejected(name):
    policy_chosen = logps(-10.0, -5.0).requires_grad_()
    policy_rejected = logps(-9.0, -6.0).requires_grad_()
    out = preference_loss(name, beta=0.1, policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                          ref_chosen=logps(-10.0, -5.0), ref_rejected=logps(-9.0, -6.0))
    out.losses.sum().backward()
    assert (policy_chosen.grad < 0).all()      # gradient descent increases log p(chosen)
    assert (policy_rejected.grad > 0).all()    # ... and decreases log p(rejected)


def test_rewards_are_detached():
    out = dpo_loss(PC.clone().requires_grad_(), PR, RC, RR, beta=0.1)
    assert not out.chosen_rewards.requires_grad and out.losses.requires_grad


def test_registry_dispatch():
    assert set(PREFERENCE_LOSSES) == {"dpo", "cdpo", "ipo"}
    kwargs = dict(policy_chosen=PC, policy_rejected=PR, ref_chosen=RC, ref_rejected=RR)
    out = preference_loss("dpo", beta=0.5, **kwargs)
    assert isinstance(out, PreferenceLossOutput)
    torch.testing.assert_close(out.losses, dpo_loss(PC, PR, RC, RR, beta=0.5).losses)
    # cdpo: eps defaults to 0.1, a given eps overrides it, eps = 0 is plain DPO
    torch.testing.assert_close(preference_loss("cdpo", beta=0.5, **kwargs).losses,
                               dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1).losses)
    torch.testing.assert_close(preference_loss("cdpo", beta=0.5, label_smoothing=0.3, **kwargs).losses,
                               dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.3).losses)
    torch.testing.assert_close(preference_loss("cdpo", beta=0.5, label_smoothing=0.0, **kwargs).losses, out.losses)
    torch.testing.assert_close(preference_loss("ipo", beta=0.5, label_smoothing=0.0, **kwargs).losses,
                               ipo_loss(PC, PR, RC, RR, beta=0.5).losses)


def test_registry_errors():
    kwargs = dict(policy_chosen=PC, policy_rejected=PR, ref_chosen=RC, ref_rejected=RR)
    with pytest.raises(ValueError, match=r"unknown preference loss 'kto'.*\['cdpo', 'dpo', 'ipo'\]"):
        preference_loss("kto", beta=0.1, **kwargs)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("ipo", beta=0.1, label_smoothing=0.1, **kwargs)
