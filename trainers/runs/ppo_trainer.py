"""PPO on a training worker: rollouts come from the rollout actor pool, updates happen here.

One step: this rank's prompts go to the actor pool (which holds the policy's last synced weights),
the rollouts are scored (rule or reward model), the trainer recomputes log-probs and values itself
(the engine's sampling log-probs are only compared: `ppo/logprob_mismatch`), per-token KL-penalised
rewards give GAE advantages, then `ppo_epochs` passes of `ppo_minibatches` clipped updates. After
the update rank 0 pushes the weights to the actors (every `rollout.sync_every` steps) and every rank
waits for it, so the next rollouts come from the new policy; each rollout records its version.
The math lives in `trainers.model.ppo_math` (pure functions). No Ray in this file: the pool is the Ray
actor pool (rollout.actors) or, by default, HF engines in this process (rollout.local_pool).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from rollout.interface import RolloutPoolLike, SamplingParams
from trainers.data.collate import collate_sequences
from trainers.data.seeds import derive_seed, rank_seed
from trainers.config import TrainConfig
from trainers.model.logprobs import gather_response_positions, response_token_logps
from trainers.runs.policy_trainer import PolicyTrainer, mean_across_ranks, unwrap
from trainers.model.ppo_math import (AdaptiveKLController, FixedKLController, entropy_from_logits, gae_advantages,
                               kl_penalized_rewards, masked_mean, masked_whiten, per_token_kl, ppo_policy_loss,
                               ppo_value_loss)
from trainers.model.rewards import make_reward_fn


class PolicyWithValue(nn.Module):
    """The causal LM plus a scalar value head on its last hidden states (one module, so DDP syncs both)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.normal_(self.value_head.weight, std=1e-3)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1)


