"""A whole reward-model run: AdamW over Bradley-Terry pairs, held-out accuracy, saving (its config,
`RewardModelConfig`, lives with the other configs in trainers.config).

The model, its loss and its per-step functions live in trainers.model.reward_model; this is the
run around them, kept a plain function so a Ray Train worker or a test can call it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from trainers.config import RewardModelConfig  # noqa: F401  (defined with the other configs: light to import)
from trainers.data.batches import ShardedBatches
from trainers.data.collate import load_training_pairs, tokenize_pairs
from trainers.data.pairs import load_preference_data
from trainers.model.reward_model import RewardModel, evaluate_reward_model, reward_train_step


@dataclass
class RewardTrainingResult:
    model: RewardModel
    tokenizer: object
    evaluations: list[dict]        # {"step", "eval/loss", "eval/accuracy", "eval/margin"} per evaluation
    train_pairs: int
    eval_pairs: int
    seconds: float

    @property
    def accuracies(self) -> dict[int, float]:
        """Held-out accuracy by step."""
        return {e["step"]: e["eval/accuracy"] for e in self.evaluations}


def train_reward_model(config: RewardModelConfig, *, model: RewardModel | None = None, tokenizer=None,
                       output_dir: str | Path | None = None,
                       log: Callable[[int, dict[str, float]], None] | None = None) -> RewardTrainingResult:
    """Train on `config.train_split` with AdamW, evaluating held-out accuracy at step 0, every
    `eval_every` steps and at the end. `model`/`tokenizer` default to `config.model`'s body with a
    fresh head; `log(step, metrics)` sees every step's metrics; `output_dir` gets the final model."""
    started = time.perf_counter()
    if (model is None) != (tokenizer is None):
        raise ValueError("pass both model and tokenizer, or neither")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    try:
        if model is None:
            model, tokenizer = RewardModel.from_causal_lm(config.model, seed=config.seed)
        _, train_pairs, _ = load_training_pairs(config, tokenizer)
        eval_data = load_preference_data(config.dataset, config.eval_split, skip_bad_rows=config.skip_bad_rows,
                                         max_rows=config.max_eval_pairs, holdout_fraction=config.holdout_fraction)
        eval_pairs, _ = tokenize_pairs(tokenizer, eval_data.pairs, config.max_prompt_tokens, config.max_response_tokens,
                                       config.truncation, config.skip_bad_rows)
        pad_id = tokenizer.pad_token_id
        batches = ShardedBatches(train_pairs, config.batch_size, rank=0, world_size=1, seed=config.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        warmup = max(1, config.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))

        evaluations = [{"step": 0, **evaluate_reward_model(model, eval_pairs, pad_id, config.eval_batch_size)}]
        if log is not None:
            log(0, dict(evaluations[0]))
        for step in range(1, config.max_steps + 1):
            metrics = reward_train_step(model, optimizer, batches.batch(step - 1), pad_id, config.max_grad_norm, scheduler)
            if step % config.eval_every == 0 or step == config.max_steps:
                evaluation = {"step": step, **evaluate_reward_model(model, eval_pairs, pad_id, config.eval_batch_size)}
                evaluations.append(evaluation)
                metrics.update(evaluation)
            if log is not None:
                log(step, metrics)
    finally:
        torch.random.set_rng_state(generator_state)
    model.eval()
    if output_dir is not None:
        model.save_pretrained(output_dir, tokenizer, extra={"training_config": config.to_dict(),
                                                            "final_eval": evaluations[-1]})
    return RewardTrainingResult(model, tokenizer, evaluations, len(train_pairs), len(eval_pairs),
                                time.perf_counter() - started)
