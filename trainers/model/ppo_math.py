"""PPO for language models as pure tensor functions: KL penalties, advantages, clipped losses.

Every per-token tensor is [B, T] and comes with a response mask of the same shape: 1 (or True) on
generated tokens, 0 on prompt and padding. A row's response is one contiguous run of ones (left or
right padding around it is fine). Values at masked positions are never read: they are replaced by 0
before any arithmetic, so garbage there (even inf or NaN, e.g. a fill value of precomputed
log-probs) changes neither results nor gradients.

Means over tokens are token-level over the whole batch (every response token weighs the same), as
in `trainers.model.losses.sft_loss`. Metrics (clip fractions, approximate KL) come back detached.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor


def _bool_mask(mask: Tensor, *like: Tensor) -> Tensor:
    for tensor in like:
        if tensor.shape != mask.shape:
            raise ValueError(f"expected tensors of the mask's shape {tuple(mask.shape)}, got {tuple(tensor.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def _zero_masked(x: Tensor, mask: Tensor) -> Tensor:
    # `where`, not `x * mask`: inf * 0 is NaN, and a NaN would also reach the gradient
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _check_positive(name: str, value: float) -> None:
    if not value > 0:  # also rejects NaN
        raise ValueError(f"{name} must be > 0, got {value}")


# ---------------------------------------------------------------------------------------------
# masked statistics

def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over the unmasked entries (all of them, or along `dim`); 0 where there are none."""
    mask = _bool_mask(mask, x)
    total = _zero_masked(x, mask)
    if dim is None:
        return total.sum() / mask.sum().clamp(min=1).to(x.dtype)
    return total.sum(dim) / mask.sum(dim).clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the unmasked entries of x (all of them), with Bessel's correction by default.

    With fewer than two entries the unbiased estimate is undefined; this returns 0 then.
    """
    mask = _bool_mask(mask, x)
    x = _zero_masked(x, mask)  # before the square: its gradient at padding would be 0 * inf otherwise
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = mask.sum().to(x.dtype)
        var = torch.where(count > 1, var * count / (count - 1).clamp(min=1), torch.zeros_like(var))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the unmasked entries of the batch; 0 at masked positions.

    Whitening advantages makes the policy step size independent of the reward scale. With
    shift_mean=False the mean is added back (only the spread is normalised): rewards whitened that
    way keep their sign on average, which matters when their mean carries information.
    """
    mask = _bool_mask(mask, x)
    x = _zero_masked(x, mask)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_masked(whitened, mask)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last unmasked position of each row, [B, T] -> [B] (long).

    Works for left and right padding alike. A row with no unmasked position gets T - 1; callers
    that can meet such rows check `mask.any(-1)`.
    """
    mask = _bool_mask(mask)
    width = mask.shape[-1]
    return width - 1 - mask.flip(-1).to(torch.uint8).argmax(-1)


# ---------------------------------------------------------------------------------------------
# KL between policy and reference, estimated from the sampled tokens

def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log pi(x) - log ref(x): unbiased for KL(pi || ref) when x ~ pi, but high variance and
    negative on many tokens, so a per-token penalty built on it can reward some tokens."""
    return logp - ref_logp


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = (r - 1) - log r with r = ref(x) / pi(x): also unbiased for KL(pi || ref) when x ~ pi
    (E[r] = 1), never negative (log r <= r - 1), and lower variance than k1 while pi stays near ref.

    Computed as expm1(d) - d, d = log r, which keeps precision for tiny d. It grows like exp(d)
    when the reference likes a token far more than the policy does.
    """
    log_ratio = ref_logp - logp
    return (torch.expm1(log_ratio) - log_ratio).clamp(min=0)  # clamp: rounding only, never the math


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k3": kl_k3}


def per_token_kl(logp: Tensor, ref_logp: Tensor, mask: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token KL estimate of the sampled tokens [B, T]; 0 at masked positions."""
    try:
        estimate = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid names: {sorted(KL_ESTIMATORS)}") from None
    mask = _bool_mask(mask, logp, ref_logp)
    return _zero_masked(estimate(_zero_masked(logp, mask), _zero_masked(ref_logp, mask)), mask)


