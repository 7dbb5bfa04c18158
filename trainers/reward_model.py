"""A scalar reward model on a causal-LM backbone, its Bradley-Terry loss, training, saving and loading.

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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModel

from trainers.batches import ShardedBatches
from trainers.collate import TokenizedPair, collate_preference_batch, load_training_pairs, tokenize_pairs
from trainers.data import load_preference_data
from trainers.models import load_model_and_tokenizer, load_tokenizer
from trainers.ppo_math import last_token_index

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


# ---------------------------------------------------------------------------------------------
# a whole training run

def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class RewardModelConfig:
    """One reward-model run. Data fields have TrainConfig's names, so `load_training_pairs` reads them."""
    model: str = _f("tiny-pythia-1m", "built-in size, a Hugging Face name or a local causal-LM folder (the backbone)")
    dataset: str = _f("builtin", "preference data, as in TrainConfig")
    train_split: str = _f("train", "split to train on")
    eval_split: str = _f("test", "held-out split for accuracy")
    max_train_pairs: int | None = _f(None, "use only the first N valid training pairs")
    max_eval_pairs: int | None = _f(None, "evaluate on only the first N held-out pairs")
    skip_bad_rows: bool = _f(False, "skip malformed rows instead of stopping at the first")
    max_prompt_tokens: int = _f(160, "prompts keep their last N tokens")
    max_response_tokens: int = _f(64, "responses keep their first N tokens (EOS included)")
    truncation: str = _f("truncate", "'truncate' or 'error', as in TrainConfig")
    lr: float = _f(1e-3, "peak AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(5, "linear warm-up steps, then constant")
    max_steps: int = _f(50, "optimizer steps")
    batch_size: int = _f(16, "pairs per step")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    eval_every: int = _f(25, "held-out evaluation every N steps (and at step 0 and the last step)")
    eval_batch_size: int = _f(32, "pairs per evaluation forward")
    seed: int = _f(0, "seed of backbone and head init and of the data order")

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.truncation not in ("truncate", "error"):
            raise ValueError(f"truncation must be 'truncate' or 'error', got {self.truncation!r}")

    def to_dict(self) -> dict:
        return asdict(self)


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
                                         max_rows=config.max_eval_pairs)
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