def response_stats(model, batch: dict, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs [B, R], values [B, R], mean entropy (scalar), mask [B, R]) of the response tokens.

    The value at a response token is the head's output at the position that predicts it (the state
    before the token was chosen)."""
    device = next(model.parameters()).device
    logits, values = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
    labels = batch["labels"].to(device)
    logps, mask = response_token_logps(logits, labels, lengths)
    values, _ = gather_response_positions(values[:, :-1], labels, lengths)
    response_logits_index = gather_response_positions(
        torch.arange(logits.shape[1] - 1, device=device).expand(len(lengths), -1), labels, lengths)[0]
    response_logits = torch.gather(logits, 1, response_logits_index[..., None].expand(-1, -1, logits.shape[-1]))
    return logps, values, entropy_from_logits(response_logits, mask), mask


def reference_logps(reference, batch: dict, lengths: list[int]) -> torch.Tensor:
    device = next(reference.parameters()).device
    with torch.no_grad():
        logits = reference(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    return response_token_logps(logits, batch["labels"].to(device), lengths)[0]


class PPOTrainer(PolicyTrainer):
    def __init__(self, config: TrainConfig, rank: int = 0, world_size: int = 1, wrap_model=None,
                 pool: RolloutPoolLike | None = None):
        if pool is None:  # no Ray: one HF engine in this process, from the policy's start weights
            from rollout.local_pool import LocalRolloutPool

            pool = LocalRolloutPool.from_pretrained(config.init_checkpoint or config.model, seed=config.seed,
                                                    batch_size=config.micro_batch_size)
        super().__init__(config, rank, world_size, wrap_model, pool=pool)
        self.reward_fn = make_reward_fn(config.reward, self.tokenizer)
        self.kl_controller = (AdaptiveKLController(config.ppo_kl_coef, config.ppo_target_kl, config.ppo_kl_horizon)
                              if config.ppo_target_kl > 0 else FixedKLController(config.ppo_kl_coef))

    def trainable_model(self, model):
        torch.manual_seed(self.config.seed)
        return PolicyWithValue(model)

    def language_model(self):
        return unwrap(self.model).lm

    def _prompts(self) -> tuple[list[list[int]], list[str]]:
        indices = self.batches.batch(self.step)
        prompt_ids = [self.pairs[i].prompt_ids for i in indices]
        # the text the policy saw (after truncation; tokenized pairs may skip rows, so not data.pairs[i])
        return prompt_ids, self.tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)

    def train_step(self) -> dict[str, float]:
        config, started = self.config, time.perf_counter()
        prompt_ids, prompt_texts = self._prompts()
        params = SamplingParams(max_new_tokens=config.ppo_max_new_tokens, temperature=config.ppo_temperature,
                                seed=rank_seed(derive_seed(config.seed, self.step), self.rank, self.world_size))
        rollout = self.pool.generate(prompt_ids, params)
        if rollout.policy_version != self.policy_version:
            raise RuntimeError(f"rollouts came from policy version {rollout.policy_version}, expected {self.policy_version}")
        generation_s = rollout.info["seconds"]
        responses = [ids if ids else [self.tokenizer.eos_token_id] for ids in rollout.token_ids]
        lengths = [len(r) for r in responses]
        scores = self.reward_fn(prompt_texts, rollout.texts).float()
        batch = collate_sequences(prompt_ids, responses, self.tokenizer.pad_token_id)

        self.model.eval()
        with torch.no_grad():
            old_logps, old_values, _, mask = response_stats(self.model, batch, lengths)
        ref_logps = reference_logps(self.reference_model, batch, lengths)
        engine_logps = torch.zeros_like(old_logps)
        for row, values in enumerate(rollout.logprobs):
            engine_logps[row, : len(values)] = torch.tensor(values[: lengths[row]], dtype=old_logps.dtype)
        rewards = kl_penalized_rewards(scores, old_logps, ref_logps, mask, self.kl_controller.value, config.ppo_kl_estimator)
        advantages, returns = gae_advantages(rewards, old_values, mask, config.ppo_gamma, config.ppo_lam)
        advantages = masked_whiten(advantages, mask)
        sequence_kl = (per_token_kl(old_logps, ref_logps, mask, "k1").sum(-1)).mean()

        self.model.train()
        totals = {"ppo/policy_loss": 0.0, "ppo/value_loss": 0.0, "ppo/clipfrac": 0.0, "ppo/approx_kl": 0.0,
                  "ppo/entropy": 0.0, "train/loss": 0.0, "train/grad_norm": 0.0}
        rows = torch.arange(len(responses))
        size = len(responses) // config.ppo_minibatches
        updates = 0
        for _ in range(config.ppo_epochs):
            for part in rows.split(size):
                minibatch = {k: v[part] for k, v in batch.items()}
                part_lengths = [lengths[i] for i in part.tolist()]
                width = max(part_lengths)
                logps, values, entropy, part_mask = response_stats(self.model, minibatch, part_lengths)
                policy = ppo_policy_loss(logps, old_logps[part, :width], advantages[part, :width], part_mask, config.ppo_clip)
                value = ppo_value_loss(values, old_values[part, :width], returns[part, :width], part_mask, config.ppo_value_clip)
                loss = policy.loss + config.ppo_vf_coef * value.loss
                loss.backward()
                if config.max_grad_norm > 0:
                    totals["train/grad_norm"] += float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.max_grad_norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                updates += 1
                for key, amount in (("ppo/policy_loss", policy.loss), ("ppo/value_loss", value.loss),
                                    ("ppo/clipfrac", policy.clipfrac), ("ppo/approx_kl", policy.approx_kl),
                                    ("ppo/entropy", entropy), ("train/loss", loss)):
                    totals[key] += float(amount.detach()) if torch.is_tensor(amount) else float(amount)
        metrics = {k: v / updates for k, v in totals.items()}
        metrics.update({
            "ppo/reward": float(scores.mean()), "ppo/kl": float(sequence_kl), "ppo/kl_coef": self.kl_controller.value,
            "ppo/logprob_mismatch": float(masked_mean((engine_logps - old_logps).abs(), mask)),
            "ppo/response_length": float(sum(lengths) / len(lengths)),
            "ppo/returns": float(masked_mean(returns, mask)),
            "rollout/tokens_per_s": sum(lengths) / max(generation_s, 1e-9),
            "train/lr": self.scheduler.get_last_lr()[0],
        })
        self.scheduler.step()
        metrics = mean_across_ranks(metrics)
        self.kl_controller.update(metrics["ppo/kl"], len(responses) * self.world_size)
        self.step += 1
        if self.step % config.rollout.sync_every == 0:
            self.sync_weights()
        metrics["rollout/weight_sync_s"] = self.last_sync_s
        metrics.update(self.take_mismatch())  # rank 0, after this step's sync
        metrics["rollout/policy_version"] = float(self.policy_version)
        metrics["train/step_time_s"] = time.perf_counter() - started
        return metrics

    def state_dict(self) -> dict:
        return {**super().state_dict(), "kl_controller": self.kl_controller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.kl_controller.load_state_dict(state["kl_controller"])
