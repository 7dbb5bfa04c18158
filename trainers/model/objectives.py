"""From a batch of tokenized pairs to a scalar loss and its metrics, for each training objective.

SFT trains on the chosen response only; the preference losses (dpo, cdpo, ipo) score chosen and
rejected in one concatenated forward and compare against the frozen reference model.
"""
from __future__ import annotations

from typing import Sequence

import torch

from trainers.data.collate import TokenizedPair, collate_preference_batch, collate_sequences
from trainers.config import TrainConfig
from trainers.model.logprobs import sequence_logps
from trainers.model.losses import preference_loss, reward_metrics, sft_loss


def forward_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    return sequence_logps(logits, batch["labels"].to(device))


def compute_loss(config: TrainConfig, model, pairs: Sequence[TokenizedPair], pad_id: int, reference_model=None,
                 reference_logps: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss to back-propagate (mean over the micro-batch) and detached metrics for logging.

    Preference losses take the reference log-probs precomputed (`reference_logps`: chosen, rejected)
    or run `reference_model` on the batch."""
    if config.loss == "sft":
        prompts, responses = [p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs]
        if config.sft_recipe == "both":  # Ren & Sutherland's remedy: SFT also lifts y- before DPO pushes it down
            prompts, responses = prompts * 2, responses + [p.rejected_ids for p in pairs]
        batch = collate_sequences(prompts, responses, pad_id)
        sums, means, counts = forward_logps(model, batch)
        loss = sft_loss(sums, counts)
        n = len(pairs)
        return loss, {"train/loss": loss.item(), "sft/logp_chosen": sums[:n].detach().mean().item(),
                      "sft/logp_tok_chosen": means[:n].detach().mean().item()}

    batch = collate_preference_batch(pairs, pad_id)
    n = len(pairs)
    sums, _, _ = forward_logps(model, batch)
    if reference_logps is not None:
        ref_chosen, ref_rejected = (t.to(sums.device, sums.dtype) for t in reference_logps)
    else:
        with torch.no_grad():
            ref_sums, _, _ = forward_logps(reference_model, batch)
        ref_chosen, ref_rejected = ref_sums[:n], ref_sums[n:]
    # 0 keeps the registered loss's own default (cdpo: 0.1); TrainConfig refuses it for a loss without one
    output = preference_loss(
        config.loss, beta=config.beta, label_smoothing=config.label_smoothing or None,
        policy_chosen=sums[:n], policy_rejected=sums[n:],
        ref_chosen=ref_chosen, ref_rejected=ref_rejected,
    )
    loss = output.losses.mean()
    metrics = {"train/loss": loss.item(),
               "dpo/logp_chosen": sums[:n].detach().mean().item(),
               "dpo/logp_rejected": sums[n:].detach().mean().item()}
    metrics.update({f"dpo/{k}": v for k, v in reward_metrics(output.chosen_rewards, output.rejected_rewards).items()})
    return loss, metrics
