"""PPO math against hand-computed cases and slow loop re-implementations (python floats, one token at a time)."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from trainers.model.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae_advantages,
    kl_k1,
    kl_k3,
    kl_penalized_rewards,
    last_token_index,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_kl,
    ppo_policy_loss,
    ppo_value_loss,
    token_entropy,
)

NAN, INF = float("nan"), float("inf")


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def ragged_mask(batch: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Rows with a random start (left zeros) and length (right zeros); row 0 is full, row 1 empty."""
    mask = torch.zeros(batch, width, dtype=torch.bool)
    mask[0] = True
    for row in range(2, batch):
        start = int(torch.randint(0, width // 2, (1,), generator=generator))
        length = int(torch.randint(1, width - start + 1, (1,), generator=generator))
        mask[row, start:start + length] = True
    return mask


def random_case(seed: int, batch: int = 6, width: int = 9):
    """Random per-token tensors with garbage (inf, NaN) written at masked positions."""
    generator = torch.Generator().manual_seed(seed)
    mask = ragged_mask(batch, width, generator)

    def randn(scale: float = 1.0):
        x = torch.randn(batch, width, generator=generator, dtype=torch.float64) * scale
        garbage = torch.tensor([INF, NAN, -INF], dtype=torch.float64)[torch.arange(batch * width) % 3].view(batch, width)
        return torch.where(mask, x, garbage)

    return mask, randn


def rows(mask: torch.Tensor) -> list[list[int]]:
    """Unmasked column indices of each row (contiguous by construction)."""
    return [[j for j in range(mask.shape[1]) if mask[i, j]] for i in range(mask.shape[0])]


# ----------------------------------------------------------------------------- masked statistics

def test_masked_mean_and_var_hand_computed():
    x, mask = t([1.0, 2.0, 3.0], [4.0, NAN, INF]), torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.5)                  # (1 + 2 + 3 + 4) / 4
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([2.0, 4.0])
    # deviations from 2.5: -1.5, -0.5, 0.5, 1.5 -> squares sum to 5; unbiased / 3, biased / 4
    assert masked_var(x, mask).item() == pytest.approx(5 / 3)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(5 / 4)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0               # nothing unmasked: 0, not NaN
    assert masked_var(t([7.0, 1.0]), torch.tensor([[1, 0]])).item() == 0.0     # one entry: no spread


def test_masked_whiten_hand_computed():
    x, mask = t([1.0, 2.0, 3.0], [4.0, NAN, INF]), torch.tensor([[1, 1, 1], [1, 0, 0]])
    std = math.sqrt(5 / 3)                                                     # 1.2910
    expected = [[-1.5 / std, -0.5 / std, 0.5 / std], [1.5 / std, 0.0, 0.0]]   # [-1.1619, -0.3873, 0.3873], [1.1619, 0, 0]
    torch.testing.assert_close(masked_whiten(x, mask), t(*expected), rtol=1e-6, atol=1e-7)
    kept_mean = [[v + 2.5 for v in expected[0]], [expected[1][0] + 2.5, 0.0, 0.0]]
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), t(*kept_mean), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_loop(seed, shift_mean):
    mask, randn = random_case(seed)
    x = randn(3.0) + 5.0
    values = [x[i, j].item() for i, columns in enumerate(rows(mask)) for j in columns]
    mean, std = statistics.mean(values), math.sqrt(statistics.variance(values) + 1e-8)
    expected = torch.zeros_like(x)
    for i, columns in enumerate(rows(mask)):
        for j in columns:
            expected[i, j] = (x[i, j].item() - mean) / std + (0.0 if shift_mean else mean)
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=shift_mean), expected)
    whitened = masked_whiten(x, mask)
    assert masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(whitened, mask).item() == pytest.approx(1.0, rel=1e-6)


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 0], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [1, 3, 2, 3]


# ----------------------------------------------------------------------------- KL estimators and rewards

def test_kl_estimators_hand_computed():
    logp, ref = t(-1.0, -2.0), t(-2.0, -1.0)
    assert kl_k1(logp, ref).tolist() == pytest.approx([1.0, -1.0])
    # k3 = (r - 1) - log r, r = exp(ref - logp): r = e^-1 -> e^-1 - 1 + 1 = 0.3679; r = e -> e - 1 - 1 = 0.7183
    assert kl_k3(logp, ref).tolist() == pytest.approx([math.exp(-1), math.e - 2])
    assert kl_k3(logp, logp).tolist() == [0.0, 0.0]


