"""Training losses as pure functions of per-sequence log-probs, one value per example.

Inputs are summed log-probs log p(y|x) of shape [B] (from `trainers.model.logprobs.sequence_logps`);
callers reduce (`.mean()`) themselves, so per-example values stay available for logging.
Preference variants live in the `PREFERENCE_LOSSES` registry, selected by name in one place.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch.nn.functional as F
from torch import Tensor

CDPO_DEFAULT_LABEL_SMOOTHING = 0.1  # the flip rate eps used by the reference DPO code's cDPO example


def sft_loss(sums: Tensor, counts: Tensor) -> Tensor:
    """Token-level NLL over all response tokens of the batch: -sum(sums) / sum(counts).

    Long responses weigh more than short ones, as in ordinary LM training. sums [B], counts [B] -> [].
    A batch without any response token gives 0 (still connected to the graph), not NaN.
    """
    return -sums.sum() / counts.sum().clamp(min=1).to(sums.dtype)


@dataclass(frozen=True)
class PreferenceLossOutput:
    """Per-example loss and implicit rewards r = beta * (log pi(y|x) - log pi_ref(y|x)), all [B].

    Rewards are detached: they are for logging (margins, accuracy), not for back-propagation.
    """
    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def _check(beta: float, label_smoothing: float, *logps: Tensor) -> None:
    if not beta > 0:  # also rejects NaN
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    shapes = {tuple(t.shape) for t in logps}
    if len(shapes) != 1:
        raise ValueError(f"policy/reference log-probs must share one shape [B], got {sorted(shapes)}")


def _log_ratio_margin(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor) -> Tensor:
    """h = (log pi(y+) - log pi_ref(y+)) - (log pi(y-) - log pi_ref(y-)), shape [B]."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def _rewards(beta: float, policy: Tensor, reference: Tensor) -> Tensor:
    return (beta * (policy - reference)).detach()


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float, label_smoothing: float = 0.0) -> PreferenceLossOutput:
    """Sigmoid DPO (Rafailov et al. 2023, eq. 7): loss = -log sigmoid(beta * h), all inputs [B].

    With label_smoothing eps > 0 this is conservative DPO (cDPO), which assumes each preference label
    is flipped with probability eps: loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    `logsigmoid` keeps the loss finite for any beta * h.
    """
    _check(beta, label_smoothing, policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    logits = beta * _log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return PreferenceLossOutput(losses, _rewards(beta, policy_chosen, ref_chosen), _rewards(beta, policy_rejected, ref_rejected))


def ipo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float) -> PreferenceLossOutput:
    """IPO (Azar et al. 2023): loss = (h - 1 / (2 beta))^2, all inputs [B].

    A squared loss regresses the log-ratio margin h to a finite target instead of pushing it to
    infinity as DPO can on deterministic preferences; here beta acts as the regulariser tau.
    """
    _check(beta, 0.0, policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    margin = _log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = (margin - 1.0 / (2.0 * beta)) ** 2
    return PreferenceLossOutput(losses, _rewards(beta, policy_chosen, ref_chosen), _rewards(beta, policy_rejected, ref_rejected))


# name -> loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, [label_smoothing])
PREFERENCE_LOSSES: dict[str, Callable[..., PreferenceLossOutput]] = {
    "dpo": dpo_loss,
    "cdpo": partial(dpo_loss, label_smoothing=CDPO_DEFAULT_LABEL_SMOOTHING),  # a given eps overrides it
    "ipo": ipo_loss,
}


def preference_loss(name: str, *, beta: float, label_smoothing: float | None = None,
                    **logps: Tensor) -> PreferenceLossOutput:
    """Dispatch to `PREFERENCE_LOSSES[name]`; `logps` are policy_chosen, policy_rejected, ref_chosen, ref_rejected.

    label_smoothing None keeps the loss's own default (0 for dpo, 0.1 for cdpo). A loss without label
    smoothing (ipo) accepts None or 0 and rejects anything else rather than silently ignoring it.
    """
    try:
        loss_fn = PREFERENCE_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown preference loss {name!r}; valid names: {sorted(PREFERENCE_LOSSES)}") from None
    if label_smoothing is not None:
        if "label_smoothing" in inspect.signature(loss_fn).parameters:
            logps["label_smoothing"] = label_smoothing
        elif label_smoothing != 0:
            raise ValueError(f"preference loss {name!r} takes no label_smoothing (got {label_smoothing})")
    return loss_fn(beta=beta, **logps)


def reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """Batch means of the implicit rewards, [B] each -> floats.

    reward_accuracy counts strict wins only: a tie (e.g. at step 0, policy == reference) is not a win.
    """
    chosen, rejected = chosen_rewards.detach().double(), rejected_rewards.detach().double()
    return {
        "reward_margin": (chosen - rejected).mean().item(),
        "reward_accuracy": (chosen > rejected).float().mean().item(),
        "reward_chosen": chosen.mean().item(),
        "reward_rejected": rejected.mean().item(),
    }
