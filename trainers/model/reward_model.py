"""A scalar reward model on a causal-LM backbone, its Bradley-Terry loss and per-step functions, saving and loading.

The model is the transformer body of a causal LM (its LM head dropped) plus `nn.Linear(hidden, 1)`
read at the last real token of prompt + response, which for our data is the response's EOS: the
only position that has attended to the whole sequence. Training needs nothing but plain PyTorch;
`reward_loss` and `reward_train_step` take the model as an argument, so a Ray Train worker can pass
a DDP-wrapped one, and the data order comes from `ShardedBatches` (a pure function of seed and step).

A saved folder is a `save_pretrained` folder of the backbone (loadable alone with `AutoModel`, or
with `AutoModelForCausalLM` to start a policy or value model from it), the tokenizer, the head's
weights and a small JSON that says how to put them together.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModel

from trainers.data.collate import TokenizedPair, collate_preference_batch
from trainers.model.factory import load_model_and_tokenizer, load_tokenizer
from trainers.model.ppo_math import last_token_index

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"
FORMAT_NAME, FORMAT_VERSION = "probesweep-reward-model", 1


# ---------------------------------------------------------------------------------------------
# loss

class BradleyTerryOutput(NamedTuple):
    loss: Tensor       # scalar mean of -log sigmoid(chosen - rejected), to back-propagate
    accuracy: Tensor   # detached: share of pairs with chosen strictly above rejected (a tie is a miss)
    margin: Tensor     # detached: mean of chosen - rejected


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor) -> BradleyTerryOutput:
    """Negative log-likelihood of the preferences under Bradley-Terry, P(y+ > y-) = sigmoid(s+ - s-).

    Only score differences matter, so the scale's zero is arbitrary (PPO whitening or a baseline
    takes care of it). `logsigmoid` keeps the loss finite for any margin. Inputs [B] each.
    """
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.dim() != 1:
        raise ValueError(f"chosen and rejected scores must share one shape [B], got "
                         f"{tuple(chosen_scores.shape)} and {tuple(rejected_scores.shape)}")
    margins = chosen_scores - rejected_scores
    loss = -F.logsigmoid(margins).mean()
    detached = margins.detach()
    return BradleyTerryOutput(loss, (detached > 0).to(margins.dtype).mean(), detached.mean())


# ---------------------------------------------------------------------------------------------
# model

def _new_head(hidden_size: int, seed: int, dtype: torch.dtype) -> nn.Linear:
    """A seeded head whose initial scores have a spread of about 1 / sqrt(hidden) of the features'
    scale: small, so the first steps shape the backbone instead of fighting a random ranking."""
    head = nn.Linear(hidden_size, 1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / math.sqrt(hidden_size + 1), generator=generator)
        head.bias.zero_()
    return head.to(dtype)


class RewardModel(nn.Module):
    """backbone (a transformers base model returning `last_hidden_state`) + linear head -> one score per row."""

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None, *, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        hidden_size = backbone.config.hidden_size
        dtype = next(backbone.parameters()).dtype
        self.head = head if head is not None else _new_head(hidden_size, seed, dtype)
        if self.head.in_features != hidden_size or self.head.out_features != 1:
            raise ValueError(f"head must map {hidden_size} features to 1, got {self.head}")

    @classmethod
    def from_causal_lm(cls, name_or_path: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
        """(reward model, tokenizer) from `load_model_and_tokenizer`: its body, a fresh head seeded by `seed`."""
        lm, tokenizer = load_model_and_tokenizer(name_or_path, seed=seed, dtype=dtype)
        return cls(lm.base_model, seed=seed), tokenizer

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Scores [B] of rows [B, T], padded on either side (attention_mask 0 on padding).

        Positions count real tokens only, so a row's score does not depend on how much padding
        the batch gave it (with left padding too).
        """
        if not bool(attention_mask.any(-1).all()):
            raise ValueError("every row needs at least one real token (attention_mask all zero in some row)")
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_index(attention_mask).to(hidden.device)]
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1)

    def save_pretrained(self, directory: str | Path, tokenizer=None, extra: dict | None = None) -> None:
        """Backbone (Hugging Face format), head weights, JSON description; the tokenizer if given."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(directory)
        save_file({name: p.detach().cpu().contiguous() for name, p in self.head.state_dict().items()}, directory / HEAD_FILE)
        meta = {**(extra or {}), "format": FORMAT_NAME, "version": FORMAT_VERSION, "head_file": HEAD_FILE,
                "hidden_size": self.head.in_features, "backbone_class": type(self.backbone).__name__,
                "score_position": "last token with attention_mask 1",
                "position_ids": "cumulative count of real tokens minus 1"}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None) -> "RewardModel":
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory} is not a saved reward model (no {META_FILE})")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: unsupported format {meta.get('format')!r} version {meta.get('version')!r}")
        backbone = AutoModel.from_pretrained(directory, **({"dtype": dtype} if dtype is not None else {}))
        head = nn.Linear(meta["hidden_size"], 1)
        head.load_state_dict(load_file(directory / meta["head_file"]))
        return cls(backbone, head.to(next(backbone.parameters()).dtype))


def load_reward_model(directory: str | Path, dtype: torch.dtype | None = None):
    """(reward model, tokenizer) from a folder written by `RewardModel.save_pretrained(..., tokenizer)`."""
    return RewardModel.from_pretrained(directory, dtype), load_tokenizer(str(directory))


# ---------------------------------------------------------------------------------------------
# one step, evaluation

def score_pairs(model, pairs: Sequence[TokenizedPair], pad_id: int) -> tuple[Tensor, Tensor]:
    """(chosen scores [B], rejected scores [B]) from one forward over 2B right-padded rows."""
    batch = collate_preference_batch(pairs, pad_id)
    device = next(model.parameters()).device
    scores = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return scores[: len(pairs)], scores[len(pairs):]


def reward_loss(model, pairs: Sequence[TokenizedPair], pad_id: int) -> tuple[Tensor, dict[str, float]]:
    """Loss to back-propagate (mean over the pairs) and detached metrics for logging."""
    chosen, rejected = score_pairs(model, pairs, pad_id)
    out = bradley_terry_loss(chosen, rejected)
    return out.loss, {"train/loss": out.loss.item(), "train/accuracy": out.accuracy.item(),
                      "train/margin": out.margin.item()}


def reward_train_step(model, optimizer: torch.optim.Optimizer, pairs: Sequence[TokenizedPair], pad_id: int,
                      max_grad_norm: float = 1.0, scheduler=None) -> dict[str, float]:
    """One optimizer step on one batch of pairs; returns its metrics."""
    model.train()
    loss, metrics = reward_loss(model, pairs, pad_id)
    loss.backward()
    if max_grad_norm > 0:
        metrics["train/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
    metrics["train/lr"] = optimizer.param_groups[0]["lr"]
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return metrics


@torch.no_grad()
def evaluate_reward_model(model, pairs: Sequence[TokenizedPair], pad_id: int, batch_size: int = 32) -> dict[str, float]:
    """Bradley-Terry loss, accuracy and margin over all `pairs`, pair-weighted (eval mode, no grad)."""
    if not pairs:
        raise ValueError("no evaluation pairs")
    was_training = model.training
    model.eval()
    try:
        chosen, rejected = zip(*(score_pairs(model, pairs[start:start + batch_size], pad_id)
                                 for start in range(0, len(pairs), batch_size)))
    finally:
        model.train(was_training)
    out = bradley_terry_loss(torch.cat(chosen), torch.cat(rejected))
    return {"eval/loss": out.loss.item(), "eval/accuracy": out.accuracy.item(), "eval/margin": out.margin.item()}