def test_k3_is_never_negative():
    generator = torch.Generator().manual_seed(0)
    logp = torch.randn(10_000, generator=generator, dtype=torch.float64) * 3
    ref = torch.randn(10_000, generator=generator, dtype=torch.float64) * 3
    tiny = logp + torch.randn(10_000, generator=generator, dtype=torch.float64) * 1e-9  # rounding territory
    for other in (ref, tiny):
        assert (kl_k3(logp, other) >= 0).all()
        assert (kl_k3(logp.float(), other.float()) >= 0).all()
    assert (kl_k1(logp, ref) < 0).any()   # k1 is negative on many samples


def test_k1_and_k3_estimate_the_exact_kl_by_monte_carlo():
    """Sampling x ~ p, the means of k1 and k3 both converge to KL(p || ref) = sum_x p(x) log(p(x) / ref(x))."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.5], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    exact = sum(pi * math.log(pi / ri) for pi, ri in zip(p.tolist(), ref.tolist()))   # 0.2515
    n = 200_000
    samples = torch.multinomial(p, n, replacement=True, generator=generator)
    logp, ref_logp = p.log()[samples], ref.log()[samples]
    for estimator in (kl_k1, kl_k3):
        values = estimator(logp, ref_logp)
        tolerance = 5 * values.std().item() / math.sqrt(n)    # 5 standard errors: fails ~1 in 2 million
        assert values.mean().item() == pytest.approx(exact, abs=tolerance), estimator.__name__
    # near the reference, k3's per-sample variance is far below k1's
    near = torch.tensor([0.19, 0.21, 0.2, 0.18, 0.22], dtype=torch.float64)
    samples = torch.multinomial(near, n, replacement=True, generator=generator)
    k1, k3 = kl_k1(near.log()[samples], ref.log()[samples]), kl_k3(near.log()[samples], ref.log()[samples])
    assert k3.var().item() < 0.05 * k1.var().item()


def test_per_token_kl_masks_and_rejects_unknown_estimators():
    logp, ref = t([-1.0, NAN], [-2.0, -3.0]), t([-2.0, 5.0], [-1.0, INF])
    mask = torch.tensor([[1, 0], [1, 0]])
    assert per_token_kl(logp, ref, mask, "k1").tolist() == [[1.0, 0.0], [-1.0, 0.0]]
    torch.testing.assert_close(per_token_kl(logp, ref, mask, "k3"), t([math.exp(-1), 0.0], [math.e - 2, 0.0]))
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k2'.*\['k1', 'k3'\]"):
        per_token_kl(logp, ref, mask, "k2")


def test_kl_penalized_rewards_hand_computed():
    logp = t([-1.0, -2.0, -0.5], [-1.0, -1.0, NAN], [9.0, -1.0, -2.0])
    ref = t([-2.0, -1.0, -0.5], [-1.5, -1.0, INF], [NAN, -1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 1]])     # full, right-padded, left-padded
    score = t(2.0, -1.0, 3.0)
    rewards = kl_penalized_rewards(score, logp, ref, mask, kl_coef=0.1, estimator="k1")
    # k1 = logp - ref: row 0 [1, -1, 0], row 1 [0.5, 0, pad], row 2 [pad, 0, -1]; score at the last response token
    expected = [[-0.1 * 1, -0.1 * -1, -0.1 * 0 + 2.0],
                [-0.1 * 0.5, -0.1 * 0 - 1.0, 0.0],
                [0.0, 0.0, -0.1 * -1 + 3.0]]
    torch.testing.assert_close(rewards, t(*expected))
    rewards = kl_penalized_rewards(score, logp, ref, mask, kl_coef=0.1, estimator="k3")
    # k3 with d = ref - logp: row 0 d = [-1, 1, 0] -> [e^-1, e - 2, 0]; row 1 d = [-0.5, 0] -> [e^-0.5 - 0.5, 0]
    # row 2 d = [0, 1] -> [0, e - 2]
    expected = [[-0.1 * math.exp(-1), -0.1 * (math.e - 2), 2.0],
                [-0.1 * (math.exp(-0.5) - 0.5), -1.0, 0.0],
                [0.0, 0.0, -0.1 * (math.e - 2) + 3.0]]
    torch.testing.assert_close(rewards, t(*expected))


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalized_rewards_match_loop(estimator):
    mask, randn = random_case(1)
    logp, ref = randn(), randn()
    score = torch.randn(mask.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rewards = kl_penalized_rewards(score, logp.requires_grad_(), ref, mask, kl_coef=0.3, estimator=estimator)
    assert not rewards.requires_grad
    expected = torch.zeros_like(rewards)
    for i, columns in enumerate(rows(mask)):
        for j in columns:
            a, b = logp[i, j].item(), ref[i, j].item()
            kl = a - b if estimator == "k1" else math.exp(b - a) - 1 - (b - a)
            expected[i, j] = -0.3 * kl + (score[i].item() if j == columns[-1] else 0.0)
    torch.testing.assert_close(rewards, expected)
    assert rewards[1].abs().sum() == 0   # the empty row: no penalty and no score


def test_kl_penalized_rewards_validation():
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="score"):
        kl_penalized_rewards(torch.zeros(3), torch.zeros(2, 3), torch.zeros(2, 3), mask, 0.1)
    with pytest.raises(ValueError, match="shape"):
        kl_penalized_rewards(torch.zeros(2), torch.zeros(2, 4), torch.zeros(2, 3), mask, 0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        kl_penalized_rewards(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3), mask, -0.1)


# ----------------------------------------------------------------------------- KL controllers

def test_adaptive_controller_hand_computed():
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    # KL 9 vs target 6: error 9/6 - 1 = 0.5, clipped to 0.2; factor 1 + 0.2 * 256 / 10000 = 1.00512
    assert controller.update(current_kl=9.0, n_steps=256) == pytest.approx(0.2 * 1.00512)
    # KL 5.4: error 5.4/6 - 1 = -0.1 (inside the clip); factor 1 - 0.1 * 500 / 10000 = 0.995
    assert controller.update(current_kl=5.4, n_steps=500) == pytest.approx(0.2 * 1.00512 * 0.995)
    assert controller.value == pytest.approx(0.2 * 1.00512 * 0.995)


def test_adaptive_controller_moves_towards_target():
    def after(kl: float, n_steps: int = 100) -> float:
        return AdaptiveKLController(0.1, target=1.0, horizon=1000).update(kl, n_steps)

    assert after(2.0) > 0.1          # KL above target: penalise harder
    assert after(0.5) < 0.1          # below: relax
    assert after(1.0) == 0.1 and after(3.0, n_steps=0) == 0.1
    assert after(100.0) == after(1.2) == pytest.approx(0.1 * 1.02)   # error clipped at +0.2
    assert after(0.0) == after(0.8) == pytest.approx(0.1 * 0.98)     # ... and at -0.2
    # closed loop: a policy whose KL falls as the coefficient rises settles near the target
    controller = AdaptiveKLController(0.01, target=1.0, horizon=100)
    for _ in range(2000):
        controller.update(current_kl=0.05 / controller.value, n_steps=10)   # KL = 0.05 / coef
    assert 0.05 / controller.value == pytest.approx(1.0, rel=0.01)


def test_fixed_controller_and_state():
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 512) == 0.05 and fixed.value == 0.05
    adaptive = AdaptiveKLController(0.1, target=1.0, horizon=1000)
    adaptive.update(3.0, 100)
    restored = AdaptiveKLController(0.1, target=1.0, horizon=1000)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value != 0.1


def test_controller_validation():
    for kwargs in (dict(init_kl_coef=0.0, target=1.0, horizon=10), dict(init_kl_coef=0.1, target=-1.0, horizon=10),
                   dict(init_kl_coef=0.1, target=1.0, horizon=0)):
        with pytest.raises(ValueError):
            AdaptiveKLController(**kwargs)
    controller = AdaptiveKLController(0.1, target=1.0, horizon=10)
    with pytest.raises(ValueError, match="current_kl"):
        controller.update(NAN, 1)
    with pytest.raises(ValueError, match="n_steps"):
        controller.update(1.0, 50)    # 0.2 * 50 / 10 = 1: the factor could reach 0
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-1.0)


# ----------------------------------------------------------------------------- GAE

def gae_loop(rewards, values, mask, gamma, lam):
    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for i, columns in enumerate(rows(mask)):
        next_value = next_advantage = 0.0
        for j in reversed(columns):
            delta = rewards[i, j].item() + gamma * next_value - values[i, j].item()
            next_advantage = delta + gamma * lam * next_advantage
            next_value = values[i, j].item()
            advantages[i, j], returns[i, j] = next_advantage, next_advantage + next_value
    return advantages, returns


def test_gae_hand_computed_with_right_padding():
    gamma, lam = 0.9, 0.5        # gamma * lam = 0.45
    rewards = t([0.0, 0.0, 1.0], [0.0, 1.0, 5.0])
    values = t([0.5, 0.6, 0.7], [0.5, 0.7, 9.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)
    # row 0: d2 = 1 - 0.7 = 0.3;  d1 = 0.9*0.7 - 0.6 = 0.03;  d0 = 0.9*0.6 - 0.5 = 0.04
    #        A2 = 0.3; A1 = 0.03 + 0.45*0.3 = 0.165; A0 = 0.04 + 0.45*0.165 = 0.11425
    # row 1: the padded reward 5 and value 9 are ignored: d1 = 1 - 0.7 = 0.3; d0 = 0.9*0.7 - 0.5 = 0.13
    #        A1 = 0.3; A0 = 0.13 + 0.45*0.3 = 0.265
    torch.testing.assert_close(advantages, t([0.11425, 0.165, 0.3], [0.265, 0.3, 0.0]))
    torch.testing.assert_close(returns, t([0.61425, 0.765, 1.0], [0.765, 1.0, 0.0]))   # A + V


def test_gae_limits():
    rewards, values, mask = t([1.0, 2.0, 3.0]), t([0.5, 0.25, 1.0]), torch.ones(1, 3)
    # lam = 1, gamma = 1: A_t = (sum of rewards from t) - V_t; returns are the reward-to-go
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    assert returns.tolist() == [[6.0, 5.0, 3.0]] and advantages.tolist() == [[5.5, 4.75, 2.0]]
    # lam = 0: one-step TD errors r_t + gamma V_{t+1} - V_t
    advantages, _ = gae_advantages(rewards, values, mask, gamma=0.5, lam=0.0)
    assert advantages[0].tolist() == pytest.approx([1 + 0.5 * 0.25 - 0.5, 2 + 0.5 * 1.0 - 0.25, 3 - 1.0])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)])
def test_gae_matches_loop_on_ragged_masks(seed, gamma, lam):
    mask, randn = random_case(seed, batch=7, width=11)
    rewards, values = randn(), randn()
    advantages, returns = gae_advantages(rewards, values.requires_grad_(), mask, gamma, lam)
    expected_advantages, expected_returns = gae_loop(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, expected_advantages)
    torch.testing.assert_close(returns, expected_returns)
    assert not advantages.requires_grad and not returns.requires_grad


def test_gae_ignores_what_follows_the_response():
    """Right padding: appending padded columns with any content changes nothing."""
    mask, randn = random_case(5, width=6)
    rewards, values = randn(), randn()
    wide = lambda x, fill: torch.cat([x, torch.full((x.shape[0], 4), fill, dtype=x.dtype)], dim=1)
    short = gae_advantages(rewards, values, mask, 0.95, 0.9)
    long = gae_advantages(wide(rewards, 7.0), wide(values, -3.0), wide(mask, False), 0.95, 0.9)
    for a, b in zip(short, long):
        torch.testing.assert_close(b[:, :6], a)
        assert b[:, 6:].abs().sum() == 0


# ----------------------------------------------------------------------------- policy and value losses

def test_policy_loss_hand_computed():
    clip = 0.2
    ratios = [1.5, 1.5, 0.5, 0.5, 1.0]
    logp = t([math.log(r) for r in ratios] + [NAN]).requires_grad_()
    old_logp = t([0.0] * 5 + [INF])
    advantages = t([1.0, -1.0, 1.0, -1.0, 2.0, NAN])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    out = ppo_policy_loss(logp, old_logp, advantages, mask, clip)
    # token: -A*ratio, -A*clip(ratio) -> max
    # a: -1.5, -1.2 -> -1.2 (clipped)   b: 1.5, 1.2 -> 1.5      c: -0.5, -0.8 -> -0.5
    # d:  0.5,  0.8 ->  0.8 (clipped)   e: -2.0, -2.0 -> -2.0
    assert out.loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8 - 2.0) / 5)   # -0.28
    assert out.clipfrac.item() == pytest.approx(2 / 5)
    # approx KL, k3 with r = ratio: 1.5 - 1 - log 1.5 = 0.0945, 0.5 - 1 - log 0.5 = 0.1931, 0 at r = 1
    assert out.approx_kl.item() == pytest.approx((2 * (0.5 - math.log(1.5)) + 2 * (-0.5 - math.log(0.5))) / 5)
    out.loss.backward()
    # d/dlogp of -A * ratio is -A * ratio; clipped tokens and padding get nothing
    assert logp.grad[0].tolist() == pytest.approx([0.0, 1.5 / 5, -0.5 / 5, 0.0, -2.0 / 5, 0.0])
    assert not out.clipfrac.requires_grad and not out.approx_kl.requires_grad


def policy_loss_loop(logp, old_logp, advantages, mask, clip):
    total, clipped_count, kl, count = 0.0, 0, 0.0, 0
    for i, columns in enumerate(rows(mask)):
        for j in columns:
            log_ratio = logp[i, j].item() - old_logp[i, j].item()
            ratio, a = math.exp(log_ratio), advantages[i, j].item()
            unclipped, clipped = -a * ratio, -a * min(max(ratio, 1 - clip), 1 + clip)
            total += max(unclipped, clipped)
            clipped_count += clipped > unclipped
            kl += ratio - 1 - log_ratio
            count += 1
    return total / count, clipped_count / count, kl / count


@pytest.mark.parametrize("seed", range(4))
def test_policy_loss_matches_loop(seed):
    mask, randn = random_case(seed, batch=8, width=10)
    logp, old_logp, advantages = randn(0.3), randn(0.3), randn()
    out = ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2)
    loss, clipfrac, approx_kl = policy_loss_loop(logp, old_logp, advantages, mask, 0.2)
    assert 0 < clipfrac < 1    # the case exercises both branches
    assert out.loss.item() == pytest.approx(loss)
    assert out.clipfrac.item() == pytest.approx(clipfrac)
    assert out.approx_kl.item() == pytest.approx(approx_kl)


def test_policy_loss_on_policy_gradient_is_minus_mean_advantage():
    """At ratio 1 nothing is clipped and d loss / d logp_t = -A_t / n_tokens."""
    mask, randn = random_case(3)
    logp, advantages = randn(), randn()
    leaf = logp.clone().requires_grad_()
    out = ppo_policy_loss(leaf, logp.detach(), advantages, mask, clip_eps=0.1)
    out.loss.backward()
    n = mask.sum().item()
    torch.testing.assert_close(leaf.grad, torch.where(mask, -advantages / n, torch.zeros_like(advantages)))
    assert out.clipfrac.item() == 0.0 and out.approx_kl.item() == 0.0


def test_value_loss_hand_computed():
    values = t([1.0, 1.0, 0.2, NAN]).requires_grad_()
    old_values, returns = t([0.0, 0.0, 0.0, INF]), t([2.0, 0.0, 1.0, 1.0])
    mask = torch.tensor([[True, True, True, False]])
    out = ppo_value_loss(values, old_values, returns, mask, clip_eps=0.5)
    # V_clip = old + clip(V - old, -0.5, 0.5) = [0.5, 0.5, 0.2]
    # a: (1 - 2)^2 = 1, (0.5 - 2)^2 = 2.25 -> 2.25 (clipped)   b: 1, 0.25 -> 1   c: 0.64, 0.64 -> 0.64
    assert out.loss.item() == pytest.approx(0.5 * (2.25 + 1.0 + 0.64) / 3)
    assert out.clipfrac.item() == pytest.approx(1 / 3)
    out.loss.backward()
    # d/dV 0.5 (V - R)^2 / 3 = (V - R) / 3 on the unclipped branch; the clipped branch is flat in V
    assert values.grad[0].tolist() == pytest.approx([0.0, 1.0 / 3, (0.2 - 1.0) / 3, 0.0])


@pytest.mark.parametrize("seed", range(3))
def test_value_loss_matches_loop(seed):
    mask, randn = random_case(seed, batch=8, width=10)
    values, old_values, returns = randn(), randn(), randn()
    out = ppo_value_loss(values, old_values, returns, mask, clip_eps=0.3)
    total, clipped_count, count = 0.0, 0, 0
    for i, columns in enumerate(rows(mask)):
        for j in columns:
            v, old, r = values[i, j].item(), old_values[i, j].item(), returns[i, j].item()
            clipped = old + min(max(v - old, -0.3), 0.3)
            total += 0.5 * max((v - r) ** 2, (clipped - r) ** 2)
            clipped_count += (clipped - r) ** 2 > (v - r) ** 2
            count += 1
    assert out.loss.item() == pytest.approx(total / count)
    assert out.clipfrac.item() == pytest.approx(clipped_count / count)


@pytest.mark.parametrize("clip_eps", [0.0, -0.1, NAN])
def test_clip_eps_must_be_positive(clip_eps):
    x, mask = torch.zeros(1, 2), torch.ones(1, 2)
    with pytest.raises(ValueError, match="clip_eps"):
        ppo_policy_loss(x, x, x, mask, clip_eps)
    with pytest.raises(ValueError, match="clip_eps"):
        ppo_value_loss(x, x, x, mask, clip_eps)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 0.2)
    with pytest.raises(ValueError, match="shape"):
        gae_advantages(torch.zeros(2, 3), torch.zeros(3, 3), torch.ones(2, 3), 1.0, 0.95)


# ----------------------------------------------------------------------------- entropy

def test_entropy_hand_computed():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, -INF, 0.0, -INF], [100.0, 0.0, 0.0, 0.0]]])
    # uniform over 4: log 4; uniform over the 2 finite logits: log 2; one logit far above the rest: ~0
    entropy = token_entropy(logits)
    assert entropy[0, :2].tolist() == pytest.approx([math.log(4), math.log(2)])
    assert entropy[0, 2].item() == pytest.approx(0.0, abs=1e-6)
    assert entropy_from_logits(logits, torch.tensor([[1, 1, 0]])).item() == pytest.approx((math.log(4) + math.log(2)) / 2)


def test_entropy_matches_loop_and_gradient_is_masked():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=generator, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    total, count = 0.0, 0
    for i in range(3):
        for j in range(5):
            if mask[i, j]:
                z = [math.exp(v) for v in logits[i, j].tolist()]
                probs = [v / sum(z) for v in z]
                total += -sum(p * math.log(p) for p in probs)
                count += 1
    value = entropy_from_logits(logits, mask)
    assert value.item() == pytest.approx(total / count)
    value.backward()
    assert logits.grad[~mask.bool()].abs().sum() == 0 and logits.grad[mask.bool()].abs().sum() > 0
    assert token_entropy(logits.half()).dtype == torch.float32


# ----------------------------------------------------------------------------- gradients and padding

def test_gradient_flows_only_through_unmasked_tokens():
    """Garbage at masked positions (inf, NaN) leaves values finite and gives those positions zero gradient."""
    mask, randn = random_case(7, batch=6, width=8)
    logp, old_logp, advantages = randn(0.3).requires_grad_(), randn(0.3), randn()
    values, old_values, returns = randn().requires_grad_(), randn(), randn()
    policy = ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2)
    value = ppo_value_loss(values, old_values, returns, mask, clip_eps=0.2)
    whitened = masked_whiten(values, mask)
    for out in (policy.loss, policy.clipfrac, policy.approx_kl, value.loss, value.clipfrac, whitened):
        assert torch.isfinite(out).all()
    (policy.loss + value.loss + (whitened * returns.nan_to_num(0.0, 0.0, 0.0)).sum()).backward()
    for leaf in (logp, values):
        assert torch.isfinite(leaf.grad).all()
        assert leaf.grad[~mask].abs().sum() == 0
        assert (leaf.grad[mask] != 0).float().mean() > 0.5   # most unmasked tokens do get a gradient


def test_no_response_tokens_gives_zero_not_nan():
    x, mask = torch.ones(2, 3, requires_grad=True), torch.zeros(2, 3)
    out = ppo_policy_loss(x, x.detach(), x.detach(), mask, 0.2)
    assert out.loss.item() == 0.0 and out.clipfrac.item() == 0.0
    out.loss.backward()
    assert x.grad.abs().sum() == 0
    advantages, returns = gae_advantages(x, x, mask, 1.0, 1.0)
    assert advantages.abs().sum() == 0 and returns.abs().sum() == 0