def kl_penalized_rewards(score: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float,
                         estimator: str = "k1") -> Tensor:
    """Per-token rewards [B, T]: -kl_coef * KL estimate at every response token, plus the sequence
    score [B] (e.g. a reward model's) at the last response token; 0 elsewhere.

    Spreading the KL penalty over tokens gives the value function a dense signal, while the score is
    only known once the sequence is complete. The result is detached: rewards are constants of the
    PPO update. A row without response tokens gets all zeros (its score goes nowhere).
    """
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    mask = _bool_mask(mask, logp, ref_logp)
    if score.shape != mask.shape[:1]:
        raise ValueError(f"score must have shape [B] = {tuple(mask.shape[:1])}, got {tuple(score.shape)}")
    kl = per_token_kl(logp.detach(), ref_logp.detach(), mask, estimator)
    rewards = -kl_coef * kl
    has_response = mask.any(-1)
    placed = torch.where(has_response, score.detach().to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    return rewards.scatter_add(1, last_token_index(mask)[:, None], placed[:, None])


# ---------------------------------------------------------------------------------------------
# KL coefficient controllers

class KLController:
    """The KL coefficient in `value`; `update(current_kl, n_steps)` after each batch returns the new one."""

    def __init__(self, kl_coef: float):
        if not kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict:  # the coefficient is the only state a resumed run needs
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class FixedKLController(KLController):
    """A constant KL coefficient."""

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController(KLController):
    """Steers the KL coefficient so the measured KL(pi || ref) tracks `target` (Ziegler et al. 2019).

    A proportional controller in log space: error e = clip(KL / target - 1, -0.2, 0.2), then
    coef *= 1 + e * n_steps / horizon. Clipping keeps one noisy KL estimate from swinging the
    coefficient; `horizon` (in the same unit as n_steps, e.g. sequences) sets how fast it reacts:
    with a constant error the coefficient changes by a factor of about exp(e) per horizon.
    """

    MAX_ERROR = 0.2

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        _check_positive("init_kl_coef", init_kl_coef)
        _check_positive("target", target)
        _check_positive("horizon", horizon)
        super().__init__(init_kl_coef)
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move the coefficient after a batch of `n_steps` samples whose mean KL was `current_kl`."""
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl}")
        if not 0 <= n_steps < self.horizon / self.MAX_ERROR:  # beyond that the factor could reach <= 0
            raise ValueError(f"n_steps must be in [0, horizon / {self.MAX_ERROR}), got {n_steps}")
        error = min(max(current_kl / self.target - 1.0, -self.MAX_ERROR), self.MAX_ERROR)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


# ---------------------------------------------------------------------------------------------
# advantages

def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016): (advantages, returns), both [B, T].

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where V_{t+1}
    and A_{t+1} are 0 after a row's last response token: the episode ends there, so nothing is
    bootstrapped from padding. returns = A + V are the value targets. lam trades bias (lam = 0:
    one-step TD) for variance (lam = 1: Monte Carlo return minus V). Both outputs are detached
    (they are targets) and 0 at masked positions.
    """
    if not 0 <= gamma <= 1 or not 0 <= lam <= 1:
        raise ValueError(f"gamma and lam must be in [0, 1], got {gamma}, {lam}")
    mask = _bool_mask(mask, rewards, values)
    rewards, values = _zero_masked(rewards.detach(), mask), _zero_masked(values.detach(), mask)
    advantages = torch.zeros_like(rewards)
    next_value = next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = _zero_masked(delta + gamma * lam * next_advantage, mask[:, t])
        advantages[:, t] = advantage
        next_value, next_advantage = values[:, t], advantage  # both 0 at padding: no bootstrapping
    return advantages, _zero_masked(advantages + values, mask)


# ---------------------------------------------------------------------------------------------
# losses

class PolicyLossOutput(NamedTuple):
    loss: Tensor        # scalar, to back-propagate
    clipfrac: Tensor    # detached: share of response tokens whose gradient the clip removed
    approx_kl: Tensor   # detached: k3 estimate of KL(old || new) over the response tokens


class ValueLossOutput(NamedTuple):
    loss: Tensor
    clipfrac: Tensor    # detached: share of response tokens where the clipped error was the larger


def ppo_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float) -> PolicyLossOutput:
    """Clipped surrogate (Schulman et al. 2017): mean over response tokens of
    max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), ratio = exp(logp - old_logp).

    Taking the pessimistic term removes the incentive to move a token's probability further once the
    ratio has left [1 - eps, 1 + eps] in the direction the advantage favours, so several epochs on the
    same rollouts stay near the sampling policy. Only `logp` carries gradient; old_logp and
    advantages are treated as constants. clipfrac counts the tokens where the clipped term is
    strictly larger, i.e. where the clip zeroed the gradient (a ratio out of range on the side the
    advantage disfavours is not clipped and not counted).
    """
    _check_positive("clip_eps", clip_eps)
    mask = _bool_mask(mask, logp, old_logp, advantages)
    log_ratio = _zero_masked(logp, mask) - _zero_masked(old_logp.detach(), mask)
    advantages = _zero_masked(advantages.detach(), mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(logp.dtype), mask).detach()
    approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask).detach()  # k3 with r = new / old
    return PolicyLossOutput(loss, clipfrac, approx_kl)


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float) -> ValueLossOutput:
    """Clipped value loss: 0.5 * mean over response tokens of max((V - R)^2, (V_clip - R)^2), with
    V_clip = V_old + clip(V - V_old, -eps, eps).

    As with the policy, the value head gains nothing from moving more than eps away from its value
    at rollout time in one update. Note eps is in the units of the returns (not a ratio), so it
    must suit the reward scale. Only `values` carries gradient.
    """
    _check_positive("clip_eps", clip_eps)
    mask = _bool_mask(mask, values, old_values, returns)
    values = _zero_masked(values, mask)
    old_values, returns = _zero_masked(old_values.detach(), mask), _zero_masked(returns.detach(), mask)
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    clipfrac = masked_mean((clipped_error > unclipped_error).to(values.dtype), mask).detach()
    return ValueLossOutput(loss, clipfrac)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution at every position, [..., V] -> [...], in float32 or wider.

    Logits of -inf (a vocabulary masked out, as top-k sampling does) contribute 0, not NaN.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    safe_log_probs = _zero_masked(log_probs, probs > 0)  # 0 * -inf would be NaN, in value and gradient
    return -(probs * safe_log_probs).sum(-1)


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean entropy over response tokens of the policy at each position: logits [B, T, V], mask [B, T].

    A falling entropy shows the policy collapsing onto few tokens; an entropy bonus works against it.
    `logits[:, t]` must be the distribution the token at mask position t was sampled from. Unlike the
    other inputs, logits are not sanitised at masked positions (that would copy [B, T, V]): they
    must be finite there, as a model's logits are.
    """
    if logits.shape[:-1] != mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match the mask {tuple(mask.shape)} plus a vocabulary dimension")
    return masked_mean(token_entropy(logits), mask)
